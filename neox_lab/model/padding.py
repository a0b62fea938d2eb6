"""The left-padding check every forward makes: a left-padded batch without an attention mask is read
as text, which shifts every later position of its padded rows."""

from __future__ import annotations

import os
import sys
import warnings

import torch


def warn_if_left_padded(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_ids,
                        past_key_values=None) -> None:
    """Warn when a batch looks left-padded and no attention mask says so: its rows begin with different
    numbers of a pad token (`pad_ids`: the tokenizer's and the config's; a bos equal to the pad token
    counts once in every row, so it does not trigger this). A step after a KV cache is not a prompt: a
    row that just emitted eos (often the pad id) is fine."""
    # Anything but an integer id tensor is left to forward's input checks, which name the problem.
    if attention_mask is not None or not torch.is_tensor(input_ids) or input_ids.is_floating_point():
        return
    if input_ids.dim() != 2 or input_ids.shape[0] < 2 or input_ids.shape[1] < 2 or past_key_values is not None:
        return
    for pad in set(pad_ids) - {None}:
        leading = (input_ids == pad).long().cumprod(-1).sum(-1)
        if bool((leading != leading[:1]).any()):  # one host sync
            warnings.warn(f"input_ids look left-padded (rows start with different numbers of the pad token "
                          f"{pad}) but no attention_mask was given, so the padding is attended to as text "
                          "and shifts every later position of those rows; pass attention_mask (e.g. from "
                          "the tokenizer with padding_side='left') or pad on the right",
                          stacklevel=caller_stacklevel())
            return


def caller_stacklevel() -> int:
    """The `stacklevel` that makes a warning point at the first frame outside neox_lab, torch and
    (for a placed model, whose modules it wraps) accelerate."""
    # The package root, not this file's folder: hooks/ and model/ frames are neox_lab's alike.
    internal = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    accelerate = sys.modules.get("accelerate")  # only where already imported: never imported for this
    if accelerate is not None and getattr(accelerate, "__file__", None):
        internal += (os.path.dirname(accelerate.__file__),)
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level
