"""The demo's training-dynamics section: the shipped model's training checkpoints swept in one model,
induction and in-context-learning scores drawn against step, and the step where induction heads appear.

Two induction probes, because the shipped model learned to copy in two stages (its training curriculum,
experiments/train_default.py): spans of frequent code tokens first, then the " word" tokens. The main
probe repeats random tokens of held-out code (the text the in-context-learning score reads); the
second repeats random " word" tokens, the probe of the demo's first section.

`history_measurement` is also what `experiments/train_default.py` records for each checkpoint it keeps
(training.json, "checkpoints"), so the demo's numbers can be checked against the training run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..analysis import plotting
from ..analysis.induction import word_token_ids
from ..analysis.measurements import InContextLearningScore, InductionScore, combine, first_step_above
from ..default_model import heldout_windows
from ..dynamics.sweep import sweep_checkpoints
from ..model.shipped import DEFAULT_MODEL_ID
from ..tokenizer import NeoXTokenizer
from .summary import INDUCTION_THRESHOLD

__all__ = ["DynamicsResult", "history_measurement", "run_dynamics"]

#: Held-out text for the in-context-learning score: the first 256 tokens (the training context) of 8 files.
ICL_WINDOWS, ICL_LEN = 8, 256
#: Olsson et al. compare the 500th token with the 50th; in a 256-token context: tokens 40-59 against 236-255.
ICL_EARLY, ICL_LATE = (40, 60), (236, 256)
#: Each induction probe: 8 sequences of [bos] + 15 random tokens repeated twice.
PROBE_N, PROBE_BATCH = 15, 8


def history_measurement(tokenizer: NeoXTokenizer):
    """Per head, the induction score on repeated random tokens of held-out code ("induction_score") and
    of " word" tokens ("words_induction_score"), with each probe's loss per copy; and the
    in-context-learning score on held-out standard-library code (`heldout_windows`). The code text is
    this Python's standard library, so those numbers move a little between Python versions."""
    windows = heldout_windows(tokenizer, ICL_WINDOWS, ICL_LEN)
    # Candidates and bos given, so the tokens do not depend on whether a model carries a tokenizer.
    bos = tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    code = torch.unique(windows)
    code = code[code != bos]
    return combine(InductionScore(PROBE_N, PROBE_BATCH, seed=0, candidates=code, bos_token_id=bos),
                   InductionScore(PROBE_N, PROBE_BATCH, seed=0, candidates=word_token_ids(tokenizer),
                                  bos_token_id=bos, prefix="words_"),
                   InContextLearningScore(windows, early=ICL_EARLY, late=ICL_LATE))


@dataclass
class DynamicsResult:
    """The sweep over the training checkpoints, and what the demo read from it."""

    steps: list[int]
    induction: torch.Tensor  # [n_checkpoints n_layers n_heads], code-token probe
    words: torch.Tensor  # [n_checkpoints n_layers n_heads], word probe
    icl: torch.Tensor  # [n_checkpoints]
    timings: list[dict]
    figure: Figure | None = None
    files: dict = field(default_factory=dict)

    @property
    def appear_step(self) -> int | None:
        """The first checkpoint with a head above the induction threshold on held-out code tokens."""
        return first_step_above(self.steps, self.induction, INDUCTION_THRESHOLD)

    @property
    def words_step(self) -> int | None:
        """The first checkpoint with a head above the threshold on random " word" tokens."""
        return first_step_above(self.steps, self.words, INDUCTION_THRESHOLD)

    def best(self, probe: torch.Tensor) -> torch.Tensor:
        """[n_checkpoints] the best head's score."""
        return probe.flatten(1).amax(-1)


def run_dynamics(checkpoints=DEFAULT_MODEL_ID, tokenizer: NeoXTokenizer | None = None, *, model=None,
                 out_dir: str | Path | None = None, progress: bool = True) -> DynamicsResult:
    """Sweep `checkpoints` (default: the shipped model's training history) with `history_measurement`;
    draw the scores against step into `out_dir`/training_dynamics.png when given. `model`: load the
    checkpoints into it (in place) instead of a new float32 model."""
    tokenizer = tokenizer or NeoXTokenizer.default()
    load = {"model": model} if model is not None else {"dtype": torch.float32}
    records = sweep_checkpoints(checkpoints, history_measurement(tokenizer), progress=progress, **load)
    res = DynamicsResult(records.steps, records.stack("induction_score"), records.stack("words_induction_score"),
                         records.stack("icl_score"), records.timings)
    if out_dir is not None:
        res.figure = draw(res)
        res.files["training_dynamics"] = Path(out_dir) / "training_dynamics.png"
        plotting.save_png(res.figure, res.files["training_dynamics"])
    return res


def draw(res: DynamicsResult) -> Figure:
    """Two panels over training step: each head's induction score (the word probe's best head dashed),
    and the in-context-learning score."""
    fig = Figure(figsize=(12.0, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    mark = dict(mark_step=res.appear_step, mark_label=None if res.appear_step is None else
                f"induction heads appear (step {res.appear_step})")
    plotting.over_training(res.steps, res.induction, ylabel="induction score", ax=left,
                           title="Induction score per head (held-out code tokens repeated)", **mark)
    legend = left.get_legend()
    (words,) = left.plot(res.steps, res.best(res.words).numpy(), color="black", linestyle="--", linewidth=1.2,
                         marker="s", markersize=3, label="best head, random word tokens")
    left.legend([*legend.legend_handles, words], [*(t.get_text() for t in legend.get_texts()), words.get_label()],
                fontsize=7, loc="best")
    left.axhline(INDUCTION_THRESHOLD, color="grey", linewidth=0.8, linestyle=":")
    plotting.over_training(res.steps, res.icl, labels=["ICL score"], ylabel="loss(late) - loss(early), nats",
                           ax=right, title=f"In-context learning: tokens {ICL_LATE[0]}-{ICL_LATE[1] - 1} vs "
                                           f"{ICL_EARLY[0]}-{ICL_EARLY[1] - 1} (held-out code)",
                           **mark)
    fig.suptitle("Training dynamics of the shipped model: its kept checkpoints, swept in one model")
    return fig
