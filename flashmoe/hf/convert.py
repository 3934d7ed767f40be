"""``convert`` / ``unconvert``: every sparse-MoE block of a transformers model into a
FlashMoELayer, and back.

A candidate block is a block of a class flashmoe knows, or the parent of an experts module: a
module holding 3-D expert tensors ``down_proj`` and ``gate_up_proj`` (or ``up_proj``), as
transformers 5 stores nearly every family's experts. So blocks are found wherever they sit
(``mlp``, ``feed_forward``, ``block_sparse_moe``, ...) and dense layers are left alone. Each
candidate goes through ``FlashMoELayer.from_hf``; the blocks it refuses stay as they are, with its
reason in the report.

Inside the model a converted layer keeps what transformers expects of the block:

- router logits: where the model records ``router_logits`` (``output_router_logits=True``,
  the load-balancing loss) from the block's router, the layer holds a parameter-free stand-in
  of the router's class at the router's path, whose output transformers records: the layer's
  fp32 router logits, differentiable. They are computed only once something records them.
- router jitter (Mixtral, DBRX): applied in training mode by the layer itself (``jitter_noise``).
- saving: a converted model's ``state_dict`` holds flashmoe's tensor names, which plain
  transformers does not load. ``unconvert(model)`` puts the original blocks back, with the
  layers' current weights written into them, so ``save_pretrained`` then writes an ordinary
  checkpoint; ``convert`` again to go on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layer import FlashMoELayer


@dataclass
class ConversionReport:
    """What ``convert`` did: module path -> block class for the blocks it converted, and
    module path -> reason for the candidate blocks it left as they are."""

    converted: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} block(s), left {len(self.left)}"]
        lines += [f"  converted {path} ({name})" for path, name in self.converted.items()]
        lines += [f"  left {path}: {reason}" for path, reason in self.left.items()]
        return "\n".join(lines)


class TransformersMoELayer(FlashMoELayer):
    """A FlashMoELayer standing in for a transformers sparse-MoE block (made by ``convert``):
    it hands its router logits to the router stand-in transformers records, and keeps the
    original block, without its weights, for ``unconvert``."""

    def forward(self, x: torch.Tensor, return_routing: bool = False, input_ids: torch.Tensor | None = None):
        """As ``FlashMoELayer.forward`` (``input_ids``, which DeepSeek-V4's decoder layers pass,
        is not read)."""
        recorder = self._modules.get(self.__dict__.get("_recorder_name") or "")
        # transformers installs its recording hooks the first time outputs are requested;
        # before that nobody reads the logits, so they are not computed.
        if return_routing or recorder is None or not recorder._forward_hooks:
            return super().forward(x, return_routing=return_routing)
        out, routing = super().forward(x, return_routing=True)
        recorder(routing.logits)
        return (out, routing.logits) if self.returns_router_logits else out


class RouterLogits(nn.Module):
    """The router stand-in: returns the logits it is given at the position the model records
    (the rest None). Combined with a router class by ``_stand_in`` so transformers' recorder,
    which matches by class, finds it; it holds no parameters (the layer owns the router)."""

    def __init__(self, index: int):
        nn.Module.__init__(self)        # not the router class's: nothing of it is built
        self.index = index

    def forward(self, logits: torch.Tensor):
        return tuple(logits if i == self.index else None for i in range(self.index + 1))

    def extra_repr(self) -> str:
        return f"records the layer's router logits at output {self.index}"

    def __reduce__(self):
        return _stand_in, (type(self).__mro__[2], self.index), self.__dict__


_STAND_IN_CLASSES: dict = {}


def _stand_in(router_cls: type, index: int) -> RouterLogits:
    klass = _STAND_IN_CLASSES.get(router_cls)
    if klass is None:
        klass = type(f"{router_cls.__name__}Logits", (RouterLogits, router_cls),
                     {"__module__": __name__})
        _STAND_IN_CLASSES[router_cls] = klass
    recorder = klass.__new__(klass)
    RouterLogits.__init__(recorder, index)
    return recorder


@dataclass
class _Origin:
    """The block a layer replaced: its modules with the tensors the layer holds moved to the
    meta device (``released``: (module, name, is_parameter) of each), and where it sat."""

    block: nn.Module
    released: list
    dtype: torch.dtype
    router_name: str | None


def convert(model: nn.Module, **layer_kwargs) -> ConversionReport:
    """Replace every sparse-MoE block of ``model`` that ``FlashMoELayer.from_hf`` supports with
    the layer (weights moved over; ``layer_kwargs`` such as ``backend``, ``device``,
    ``max_tokens`` go to it). Returns a ``ConversionReport``; warns when nothing was converted.
    Save with ``unconvert(model)`` first (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}: expected a torch.nn.Module "
                        "(a transformers model)")
    report = ConversionReport()
    for path in _candidate_paths(model):
        block = model.get_submodule(path)
        try:
            layer = TransformersMoELayer.from_hf(block, **layer_kwargs)
            router_name = _attach_recorder(model, path, block, layer)
        except (TypeError, ValueError) as error:
            report.left[path] = str(error)
            continue
        layer.__dict__["_recorder_name"] = router_name
        layer.__dict__["_hf_origin"] = _Origin(block, _release(layer, block), layer.gate_up_proj.dtype,
                                               router_name)
        layer.train(block.training)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer)
        report.converted[path] = type(block).__name__
    if not report.converted:
        warnings.warn(f"flashmoe.hf.convert converted no block of {type(model).__name__}"
                      + (f": {report}" if report.left else ": it has no sparse-MoE block"),
                      UserWarning, stacklevel=2)
    return report


