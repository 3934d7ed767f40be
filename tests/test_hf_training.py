"""Training and saving a converted transformers model: the router logits reach transformers'
load-balancing loss, Mixtral's router jitter is applied, and unconvert + save_pretrained writes a
checkpoint plain transformers loads. Tiny random configs built locally, fp32."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from flashmoe import FlashMoELayer  # noqa: E402
from flashmoe.hf import convert, unconvert  # noqa: E402
from test_hf_convert import ids, logits  # noqa: E402
from test_hf_experts import SERVED, build, relative_error  # noqa: E402

AUX_LOSS_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]


def router_weight_grads(model) -> list:
    """The router weights' gradients, layer by layer, converted or not."""
    grads = []
    for module in model.modules():
        if isinstance(module, FlashMoELayer):
            grads.append(module.router_weight.grad)
        elif hasattr(module, "experts") and not isinstance(module, FlashMoELayer):
            router = getattr(module, "gate", None) or module.router
            grads.append(router.weight.grad)
    return grads


@pytest.mark.parametrize("model_type", AUX_LOSS_FAMILIES)
def test_aux_loss_is_transformers(model_type):
    model = build(model_type, **SERVED[model_type], router_aux_loss_coef=0.5).train()
    original = copy.deepcopy(model)
    convert(model)
    outputs = []
    for m in (original, model):
        out = m(input_ids=ids(), labels=ids(), output_router_logits=True)
        out.loss.backward()
        outputs.append(out)
    assert len(outputs[1].router_logits) == len(outputs[0].router_logits) == 2
    for mine, theirs in zip(outputs[1].router_logits, outputs[0].router_logits):
        assert relative_error(mine, theirs.float()) < 1e-5
    assert abs(float(outputs[1].aux_loss.detach()) - float(outputs[0].aux_loss.detach())) < 1e-5
    assert abs(float(outputs[1].loss.detach()) - float(outputs[0].loss.detach())) < 1e-5
    # the aux loss trains the routers as it did
    for mine, theirs in zip(router_weight_grads(model), router_weight_grads(original)):
        assert relative_error(mine, theirs) < 1e-4


def test_router_logits_recorded_when_transformers_hooked_before_convert():
    model = build("qwen3_moe", output_router_logits=True)
    expected = model(input_ids=ids()).router_logits        # installs transformers' hooks
    convert(model)
    recorded = model(input_ids=ids()).router_logits
    assert len(recorded) == 2
    assert all(relative_error(a, b) < 1e-5 for a, b in zip(recorded, expected))
    unconvert(model)                                        # and after going back
    assert len(model(input_ids=ids()).router_logits) == 2


def test_router_logits_are_not_computed_when_nothing_records_them(monkeypatch):
    model = build("mixtral")
    convert(model)
    seen = []
    original = FlashMoELayer.forward
    monkeypatch.setattr(FlashMoELayer, "forward",
                        lambda self, x, return_routing=False: seen.append(return_routing)
                        or original(self, x, return_routing))
    logits(model, ids())
    assert seen == [False, False]


def test_mixtral_router_jitter_is_applied_in_training():
    model = build("mixtral", router_jitter_noise=0.2).train()
    original = copy.deepcopy(model)
    convert(model)
    assert all(m.jitter_noise == 0.2 for m in model.modules() if isinstance(m, FlashMoELayer))
    losses = []
    for m in (original, model, model):
        torch.manual_seed(5)            # the same noise drawn for the same tensors
        losses.append(float(m(input_ids=ids(), labels=ids()).loss.detach()))
    assert abs(losses[1] - losses[0]) < 1e-5
    torch.manual_seed(6)
    assert abs(float(model(input_ids=ids(), labels=ids()).loss.detach()) - losses[1]) > 1e-6   # it is noise
    model.eval()
    original.eval()
    assert relative_error(logits(model, ids()), logits(original, ids())) < 1e-5      # none in eval


def test_save_after_unconvert_loads_in_plain_transformers(tmp_path):
    model = build("qwen2_moe").train()
    convert(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids(), labels=ids(), output_router_logits=True).loss.backward()
    optimizer.step()
    model.eval()
    trained = logits(model, ids())
    unconvert(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert not any(isinstance(m, FlashMoELayer) for m in reloaded.modules())
    assert relative_error(logits(reloaded.eval(), ids()), trained) < 1e-5
