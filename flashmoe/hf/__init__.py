"""flashmoe inside Hugging Face transformers 5.

``blocks``: ``from_hf`` / ``config_from_hf``, one sparse-MoE block into a FlashMoELayer.
"""

from .blocks import FAMILIES, HIDDEN_ACTS, config_from_hf, detect_family, from_hf

__all__ = ["FAMILIES", "HIDDEN_ACTS", "config_from_hf", "detect_family", "from_hf"]
