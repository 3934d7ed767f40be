"""flashmoe.cuda_graphs: graphs captured per token count, replayed for any count up to the bound.
On the CPU the same object runs the padded forwards eagerly (the padding and the size choice
are tested here); the capture itself is a GPU test, also run by the bring-up kit."""

from __future__ import annotations

import pytest
import torch

from flashmoe import FlashMoELayer, MoEConfig, checks, cuda_graphs


def make(**kw):
    fields = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32")
    fields.update(kw)
    return MoEConfig(**fields)


def test_default_sizes_are_powers_of_two_up_to_the_bound():
    assert cuda_graphs.default_sizes(1) == [1]
    assert cuda_graphs.default_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert cuda_graphs.default_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def test_padded_replays_equal_the_layer_for_every_count():
    layer = FlashMoELayer(make(num_shared_experts=1), max_tokens=40)
    graphed = cuda_graphs.capture(layer)
    assert graphed.sizes == [1, 2, 4, 8, 16, 32, 40]
    with torch.no_grad():
        for t in (1, 3, 16, 17, 40, 0, 5):
            x = torch.randn(t, 16)
            out = graphed(x)
            assert out.shape == x.shape
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
        x = torch.randn(2, 3, 16)
        torch.testing.assert_close(graphed(x), layer(x), rtol=1e-5, atol=1e-6)


def test_what_cannot_replay_is_refused_with_the_reason():
    layer = FlashMoELayer(make(), max_tokens=8)
    graphed = cuda_graphs.capture(layer)
    with torch.no_grad(), pytest.raises(ValueError, match="captured for at most 8"):
        graphed(torch.randn(9, 16))
    with pytest.raises(RuntimeError, match="replays no autograd"):
        graphed(torch.randn(2, 16))                      # parameters require grad
    with pytest.raises(ValueError, match="give sizes"):
        cuda_graphs.capture(FlashMoELayer(make()))
    capped = FlashMoELayer(make(capacity_factor=1.0))
    graphed = cuda_graphs.capture(capped, sizes=[4, 16])
    with torch.no_grad():
        x = torch.randn(16, 16)
        torch.testing.assert_close(graphed(x), capped(x))
        with pytest.raises(ValueError, match="capacity factor.*only the captured sizes"):
            graphed(torch.randn(5, 16))
    cast = FlashMoELayer(make(), max_tokens=2)
    graphed = cuda_graphs.capture(cast)
    cast.bfloat16()
    with torch.no_grad(), pytest.raises(RuntimeError, match="capture again after casting"):
        graphed(torch.randn(2, 16, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_graphs_replay_the_kernel_correctly_with_changing_token_counts():
    # the same check the bring-up kit's robustness stage runs
    config = make(hidden_size=256, intermediate_size=128, num_experts=8, dtype="bfloat16",
                  num_shared_experts=1)
    ok, detail = checks.check_layer_graphs(config, torch.device("cuda"))
    assert ok, detail
