"""`sweep_checkpoints`: run one measurement on every training checkpoint of a model, loading each into
the same model object in place.

    from neox_lab import sweep_checkpoints
    from neox_lab.analysis.measurements import InductionScore

    records = sweep_checkpoints("neox-lab/default", InductionScore(), out="induction.jsonl")
    records.steps, records.stack("induction_score")       # [n_checkpoints n_layers n_heads]

The first checkpoint to compute is loaded with `from_pretrained` (unless `model=` is given), every
later one with `model.load_checkpoint_` (the same tensors, new values: hooks, placement and attention
backend stay). Records come back in the order the checkpoints were given. With `out=`, each record is
written to the results file as its checkpoint finishes (results.py), and a sweep started again with
the same arguments reads the finished ones back instead of computing them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis.measurements import spec_of
from ..config import NeoXConfig
from ..default_model import load_or_default
from ..lens.hooked_transformer import HookedTransformer
from ..model.base import NeoXPreTrained
from ..model.checkpoints import CheckpointRef, list_checkpoints, pick_checkpoint, step_of
from ..model.loading import CheckpointError, resolve_checkpoint, resolve_dtype
from ..model.reload import check_same_config
from ..model.shipped import DEFAULT_MODEL_ID
from .results import ResultsFile, normalize_values

__all__ = ["SweepResult", "resolve_checkpoints", "sweep_checkpoints"]


class SweepResult(list):
    """The sweep's records, one dict per checkpoint in order: ``{"checkpoint", "step", **values}``.

    `timings[i]` is record i's ``{"checkpoint", "load_s", "analysis_s", "resumed"}`` (resumed: read back
    from the results file, with the times of the run that computed it); `model` the model measured
    (None when every record was read back); `out` the results file.
    """

    def __init__(self, records=(), timings=(), model=None, out: Path | None = None):
        super().__init__(records)
        self.timings = list(timings)
        self.model = model
        self.out = out

    @property
    def steps(self) -> list[int | None]:
        return [r["step"] for r in self]

    def stack(self, name: str) -> torch.Tensor:
        """Value `name` of every record stacked: [n_checkpoints, *its shape] (numbers: [n_checkpoints])."""
        if not self:
            raise ValueError("the sweep has no records")
        if any(name not in r for r in self):
            known = [k for k in self[0] if k not in ("checkpoint", "step")]
            raise KeyError(f"{name!r} is not a value of the records ({', '.join(known)})")
        return torch.stack([torch.as_tensor(r[name]) for r in self])

    @property
    def computed(self) -> list[str]:
        """The checkpoints this call computed (not read back from the results file)."""
        return [t["checkpoint"] for t in self.timings if not t["resumed"]]


# ------------------------------------------------------------------------------------------ what to sweep
def resolve_checkpoints(checkpoints, steps: Sequence[int] | None = None) -> list[CheckpointRef]:
    """The checkpoints a sweep runs over, in order, each with its step and a stable label.

    `checkpoints`: a list of checkpoint directories (steps from their names, "step100" -> 100, else
    None; hub ids may carry a revision as "owner/name@revision"), or one name whose training
    checkpoints are listed: a Pythia hub id (its 154 revisions), a local folder of step directories,
    or "neox-lab/default" (the shipped model's training history). `steps` picks some of a listed
    name's checkpoints by step, in the order given (each must exist, as `checkpoint_value`)."""
    if isinstance(checkpoints, (str, os.PathLike)):
        name = os.fspath(checkpoints)
        path = Path(name).expanduser()
        if name != DEFAULT_MODEL_ID and path.is_dir() and (path / "config.json").is_file():
            refs = [CheckpointRef(step_of(path), os.fspath(path.resolve()))]
        elif steps is not None:
            refs = [pick_checkpoint(name, checkpoint_value=s) for s in steps]
        else:
            refs = list_checkpoints(name)
        refs = [_absolute(r) for r in refs]
    else:
        if steps is not None:
            raise ValueError("steps= picks among the checkpoints of one name (a hub id, a folder of step "
                             "directories); for a list of directories, list the ones you want")
        if not isinstance(checkpoints, Sequence) or not checkpoints:
            raise TypeError("checkpoints must be a non-empty list of checkpoint directories, or one name (a Pythia "
                            f"hub id, a folder of step directories, '{DEFAULT_MODEL_ID}'); got {checkpoints!r}")
        refs = [_absolute(_ref(item)) for item in checkpoints]
    labels = [r.label for r in refs]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise ValueError(f"checkpoints named more than once: {', '.join(twice)}")
    return refs


def _ref(item) -> CheckpointRef:
    if isinstance(item, CheckpointRef):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(f"checkpoints: {item!r} is not a checkpoint directory or hub id")
    text = os.fspath(item)
    if Path(text).expanduser().exists() or "@" not in text:
        return CheckpointRef(step_of(text), text)
    repo, revision = text.rsplit("@", 1)
    return CheckpointRef(step_of(revision), repo, revision)


def _absolute(ref: CheckpointRef) -> CheckpointRef:
    """A local directory by its absolute path, so a results file resumes from any working directory."""
    path = Path(ref.source).expanduser()
    if ref.revision is not None or not path.exists():
        return ref
    return CheckpointRef(ref.step, os.fspath(path.resolve()), None, ref.name)


def _precheck_configs(refs: list[CheckpointRef], model) -> None:
    """Refuse, before any work, a local checkpoint whose config does not fit the others (or `model`)."""
    first_cfg, first_label = (model.hf().cfg, "the model") if model is not None else (None, None)
    for ref in refs:
        if ref.revision is not None or not Path(ref.source).is_dir():
            continue  # a hub checkpoint's config is checked when it is loaded
        cfg = NeoXConfig.from_hf(ref.source)
        if first_cfg is None:
            first_cfg, first_label = cfg, f"the first checkpoint ({ref.label})"
            continue
        check_same_config(first_cfg, cfg, ref.label, against=first_label)


# ------------------------------------------------------------------------------------------ the sweep
def sweep_checkpoints(checkpoints, fn: Callable, *, out: str | os.PathLike | None = None,
                      model: NeoXPreTrained | None = None, steps: Sequence[int] | None = None,
                      name: str | None = None, dtype: torch.dtype | str | None = None,
                      device: torch.device | str | None = None, attn_backend: str | None = None,
                      device_map: str | dict | None = None, max_memory: dict | None = None,
                      offload_folder: str | os.PathLike | None = None, progress: bool = True) -> SweepResult:
    """Run `fn(model)` on each checkpoint; return one record ``{"checkpoint", "step", **fn(model)}`` per
    checkpoint, in order (a `SweepResult`).

    checkpoints: see `resolve_checkpoints` (a list of directories; a Pythia hub id, a folder of step
        directories or "neox-lab/default"; `steps=` picks some of those).
    fn: a measurement returning a mapping of names to numbers or tensors, the same names and shapes for
        every checkpoint (`neox_lab.analysis.measurements` has ready-made ones).
    out: a results file (.jsonl, or .parquet with pyarrow): each record is appended as its checkpoint
        finishes, and the checkpoints it already holds are read back, not computed again. A file
        written by a different sweep (another `fn` or `name`, another dtype) is refused.
    model: the model to load every checkpoint into (in place), either convention's class (a
        HookedTransformer with processed weights is processed again after each load); default: one loaded from the first
        checkpoint computed, with `dtype`, `device`, `attn_backend`, `device_map`, `max_memory`,
        `offload_folder` as `from_pretrained` takes them (the checkpoint's tokenizer attached, else the
        package's). Its hooks, placement and attention backend stay through the sweep.
    name: names the measurement in the results file; give one when `fn` is a lambda or closure, which
        are otherwise told apart only by their qualified name.
    progress: a progress bar with each checkpoint's load and analysis time.

    A local checkpoint whose config differs from the first's (or the model's) in a field that changes
    shapes or the computation is refused before anything is computed, naming it and the field; a hub
    checkpoint is checked as it is loaded.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(model) -> mapping, got {type(fn).__name__}")
    if model is not None:
        given = dict(dtype=dtype, device=device, attn_backend=attn_backend, device_map=device_map,
                     max_memory=max_memory, offload_folder=offload_folder)
        clash = sorted(k for k, v in given.items() if v is not None)
        if clash:
            raise ValueError(f"{', '.join(clash)} say how to load a new model; with model= every checkpoint is "
                             "loaded into that model as it is (place or cast it before the sweep)")
        if not isinstance(model, (NeoXPreTrained, HookedTransformer)):
            raise TypeError(f"model must be a neox_lab model (NeoXForCausalLM & co., or HookedTransformer), got "
                            f"{type(model).__name__}")
    dtype = resolve_dtype(dtype)
    refs = resolve_checkpoints(checkpoints, steps)
    _precheck_configs(refs, model)
    run_dtype = next(model.parameters()).dtype if model is not None else dtype
    sweep = {"fn": spec_of(fn), "name": name,
             "dtype": None if run_dtype is None else str(run_dtype).removeprefix("torch.")}
    if model is not None and model.weights_processed:
        sweep["processed"] = sorted(model.weights_processed)
    results = ResultsFile(out, sweep) if out is not None else None
    done = {r["checkpoint"]: r for r in results.records} if results is not None else {}

    records, timings = [], []
    bar = tqdm(refs, desc="sweep", unit="ckpt", disable=not progress)
    try:
        for ref in bar:
            if ref.label in done:
                rec = done[ref.label]
                records.append({"checkpoint": ref.label, "step": ref.step, **rec["values"]})
                timings.append({"checkpoint": ref.label, "load_s": rec["load_s"], "analysis_s": rec["analysis_s"],
                                "resumed": True})
                continue
            bar.set_postfix_str(f"loading {ref.label if ref.step is None else f'step {ref.step}'}")
            t0 = time.perf_counter()
            directory = resolve_checkpoint(ref.source, ref.revision)
            if model is None:
                model = load_or_default(directory, dtype=dtype, device=device, attn_backend=attn_backend or "auto",
                                        device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
            else:
                try:
                    model.load_checkpoint_(directory)
                except CheckpointError as err:
                    raise CheckpointError(f"sweep, checkpoint {ref.label}: {err}") from err
            t1 = time.perf_counter()
            bar.set_postfix_str(f"measuring {ref.label if ref.step is None else f'step {ref.step}'}")
            values = normalize_values(fn(model), f"checkpoint {ref.label}")
            t2 = time.perf_counter()
            record = {"checkpoint": ref.label, "step": ref.step, "load_s": round(t1 - t0, 4),
                      "analysis_s": round(t2 - t1, 4), "values": values}
            if results is not None:
                results.append(record)
            records.append({"checkpoint": ref.label, "step": ref.step, **values})
            timings.append({"checkpoint": ref.label, "load_s": t1 - t0, "analysis_s": t2 - t1, "resumed": False})
            bar.set_postfix_str(f"load {t1 - t0:.2f}s, analysis {t2 - t1:.2f}s")
    finally:
        bar.close()
    return SweepResult(records, timings, model, None if results is None else results.path)
