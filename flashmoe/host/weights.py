"""The layer's weights as the kernel reads them: checked views in the kernel's layouts and dtypes,
kept until a weight changes, and the TMA tensor maps the wgmma engine loads them through."""

from __future__ import annotations

import warnings

import torch

from ..config import MoEConfig
from ..reference import MoEWeights
from .spec import KernelSpec


class KernelWeights:
    """One backend's weight views. ``num_experts``: the experts the expert weights hold (all E, or
    a process-group rank's E / W); ``routing``: the kernels' routing ('given' reads no router)."""

    def __init__(self, config: MoEConfig, device: torch.device, num_experts: int, routing: str, emulate: bool):
        self.config, self.device, self.num_experts = config, device, num_experts
        self.routing, self.emulate = routing, emulate
        self._key = None
        self._views: dict = {}
        self._maps: dict = {}       # block_n -> TMA tensor maps of the views (wgmma specs)

    def views(self, w: MoEWeights) -> dict:
        """The weights in the layouts the kernel reads (name -> tensor). The router gets the
        shared-expert gate appended as row E (one fp32 matrix); rebuilt only when a weight changes."""
        cfg = self.config
        tensors = [w.router_weight, w.gate_up_proj, w.down_proj, w.selection_bias, w.shared_gate_up_proj,
                   w.shared_down_proj, w.shared_gate_weight, w.router_bias, w.gate_up_bias, w.down_bias]
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)
        if key == self._key:
            return self._views
        E, H = self.num_experts, cfg.hidden_size
        dt = cfg.torch_dtype

        def need(t, name, shape, dtype):
            if t is None:
                raise ValueError(f"the config needs weight {name} but it is None")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the kernel runs on {self.device}")
            view = t.to(dtype).contiguous()
            if view.data_ptr() % 16:
                # Rows move as 16-byte vectors (cp.async, TMA): a view at an odd offset into a
                # larger tensor is copied once, here, not faulted on in the kernel.
                warnings.warn(f"flashmoe: {name} does not start on a 16-byte boundary; the kernel uses an "
                              f"aligned copy of it", stacklevel=4)
                view = view.clone()
            return view

        keep = {"gate_up": need(w.gate_up_proj, "gate_up_proj", (E, cfg.up_rows, H), dt),
                "down": need(w.down_proj, "down_proj", (E, H, cfg.intermediate_size), dt)}
        if self.routing == "router":
            router = need(w.router_weight, "router_weight", (cfg.router_experts, H), torch.float32)
            if cfg.shared_expert_gate:
                router = torch.cat([router, need(w.shared_gate_weight, "shared_gate_weight", (1, H),
                                                 torch.float32)])
            keep["router"] = router
            if cfg.router_bias:
                keep["router_bias"] = need(w.router_bias, "router_bias", (cfg.router_experts,), torch.float32)
        if cfg.selection_bias:
            keep["bias"] = need(w.selection_bias, "selection_bias", (cfg.router_experts,), torch.float32)
        if cfg.expert_bias:
            keep["gate_up_bias"] = need(w.gate_up_bias, "gate_up_bias", (E, cfg.up_rows), dt)
            keep["down_bias"] = need(w.down_bias, "down_bias", (E, H), dt)
        if cfg.num_shared_experts:
            Is = cfg.shared_intermediate_total
            keep["shared_gate_up"] = need(w.shared_gate_up_proj, "shared_gate_up_proj",
                                          ((2 if cfg.gated else 1) * Is, H), dt)
            keep["shared_down"] = need(w.shared_down_proj, "shared_down_proj", (H, Is), dt)
        self._views, self._key = keep, key
        self._maps = {}                # the tensor maps point at the old views
        return keep

    def pointer(self, name: str) -> int:
        """The device address of view ``name`` (0: the config has no such weight)."""
        return self._views[name].data_ptr() if name in self._views else 0

    def maps(self, spec: KernelSpec) -> dict | None:
        """The views' TMA tensor maps for a wgmma spec (None for mma_sync); encoded on the host
        (no GPU work) once per set of views and B box (block_n: the prefill and decode tiles share
        one, the wide tile has its own), in the emulator's own format when emulating."""
        if spec.gemm != "wgmma":
            return None
        if spec.block_n not in self._maps:
            from . import tensormap
            encode = tensormap.emulated_weight_tensor_maps if self.emulate else tensormap.weight_tensor_maps
            try:
                maps = encode(spec, self.config, gate_up=self.pointer("gate_up"), down=self.pointer("down"),
                              num_experts=self.num_experts, shared_gate_up=self.pointer("shared_gate_up"),
                              shared_down=self.pointer("shared_down"))
            except (ValueError, RuntimeError) as e:   # e.g. a weight view that is not 16-byte aligned
                warnings.warn(f"flashmoe: no TMA tensor maps for the weights ({e}); the wgmma engine "
                              f"reads them with cp.async instead", stacklevel=4)
                maps = None
            self._maps[spec.block_n] = maps
        return self._maps[spec.block_n]
