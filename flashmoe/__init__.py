"""flashmoe: a Mixture-of-Experts layer for PyTorch whose GPU forward pass is one persistent
CUDA kernel; ``flashmoe.reference`` defines what it computes and is also the CPU backend."""

from .config import MoEConfig
from .errors import FlashMoEError, KernelUnavailable
from .functional import experts_forward, moe_forward
from .layer import FlashMoELayer
from .reference import MoEWeights, Routing

__version__ = "0.1.0"

__all__ = ["FlashMoELayer", "MoEConfig", "moe_forward", "experts_forward", "FlashMoEError",
           "KernelUnavailable", "MoEWeights", "Routing", "__version__"]
