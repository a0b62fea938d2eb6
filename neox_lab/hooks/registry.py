"""The registry of hook names: the public contract, written once, with each stream's shape.

`hook_names(cfg)` lists every hook point a model built from `cfg` has; a test checks it against the
hook points actually present on the module tree.

Stream flags. TransformerLens hides a few streams behind config flags; neox_lab has the same flags,
as model methods (`model.set_use_split_qkv_input(True)`, ...). A flagged hook point is listed (by
`hook_names(cfg, flags=...)`, `model.hook_names()`, `model.hook_dict`, `run_with_cache()`) only while
its flag is on; naming it while the flag is off raises, saying which flag turns it on, so a hook behind
a flag can never silently not fire (TransformerLens' hooks behind flags do).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection

from ..axes import HEAD_READS, HEAD_WRITES, HEADS, LN_SCALE, LOGITS, MLP_ACTS, PATTERN, RESID
from ..config import NeoXConfig

#: Hooks on the whole model (before/after the blocks).
MODEL_HOOKS = {
    "hook_embed": RESID,
    "ln_final.hook_scale": LN_SCALE,
    "ln_final.hook_normalized": RESID,
    "ln_final.hook_ln_out": RESID,
}

#: LayerNorm streams: scale = sqrt(var + eps); normalized = (x - mean) / scale, before the affine weight
#: and bias (TransformerLens 3.x's meaning); ln_out = normalized * w + b, the output that feeds
#: attention / MLP / unembed (a name TransformerLens does not use, so no TransformerLens name changes meaning).
#: The same three streams by meaning, for code that maps another library's modules onto them.
LN_SCALE_HOOK, LN_STANDARDIZED_HOOK, LN_OUTPUT_HOOK = "hook_scale", "hook_normalized", "hook_ln_out"
LN_HOOKS = {LN_SCALE_HOOK: LN_SCALE, LN_STANDARDIZED_HOOK: RESID, LN_OUTPUT_HOOK: RESID}

#: Hooks of every block, relative to `blocks.{L}.`.
BLOCK_HOOKS = {
    "hook_resid_pre": RESID,
    **{f"ln1.{k}": v for k, v in LN_HOOKS.items()},
    "attn.hook_q": HEADS,
    "attn.hook_k": HEADS,
    "attn.hook_v": HEADS,
    "attn.hook_rot_q": HEADS,
    "attn.hook_rot_k": HEADS,
    "attn.hook_attn_scores": PATTERN,
    "attn.hook_pattern": PATTERN,
    "attn.hook_z": HEADS,
    "attn.hook_result": HEAD_WRITES,
    "hook_attn_out": RESID,
    **{f"ln2.{k}": v for k, v in LN_HOOKS.items()},
    "mlp.hook_pre": MLP_ACTS,
    "mlp.hook_post": MLP_ACTS,
    "hook_mlp_out": RESID,
    "hook_resid_post": RESID,
}

#: Only sequential-residual blocks have a stream between attention and MLP.
SEQUENTIAL_ONLY = {"hook_resid_mid": RESID}

#: TransformerLens' stream flags (the names of its config fields and of the models' setters without
#: `set_`) -> the block hook points each one turns on, relative to `blocks.{L}.`, with their shapes:
#: use_attn_in          hook_attn_in   the block's input (resid_pre) copied to every head, before ln1;
#:                                     each head's q, k and v are computed from its own copy
#: use_split_qkv_input  hook_q_input, hook_k_input, hook_v_input: the same per head and per stream
#:                                     (q, k, v each read their own copy), before ln1
#: use_hook_mlp_in      hook_mlp_in    the MLP's input before ln2: resid_pre on a parallel block,
#:                                     resid_mid on a sequential one
FLAG_HOOKS = {
    "use_attn_in": {"hook_attn_in": HEAD_READS},
    "use_split_qkv_input": {"hook_q_input": HEAD_READS, "hook_k_input": HEAD_READS, "hook_v_input": HEAD_READS},
    "use_hook_mlp_in": {"hook_mlp_in": RESID},
}
#: The flags under which ln1 normalises each head's input separately ([batch pos n_heads d_model]), so
#: its single-stream hook points (ln1.hook_scale, ...) do not exist: TransformerLens fires them three
#: times per forward there, with per-head shapes.
PER_HEAD_LN1 = ("use_attn_in", "use_split_qkv_input")

#: Hooks of the task heads (the unembedding / classifier output, per position).
HEAD_HOOKS = {"hook_logits": LOGITS}


def block_hook(layer: int, hook: str) -> str:
    """The full name of hook `hook` of block `layer`, e.g. ``block_hook(3, "attn.hook_z")``."""
    return f"blocks.{layer}.{hook}"


def layer_of(name: str) -> int | None:
    """The block a full hook name belongs to; None for the hooks before and after the blocks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def check_flags(flags: Collection[str]) -> None:
    """Raise for a name in `flags` that is not one of TransformerLens' stream flags."""
    unknown = sorted(set(flags) - set(FLAG_HOOKS))
    if unknown:
        raise ValueError(f"unknown stream flag(s) {unknown}; the flags are {sorted(FLAG_HOOKS)}")


