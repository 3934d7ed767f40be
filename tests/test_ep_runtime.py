"""Expert parallelism across processes, without a GPU: per-peer transport choice, NVSHMEM
bootstrap from torch.distributed (nvshmem4py replaced by fakes where a real call needs a GPU),
version and heap-size errors, teardown order, the plan's NVSHMEM regions and the layer's choice
between the kernel and ep_forward."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist

from flashmoe import FlashMoELayer, MoEConfig, backend_select
from flashmoe.errors import KernelUnavailable
from flashmoe.host import heap as heap_mod
from flashmoe.host import plan as plan_mod
from flashmoe.host import runtime as rt
from flashmoe.host.spec import KernelSpec


# ---------------------------------------------------------------- per-peer transport choice

def test_peer_bases_pointer_where_nvshmem_ptr_gives_one():
    # 4 PEs, one rank each: PEs 0 and 1 share a node with us (nvshmem_ptr non-null), 2 and 3 not.
    mapped = {0: 0x1000_0000, 1: 0x2000_0000}
    bases = heap_mod.peer_bases(4, 1, 4096, lambda pe: mapped.get(pe, 0))
    assert bases == [0x1000_0000, 0x2000_0000, 0, 0]
    assert heap_mod.describe_transports(bases) == "peer pointers for ranks 0-1; NVSHMEM for ranks 2-3"


def test_peer_bases_virtual_ranks_on_one_pe_and_forced_nvshmem():
    bases = heap_mod.peer_bases(4, 4, 256, lambda pe: 0x5000 if pe == 0 else 0)
    assert bases == [0x5000, 0x5100, 0x5200, 0x5300]        # slice r of PE 0
    assert heap_mod.peer_bases(4, 4, 256, lambda pe: 0x5000, force_nvshmem=True) == [0] * 4
    assert heap_mod.describe_transports([0]) == "NVSHMEM for rank 0"
    with pytest.raises(ValueError, match="multiple"):
        heap_mod.peer_bases(3, 2, 256, lambda pe: 1)


# ---------------------------------------------------------------- environment, sizes, versions

def test_env_defaults_only_without_infiniband_and_never_override():
    assert rt.nvshmem_env_defaults(1, infiniband=True, environ={}) == {}
    one_host = rt.nvshmem_env_defaults(1, infiniband=False, environ={})
    assert one_host == {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_DISABLE_NCCL": "1",
                        "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}
    # Several hosts: the bootstrap must not be pinned to the loopback interface.
    assert "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME" not in rt.nvshmem_env_defaults(2, False, environ={})
    kept = rt.nvshmem_env_defaults(1, False, environ={"NVSHMEM_REMOTE_TRANSPORT": "ibrc"})
    assert "NVSHMEM_REMOTE_TRANSPORT" not in kept


def test_ibgda_is_refused_with_the_fix():
    for off in ({}, {"NVSHMEM_IB_ENABLE_IBGDA": "0"}, {"NVSHMEM_IB_ENABLE_IBGDA": "false"}):
        rt.check_remote_transport(off)
    with pytest.raises(rt.NvshmemUnavailable, match=r"NVSHMEM_IB_ENABLE_IBGDA='1'.*unset NVSHMEM_IB_ENABLE_IBGDA"):
        rt.check_remote_transport({"NVSHMEM_IB_ENABLE_IBGDA": "1"})


def test_parse_size():
    assert rt.parse_size("1073741824") == 1 << 30
    assert rt.parse_size("4G") == 4 << 30 and rt.parse_size("512m") == 512 << 20
    with pytest.raises(ValueError, match="NVSHMEM_SYMMETRIC_SIZE"):
        rt.parse_size("lots")


def test_version_mismatch_names_both_versions_and_the_fix():
    rt.check_versions("3.4.5", (3, 4, 5))
    with pytest.raises(rt.NvshmemUnavailable) as e:
        rt.check_versions("3.8.0", (3, 4, 5))
    text = str(e.value)
    assert "libnvshmem_host 3.8.0" in text and "NVSHMEM 3.4.5 headers" in text
    assert "nvidia-nvshmem-cu13==3.4.5" in text
    assert isinstance(e.value, KernelUnavailable)        # backend='auto' falls back on it


def test_headers_version_reads_the_installed_headers():
    pytest.importorskip("nvidia.nvshmem")
    from importlib.metadata import version
    assert ".".join(map(str, rt.headers_version())) == version("nvidia-nvshmem-cu13")


def test_missing_nvshmem4py_says_what_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_nvshmem(name, *a, **k):
        if name.startswith("nvshmem"):
            raise ImportError("No module named 'nvshmem'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_nvshmem)
    with pytest.raises(rt.NvshmemUnavailable, match="pip install 'nvshmem4py-cu13"):
        rt._import_nvshmem()


# ---------------------------------------------------------------- bootstrap with fakes

class FakeNvshmem:
    """nvshmem.core + nvshmem.bindings + cuda.core.Device, recording every call."""

    def __init__(self, version="3.8.0", p2p=(0,), heap_limit=1 << 20):
        self.calls, self.version, self.p2p, self.heap_limit = [], version, set(p2p), heap_limit
        self.core = types.SimpleNamespace(
            get_version=lambda: types.SimpleNamespace(libnvshmem_version=self.version),
            get_unique_id=self._uid, init=self._init, bytetensor=self._alloc,
            free_tensor=lambda t: self.calls.append(("free", t.numel())),
            finalize=lambda: self.calls.append(("finalize",)))
        self.bindings = types.SimpleNamespace(
            ptr=lambda addr, pe: addr if pe in self.p2p else 0,
            cumodule_init=lambda h: self.calls.append(("module_init", h)) or 0,
            cumodule_finalize=lambda h: self.calls.append(("module_finalize", h)),
            barrier_all_on_stream=lambda s: self.calls.append(("barrier",)))

        class Device:
            def __init__(dev, index):
                dev.index = index

            def set_current(dev):
                self.calls.append(("set_current", dev.index))
        self.Device = Device

    def _uid(self, empty=False):
        return ("uid", "empty" if empty else "real")

    def _init(self, **kw):
        self.calls.append(("init", kw["uid"], kw["rank"], kw["nranks"], kw["initializer_method"],
                           kw["device"].index))

    def _alloc(self, shape):
        if shape[0] > self.heap_limit:
            raise RuntimeError("nvshmem_malloc failed")
        return torch.ones(shape, dtype=torch.uint8)      # not zero: the runtime must zero it


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream)
    for key in (*rt.NO_IB_ENV, *rt.ONE_HOST_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(rt, "infiniband_present", lambda: False)
    yield dist.group.WORLD
    if rt.active_runtime() is not None:
        rt.active_runtime().close()
    dist.destroy_process_group()


def _fake(monkeypatch, **kw) -> FakeNvshmem:
    fake = FakeNvshmem(**kw)
    monkeypatch.setattr(rt, "_import_nvshmem", lambda: (fake.core, fake.bindings, fake.Device))
    monkeypatch.setattr(rt, "headers_version", lambda: (3, 8, 0))
    return fake


def test_bootstrap_from_process_group(one_rank_group, monkeypatch):
    fake = _fake(monkeypatch)
    runtime = rt.Runtime.from_process_group(one_rank_group, device=0)
    assert ("init", ("uid", "real"), 0, 1, "uid", 0) in fake.calls
    assert fake.calls.index(("set_current", 0)) < [c[0] for c in fake.calls].index("init")
    assert os.environ["NVSHMEM_REMOTE_TRANSPORT"] == "none"          # set before init
    assert os.environ["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] == "lo"
    assert rt.Runtime.from_process_group(one_rank_group) is runtime   # once per process
    assert "PE 0 of 1" in runtime.describe()


def test_heap_zeroed_with_per_peer_transports_and_teardown_order(one_rank_group, monkeypatch):
    fake = _fake(monkeypatch, p2p=(0,))
    with rt.Runtime.from_process_group(one_rank_group, device=0) as runtime:
        heap = runtime.allocate_heap(1, 1024, world=1)
        assert int(heap.tensor.sum()) == 0 and heap.bases == [heap.base] and not heap.uses_nvshmem
        assert fake.calls[-1] == ("barrier",)          # nobody writes before every PE zeroed
        forced = runtime.allocate_heap(1, 512, world=1, force_nvshmem=True)
        assert forced.bases == [0] and forced.uses_nvshmem
        runtime.register_kernel(1234)
        runtime.register_kernel(1234)                  # once per module
    names = [c[0] for c in fake.calls]
    assert names.count("module_init") == 1
    # Modules, then tensors, then finalize: a tensor freed after finalize crashes at exit.
    assert names[-4:] == ["module_finalize", "free", "free", "finalize"]
    assert runtime.closed and rt.active_runtime() is None
    runtime.close()                                    # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        runtime.allocate_heap(1, 16, world=1)


def test_heap_too_small_says_bytes_and_setting(one_rank_group, monkeypatch):
    _fake(monkeypatch, heap_limit=1000)
    runtime = rt.Runtime.from_process_group(one_rank_group, device=0)
    with pytest.raises(rt.HeapTooSmall) as e:
        runtime.allocate_heap(1, 5000, world=1)
    assert "needs 5000 bytes" in str(e.value) and "NVSHMEM_SYMMETRIC_SIZE" in str(e.value)


def test_bootstrap_refuses_mismatched_versions(one_rank_group, monkeypatch):
    fake = _fake(monkeypatch, version="3.4.5")
    with pytest.raises(rt.NvshmemUnavailable, match="3.4.5.*3.8.0"):
        rt.Runtime.from_process_group(one_rank_group, device=0)
    assert not any(c[0] == "init" for c in fake.calls)     # refused before initialising


# ---------------------------------------------------------------- plan and layer

def test_nvshmem_regions_exist_only_for_the_nvshmem_transport():
    config = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, dtype="bfloat16")
    peer = plan_mod.make_plan(config, KernelSpec(), world=4, max_tokens=100, num_local_ranks=1)
    nv = plan_mod.make_plan(config, KernelSpec(transport="nvshmem"), world=4, max_tokens=100,
                            num_local_ranks=1, first_local_rank=3)
    assert peer.regions["x_stage"].size == peer.regions["put_stage"].size == 0
    assert nv.regions["x_stage"].size == 100 * 64 * 2
    assert nv.regions["put_stage"].size == plan_mod.PUT_STAGE_TILES * 128 * 128 * 2
    assert nv.regions["recv_rows"].banked                 # one process per rank: peers bank
    with pytest.raises(ValueError, match="stages GEMM1 tiles"):
        plan_mod.make_plan(config, KernelSpec(transport="nvshmem"), world=1, max_tokens=8,
                           device=plan_mod.DeviceInfo(sm_count=300))


def test_group_choice_on_cpu_inputs_is_the_reference_without_a_collective(monkeypatch):
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    x = torch.zeros(3, 16)
    cache = {}
    assert backend_select.group_choose("auto", config, x, False, object(), cache) == "reference"
    assert "CUDA" in cache[x.device]
    with pytest.raises(KernelUnavailable, match="ep_forward"):
        backend_select.group_choose("kernel", config, x, False, object(), cache)


def test_group_backend_reasons_without_a_gpu():
    from flashmoe.host.group_backend import GroupBackend
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    assert "CUDA" in GroupBackend.unavailable_reason(config, "cpu")
    if not torch.cuda.is_available():
        assert GroupBackend.unavailable_reason(config, "cuda:0") == "torch sees no CUDA device"


def test_layer_with_a_one_rank_group_runs_unchanged(one_rank_group):
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
    layer = FlashMoELayer(config, process_group=one_rank_group)
    with torch.no_grad():
        out = layer(torch.randn(5, 16, dtype=torch.bfloat16))
    assert out.shape == (5, 16) and layer.last_backend == "reference"
