"""Known bug classes of NeoX conversions and kernels, injected into a copy of a model, each with the
place a comparison must name. For checking that an equivalence harness (yours, or `compare`) catches
them: `for bug in MUTATIONS: broken, where = bug(model)`.

Each mutation takes a neox_lab `NeoXForCausalLM` and returns (a mutated deep copy, `Expected`). Config
mutations rebuild the model from a changed config with the same weights; weight mutations edit the copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass
class Expected:
    """Where the bug must be reported: a config field, a weight tensor (layer, heads, parts), the first
    diverging stream (a hook name, in `batch` when given), or a decoding step ("step 1")."""

    kind: str  # "config", "weights", "activations" or "decoding"
    name: str  # config field as reported (e.g. "rope_theta"), tensor's body-relative name, hook name or step
    layer: int | None = None
    heads: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    swapped: tuple[int, int] | None = None  # a pair of blocks the report must name as exchanged
    batch: str | None = None  # activations: the batch it shows in ("main", "left-padded", "probe")


def _rebuilt(model, **changes):
    cfg = model.cfg.replace(**changes)
    new = type(model)(cfg, attn_backend=model.attn_backend).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if not (k == "unembed.weight" and cfg.tie_word_embeddings)}
    new.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        new.tie_weights()
    return new.eval()


def _heads_of(model) -> tuple[int, int]:
    return model.cfg.num_attention_heads, model.cfg.hidden_size // model.cfg.num_attention_heads


def head_permutation(model, layer: int = 0, i: int = 0, j: int = 1):
    """The query rows of heads i and j of one layer exchanged (a wrong reshape of the fused QKV)."""
    out = copy.deepcopy(model)
    _, d = _heads_of(model)
    w = out.model.blocks[layer].attn.qkv.weight
    with torch.no_grad():
        ri, rj = slice(3 * d * i, 3 * d * i + d), slice(3 * d * j, 3 * d * j + d)
        a, b = w[ri].clone(), w[rj].clone()
        w[ri], w[rj] = b, a
    return out, Expected("weights", f"blocks.{layer}.attn.qkv.weight", layer, sorted([i, j]), ["query"])


def bias_zeroed(model, layer: int = 0):
    """The attention output bias of one layer dropped (a converter that forgot it)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.model.blocks[layer].attn.out.bias.zero_()
    return out, Expected("weights", f"blocks.{layer}.attn.out.bias", layer)


def one_weight_element(model, layer: int = 0, factor: float = 1 + 1e-3):
    """One element of one MLP input weight scaled by `factor` (default a 1e-3 relative change)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.model.blocks[layer].mlp.fc_in.weight[3, 5] *= factor
    return out, Expected("weights", f"blocks.{layer}.mlp.fc_in.weight", layer)


def layer_swap(model, i: int = 0, j: int = 1):
    """Two blocks exchanged (a converter that mis-numbers layers)."""
    out = copy.deepcopy(model)
    blocks = out.model.blocks
    si, sj = copy.deepcopy(blocks[i].state_dict()), copy.deepcopy(blocks[j].state_dict())
    blocks[i].load_state_dict(sj)
    blocks[j].load_state_dict(si)
    return out, Expected("weights", f"blocks.{min(i, j)}.", min(i, j), swapped=(min(i, j), max(i, j)))


def unembed_transposed(model):
    """The unembedding stored transposed (needs vocab_size == hidden_size to keep its shape)."""
    out = copy.deepcopy(model)
    w = out.unembed.weight
    if w.shape[0] != w.shape[1]:
        raise ValueError("unembed_transposed needs vocab_size == hidden_size, so the shape survives")
    with torch.no_grad():
        w.copy_(w.t().clone())
    return out, Expected("weights", "unembed.weight")


def unembed_tied(model):
    """An untied model's unembedding replaced by the embedding (a converter that tied it)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.unembed.weight.copy_(out.model.embed.weight)
    return out, Expected("weights", "unembed.weight")


def rotary_base(model, factor: float = 1 + 1e-4):
    """rope_theta off by a relative `factor` (default 10000 -> 10001)."""
    return _rebuilt(model, rotary_emb_base=model.cfg.rotary_emb_base * factor), Expected("config", "rope_theta")


def layer_norm_eps(model, eps: float = 1e-6):
    """Every LayerNorm's eps changed."""
    eps = eps if eps != model.cfg.layer_norm_eps else eps * 10
    return _rebuilt(model, layer_norm_eps=eps), Expected("config", "layer_norm_eps")


def rotary_pct(model):
    """Another fraction of each head rotated (0.25 <-> 0.5)."""
    pct = 0.5 if model.cfg.rotary_pct != 0.5 else 0.25
    return _rebuilt(model, rotary_pct=pct), Expected("config", "rotary_pct (partial_rotary_factor)")


def residual_kind(model):
    """Parallel residual flipped to sequential or back (a structural difference)."""
    return (_rebuilt(model, use_parallel_residual=not model.cfg.use_parallel_residual),
            Expected("config", "use_parallel_residual"))


#: Name -> mutation, each with its default arguments.
MUTATIONS = {f.__name__: f for f in (head_permutation, bias_zeroed, rotary_base, layer_norm_eps, rotary_pct,
                                     residual_kind, one_weight_element, layer_swap, unembed_transposed,
                                     unembed_tied)}


def named_place(report, expected: Expected) -> bool:
    """Whether `report` names `expected` as a reason it fails (config field, tensor + layer + heads +
    parts, the exchanged pair of blocks, the first diverging stream or the activation check that
    names it, or the failing decoding step)."""
    if expected.kind == "config":
        return any(d.name == expected.name for d in report.config_failures)
    if expected.kind == "activations":
        first = report.first_divergence
        if first is not None and first.name == expected.name and expected.batch in (None, first.batch):
            return True
        return any(expected.name in a.names for a in report.activation if not a.passed)
    if expected.kind == "decoding":
        return report.decoding is not None and any(f.startswith(f"decoding: {expected.name} (")
                                                   for f in report.decoding.failures())
    if report.weights is None:
        return False
    if expected.swapped is not None:
        return expected.swapped in report.weights.swapped_layers
    for t in report.weights.failures:
        if t.name.startswith(expected.name) and t.layer == expected.layer:
            if expected.heads and t.heads != expected.heads:
                continue
            if expected.parts and t.parts != expected.parts:
                continue
            return True
    return False
