"""`neox-lab compare A hf:B` with a .bin that holds more than weights: exit 2 with the reason, nothing run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neox_lab import NeoXForCausalLM
from neox_lab.cli import main
from neox_lab.testing.pairs import tiny_config

pytest.importorskip("transformers")


class Touch:
    """A pickle that would create a file when unpickled unsafely."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_an_unsafe_bin_on_the_transformers_side_is_a_usage_error(tmp_path, capsys):
    NeoXForCausalLM(tiny_config(num_hidden_layers=1)).save_pretrained(tmp_path / "good")
    NeoXForCausalLM(tiny_config(num_hidden_layers=1)).save_pretrained(tmp_path / "bad")
    weights = load_file(tmp_path / "bad" / "model.safetensors")
    weights["extra"] = Touch(tmp_path / "executed")
    torch.save(weights, tmp_path / "bad" / "pytorch_model.bin")
    os.remove(tmp_path / "bad" / "model.safetensors")
    assert main(["compare", str(tmp_path / "good"), f"hf:{tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neox-lab compare: error: hf:{tmp_path / 'bad'}: the weights cannot be loaded safely ("), err
    assert "GLOBAL" in err and "Traceback" not in err
    assert not (tmp_path / "executed").exists()
