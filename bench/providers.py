"""The implementations a benchmark compares, behind one interface, plus the correctness check.

A provider has ``forward(x2d) -> out2d`` (what is timed) and ``checked(x2d) -> (out2d, Routing)``
(run once per row: the output and the routing it was computed under). Building one either
succeeds or raises ``Unavailable`` with the reason the row will print.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

import torch

from flashmoe import FlashMoELayer, accuracy, backend_select
from flashmoe.config import MoEConfig
from flashmoe.reference import MoEWeights, Routing

from . import baselines, hf_baseline


class Unavailable(Exception):
    """A provider cannot run here; the message says why."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line, for a status cell (some messages carry install advice below)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


@dataclass
class Provider:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    checked: Callable[[torch.Tensor], tuple[torch.Tensor, Routing]]
    # Called after the timed runs: surfaces an error a launch reported asynchronously.
    finish: Callable[[torch.Tensor], None] = lambda x: None
    # Called after the last row of the layer: gives back what outlives the provider otherwise.
    close: Callable[[], None] = lambda: None


def share_weights(dst: FlashMoELayer, src: FlashMoELayer) -> FlashMoELayer:
    """Make ``dst`` hold ``src``'s tensors (not copies: one Mixtral layer's experts are 2.8 GB)."""
    for name, t in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
        setattr(dst, name, t)
    return dst


# Kernel variants a run may add beside "flashmoe", so that one run measures what a choice gains:
# without the wide 128 x 256 tile; and without it, the 128 x 128 tile's consumer warpgroups
# cooperative (each a slab of every tile) instead of ping-pong (each whole tiles, in turn); and
# those cooperative tiles in the NVSHMEM build a process-group layer runs, on one PE (its writes
# to itself go through pointers as they do to NVLink peers): against flashmoe_cooperative, what
# that build costs on the same tiles and schedule; and the shipped tiles with a routed expert's
# tiles claimed row tile by row tile instead of in bands (KernelSpec.band_tiles = 1): what the
# bands gain (traced, each kind's mean record shows it in the GEMM tiles).
KERNEL_VARIANTS = ("flashmoe_128x128", "flashmoe_cooperative", "flashmoe_nvshmem", "flashmoe_rowtiles")


def flashmoe(source: FlashMoELayer, *, virtual_world: int = 1, max_tokens: int | None = None,
             dry_run: bool = False, variant: str = "flashmoe") -> Provider:
    """The flashmoe layer on ``source``'s weights, as provider ``variant`` ("flashmoe" or one of
    KERNEL_VARIANTS). On a GPU the kernel backend is forced (a silent fallback to the reference
    must never be timed as flashmoe); a dry run uses the reference backend."""
    config = source.config
    device = source.router_weight.device
    if not dry_run:
        reason = backend_select.kernel_unavailable_reason(config, device, virtual_world)
        if reason:
            raise Unavailable(f"flashmoe kernel: {reason}")
        if variant == "flashmoe_nvshmem":
            from flashmoe.host import runtime
            try:
                runtime._import_nvshmem()
            except runtime.NvshmemUnavailable as exc:
                raise Unavailable(one_line(exc)) from exc
    specs = {"spec": variant_specs(variant, config, device, virtual_world)} if variant != "flashmoe" and not dry_run \
        else {}
    if virtual_world == 1 and max_tokens in (None, source.max_tokens) and not specs:
        layer = source
    else:
        # Built on the meta device, then given the source's tensors. It records the kernel's trace
        # when its source does (bench_layer.py and sweep_ep.py --trace).
        traced = {k: v for k, v in source.kernel_options.items() if k == "trace_capacity"}
        layer = FlashMoELayer(config, backend=source.backend, virtual_world=virtual_world, device="meta",
                              max_tokens=max_tokens or source.max_tokens, kernel_options={**specs, **traced} or None)
        share_weights(layer, source)

    def checked(x2d):
        out, routing = layer(x2d, return_routing=True)
        want = "reference" if dry_run else "kernel"
        if layer.last_backend != want:
            raise Unavailable(f"flashmoe ran on the {layer.last_backend} backend, not the {want}")
        return out, routing

    def finish(x2d):
        # The kernel checks its error word after the launch (deferred): wait for every launch,
        # then one more forward reads the words of all of them.
        if x2d.device.type == "cuda":
            torch.cuda.synchronize(x2d.device)
        layer(x2d)
        if x2d.device.type == "cuda":
            torch.cuda.synchronize(x2d.device)

    def close():
        # The NVSHMEM heap is a fixed reservation, and its allocations are not freed with the layer.
        if variant == "flashmoe_nvshmem" and layer._kernel is not None:
            layer._kernel.close()

    return Provider(variant, layer, checked, finish, close)


