"""The small GPT-NeoX shipped inside the package, trained by `experiments/train_default.py`.

    model = neox_lab.load_default()                            # tokenizer attached
    model = NeoXForCausalLM.from_pretrained("neox-lab/default")  # the same model, by its reserved id

4 layers x 4 heads, d_model 96, tied embeddings, parallel residual, rotary_pct 0.25, the GPT-NeoX-20B
tokenizer's ids; trained on the Python standard library's sources, with repeated random-token spans
mixed in so that it has clear induction heads. Its training report (held-out loss, induction scores,
the exact command) is `training_report()`.
"""

from __future__ import annotations

import json

import torch

from .model.shipped import attach_default_tokenizer, default_model_dir
from .model.tasks import NeoXForCausalLM


def load_default(dtype: torch.dtype = torch.float32, device=None, attn_backend: str = "auto"):
    """The shipped `NeoXForCausalLM` in `dtype` on `device`, in eval mode, with `.tokenizer` set.

    Stored in fp16; loaded as float32 by default, so interpretability runs use exact fp32 arithmetic.
    """
    model = NeoXForCausalLM.from_pretrained(default_model_dir(), dtype=dtype, device=device,
                                            attn_backend=attn_backend)
    attach_default_tokenizer(model)
    return model


def load_or_default(model_dir=None, dtype: torch.dtype = torch.float32, device=None):
    """A checkpoint directory's `NeoXForCausalLM` (or the shipped model when `model_dir` is None), with a
    tokenizer attached either way: the checkpoint's own, else the package's GPT-NeoX tokenizer."""
    if model_dir is None:
        return load_default(dtype=dtype, device=device)
    model = NeoXForCausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
    attach_default_tokenizer(model)
    return model


def training_report() -> dict:
    """The shipped model's training.json: config, command, held-out and unigram loss, induction scores."""
    path = default_model_dir() / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild with `python experiments/train_default.py`")
    return json.loads(path.read_text())
