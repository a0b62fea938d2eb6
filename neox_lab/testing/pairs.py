"""Seeded (transformers, neox_lab) model pairs and the tiny config tests use; no hypothesis needed.

Nothing here downloads: pairs are built from random weights, saved with transformers'
`save_pretrained` and loaded back with neox_lab, which exercises the real loading path.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ..config import NeoXConfig
from ..model.tasks import MODEL_CLASSES

#: The weight std of trained-like models (`make_trained_like`): attention-score rms ~3-10, like trained heads.
TRAINED_LIKE_STD = 0.2

HF_CLASSES = {
    "causal_lm": "GPTNeoXForCausalLM",
    "sequence_classification": "GPTNeoXForSequenceClassification",
    "token_classification": "GPTNeoXForTokenClassification",
    "question_answering": "GPTNeoXForQuestionAnswering",
    "base": "GPTNeoXModel",
}


def tiny_config(**changes) -> NeoXConfig:
    """A 2-layer, d_model 32 NeoX with partial rotary: big enough to have every stream, fast on a CPU."""
    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, bos_token_id=0,
                     eos_token_id=0)
    return cfg.replace(**changes) if changes else cfg


def hf_config(cfg: NeoXConfig, attn_implementation: str = "eager"):
    """The equivalent `transformers.GPTNeoXConfig`."""
    import transformers

    return transformers.GPTNeoXConfig(**cfg.to_hf(), attn_implementation=attn_implementation)


def build_pair(cfg: NeoXConfig, seed: int = 0, task: str = "causal_lm", *, directory: str | None = None,
               dtype=torch.float32, attn_backend: str = "eager", attn_implementation: str = "eager",
               trained_like: float | None = None):
    """A seeded random `transformers` model and the neox_lab model loaded from its saved checkpoint.

    Both are in eval mode and `dtype`. Returns (hf_model, neox_model). `directory` keeps the
    checkpoint there (e.g. for `neox-lab compare`); by default it lives in a temporary directory.
    trained_like: a weight std for `make_trained_like` (random biases and LayerNorms, sharp attention).
    """
    import transformers

    hf_cls = getattr(transformers, HF_CLASSES[task])
    torch.manual_seed(seed)
    hf_model = hf_cls(hf_config(cfg, attn_implementation)).eval()
    if trained_like is not None:
        make_trained_like(hf_model, seed, trained_like)
    neox_cls = MODEL_CLASSES[HF_CLASSES[task]]
    with tempfile.TemporaryDirectory() if directory is None else _Keep(directory) as path:
        hf_model.save_pretrained(path)
        neox_model = neox_cls.from_pretrained(path, attn_backend=attn_backend)
    return hf_model.to(dtype), neox_model.to(dtype).eval()


def make_trained_like(model, seed: int = 0, std: float = 0.2, *, bias_std: float = 0.1):
    """Give a random model (neox_lab or transformers) the statistics of a trained one, in place: weight
    matrices ~N(0, std) (std 0.2 gives attention-score rms ~3-10, like trained heads), random biases,
    LayerNorm weights ~1 + N(0, bias_std) and biases ~N(0, bias_std). Fresh-init models have zero biases
    and unit LayerNorms, so a dropped bias or a LayerNorm mix-up would change nothing. Returns `model`.
    (std = bias_std = 0.3 on a tiny model makes attention near one-hot: the TransformerLens cross-check
    and the weight-processing tests use that.)"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.dim() >= 2:
                value = std * noise
            elif "norm" in name or ".ln" in name or name.startswith("ln"):
                value = (1.0 if name.endswith("weight") else 0.0) + bias_std * noise
            else:
                value = bias_std * noise
            p.copy_(value.to(p.dtype))
    return model


class _Keep:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def __exit__(self, *exc) -> None:
        return None
