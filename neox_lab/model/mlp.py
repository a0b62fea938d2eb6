"""The NeoX MLP and the activations transformers supports for NeoX checkpoints."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import axes
from ..config import NeoXConfig
from ..hooks.points import HookPoint
from .weights import MLPWeights


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# The same formulas transformers' ACT2FN uses, so fp32 outputs agree to rounding.
ACT_FNS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class MLP(nn.Module, MLPWeights):
    """fc_in -> activation -> fc_out; hook_pre before the activation, hook_post after ([batch pos d_mlp]).

    `W_in`, `b_in`, `W_out`, `b_out` show the weights in TransformerLens' layout (views, see weights.py)."""

    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT_FNS[cfg.hidden_act]
        self.hook_pre = HookPoint(axes.MLP_ACTS)
        self.hook_post = HookPoint(axes.MLP_ACTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(self.fc_in(x))
        return self.fc_out(self.hook_post(self.act(pre)))
