"""moekit: Mixture-of-Experts models in PyTorch.

Public API re-exports only; see ../DESIGN.md-style overview in README.md.
"""

__version__ = "0.1.0"

from .config import MoEConfig
from .moe.layers import MixtureOfDepths, MoELayer, ResidualMoE, pyramid_schedule
from .moe.routing import Routing

__all__ = ["MoEConfig", "MoELayer", "ResidualMoE", "MixtureOfDepths", "pyramid_schedule", "Routing", "__version__"]
