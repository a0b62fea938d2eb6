"""Training dynamics: one measurement over a model's training checkpoints.

    sweep    `sweep_checkpoints`: each checkpoint loaded into the same model in place, `fn(model)` run,
             the records returned in order and appended to a results file as they finish (resumable)
    results  the results file: JSON lines or Parquet, its header naming the sweep that wrote it

Sits above the model, the analysis tools and `default_model` (it loads the first checkpoint the way
every command loads a model); the demo and the CLI build on it. The measurements themselves are
`neox_lab.analysis.measurements`, the figure `neox_lab.analysis.plotting.over_training`.
"""

from .results import SweepFileError
from .sweep import SweepResult, resolve_checkpoints, sweep_checkpoints

__all__ = ["SweepFileError", "SweepResult", "resolve_checkpoints", "sweep_checkpoints"]
