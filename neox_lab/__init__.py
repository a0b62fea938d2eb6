"""neox_lab: an einops GPT-NeoX with hook points on every stream, for interpretability and equivalence testing.

The file list is the architecture: config, rotary, attention (+ backends), mlp, layernorm, block, model,
heads, loading, hook_points / hook_registry / hooked, activation_cache, kv_cache, generation, tokenizer;
then the tools built on them: interventions, patching, disk_cache, plotting, demo, testing.

Names are imported on first use, so `import neox_lab` (and the pytest plugin it registers) costs no
torch import until something is actually used.
"""

from __future__ import annotations

import importlib

from .version import __version__  # noqa: F401 - the package's version, as neox_lab.__version__

_EXPORTS = {
    "ActivationCache": "hooks.activation_cache",
    "ActivationStore": "store.reader",
    "CachedActivations": "store.reader",
    "CheckpointError": "model.loading",
    "HookError": "hooks.points",
    "HookPoint": "hooks.points",
    "KVCache": "model.kv_cache",
    "NeoXConfig": "config",
    "PRESETS": "config",
    "NeoXForCausalLM": "model.tasks",
    "NeoXForQuestionAnswering": "model.tasks",
    "NeoXForSequenceClassification": "model.tasks",
    "NeoXForTokenClassification": "model.tasks",
    "NeoXModel": "model.base",
    "NeoXOutput": "model.outputs",
    "NeoXTokenizer": "tokenizer",
    "cache_dataset": "store.writer",
    "hook_names": "hooks.registry",
    "load_default": "default_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neox_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
