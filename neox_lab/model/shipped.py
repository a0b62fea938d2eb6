"""Where the small model shipped inside the package lives, and the id that names it.

`from_pretrained("neox-lab/default")` resolves to this directory without asking the hub. It holds no
tokenizer.json: the package already carries the GPT-NeoX tokenizer (`NeoXTokenizer.default()`), and
a model loaded from here gets that one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..tokenizer import NeoXTokenizer

#: The id `from_pretrained` resolves to the package's own model directory (no hub involved).
DEFAULT_MODEL_ID = "neox-lab/default"
_FILES = ("config.json", "model.safetensors")


def package_model_dir() -> Path:
    """Where the shipped model lives (whether or not its files are there)."""
    return Path(str(resources.files("neox_lab") / "data" / "default"))


def default_model_dir() -> Path:
    """Directory of the shipped model; raises FileNotFoundError naming what is missing."""
    directory = package_model_dir()
    missing = [name for name in _FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the default model's package data is missing from {directory} ({', '.join(missing)}); "
            "reinstall neox-lab, or rebuild it with `python experiments/train_default.py`"
        )
    return directory


def attach_default_tokenizer(model) -> None:
    """Give `model` the package's GPT-NeoX tokenizer unless it already has one."""
    if getattr(model, "tokenizer", None) is None:
        model.tokenizer = NeoXTokenizer.default()