def variant_specs(variant: str, config: MoEConfig, device, world: int = 1) -> list:
    """The specs of kernel variant ``variant`` on ``device`` for a layer of ``world`` ranks: its
    prefill and decode tiles without the wide one, for "flashmoe_cooperative" with every wgmma
    tile cooperative, and for "flashmoe_nvshmem" also built with the NVSHMEM transport; for
    "flashmoe_rowtiles" the layer's own tiles (the wide one too) in bands of one row tile."""
    from flashmoe.host.backend import _device_info
    from flashmoe.host.plan import kernel_specs, layer_specs
    if variant not in KERNEL_VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed are {', '.join(KERNEL_VARIANTS)}")
    info = _device_info(torch.device(device))
    if variant == "flashmoe_rowtiles":
        return [replace(s, band_tiles=1) for s in kernel_specs(config, world, info)]
    specs = layer_specs(config, world, info)
    if variant in ("flashmoe_cooperative", "flashmoe_nvshmem"):
        specs = [replace(s, schedule="cooperative") for s in specs]
    if variant == "flashmoe_nvshmem":
        specs = [replace(s, transport="nvshmem") for s in specs]
    return specs


def reserve_nvshmem_heap(configs: list[MoEConfig], max_tokens: int, device) -> str | None:
    """Size NVSHMEM's symmetric heap (fixed when NVSHMEM initialises) for the largest heap a
    "flashmoe_nvshmem" layer of ``configs`` needs at ``max_tokens``, plus 1 GiB for NVSHMEM's
    own, unless the user set it. Returns the size set (None: the user's stands)."""
    from flashmoe.host import runtime
    from flashmoe.host.backend import _device_info
    from flashmoe.host.plan import plan_tokens, variant_plans
    if runtime.HEAP_SIZE_ENV in os.environ:
        return None
    info = _device_info(torch.device(device))
    need = max(variant_plans(c, variant_specs("flashmoe_nvshmem", c, device), 1, plan_tokens(max_tokens),
                             info)[0].rank_heap_bytes for c in configs)
    size = runtime._round_up_size(need + (1 << 30))
    os.environ[runtime.HEAP_SIZE_ENV] = size
    return size


def kernel_tile(layer: FlashMoELayer) -> str | None:
    """The GEMM tile of ``layer``'s last kernel launch, as "BMxBN" (None: no kernel launch)."""
    tile = layer._kernel.last_tile() if layer._kernel is not None else None
    return "{}x{}".format(*tile) if tile else None


def torch_loop(config: MoEConfig, weights: MoEWeights) -> Provider:
    def checked(x2d):
        routing = baselines.torch_router(x2d, weights, config)
        return baselines.torch_loop(x2d, weights, config, routing), routing
    return Provider("torch_loop", lambda x: baselines.torch_loop(x, weights, config), checked)


def hf_grouped_mm(config: MoEConfig, weights: MoEWeights, family: str) -> Provider:
    try:
        module = hf_baseline.build(family, config, weights)
    except ImportError as exc:
        raise Unavailable(f"transformers is not importable: {one_line(exc)}") from exc
    except ValueError as exc:
        raise Unavailable(one_line(exc)) from exc

    def checked(x2d):
        return hf_baseline.forward(module, x2d), hf_baseline.routing(module, x2d)
    return Provider("hf_grouped_mm", lambda x: hf_baseline.forward(module, x), checked)


def bulk_sync(config: MoEConfig, weights: MoEWeights, world: int) -> Provider:
    if config.num_experts % world:
        raise Unavailable(f"num_experts={config.num_experts} is not divisible by W={world}")

    def checked(x2d):
        routing = baselines.torch_router(x2d, weights, config)
        return baselines.bulk_sync(x2d, weights, config, world, routing), routing
    return Provider("bulk_sync", lambda x: baselines.bulk_sync(x, weights, config, world), checked)


def check(out: torch.Tensor, x2d: torch.Tensor, weights: MoEWeights, config: MoEConfig,
          routing: Routing, reference_routing: Routing) -> dict:
    """The project's accuracy rule (``flashmoe.accuracy``) on ``out`` under the routing it was
    computed with, plus the share of tokens routed to the same expert set as the fp32 reference
    router (a router in bf16 disagrees on near-ties; a broken router disagrees everywhere)."""
    ok, err, tol = accuracy.check(out, x2d, weights, config, routing=routing)
    same = torch.equal(routing.ids.sort(dim=-1).values, reference_routing.ids.sort(dim=-1).values)
    if same:
        agree = 1.0
    else:
        match = (routing.ids.sort(dim=-1).values == reference_routing.ids.sort(dim=-1).values).all(dim=-1)
        agree = float(match.float().mean())
    return {"max_abs_err": err, "tol": tol, "correct": bool(ok), "route_agree": agree}
