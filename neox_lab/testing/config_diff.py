"""The first layer of evidence: which config fields two models differ in, and which of those change
the function they compute.

A difference in a field that changes the function (the rotary base, the LayerNorm eps, the residual
kind, tying ...) is non-equivalence by itself, however small its effect on a few random tokens: a
1e-4 change of the rotary base moves short sequences' rotated q/k below an fp32 noise floor, and a
diff of the two configs shows it at once. Fields that only matter in training (dropout, the init
range) or to generation defaults are reported but do not fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import NeoXConfig

#: Fields without which two models cannot even be compared stream by stream (shapes differ).
STRUCTURAL = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
              "num_labels", "use_parallel_residual")

#: Fields that change what the model computes in eval mode, with what they change (for the report).
FUNCTIONAL = {
    "hidden_act": "the MLP activation",
    "rotary_pct": "how many channels of each head are rotated",
    "rotary_emb_base": "the rotary angles",
    "rope_scaling": "the rotary angles",
    "layer_norm_eps": "every LayerNorm's scale",
    "use_parallel_residual": "the residual wiring of every block",
    "tie_word_embeddings": "the unembedding (tied to the embedding or not)",
    "attention_bias": "whether q/k/v and the attention output have biases",
    "num_hidden_layers": "the depth",
    "num_attention_heads": "the head split",
    "hidden_size": "the model width",
    "intermediate_size": "the MLP width",
    "vocab_size": "the vocabulary",
    "num_labels": "the task head's width",
}

#: Fields that change the function only in some cases.
CONDITIONAL = {
    "max_position_embeddings": "the rotary angles under dynamic rope scaling",
    "pad_token_id": "which position a sequence classifier pools",
}

#: Fields that only matter when some channel is rotated.
ROTARY_ONLY = ("rotary_emb_base", "rope_scaling")

#: The names users see in config.json / transformers, where neox_lab's field is named otherwise.
DISPLAY = {"rotary_emb_base": "rope_theta", "rotary_pct": "rotary_pct (partial_rotary_factor)"}


@dataclass
class ConfigDifference:
    """One field whose value differs; `changes_function` decides whether it fails the comparison."""

    field: str
    a: object
    b: object
    changes_function: bool
    structural: bool
    effect: str

    @property
    def name(self) -> str:
        """The field as config.json / transformers name it (e.g. rope_theta, layer_norm_eps)."""
        return DISPLAY.get(self.field, self.field)

    def describe(self) -> str:
        kind = "structural" if self.structural else ("changes " + self.effect if self.changes_function
                                                     else "does not change the eval-mode function")
        return f"config {self.name}: model_a {self.a!r}, model_b {self.b!r} ({kind})"

    def to_dict(self) -> dict:
        return {"field": self.name, "neox_lab_field": self.field, "model_a": self.a, "model_b": self.b,
                "changes_function": self.changes_function, "structural": self.structural, "effect": self.effect}


def diff_configs(a: NeoXConfig, b: NeoXConfig, *, task: str | None = None) -> list[ConfigDifference]:
    """Every field in which `a` and `b` differ (a == b for floats: any change is reported).

    task: the transformers class name of the models (e.g. "GPTNeoXForSequenceClassification"), which
    decides whether `pad_token_id` changes the function.
    """
    out = []
    for f in dataclasses.fields(NeoXConfig):
        if f.name == "extra":
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va == vb:
            continue
        structural = f.name in STRUCTURAL
        if f.name in ROTARY_ONLY and not (_rotates(a) or _rotates(b)):
            changes, effect = False, "nothing: no channel is rotated (rotary_pct gives 0 rotary dims)"
        elif f.name in FUNCTIONAL:
            changes, effect = True, FUNCTIONAL[f.name]
        elif f.name == "max_position_embeddings":
            dynamic = any((c.rope_scaling or {}).get("type") == "dynamic" for c in (a, b))
            changes, effect = dynamic, CONDITIONAL[f.name]
        elif f.name == "pad_token_id":
            changes, effect = bool(task and "SequenceClassification" in task), CONDITIONAL[f.name]
        else:
            changes, effect = False, "training or generation settings only"
        out.append(ConfigDifference(f.name, va, vb, changes, structural, effect))
    return out


def _rotates(cfg: NeoXConfig) -> bool:
    return int(cfg.hidden_size // cfg.num_attention_heads * cfg.rotary_pct) > 0
