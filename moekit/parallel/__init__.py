"""Expert parallelism on torch.distributed: groups, the all-to-all dispatcher, state re-sharding, the transform."""

from .core import *  # noqa: F401,F403
from .core import apply_expert_parallel, init_expert_parallel  # noqa: F401
