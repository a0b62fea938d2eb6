"""Ready-made measurements of a model, each ``fn(model) -> {name: number or tensor}``: what a sweep over
training checkpoints (`neox_lab.sweep_checkpoints`) runs on every checkpoint.

    InductionScore          per head: attention from a repeated token to the token after its previous
                            occurrence, on repeated random tokens; and the loss on each copy
    PrefixMatchingScore     per head, on any tokens: attention to the tokens that followed earlier
                            occurrences of the current token (Olsson et al. 2022's prefix matching;
                            on repeated random tokens it is InductionScore's stripe)
    PreviousTokenScore      per head: attention to the previous position
    InContextLearningScore  loss at late minus early token positions (negative: later tokens are
                            predicted better, from context; Olsson et al. 2022)
    ActivationPatchGrid     any `activation_patch` grid
    combine(*fns)           several of them as one fn

Each is a callable object whose `spec` (a JSON-able dict) says what it measures and on what inputs (a
digest of the tokens), so a sweep's results file can tell a different measurement from the same one.
All run under `torch.no_grad()` and return tensors on the CPU, in the model's dtype widened to at least
float32; per-head results are [n_layers n_heads].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..dtypes import widen
from ..hooks.registry import block_hook
from .induction import measure_induction, repeated_tokens, word_token_ids
from .patching import activation_patch

__all__ = ["ActivationPatchGrid", "InContextLearningScore", "InductionScore", "PrefixMatchingScore",
           "PreviousTokenScore", "combine", "first_step_above", "spec_of", "token_digest"]


def token_digest(tokens: torch.Tensor) -> str:
    """A short digest of a token batch (shape and ids), for a measurement's `spec`."""
    t = torch.as_tensor(tokens).detach().cpu().to(torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def spec_of(fn: Callable) -> dict:
    """What identifies a measurement: its `spec` when it has one, else its qualified name (a lambda or
    closure is only told apart from another by the `name=` a sweep is given)."""
    spec = getattr(fn, "spec", None)
    if isinstance(spec, Mapping):
        return dict(spec)
    return {"fn": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"}


def _as_tokens(tokens, what: str) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.shape[1] < 2:
        raise ValueError(f"{what}: tokens must be integer ids [batch pos] with pos >= 2, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    return tokens.long()


@torch.no_grad()
def _patterns(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention pattern [batch n_heads query_pos key_pos] on `tokens`, on the CPU, in at
    least float32."""
    model = model.hf()  # either convention's class: run through the transformers view, same modules
    names = [block_hook(layer, "attn.hook_pattern") for layer in range(model.cfg.num_hidden_layers)]
    previous = model.attn_backend
    model.set_attn_backend("eager")  # patterns exist only in the eager kernel: ask for it, no fallback warning
    try:
        _, cache = model.run_with_cache(tokens.to(model.input_device), names_filter=names)
    finally:
        model.set_attn_backend(previous)
    return [widen(cache[name]).cpu() for name in names]


# ------------------------------------------------------------------------------------------ attention
class InductionScore:
    """Per-head induction score on `batch` sequences of [bos] + `n` distinct random tokens repeated twice:
    mean attention from each second-copy token to the token after its first occurrence
    (`analysis.induction.measure_induction`). Returns ``{"induction_score": [n_layers n_heads],
    "loss_first_copy": float, "loss_second_copy": float}``.

    The tokens are drawn once, with `seed`, from `candidates` (default: the model's tokenizer's " word"
    tokens inside its vocabulary), and reused for every model measured; or pass `tokens` directly.
    `prefix` is put before every returned name (two probes in one `combine`).
    """

    def __init__(self, n: int = 15, batch: int = 16, *, seed: int = 0, candidates: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None, bos_token_id: int | None = None, prefix: str = ""):
        if tokens is not None:
            tokens = _as_tokens(tokens, "InductionScore")
        self.n, self.batch, self.seed, self.bos_token_id, self.prefix = n, batch, seed, bos_token_id, prefix
        self.candidates = None if candidates is None else torch.as_tensor(candidates).long()
        self.given = tokens
        self.tokens = tokens  # drawn on the first call when not given

    @property
    def spec(self) -> dict:
        return {"measure": "induction_score", "n": self.n, "batch": self.batch, "seed": self.seed,
                "bos_token_id": self.bos_token_id, "prefix": self.prefix,
                "candidates": None if self.candidates is None else token_digest(self.candidates),
                "tokens": None if self.given is None else token_digest(self.given)}

    def tokens_for(self, model) -> torch.Tensor:
        """The measured tokens (drawn on the first call, from the model's tokenizer unless given)."""
        if self.tokens is None:
            model = model.hf()  # its NeoXConfig and tokenizer, whichever convention's class was given
            candidates = self.candidates
            tok = getattr(model, "tokenizer", None)
            if candidates is None:
                if tok is None:
                    raise ValueError("InductionScore draws its tokens from the model's tokenizer, and this model "
                                     "has none: pass candidates= (token ids) or tokens=")
                candidates = word_token_ids(tok)
            candidates = candidates[candidates < model.cfg.vocab_size]
            bos = self.bos_token_id
            if bos is None:
                bos = model.cfg.bos_token_id if tok is None or tok.bos_token_id is None else tok.bos_token_id
            self.tokens = repeated_tokens(candidates, self.n, batch=self.batch, bos_token_id=bos,
                                          generator=torch.Generator().manual_seed(self.seed))
        return self.tokens

    def __call__(self, model) -> dict:
        res = measure_induction(model, self.tokens_for(model), self.n)
        out = {"induction_score": res.scores.float(), "loss_first_copy": float(res.copy_loss[0]),
               "loss_second_copy": float(res.copy_loss[1])}
        return {self.prefix + k: v for k, v in out.items()}


def prefix_matching_targets(tokens: torch.Tensor) -> torch.Tensor:
    """[batch query_pos key_pos] bool: key k is a target of query q when k <= q and token k-1 is an
    earlier occurrence of token q (k-1 < q), i.e. k followed a previous occurrence of q's token."""
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch q j]: token j equals token q
    pos = torch.arange(tokens.shape[1])
    earlier = same & (pos[None, :] < pos[:, None])[None]  # j < q
    targets = torch.zeros_like(earlier)
    targets[:, :, 1:] = earlier[:, :, :-1]  # key k = j + 1
    return targets


class PrefixMatchingScore:
    """Per-head prefix-matching score on any `tokens` [batch pos]: for each query whose token occurred
    before, the attention it pays to the positions right after those earlier occurrences, averaged
    over such queries. Returns ``{"prefix_matching_score": [n_layers n_heads]}``."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = _as_tokens(tokens, "PrefixMatchingScore")
        self.targets = prefix_matching_targets(self.tokens)
        self.queries = self.targets.any(-1)  # [batch q]
        if not bool(self.queries.any()):
            raise ValueError("PrefixMatchingScore: no token of `tokens` repeats an earlier one, so no query has "
                             "a prefix-matching target; use text with repetitions (or repeated random tokens)")

    @property
    def spec(self) -> dict:
        return {"measure": "prefix_matching_score", "tokens": token_digest(self.tokens)}

    def __call__(self, model) -> dict:
        scores = []
        for pattern in _patterns(model, self.tokens):
            mass = (pattern * self.targets[:, None]).sum(-1)  # [batch n_heads q]
            scores.append(mass.transpose(0, 1)[:, self.queries].mean(-1))
        return {"prefix_matching_score": torch.stack(scores)}


class PreviousTokenScore:
    """Per-head previous-token score on `tokens` [batch pos]: mean attention from each position q >= 1 to
    q - 1. Returns ``{"previous_token_score": [n_layers n_heads]}``."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = _as_tokens(tokens, "PreviousTokenScore")

    @property
    def spec(self) -> dict:
        return {"measure": "previous_token_score", "tokens": token_digest(self.tokens)}

    def __call__(self, model) -> dict:
        scores = [torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))
                  for p in _patterns(model, self.tokens)]
        return {"previous_token_score": torch.stack(scores)}


# ------------------------------------------------------------------------------------------ loss
def _span(spec, length: int, what: str) -> tuple[int, int]:
    """A token index or a [start, stop) range of token indices, inside 1..length-1 (token 0 has no loss)."""
    start, stop = (spec, spec + 1) if isinstance(spec, int) else tuple(spec)
    if not 1 <= start < stop <= length:
        raise ValueError(f"InContextLearningScore: {what}={spec!r} must name tokens inside 1..{length - 1} of the "
                         f"{length}-token sequences (token 0 is never predicted)")
    return start, stop


class InContextLearningScore:
    """The in-context-learning score of Olsson et al. (2022): the mean next-token loss of late tokens
    minus that of early tokens in `tokens` [batch pos] (text). Negative when context helps.

    `early` / `late`: a token index (Olsson et al. use the 50th and 500th tokens) or a [start, stop)
    range of them, averaged. Returns ``{"icl_score": late - early, "loss_early": ..., "loss_late": ...}``;
    with `per_token=True` also ``"loss_per_token": [pos-1]`` (mean over the batch of the loss of tokens
    1..pos-1), which costs the unembedding of every position: without it only the positions scored
    are unembedded (`logits_to_keep`; causal attention makes a prefix's logits those of the whole).
    `chunk` rows run per forward, bounding the [rows pos d_vocab] logits held at once.
    """

    def __init__(self, tokens: torch.Tensor, early=50, late=500, *, per_token: bool = False,
                 chunk: int | None = None):
        self.tokens = _as_tokens(tokens, "InContextLearningScore")
        length = self.tokens.shape[1]
        self.early, self.late = _span(early, length, "early"), _span(late, length, "late")
        if self.early[1] > self.late[0]:
            raise ValueError(f"InContextLearningScore: early={early!r} must come before late={late!r}")
        self.per_token, self.chunk = per_token, chunk

    @property
    def spec(self) -> dict:
        return {"measure": "icl_score", "tokens": token_digest(self.tokens), "early": list(self.early),
                "late": list(self.late), "per_token": self.per_token}

    def _rows(self, model, positions: int) -> int:
        return self.chunk or max(1, 2 ** 25 // (positions * model.cfg.vocab_size))

    def _span_loss(self, model, span: tuple[int, int]) -> torch.Tensor:
        """[batch stop-start] loss of tokens start..stop-1: logits at positions start-1..stop-2 only."""
        start, stop = span
        prefix, target = self.tokens[:, :stop - 1], self.tokens[:, start:stop]
        rows, out = self._rows(model, stop - start), []
        for i in range(0, prefix.shape[0], rows):
            logits = model(prefix[i:i + rows].to(model.input_device), logits_to_keep=stop - start).logits
            logits = widen(logits).cpu()
            out.append(F.cross_entropy(logits.flatten(0, 1), target[i:i + rows].flatten(), reduction="none")
                       .view(logits.shape[:2]))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        model = model.hf()  # either convention's class: run through the transformers view, same modules
        if not self.per_token:
            early, late = (float(self._span_loss(model, span).mean()) for span in (self.early, self.late))
            return {"icl_score": late - early, "loss_early": early, "loss_late": late}
        rows = self._rows(model, self.tokens.shape[1])
        device = model.input_device
        losses = []
        for i in range(0, self.tokens.shape[0], rows):
            chunk = self.tokens[i:i + rows]
            logits = widen(model(chunk.to(device)).logits[:, :-1]).cpu()
            losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
                          .view(logits.shape[:2]))
        per_token = torch.cat(losses).mean(0)  # [pos-1]: entry t-1 is the loss of token t
        early = float(per_token[self.early[0] - 1:self.early[1] - 1].mean())
        late = float(per_token[self.late[0] - 1:self.late[1] - 1].mean())
        return {"icl_score": late - early, "loss_early": early, "loss_late": late, "loss_per_token": per_token}


# ------------------------------------------------------------------------------------------ patching
class ActivationPatchGrid:
    """An `activation_patch` grid as a measurement: ``{"<name>": values [layer, *cells], "<name>_clean":
    metric on the clean run, "<name>_corrupted": on the corrupted run}``, `name` defaulting to
    "patch_<target>". Arguments are `activation_patch`'s; `normalized=True` reports the fraction of the
    clean-corrupted gap restored instead of the raw metric."""

    def __init__(self, clean_tokens, corrupted_tokens, metric: Callable, target: str = "resid_pre", *,
                 name: str | None = None, normalized: bool = False, **kwargs):
        self.clean, self.corrupted = torch.as_tensor(clean_tokens), torch.as_tensor(corrupted_tokens)
        self.metric, self.target, self.normalized, self.kwargs = metric, target, normalized, kwargs
        self.name = name or f"patch_{target}"

    @property
    def spec(self) -> dict:
        return {"measure": "activation_patch", "target": self.target, "name": self.name,
                "normalized": self.normalized, "metric": spec_of(self.metric), "clean": token_digest(self.clean),
                "corrupted": token_digest(self.corrupted),
                "kwargs": {k: repr(v) for k, v in sorted(self.kwargs.items())}}

    def __call__(self, model) -> dict:
        res = activation_patch(model, self.clean, self.corrupted, self.metric, self.target, **self.kwargs)
        values = res.values
        if self.normalized:
            values = (values - res.corrupted_value) / (res.clean_value - res.corrupted_value)
        return {self.name: values, f"{self.name}_clean": res.clean_value, f"{self.name}_corrupted": res.corrupted_value}


# ------------------------------------------------------------------------------------------ together
class _Combined:
    def __init__(self, fns: tuple[Callable, ...]):
        if not fns:
            raise ValueError("combine needs at least one measurement")
        self.fns = fns

    @property
    def spec(self) -> dict:
        return {"measure": "combined", "parts": [spec_of(fn) for fn in self.fns]}

    def __call__(self, model) -> dict:
        out: dict = {}
        for fn in self.fns:
            result = fn(model)
            clash = sorted(set(out) & set(result))
            if clash:
                raise ValueError(f"combine: {', '.join(clash)} returned by more than one measurement; rename them "
                                 "(e.g. ActivationPatchGrid(name=...))")
            out.update(result)
        return out


def combine(*fns: Callable) -> Callable:
    """One measurement running `fns` in order and merging their results (keys must not collide)."""
    return _Combined(fns)


def first_step_above(steps, values, threshold: float) -> int | None:
    """The first step whose value (the maximum over every entry: a head, a layer) exceeds `threshold`;
    None when none does. `values` [n_steps ...]."""
    values = torch.as_tensor(values, dtype=torch.float64)
    best = values.reshape(values.shape[0], -1).amax(-1)
    above = [s for s, v in zip(steps, best.tolist(), strict=True) if v > threshold]
    return above[0] if above else None
