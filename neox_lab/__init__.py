"""neox_lab: an einops GPT-NeoX with hook points on every stream, for interpretability and equivalence testing.

The folders are the architecture; each imports only what is listed below it (docs/architecture.md):

    cli, commands/        the `neox-lab` command line, one module per subcommand
    demo/, testing/       the demo; equivalence testing (compare, tolerances, the pytest plugin)
    dynamics/             training dynamics: a measurement swept over a model's training checkpoints
    default_model         the shipped model, and the one loader of what a --model argument names
    lens/                 the TransformerLens convention: `HookedTransformer`, a view of model/'s classes
    analysis/ | store/    interpretability tools | the on-disk activation store: neither imports the
                          other, nor model/ (they run either convention's class through its `hf()` view)
    model/                the NeoX core in transformers' convention: attention and its kernels, blocks,
                          task heads (`NeoXForCausalLM`...), loading, decoding
    hooks/                the hook contract: hook points, the registry of names, run_with_cache
    config, axes, dtypes, tokenizer, version, factored_matrix   the foundations, importing nothing from neox_lab

`neox_lab.patching`, `.interventions` and `.plotting` are aliases of the modules moved into analysis/.
The names below are imported on first use, so `import neox_lab` costs no torch import until one is.
"""

from __future__ import annotations

import importlib

from .version import __version__  # noqa: F401 - the package's version, as neox_lab.__version__

_EXPORTS = {
    "ActivationCache": "hooks.activation_cache",
    "ActivationStore": "store.reader",
    "ActivationStream": "store.stream",
    "CachedActivations": "store.reader",
    "CheckpointError": "model.loading",
    "FactoredMatrix": "factored_matrix",
    "HookError": "hooks.points",
    "HookPoint": "hooks.points",
    "HookedTransformer": "lens.hooked_transformer",
    "KVCache": "model.kv_cache",
    "LensConfig": "lens.config",
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
    "get_act_name": "hooks.registry",
    "get_checkpoint_labels": "model.checkpoints",
    "load_default": "default_model",
    "sweep_checkpoints": "dynamics.sweep",
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
