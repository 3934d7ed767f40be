"""FlashMoELayer: parameters, input checks, backend choice, state_dict, autograd."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from flashmoe import FlashMoELayer, KernelUnavailable, MoEConfig, reference
from flashmoe import accuracy, backend_select

FULL = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32",
            scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True,
            num_shared_experts=2, shared_intermediate_size=4, shared_expert_gate=True)


def make(**kw):
    fields = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32")
    fields.update(kw)
    return MoEConfig(**fields)


def test_parameters_are_named_and_shaped_as_transformers_stores_them():
    layer = FlashMoELayer(MoEConfig(**{**FULL, "dtype": "bfloat16"}))
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()}
    assert shapes == {
        "router_weight": ((8, 16), torch.float32),
        "gate_up_proj": ((8, 16, 16), torch.bfloat16),
        "down_proj": ((8, 16, 8), torch.bfloat16),
        "selection_bias": ((8,), torch.float32),
        "shared_gate_up_proj": ((16, 16), torch.bfloat16),
        "shared_down_proj": ((16, 8), torch.bfloat16),
        "shared_gate_weight": ((1, 16), torch.float32),
    }
    assert "selection_bias" in dict(layer.named_buffers())


def test_plain_experts_and_no_extras():
    layer = FlashMoELayer(make(gated=False))
    assert set(layer.state_dict()) == {"router_weight", "gate_up_proj", "down_proj"}
    assert layer.gate_up_proj.shape == (8, 8, 16)
    assert layer.selection_bias is None and layer.shared_gate_weight is None


def test_init_is_random_and_scaled():
    layer = FlashMoELayer(MoEConfig(**FULL))
    for name, p in layer.named_parameters():
        p = p.detach()
        fan_in = p.shape[-1]
        assert 0.5 < float(p.std()) * fan_in ** 0.5 < 1.5, name
    assert torch.equal(layer.selection_bias, torch.zeros(8))
    # routing is neither uniform nor one expert for everything
    routing = layer(torch.randn(64, 16), return_routing=True)[1]
    assert len(torch.unique(routing.ids)) == 8


def test_forward_matches_the_reference_in_any_leading_shape():
    config = MoEConfig(**FULL)
    layer = FlashMoELayer(config, backend="reference")
    with torch.no_grad():
        layer.selection_bias.normal_()
    x = torch.randn(2, 3, 16)
    out, routing = layer(x, return_routing=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = reference.moe_forward(x, layer.weights(), config, math="fp32")
    assert torch.equal(out, expected)
    assert routing.ids.shape == (6, 2)
    assert torch.equal(routing.ids, reference.route(x.reshape(6, 16), layer.weights(), config).ids)
    assert layer.last_backend == "reference"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_output_is_the_mixed_math_within_the_accuracy_rule(dtype):
    config = make(dtype=dtype, num_shared_experts=1, top_k=3)
    layer = FlashMoELayer(config)
    x = torch.randn(40, 16, dtype=config.torch_dtype)
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == config.torch_dtype
        assert torch.equal(out, reference.moe_forward(x, layer.weights(), config, math="mixed"))
        ok, err, tol = accuracy.check(out, x, layer.weights(), config)
    assert ok and err > 0, (err, tol)


@pytest.mark.parametrize("shape", [(0, 16), (4, 0, 16)])
def test_zero_tokens(shape):
    layer = FlashMoELayer(MoEConfig(**FULL))
    out, routing = layer(torch.randn(shape), return_routing=True)
    assert out.shape == shape
    assert routing.ids.shape == (0, 2) and routing.kept.shape == (0, 2)


def test_bad_inputs_say_what_was_expected():
    layer = FlashMoELayer(make())
    with pytest.raises(ValueError, match=r"x has shape \(4, 15\): the last dimension must be hidden_size=16"):
        layer(torch.randn(4, 15))
    with pytest.raises(ValueError, match=r"x has shape \(\): the last dimension"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"x has dtype torch.int64: expected a floating-point tensor of dtype torch.float32"):
        layer(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but config.dtype is 'float32'"):
        layer(torch.randn(4, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x is on meta but the weights are on cpu"):
        layer(torch.empty(4, 16, device="meta"))
    with pytest.raises(TypeError, match=r"x is a list: expected a torch.Tensor"):
        layer([[0.0] * 16])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"backend='cuda': allowed are auto, kernel, reference"):
        FlashMoELayer(make(), backend="cuda")
    with pytest.raises(ValueError, match=r"virtual_world=3: must divide num_experts=8"):
        FlashMoELayer(make(), virtual_world=3)
    with pytest.raises(ValueError, match=r"virtual_world=0: must be an integer >= 1"):
        FlashMoELayer(make(), virtual_world=0)
    with pytest.raises(ValueError, match=r"max_tokens=0: must be None or an integer >= 1"):
        FlashMoELayer(make(), max_tokens=0)
    with pytest.raises(TypeError, match=r"config is a dict: expected a flashmoe.MoEConfig"):
        FlashMoELayer(dict(hidden_size=16))


def test_an_unsupported_cast_is_caught_at_forward():
    layer = FlashMoELayer(make()).double()
    assert layer.router_weight.dtype == torch.float32 and layer.config.dtype == "float32"
    with pytest.raises(TypeError, match=r"expert weights are torch.float64 \(after a cast\).*"
                                        r"layer.to\(torch.bfloat16\)"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    layer.float()
    assert layer(torch.randn(2, 16)).dtype == torch.float32


def test_state_dict_round_trip():
    config = MoEConfig(**FULL)
    a = FlashMoELayer(config)
    with torch.no_grad():
        a.selection_bias.normal_()
    torch.manual_seed(1)
    b = FlashMoELayer(config)
    x = torch.randn(9, 16)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert torch.equal(b.selection_bias, a.selection_bias)
    with pytest.raises(RuntimeError, match="shared_gate_weight"):
        FlashMoELayer(config.replace(shared_expert_gate=False)).load_state_dict(a.state_dict())


def test_virtual_world_does_not_change_the_reference_result():
    config = MoEConfig(**FULL)
    a = FlashMoELayer(config, virtual_world=1)
    b = FlashMoELayer(config, virtual_world=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 16)
    assert torch.equal(a(x), b(x))


def test_autograd_flows_through_the_reference_path():
    layer = FlashMoELayer(MoEConfig(**FULL))
    x = torch.randn(6, 16, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


# Backend choice. There is no GPU here: the kernel side is replaced by a fake that records calls.

def test_kernel_backend_on_cpu_raises_with_the_reason():
    layer = FlashMoELayer(make(), backend="kernel")
    with pytest.raises(KernelUnavailable, match=r"input is on cpu; the kernel runs on CUDA devices only"):
        layer(torch.randn(2, 16))


def test_auto_on_cpu_uses_the_reference():
    layer = FlashMoELayer(make())
    layer(torch.randn(2, 16))
    assert layer.last_backend == "reference"


def test_missing_kernel_module_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashmoe.host.backend", None)   # import raises ImportError
    cls, why = backend_select._import_kernel_backend()
    assert cls is None and why.startswith("kernel unavailable: ")
    with pytest.raises(KernelUnavailable, match="kernel unavailable"):
        backend_select.new_kernel(make(), "cuda", 1, None)


class FakeKernel:
    """Stands in for flashmoe.host.backend.KernelBackend: the reference, with calls recorded."""
    created = []
    reason = None

    @staticmethod
    def unavailable_reason(config, device, virtual_world):
        return FakeKernel.reason

    def __init__(self, config, device, virtual_world=1, max_tokens=None, **options):
        self.config, self.calls = config, []
        FakeKernel.created.append((config, device, virtual_world, max_tokens))

    def forward(self, x2d, weights, return_routing=False):
        assert x2d.dim() == 2 and x2d.is_contiguous()
        self.calls.append(x2d.shape)
        routing = reference.route(x2d, weights, self.config)
        out = reference.moe_forward(x2d, weights, self.config, routing=routing)
        return (out, routing) if return_routing else out


@pytest.fixture
def fake_kernel(monkeypatch):
    module = types.ModuleType("flashmoe.host.backend")
    module.KernelBackend = FakeKernel
    monkeypatch.setitem(sys.modules, "flashmoe.host.backend", module)
    FakeKernel.created, FakeKernel.reason = [], None
    # pretend the CPU is a CUDA device for the availability check only
    real = backend_select.kernel_unavailable_reason

    def on_any_device(config, device, virtual_world=1, process_group=None, emulate=False):
        return real(config, torch.device("cuda", 0), virtual_world, process_group, emulate)
    monkeypatch.setattr(backend_select, "kernel_unavailable_reason", on_any_device)
    return FakeKernel


def test_auto_uses_the_kernel_once_built_and_cached(fake_kernel):
    config = make()
    layer = FlashMoELayer(config, virtual_world=2, max_tokens=64)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out, routing = layer(x, return_routing=True)
        layer(x)
    assert layer.last_backend == "kernel"
    # max_tokens is per forward; the kernel sizes its buffers per virtual rank.
    assert fake_kernel.created == [(config, torch.device("cpu"), 2, 32)]
    assert layer._kernel.calls == [(15, 16), (15, 16)]
    assert out.shape == x.shape and routing.ids.shape == (15, 2)


def test_auto_falls_back_when_autograd_records(fake_kernel):
    layer = FlashMoELayer(make())
    layer(torch.randn(2, 16))                   # parameters require grad, grad mode on
    assert layer.last_backend == "reference" and not fake_kernel.created
    with pytest.raises(KernelUnavailable, match="computes no gradients"):
        FlashMoELayer(make(), backend="kernel")(torch.randn(2, 16))


def test_auto_falls_back_when_the_kernel_says_no(fake_kernel):
    fake_kernel.reason = "top_k=2 is not supported by this build"
    layer = FlashMoELayer(make())
    with torch.no_grad():
        layer(torch.randn(2, 16))
        assert layer.last_backend == "reference"
        with pytest.raises(KernelUnavailable, match="top_k=2 is not supported by this build"):
            FlashMoELayer(make(), backend="kernel")(torch.randn(2, 16))


@pytest.mark.parametrize("arch,smem,dtype,experts,uses", [
    ("sm_89", 99 * 1024, "float32", 8, "reference"),     # RTX 4090 / L40S: no fp32 pipeline fits 99 KiB
    ("sm_89", 99 * 1024, "bfloat16", 8, "kernel"),
    ("sm_90a", 227 * 1024, "bfloat16", 1024, "kernel"),  # a pipeline a stage shorter beside the big task map
])
def test_auto_falls_back_where_no_kernel_fits_the_gpus_shared_memory(monkeypatch, arch, smem, dtype, experts, uses):
    """The layer asks the device's shared memory before building anything: backend='auto' runs the
    reference where no pipeline fits, backend='kernel' raises saying so; where one does, the
    backend's kernels all fit beside the layer's task map."""
    from flashmoe.host import backend, launch
    from flashmoe.host.plan import DeviceInfo, make_plan
    info = DeviceInfo(sm_count=128, max_smem_per_block=smem, arch=arch)
    monkeypatch.setattr(backend, "cuda_device_arch", lambda device: (arch, None))
    monkeypatch.setattr(launch, "driver_problem", lambda: None)
    monkeypatch.setattr(backend, "_device_info", lambda device: info)
    config = make(hidden_size=64, intermediate_size=32, num_experts=experts, top_k=8, dtype=dtype)
    gpu = torch.device("cuda", 0)
    assert backend_select.choose("auto", config, gpu, grad=False) == uses
    if uses == "reference":
        with pytest.raises(KernelUnavailable, match=f"no {dtype} spec .* fits {smem} B of shared memory"):
            backend_select.choose("kernel", config, gpu, grad=False)
        return
    kernel = backend.KernelBackend.__new__(backend.KernelBackend)     # the spec choice only: no launch
    kernel.config, kernel.world, kernel.trace_capacity, kernel.device_info = config, 1, 0, info
    kernel._set_specs(None)
    for v in kernel.variants.values():
        assert make_plan(config, v.spec, max_tokens=256, device=info).smem_bytes <= smem


def test_reference_backend_never_asks_for_the_kernel(fake_kernel):
    layer = FlashMoELayer(make(), backend="reference")
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer.last_backend == "reference" and not fake_kernel.created


def test_moving_the_layer_rebuilds_the_kernel(fake_kernel):
    layer = FlashMoELayer(make())
    with torch.no_grad():
        layer(torch.randn(2, 16))
        layer.to("cpu")
        layer(torch.randn(2, 16))
    assert len(fake_kernel.created) == 2


def test_the_emulated_kernel_is_reachable_from_the_layer():
    # backend='emulated': the kernel's own source on the CPU emulator, for debugging without a GPU
    config = make(hidden_size=64, intermediate_size=32, dtype="bfloat16")
    layer = FlashMoELayer(config, backend="emulated", virtual_world=2,
                          kernel_options={"timeout_s": 2.0})
    x = torch.randn(37, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out, routing = layer(x, return_routing=True)
        ok, err, tol = accuracy.check(out, x, layer.weights(), config, routing=routing)
    assert layer.last_backend == "emulated" and layer._kernel.emulate
    assert ok, (err, tol)
    assert torch.equal(routing.ids, reference.route(x, layer.weights(), config).ids)
    with pytest.raises(KernelUnavailable, match="backend='emulated' cannot run: the kernel computes no gradients"):
        layer(x)
    with pytest.raises(KernelUnavailable, match="takes CPU tensors"):
        backend_select.choose("emulated", config, torch.device("meta"), False)
