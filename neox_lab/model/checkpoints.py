"""Training checkpoints of one model: which exist, what step each is, and how to name one.

Three kinds of checkpointed model are understood:

- a Pythia hub id ("EleutherAI/pythia-160m", "-deduped", "-v0"): its training checkpoints are hub
  revisions "step0", "step1", "step2", "step4", ..., "step512", "step1000", ... "step143000" (154 of
  them; the "-v0" models only every 1000 steps), TransformerLens' `PYTHIA_CHECKPOINTS` lists;
- a local folder of step directories (``run/step100/``, ``run/step200/``, ...: "step100", "step_100",
  "global_step100", "checkpoint-100" and "iter_0000100" are read as step 100), each a checkpoint
  directory with its config.json;
- "neox-lab/default", the shipped model: the checkpoints `experiments/train_default.py` kept during its
  training (in the package's ``data/default/checkpoints/``) and the shipped model itself, the last step.

`get_checkpoint_labels(name)` lists the steps as TransformerLens' function of that name does;
`checkpoint_index` / `checkpoint_value` pick one (`resolve_checkpoint_choice`, used by `from_pretrained`)
with TransformerLens' meaning: the value must be one of the labels (no rounding to a nearby step), the
index indexes the label list (negative from the end, as a Python list). Where TransformerLens takes
either silently when both are given, neox_lab refuses both, and a `revision` together with them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import read_json_object
from .shipped import DEFAULT_MODEL_ID, package_model_dir

#: Pythia's training checkpoints (steps), as TransformerLens lists them: log-spaced to 512, then every 1000.
PYTHIA_CHECKPOINTS: list[int] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143000 + 1, 1000))
#: The "-v0" Pythia models (before the April 2023 retraining) kept only the every-1000 checkpoints.
PYTHIA_V0_CHECKPOINTS: list[int] = list(range(1000, 143000 + 1, 1000))
PYTHIA_PREFIX = "EleutherAI/pythia"

_STEP_NAME = re.compile(r"^(?:global_)?step[_-]?(\d+)$|^checkpoint[_-](\d+)$|^iter_(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """One training checkpoint: its step, and where it is (a local directory, or a hub id and revision)."""

    step: int | None
    source: str  # a directory path, or a hub id
    revision: str | None = None  # the hub revision ("step1000"); None for a local directory
    name: str | None = None  # a label that does not depend on where the files are (the shipped model's)

    @property
    def label(self) -> str:
        """How records and errors name it: its `name`, else the directory, or "hub/id@revision"."""
        if self.name is not None:
            return self.name
        return self.source if self.revision is None else f"{self.source}@{self.revision}"


def step_of(name: str | os.PathLike) -> int | None:
    """The training step a checkpoint directory's name says ("step100", "global_step100",
    "checkpoint-100", "iter_0000100" -> 100), or None when its name says none."""
    match = _STEP_NAME.match(Path(os.fspath(name)).name)
    return None if match is None else int(next(g for g in match.groups() if g is not None))


def step_directories(folder: str | os.PathLike) -> list[CheckpointRef]:
    """The step directories in `folder` (each holding a config.json), in step order; [] when none."""
    folder = Path(os.fspath(folder))
    found: dict[int, Path] = {}
    for child in sorted(folder.iterdir()) if folder.is_dir() else ():
        step = step_of(child.name)
        if step is None or not (child / "config.json").is_file():
            continue
        if step in found:
            raise ValueError(f"{folder}: {found[step].name} and {child.name} both name step {step}; keep one")
        found[step] = child
    return [CheckpointRef(step, os.fspath(found[step])) for step in sorted(found)]


# ------------------------------------------------------------------------------------------ the shipped model
def shipped_checkpoint_dir() -> Path:
    """Where the shipped model's training checkpoints live (whether or not they are there)."""
    return package_model_dir() / "checkpoints"


def shipped_checkpoints() -> list[CheckpointRef]:
    """The shipped model's training history: the kept checkpoints, then the shipped model (its last step,
    as its training.json records it)."""
    kept = step_directories(shipped_checkpoint_dir())
    report_path = package_model_dir() / "training.json"
    if not kept or not report_path.is_file():
        raise FileNotFoundError(f"the shipped model's training checkpoints are missing from {shipped_checkpoint_dir()} "
                                "(or its training.json); reinstall neox-lab, or rebuild them with "
                                "`python experiments/train_default.py`")
    report = read_json_object(report_path, "training report")
    final = report.get("checkpoints", {}).get("final_step")
    if not isinstance(final, int) or final <= kept[-1].step:
        raise ValueError(f"{report_path}: 'checkpoints.final_step' must be the step of the shipped model, after "
                         f"step {kept[-1].step}; got {final!r} (rebuild with `python experiments/train_default.py`)")
    refs = [*kept, CheckpointRef(final, os.fspath(package_model_dir()))]
    return [CheckpointRef(r.step, r.source, None, f"{DEFAULT_MODEL_ID}@step{r.step}") for r in refs]