def flag_of(hook: str) -> str | None:
    """The stream flag that turns hook `hook` (a full or block-relative name) on; None for the rest."""
    key = hook.split(".", 2)[2] if hook.startswith("blocks.") else hook
    return next((flag for flag, names in FLAG_HOOKS.items() if key in names), None)


def unavailable_reason(name: str, flags: Collection[str]) -> str | None:
    """Why hook point `name` (full or block-relative) does not exist while exactly the stream flags in
    `flags` are on, or None when it does."""
    key = name.split(".", 2)[2] if name.startswith("blocks.") else name
    flag = flag_of(key)
    if flag is not None and flag not in flags:
        return (f"it exists only while the stream flag {flag} is on: call model.set_{flag}(True) first "
                "(off by default, as in TransformerLens)")
    per_head = [f for f in PER_HEAD_LN1 if f in flags]
    if key.startswith("ln1.") and per_head:
        verb = "are" if len(per_head) > 1 else "is"
        return (f"while {' and '.join(per_head)} {verb} on, ln1 normalises each head's input separately, so its "
                "single-stream hook points do not exist; hook the per-head inputs (hook_q_input, hook_k_input, "
                f"hook_v_input or hook_attn_in) instead, or call model.set_{per_head[0]}(False)")
    return None


def block_hook_names(cfg: NeoXConfig, flags: Collection[str] | None = ()) -> dict[str, str]:
    """Hook names (relative to the block) and shapes of one block of this config, in forward order,
    with the stream flags in `flags` on. `flags=None`: every hook point a block holds, whatever the
    flags (what the module tree has)."""
    if flags is not None:
        check_flags(flags)
    on = set(FLAG_HOOKS) if flags is None else set(flags)
    names = {}
    for key, shape in BLOCK_HOOKS.items():
        # Where TransformerLens calls them: the per-head inputs before ln1, mlp_in before ln2.
        if key == "ln1.hook_scale":
            for flag in ("use_attn_in", "use_split_qkv_input"):
                if flag in on:
                    names.update(FLAG_HOOKS[flag])
        if key == "ln2.hook_scale" and "use_hook_mlp_in" in on:
            names.update(FLAG_HOOKS["use_hook_mlp_in"])
        if key.startswith("ln1.") and flags is not None and on & set(PER_HEAD_LN1):
            continue
        names[key] = shape
        if key == "hook_attn_out" and not cfg.use_parallel_residual:
            names.update(SEQUENTIAL_ONLY)
    return names


def hook_names(cfg: NeoXConfig, *, head: bool = True, flags: Collection[str] | None = ()) -> dict[str, str]:
    """Every hook name of a model built from `cfg`, mapped to its shape in the axis vocabulary, in forward
    order, with the stream flags in `flags` on (`FLAG_HOOKS`; None: every hook point, flagged or not)."""
    names = {"hook_embed": MODEL_HOOKS["hook_embed"]}
    block = block_hook_names(cfg, flags)
    for layer in range(cfg.num_hidden_layers):
        names.update({block_hook(layer, k): v for k, v in block.items()})
    names.update({k: v for k, v in MODEL_HOOKS.items() if k.startswith("ln_final")})
    if head:
        names.update(HEAD_HOOKS)
    return names


