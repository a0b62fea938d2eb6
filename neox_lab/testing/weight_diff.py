"""The second layer of evidence: a tensor-by-tensor diff of two models' weights, when they have the
same shapes, naming the tensor, the layer and, inside attention weights, the head and q/k/v part.

Parameters are matched under neox_lab's names relative to the body (`blocks.3.attn.qkv.weight`,
`embed.weight`, `unembed.weight`); a transformers model's names are translated. Two copies of one
checkpoint loaded in dtypes a and b hold each element rounded to nearest from one original x, so
|a - b| <= (u_a + u_b) |x| elementwise (plus the coarser format's subnormal spacing). Anything past
that is a changed weight: exact, so a single element scaled by (1 + 1e-3) is caught in any dtype
finer than bf16.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..model.loading import hf_to_neox_key
from ..model.placement import stored_state_dict
from .tolerance import SUBNORMAL_SPACING, UNIT_ROUNDOFF

PARTS = ("query", "key", "value")


@dataclass
class TensorResult:
    """One parameter: normwise rel = ||a - b|| / ||b||, the count of elements past the rounding bound,
    and where they are (`heads`, `parts` for the fused QKV and the attention output)."""

    name: str
    layer: int | None
    shape: list[int]
    max_abs: float
    rel: float
    n_changed: int
    heads: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    passed: bool = True
    accepted_as: str | None = None  # "lossy" when the lossy mode let a changed tensor pass
    n_heads: int = 0

    def where(self) -> str:
        """In words: "layer 3, head 5, query rows of the fused QKV weight"."""
        bits = [] if self.layer is None else [f"layer {self.layer}"]
        if self.heads and len(self.heads) == self.n_heads > 1:
            bits.append("every head")
        elif self.heads:
            bits.append(("head " if len(self.heads) == 1 else "heads ") + ", ".join(map(str, self.heads)))
        what = _kind(self.name)
        if self.parts:
            what = f"{'/'.join(self.parts)} rows of {what}"
        bits.append(what)
        return ", ".join(bits)


@dataclass
class WeightDiff:
    """Every shared parameter compared; `only_a` / `only_b` list parameters one side lacks."""

    tensors: list[TensorResult]
    only_a: list[str]
    only_b: list[str]
    rounding: str  # the formats the elementwise bound was derived for
    lossy_floor: float | None = None  # set by the lossy mode: the relative error a tensor may have
    swapped_layers: list[tuple[int, int]] = field(default_factory=list)  # blocks exchanged wholesale
    #: parameters without a counterpart that do not fail: those of a replaced module (a fused MLP in a
    #: transformers model), and, with a weight map, the port tensors it leaves out; the activations judge them
    unmatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # weight-map entries that could not be compared (fail)

    @property
    def changed(self) -> list[TensorResult]:
        return [t for t in self.tensors if t.n_changed]

    @property
    def failures(self) -> list[TensorResult]:
        return [t for t in self.tensors if not t.passed]

    @property
    def passed(self) -> bool:
        return not self.failures and not self.only_a and not self.only_b and not self.problems


def named_weights(model) -> dict[str, torch.Tensor]:
    """A neox_lab or transformers model's parameters under neox_lab body-relative names (tied ones
    under each of their names; a transformers module neox_lab has no name for keeps its own path,
    with the body prefix translated, e.g. `blocks.0.mlp.fused.weight`)."""
    hf = not hasattr(model, "hook_dict")
    out = {}
    for key, p in stored_state_dict(model).items():  # offloaded parts of a placed model included
        if hf:
            name = hf_to_neox_key(key, bare=True)
            if name == key:
                name = _HF_LAYER.sub(r"blocks.\1.", key.removeprefix("gpt_neox."))
        else:
            name = key.removeprefix("model.")
        out[name] = p
    return out


_HF_LAYER = re.compile(r"^layers\.(\d+)\.")


def diff_weights(model_a, model_b, n_heads: int) -> WeightDiff:
    """Compare the parameters of two models of one shape (see the module docstring for the bound)."""
    return diff_named(named_weights(model_a), named_weights(model_b), n_heads)


def diff_named(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], n_heads: int) -> WeightDiff:
    """`diff_weights` on {neox_lab name: tensor} dicts. A name one side lacks fails, unless that side
    holds other parameters in the same module (its module was replaced): then both are listed in
    `unmatched` and left to the activations."""
    tensors = []
    formats = set()
    for name, tb in wb.items():
        ta = wa.get(name)
        if ta is None or tuple(ta.shape) != tuple(tb.shape):
            continue
        fa, fb = _fmt(ta.dtype), _fmt(tb.dtype)
        formats.update((fa, fb))
        tensors.append(_diff_one(name, ta, tb, fa, fb, n_heads))
    only_a = sorted(n for n in wa if n not in wb or tuple(wa[n].shape) != tuple(wb[n].shape))
    only_b = sorted(n for n in wb if n not in wa or tuple(wa[n].shape) != tuple(wb[n].shape))
    replaced = {_module_of(n) for n in only_a if n not in wb} & {_module_of(n) for n in only_b if n not in wa}
    unmatched = sorted(n for n in only_a + only_b if _module_of(n) in replaced)
    only_a = [n for n in only_a if n not in unmatched]
    only_b = [n for n in only_b if n not in unmatched]
    diff = WeightDiff(tensors, only_a, only_b, "/".join(sorted(formats)), unmatched=unmatched)
    diff.swapped_layers = _swapped_layers(wa, wb, {t.layer for t in diff.changed if t.layer is not None})
    return diff


def _module_of(name: str) -> str:
    """The block submodule a parameter belongs to ("blocks.0.mlp" for blocks.0.mlp.fc_in.weight)."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[0] == "blocks" else parts[0]


