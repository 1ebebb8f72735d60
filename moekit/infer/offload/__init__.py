"""Expert offloading: budgets, slow tiers, the offloader and its statistics."""

from .core import *  # noqa: F401,F403
from .core import offload_model  # noqa: F401
