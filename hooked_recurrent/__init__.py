"""hooked_recurrent: TransformerLens-style hooks on recurrent and hybrid language models.

`HookedRecurrentModel` wraps Hugging Face models whose layers are matrix recurrences (Qwen3.5,
Mamba-2 and the other families of `hooked_recurrent.families`) and puts a named hook point on every
state write, on the state, the gates and the reads, with the TransformerLens API
(`run_with_hooks`, `run_with_cache`, `hooks()`, `ActivationCache`).
"""

from .config import HookedRecurrentConfig
from .hook_points import HookPoint
from .model import HookedRecurrentModel
from .cache import RecurrentCache

__all__ = ["HookedRecurrentModel", "HookedRecurrentConfig", "HookPoint", "RecurrentCache"]
