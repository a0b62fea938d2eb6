"""The TransformerLens-convention notebook (experiments/transformerlens_notebook.py) runs, every line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "transformerlens_notebook.py"


def load():
    spec = importlib.util.spec_from_file_location("transformerlens_notebook", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_transformerlens_notebook_runs_unchanged():
    nb = load()
    grad = torch.is_grad_enabled()
    try:
        results = nb.notebook(nb.build_model())
    finally:
        torch.set_grad_enabled(grad)  # the notebook switches autodiff off, as such notebooks do
    assert set(results) == {"loss", "induction", "dla_top", "ablation", "lens_top", "patching"}
    patched = results["patching"]
    # the only corrupted position is 10; patching the clean embedding there restores the clean run
    assert abs(float(patched[0, 10]) - 1) < 1e-4 and float(patched[0].abs().sum() - patched[0, 10].abs()) < 1e-4