def unknown_hook_message(name: str, known: list[str], parallel: bool) -> str:
    """An error message for a hook name that does not exist, with the closest matches."""
    if flag_of(name) is not None and name.startswith("blocks."):
        return f"no hook point {name!r}: {unavailable_reason(name, ())}"
    if parallel and name.endswith("hook_resid_mid"):
        return (
            f"no hook point {name!r}: this model uses the parallel residual "
            "(resid_post = resid_pre + attn_out + mlp_out), so its blocks have no resid_mid stream; "
            "use hook_resid_pre (what attention and MLP both read) or hook_attn_out / hook_mlp_out"
        )
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"no hook point {name!r}{hint}"


# TransformerLens-style shorthand: cache["resid_post", 3] -> "blocks.3.hook_resid_post".
MODEL_SHORTHAND = {"embed": "hook_embed", "logits": "hook_logits"}
BLOCK_SHORTHAND = {  # short name -> hook name relative to its block
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
    # behind stream flags (FLAG_HOOKS)
    "attn_in": "hook_attn_in",
    "q_input": "hook_q_input",
    "k_input": "hook_k_input",
    "v_input": "hook_v_input",
    "mlp_in": "hook_mlp_in",
    # TransformerLens' long aliases (its get_act_name lookup)
    "attn": "attn.hook_pattern",
    "attn_logits": "attn.hook_attn_scores",
    "key": "attn.hook_k",
    "query": "attn.hook_q",
    "value": "attn.hook_v",
    "mlp_pre": "mlp.hook_pre",
    "mlp_post": "mlp.hook_post",
}
#: TransformerLens' spellings of the third element of a shorthand key (the sublayer).
_LAYER_TYPES = {"a": "attn", "attention": "attn", "m": "mlp", "b": None, "block": None, "blocks": None}
#: LayerNorm streams by short name: ("scale", 2, "ln2") is block 2's ln2, ("scale",) ln_final's.
LN_STREAMS = ("scale", "normalized", "ln_out")


def expand_shorthand(key: str | tuple, n_layers: int) -> str:
    """Turn ``"resid_post", 3`` / ``("scale", 2, "ln1")`` / ``"pattern1"`` style keys into a full hook name."""
    if isinstance(key, str):
        if key in MODEL_SHORTHAND:
            return MODEL_SHORTHAND[key]
        name, digits = key.rstrip("0123456789"), key[len(key.rstrip("0123456789")):]
        if digits and (name in BLOCK_SHORTHAND or name in LN_STREAMS):
            return expand_shorthand((name, int(digits)), n_layers)  # TransformerLens' "pattern1", "k6"
        return key
    name, *rest = key
    layer = rest[0] if rest else None
    if isinstance(layer, int) and layer < 0:
        layer += n_layers
    where = rest[1] if len(rest) > 1 else None
    where = _LAYER_TYPES.get(where, where)
    if name in LN_STREAMS:
        if layer is None or where == "ln_final":
            return f"ln_final.hook_{name}"
        return block_hook(layer, f"{where if where in ('ln1', 'ln2') else 'ln1'}.hook_{name}")
    if name in MODEL_SHORTHAND:
        return MODEL_SHORTHAND[name]
    if name not in BLOCK_SHORTHAND:
        raise KeyError(f"unknown shorthand {name!r}; known: {sorted(MODEL_SHORTHAND | BLOCK_SHORTHAND)}")
    if layer is None:
        raise KeyError(f"shorthand {name!r} needs a layer, e.g. ({name!r}, 0)")
    return block_hook(layer, BLOCK_SHORTHAND[name])


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' `utils.get_act_name`: the full hook name of a short one, e.g.
    ``get_act_name("z", 3)`` -> "blocks.3.attn.hook_z", ``get_act_name("scale", 2, "ln2")``,
    ``get_act_name("pattern1")``. Negative layers are not counted back here (no model at hand)."""
    if layer is None and layer_type is None:
        full = expand_shorthand(name, n_layers=0)
        return full if full != name or "." in name or name.startswith("hook_") else expand_shorthand((name,), 0)
    return expand_shorthand((name, layer, layer_type), n_layers=0)
