"""neox_lab: an einops GPT-NeoX with hook points on every stream, for interpretability and equivalence testing.

The file list is the architecture: config, rotary, attention (+ backends), mlp, layernorm, block, model,
heads, loading, hook_points / hook_names / hooked, activation_cache, kv_cache, generation, tokenizer;
then the tools built on them: interventions, patching, disk_cache, plotting, demo, testing.
"""

from .activation_cache import ActivationCache
from .cached_activations import CachedActivations
from .config import PRESETS, NeoXConfig
from .default_model import load_default
from .disk_cache import cache_dataset
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
from .tokenizer import NeoXTokenizer

__all__ = [
    "ActivationCache", "CachedActivations", "CheckpointError", "HookError", "HookPoint", "KVCache", "NeoXConfig",
    "NeoXForCausalLM", "NeoXForQuestionAnswering", "NeoXForSequenceClassification", "NeoXForTokenClassification",
    "NeoXModel", "NeoXOutput", "NeoXTokenizer", "PRESETS", "cache_dataset", "hook_names", "load_default",
]
__version__ = "0.1.0"
