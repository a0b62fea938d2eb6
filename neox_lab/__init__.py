"""neox_lab: an einops GPT-NeoX with hook points on every stream, for interpretability and equivalence testing."""

from .activation_cache import ActivationCache
from .config import PRESETS, NeoXConfig
from .default_model import load_default
from .heads import (
    NeoXForCausalLM,
    NeoXForQuestionAnswering,
    NeoXForSequenceClassification,
    NeoXForTokenClassification,
)
from .hook_names import hook_names
from .hook_points import HookError, HookPoint
from .kv_cache import KVCache
from .loading import CheckpointError
from .model import NeoXModel
from .outputs import NeoXOutput

__all__ = [
    "ActivationCache", "CheckpointError", "HookError", "HookPoint", "KVCache", "NeoXConfig", "NeoXForCausalLM",
    "NeoXForQuestionAnswering", "NeoXForSequenceClassification", "NeoXForTokenClassification", "NeoXModel",
    "NeoXOutput", "PRESETS", "hook_names", "load_default",
]
__version__ = "0.1.0"
