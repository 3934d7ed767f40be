"""flashmoe inside Hugging Face transformers 5.

``blocks``: ``from_hf`` / ``config_from_hf``, one sparse-MoE block into a FlashMoELayer.
``convert``: ``convert`` / ``unconvert``, every sparse-MoE block of a model at once and back.
``activations``: what experts and shared MLPs compute between their projections, found by running them.
``experts``: ``experts_implementation="flashmoe"``, registered in transformers' ExpertsInterface
when this package is imported (``import flashmoe`` alone does not import transformers).
"""

from .activations import HIDDEN_ACTS
from .blocks import FAMILIES, config_from_hf, detect_family, from_hf
from .convert import ConversionReport, convert, unconvert

__all__ = ["FAMILIES", "HIDDEN_ACTS", "config_from_hf", "detect_family", "from_hf", "convert",
           "unconvert", "ConversionReport", "register_experts_implementation"]

try:
    import transformers.integrations.moe  # noqa: F401
except ImportError:         # from_hf and convert need only torch; the interface needs transformers
    register_experts_implementation = None
else:
    from .experts import register as register_experts_implementation
    register_experts_implementation()