def unconvert(model: nn.Module) -> list[str]:
    """Put the original transformers blocks back in place of the layers ``convert`` made, with
    the layers' current weights (on the layer's device, in its dtype where the model was cast
    since), so ``save_pretrained`` writes a checkpoint plain transformers loads. Returns the
    module paths restored."""
    restored = []
    for path, layer in list(model.named_modules()):
        origin = layer.__dict__.get("_hf_origin") if isinstance(layer, TransformersMoELayer) else None
        if origin is None:
            continue
        if layer.world_size > 1:
            raise ValueError(f"{path} holds only its rank's experts ({layer.local_experts}); "
                             "gather every rank's experts before unconvert")
        block = _restore(layer, origin)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, block)
        restored.append(path)
    return restored


def _candidate_paths(model: nn.Module) -> list[str]:
    """Paths of the outermost modules that are a block class flashmoe knows (converts or
    refuses; DBRX's experts hold 2-D tensors, LongCat-Flash's more gate_up than down) or that
    hold an experts module (never the model itself)."""
    from .blocks import known_block
    paths = []
    for path, module in model.named_modules():
        if not path or isinstance(module, FlashMoELayer):       # its tensors look like experts
            continue
        candidate = path if known_block(module) else path.rpartition(".")[0] if _is_experts(module) else ""
        if candidate and candidate not in paths and not any(candidate.startswith(p + ".") for p in paths):
            paths.append(candidate)
    return paths


def _is_experts(module: nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (down, up)) \
        and up.shape[0] == down.shape[0]


def _release(layer: FlashMoELayer, block: nn.Module) -> list:
    """Move the block's tensors that the layer now holds to the meta device (no memory is kept
    twice); the others stay, for ``unconvert``. A tensor counts as held when the write-back
    views cover all of its elements."""
    covered: dict = {}
    with torch.no_grad():
        for view, _ in _write_back_pairs(layer, block):
            base = view if view._base is None else view._base
            covered[id(base)] = covered.get(id(base), 0) + view.numel()
    released = []
    for module in block.modules():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and covered.get(id(t)) == t.numel():
                released.append((module, name, name in module._parameters))
    for module, name, is_parameter in released:
        _replace(module, name, is_parameter, getattr(module, name).to("meta"))
    return released


