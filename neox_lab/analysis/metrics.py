"""Metrics for patching: factories returning ``metric(logits [batch pos d_vocab]) -> tensor``.

Each metric returns a scalar (``reduce="mean"``: the batch mean) or one value per batch row
(``reduce="none"``: [batch]). They compute in fp32 and are differentiable, so `attribution_patch`
can backpropagate through them. `pos` is a position index (negative counts from the end) or an
integer tensor [batch] with one position per row (e.g. each row's last real token under padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import widen

REDUCTIONS = ("mean", "none")


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


def _reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:
    return values.mean() if reduce == "mean" else values


def _at(logits: torch.Tensor, pos) -> torch.Tensor:
    """[batch pos d_vocab] -> [batch d_vocab] at `pos`, in fp32."""
    if logits.dim() != 3:
        raise ValueError(f"metric expects logits [batch pos d_vocab], got {tuple(logits.shape)}")
    if isinstance(pos, int):
        return logits[:, pos].float()
    pos = torch.as_tensor(pos, device=logits.device).long()
    if pos.shape != (logits.shape[0],):
        raise ValueError(f"pos must be an int or [batch]={logits.shape[0]} positions, got {tuple(pos.shape)}")
    return logits[torch.arange(logits.shape[0], device=logits.device), pos].float()


def _tokens(tokens, batch: int, device) -> torch.Tensor:
    """An int or [batch] token ids -> [batch 1]."""
    t = torch.as_tensor(tokens, device=device).long()
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"token ids must be an int or [batch]={batch}, got {tuple(t.shape)}")
    return t[:, None]


def logit_diff(correct, incorrect, pos=-1, reduce: str = "mean"):
    """logit[correct] - logit[incorrect] at `pos`; tokens are ints or [batch] ids (one pair per row)."""
    _check_reduce(reduce)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = _at(logits, pos)
        good = at.gather(-1, _tokens(correct, at.shape[0], at.device))
        bad = at.gather(-1, _tokens(incorrect, at.shape[0], at.device))
        return _reduce((good - bad).squeeze(-1), reduce)
    return metric


def prob(token, pos=-1, reduce: str = "mean"):
    """The softmax probability of `token` (int or [batch] ids) at `pos`."""
    _check_reduce(reduce)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = _at(logits, pos)
        p = at.softmax(-1).gather(-1, _tokens(token, at.shape[0], at.device))
        return _reduce(p.squeeze(-1), reduce)
    return metric


def loss(tokens: torch.Tensor, reduce: str = "mean"):
    """Next-token cross-entropy of `tokens` [batch pos] (-100 ignored), averaged over positions per row."""
    _check_reduce(reduce)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"loss metric: tokens {tuple(tokens.shape)} must be [batch pos] of the "
                             f"logits {tuple(logits.shape)}")
        target = tokens[:, 1:].to(logits.device).long()
        # As the model takes its own `labels=` loss: [rows d_vocab] logits, at least fp32. Cross-entropy
        # of [batch d_vocab pos] (vocabulary as axis 1) reduces over a strided axis, 3e-4 off at 50k.
        rows = widen(logits[:, :-1]).reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(rows, target.reshape(-1), ignore_index=-100, reduction="none").view(target.shape)
        counted = (target != -100).to(ce.dtype)
        return _reduce((ce * counted).sum(-1) / counted.sum(-1).clamp(min=1), reduce)
    return metric


def kl_to_clean(clean_logits: torch.Tensor, pos=-1, reduce: str = "mean"):
    """KL(clean || patched) of the next-token distributions at `pos` (None: mean over every position)."""
    _check_reduce(reduce)
    clean_logits = clean_logits.detach()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape != clean_logits.shape:
            raise ValueError(f"kl_to_clean: logits {tuple(logits.shape)} differ in shape from the clean "
                             f"logits {tuple(clean_logits.shape)}")
        if pos is None:
            ref, new = clean_logits.float(), logits.float()
        else:
            ref, new = _at(clean_logits.to(logits.device), pos), _at(logits, pos)
        ref_logp, logp = ref.log_softmax(-1), new.log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        return _reduce(kl.mean(-1) if pos is None else kl, reduce)
    return metric


__all__ = ["kl_to_clean", "logit_diff", "loss", "prob"]
