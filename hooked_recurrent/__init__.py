"""hooked_recurrent: TransformerLens-style hooks on recurrent and hybrid language models.

`HookedRecurrentModel` wraps Hugging Face Qwen3.5 (Gated DeltaNet + gated attention) and Mamba-2
models and puts a named hook point on every state write, on the state, the gates and the reads,
with the TransformerLens API (`run_with_hooks`, `run_with_cache`, `hooks()`, `ActivationCache`).
"""

from .config import HookedRecurrentConfig
from .hook_points import HookPoint
from .model import HookedRecurrentModel
from .cache import RecurrentCache

__all__ = ["HookedRecurrentModel", "HookedRecurrentConfig", "HookPoint", "RecurrentCache"]