def diff_mapped(entries, port: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], n_heads: int,
                port_label: str, reference_label: str) -> WeightDiff:
    """The weight diff of a port through its weight map: each mapped port tensor against the reference
    tensors it names, after the map's transform (which takes them to the port's layout). Port tensors
    the map leaves out are listed in `unmatched`; a missing or ill-shaped reference tensor fails."""
    tensors, missing, formats = [], [], set()
    for e in entries:
        absent = [s for s in e.sources if s not in reference]
        if absent:
            missing.append(f"{e.name} (maps to {', '.join(absent)}, which {reference_label} does not have)")
            continue
        ref = [reference[s] for s in e.sources]
        ref = e.transform(*ref) if e.transform is not None else ref[0]
        got = port[e.name]
        label = f"{e.name} = {' + '.join(e.sources)}"
        if tuple(got.shape) != tuple(ref.shape):
            missing.append(f"{e.name}: shape {tuple(got.shape)} in {port_label}, {tuple(ref.shape)} from "
                           f"{', '.join(e.sources)} after the weight map's transform")
            continue
        fa, fb = _fmt(got.dtype), _fmt(ref.dtype)
        formats.update((fa, fb))
        result = _diff_one(e.name, got, ref.to(got.device), fa, fb, n_heads)
        result.name, result.layer = label, e.layer
        tensors.append(result)
    mapped = {e.name for e in entries}
    unmatched = [f"{n} ({port_label}; not in its weight map)" for n in port if n not in mapped]
    return WeightDiff(tensors, [], [], "/".join(sorted(formats)), unmatched=unmatched, problems=missing)


def _swapped_layers(wa, wb, changed: set[int]) -> list[tuple[int, int]]:
    """Pairs (i, j) of changed blocks where block i of one model holds exactly block j of the other,
    both ways: a converter that mis-numbered layers."""
    def block(w, layer):
        prefix = f"blocks.{layer}."
        return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}

    def same(x, y):
        return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k].to(x[k].device))
                                            for k in x)

    layers = sorted(changed)
    return [(i, j) for n, i in enumerate(layers) for j in layers[n + 1:]
            if same(block(wa, i), block(wb, j)) and same(block(wa, j), block(wb, i))]


def _fmt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _diff_one(name, ta, tb, fa, fb, n_heads) -> TensorResult:
    if ta.dtype == tb.dtype and ta.device == tb.device and torch.equal(ta, tb):
        return TensorResult(name=name, layer=_layer(name), shape=list(tb.shape), max_abs=0.0, rel=0.0,
                            n_changed=0, n_heads=n_heads)  # the common case, without fp64 temporaries
    a, b = ta.to(torch.float64), tb.to(device=ta.device, dtype=torch.float64)
    diff = (a - b).abs()
    coarse = fa if UNIT_ROUNDOFF.get(fa, 0) >= UNIT_ROUNDOFF.get(fb, 0) else fb
    u = UNIT_ROUNDOFF.get(fa, 0.0) + UNIT_ROUNDOFF.get(fb, 0.0)
    bound = u * (1 + u) * b.abs() + SUBNORMAL_SPACING.get(coarse, 0.0)
    changed = diff > bound
    ref = float(b.norm())
    err = float(diff.norm())
    rel = 0.0 if err == 0 else (err / ref if ref > 0 else math.inf)
    n_changed = int(changed.sum())
    heads, parts = _locate(name, changed, n_heads) if n_changed else ([], [])
    return TensorResult(name=name, layer=_layer(name), shape=list(tb.shape),
                        max_abs=float(diff.max()) if diff.numel() else 0.0, rel=rel, n_changed=n_changed,
                        heads=heads, parts=parts, passed=n_changed == 0, n_heads=n_heads)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def _locate(name: str, changed: torch.Tensor, n_heads: int) -> tuple[list[int], list[str]]:
    """Heads (and q/k/v parts) holding changed elements, for the attention projections."""
    if ".attn.qkv." in name:
        # transformers' fused layout, which neox_lab keeps: rows are (n_heads qkv d_head).
        rows = changed.reshape(changed.shape[0], -1).any(-1).reshape(n_heads, 3, -1).any(-1)
        heads = sorted({int(h) for h, _ in rows.nonzero().tolist()})
        parts = [PARTS[p] for p in range(3) if bool(rows[:, p].any())]
        return heads, parts
    if ".attn.out.weight" in name:
        cols = changed.any(0).reshape(n_heads, -1).any(-1)  # input columns are (n_heads d_head)
        return [int(h) for h in cols.nonzero().flatten().tolist()], []
    return [], []


def _kind(name: str) -> str:
    kinds = {"attn.qkv.weight": "the fused QKV weight", "attn.qkv.bias": "the fused QKV bias",
             "attn.out.weight": "the attention output weight", "attn.out.bias": "the attention output bias",
             "mlp.fc_in.weight": "the MLP input weight", "mlp.fc_in.bias": "the MLP input bias",
             "mlp.fc_out.weight": "the MLP output weight", "mlp.fc_out.bias": "the MLP output bias",
             "ln1.weight": "ln1's weight", "ln1.bias": "ln1's bias", "ln2.weight": "ln2's weight",
             "ln2.bias": "ln2's bias", "embed.weight": "the embedding", "unembed.weight": "the unembedding",
             "ln_final.weight": "ln_final's weight", "ln_final.bias": "ln_final's bias"}
    tail = name.split(".", 2)[2] if name.startswith("blocks.") else name
    return f"{kinds.get(tail, 'tensor')} ({name})"