def _replace(module: nn.Module, name: str, is_parameter: bool, t: torch.Tensor) -> None:
    if is_parameter:
        module._parameters[name] = nn.Parameter(t, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = t       # keeps the buffer's persistence


def _restore(layer: FlashMoELayer, origin: _Origin) -> nn.Module:
    block, device = origin.block, layer.gate_up_proj.device
    for module, name, is_parameter in origin.released:
        meta = getattr(module, name)
        _replace(module, name, is_parameter, torch.empty_like(meta, device=device))
    block.to(device)
    if layer.gate_up_proj.dtype != origin.dtype:       # the model was cast after convert
        block.to(layer.gate_up_proj.dtype)
    with torch.no_grad():
        pairs = _write_back_pairs(layer, block)
        # Each view must alias one of the block's tensors, else the write would land in a copy.
        tensors = {id(t) for t in (*block.parameters(), *block.buffers())}
        for view, value in pairs:
            base = view if view._base is None else view._base
            if id(base) not in tensors:
                raise RuntimeError(f"unconvert cannot write the layer's weights back into "
                                   f"{type(block).__name__}: from_hf reads a {tuple(view.shape)} "
                                   "tensor of it that is not a view of the block's own tensors")
            view.copy_(value)
    if origin.router_name:
        recorder, router = layer._modules[origin.router_name], getattr(block, origin.router_name)
        for hook in recorder._forward_hooks.values():
            if hook not in router._forward_hooks.values():
                router.register_forward_hook(hook)
    block.train(layer.training)
    layer.__dict__.pop("_hf_origin", None)
    return block


def _write_back_pairs(layer: FlashMoELayer, block: nn.Module) -> list:
    """(view into the block's tensors, layer tensor) for every tensor ``from_hf`` copied."""
    from .blocks import Conversion, weight_pairs
    return weight_pairs(Conversion(block), layer)


def _attach_recorder(model: nn.Module, path: str, block: nn.Module, layer: FlashMoELayer):
    """Give ``layer`` a stand-in for the block's router when the model records
    ``router_logits`` from it; returns the router's child name (None: nothing records it).
    Raises ValueError when the model records something the layer cannot give."""
    specs = _router_logit_specs(model, path)
    if not specs:
        return None
    for name, child in block.named_children():
        child_path = f"{path}.{name}"
        for spec in specs:
            if not _matches(spec, child, child_path):
                continue
            _check_recordable(block, child, spec.index, layer)
            recorder = _stand_in(type(child), spec.index)
            for hook in child._forward_hooks.values():      # hooks transformers already installed
                recorder.register_forward_hook(hook)
            layer.add_module(name, recorder)
            return name
    if any(_matches(spec, block, path) for spec in specs):
        raise ValueError(f"the model records router_logits from {type(block).__name__}'s own "
                         "output, which a converted layer does not give")
    return None


def _router_logit_specs(model: nn.Module, path: str) -> list:
    """The ``router_logits`` recorders of the innermost transformers model holding ``path``."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        records = getattr(owner, "_can_record_outputs", None)
        if records:
            specs = records.get("router_logits")
            if specs is None:
                return []
            return [_as_recorder(s) for s in (specs if isinstance(specs, list) else [specs])]
    return []


def _as_recorder(spec):
    from transformers.utils.output_capturing import OutputRecorder
    if isinstance(spec, OutputRecorder):
        return spec
    # transformers' shorthand: a class or a class-name suffix, recorded at output 1
    if isinstance(spec, str):
        return OutputRecorder(target_class=None, index=1, class_name=spec)
    return OutputRecorder(target_class=spec, index=1)


def _matches(spec, module: nn.Module, path: str) -> bool:
    # transformers matches a recorder by class or by a suffix of the module's path, then by
    # layer_name inside the path; the stand-in sits at the router's path, so it matches alike.
    if not ((spec.target_class is not None and isinstance(module, spec.target_class))
            or (spec.class_name is not None and path.endswith(spec.class_name))):
        return False
    return spec.layer_name is None or f".{spec.layer_name.strip('.')}." in f".{path}."


def _check_recordable(block: nn.Module, router: nn.Module, index: int, layer: FlashMoELayer) -> None:
    """The router's recorded output must be the router logits the layer computes: checked on
    a probe input run through the block (which calls its router as it does in the model), so
    a router recording something else is refused instead of misreported."""
    from ..reference import router_logits
    weight = next((p for p in router.parameters()), layer.router_weight)
    probe = torch.randn(1, 4, layer.config.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(weight.device, layer.gate_up_proj.dtype)
    seen = []
    handle = router.register_forward_hook(lambda module, args, output: seen.append(output))
    was_training = block.training
    block.eval()       # a training-mode block may add noise
    try:
        with torch.no_grad():
            block(probe.clone())
            # what the layer's forward returns as Routing.logits
            mine = router_logits(probe.reshape(-1, probe.shape[-1]), layer.router_weight,
                                 layer.router_bias)
    finally:
        handle.remove()
        block.train(was_training)
    theirs = seen[0] if len(seen) == 1 else None
    theirs = theirs[index] if isinstance(theirs, (tuple, list)) else theirs
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    if not (isinstance(theirs, torch.Tensor) and theirs.shape == mine.shape
            and float((theirs.float() - mine).abs().max()) <= tolerance * float(mine.abs().max())):
        raise ValueError(f"the model records output {index} of {type(router).__name__} as "
                         "router_logits, which is not the router logits flashmoe computes")