# ------------------------------------------------------------------------------------------ listing
def is_pythia(name: str) -> bool:
    return name.startswith(PYTHIA_PREFIX)


def list_checkpoints(name: str | os.PathLike) -> list[CheckpointRef]:
    """Every training checkpoint of `name` (a Pythia hub id, a local folder of step directories, or
    "neox-lab/default"), in step order. Nothing is downloaded: hub checkpoints are only named."""
    text = os.fspath(name)
    if text == DEFAULT_MODEL_ID:
        return shipped_checkpoints()
    path = Path(text).expanduser()
    if path.is_dir():
        found = step_directories(path)
        if found:
            return found
        raise ValueError(f"{path} holds no step directories (step100/, global_step100/, checkpoint-100/, ... each "
                         "with a config.json), so it has no training checkpoints to list")
    if is_pythia(text):
        steps = PYTHIA_V0_CHECKPOINTS if "v0" in text else PYTHIA_CHECKPOINTS
        return [CheckpointRef(step, text, f"step{step}") for step in steps]
    raise ValueError(f"{text!r} is not checkpointed: training checkpoints are known for Pythia hub ids "
                     f"({PYTHIA_PREFIX}-*), '{DEFAULT_MODEL_ID}', and local folders of step directories")


def get_checkpoint_labels(name: str | os.PathLike) -> tuple[list[int], str]:
    """(the checkpoint labels, "step"): TransformerLens' function of this name, for the models above."""
    return [ref.step for ref in list_checkpoints(name)], "step"


def checkpoint_revisions(name: str) -> list[str]:
    """A Pythia model's checkpoint revisions on the hub: ["step0", "step1", ..., "step143000"] (154)."""
    if not is_pythia(name):
        raise ValueError(f"{name!r} is not a Pythia hub id ({PYTHIA_PREFIX}-*); only Pythia names its "
                         "checkpoints as hub revisions")
    return [ref.revision for ref in list_checkpoints(name)]


def pick_checkpoint(name: str | os.PathLike, *, checkpoint_index: int | None = None,
                    checkpoint_value: int | None = None) -> CheckpointRef:
    """The checkpoint `checkpoint_index` (into the label list; negative counts from the end) or
    `checkpoint_value` (a step that must be one of the labels) names."""
    if checkpoint_index is not None and checkpoint_value is not None:
        raise ValueError("pass checkpoint_index or checkpoint_value, not both (TransformerLens would silently "
                         "use one of them)")
    refs = list_checkpoints(name)
    labels = [ref.step for ref in refs]
    if checkpoint_value is not None:
        if isinstance(checkpoint_value, bool) or not isinstance(checkpoint_value, int):
            raise TypeError(f"checkpoint_value must be an int step, got {checkpoint_value!r}")
        if checkpoint_value not in labels:
            below = [s for s in labels if s < checkpoint_value][-1:]
            above = [s for s in labels if s > checkpoint_value][:1]
            near = " and ".join(str(s) for s in below + above)
            raise ValueError(f"checkpoint_value={checkpoint_value} is not a checkpoint of {os.fspath(name)!r} "
                             f"({len(labels)} checkpoints, steps {labels[0]}..{labels[-1]}; the nearest are "
                             f"{near}); get_checkpoint_labels({os.fspath(name)!r}) lists them")
        return refs[labels.index(checkpoint_value)]
    if isinstance(checkpoint_index, bool) or not isinstance(checkpoint_index, int):
        raise TypeError(f"checkpoint_index must be an int, got {checkpoint_index!r}")
    if not -len(refs) <= checkpoint_index < len(refs):
        raise IndexError(f"checkpoint_index={checkpoint_index} is out of range: {os.fspath(name)!r} has "
                         f"{len(refs)} checkpoints (indices 0..{len(refs) - 1}, or negative from the end)")
    return refs[checkpoint_index]


def checkpoint_label(name: str | os.PathLike, checkpoint_index: int | None = None,
                     checkpoint_value: int | None = None) -> tuple[int, int]:
    """(index, step) of the checkpoint the arguments pick, as TransformerLens' `cfg.checkpoint_index` and
    `cfg.checkpoint_value` record it (a negative index made positive)."""
    ref = pick_checkpoint(name, checkpoint_index=checkpoint_index, checkpoint_value=checkpoint_value)
    return [r.step for r in list_checkpoints(name)].index(ref.step), ref.step


def resolve_checkpoint_choice(path_or_repo_id, revision: str | None, checkpoint_index: int | None,
                              checkpoint_value: int | None) -> tuple[str | os.PathLike, str | None]:
    """(what to load, its revision) for `from_pretrained`'s arguments: unchanged without a checkpoint
    choice, else the chosen checkpoint's directory, or its hub id and revision."""
    if checkpoint_index is None and checkpoint_value is None:
        return path_or_repo_id, revision
    if revision is not None:
        raise ValueError(f"pass revision={revision!r} or checkpoint_index/checkpoint_value, not both")
    ref = pick_checkpoint(path_or_repo_id, checkpoint_index=checkpoint_index, checkpoint_value=checkpoint_value)
    return ref.source, ref.revision
