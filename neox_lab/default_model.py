"""The small GPT-NeoX shipped inside the package, trained by `experiments/train_default.py`.

    model = neox_lab.load_default()                            # tokenizer attached
    model = NeoXForCausalLM.from_pretrained("neox-lab/default")  # the same model, by its reserved id
    model = load_or_default(args.model)                        # what a --model argument names

4 layers x 4 heads, d_model 96, tied embeddings, parallel residual, rotary_pct 0.25, the GPT-NeoX-20B
tokenizer's ids; trained on the Python standard library's sources, with repeated random-token spans
mixed in so that it has clear induction heads. Its training report (held-out loss, induction scores,
the exact command) is `training_report()`.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import torch

from .model.base import NeoXPreTrained
from .model.loading import resolve_checkpoint
from .model.shipped import attach_default_tokenizer, default_model_dir
from .model.tasks import NeoXForCausalLM, model_class
from .tokenizer import NeoXTokenizer


def load_default(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 attn_backend: str = "auto") -> NeoXForCausalLM:
    """The shipped `NeoXForCausalLM` in `dtype` on `device`, in eval mode, with `.tokenizer` set.

    Stored in fp16; loaded as float32 by default, so interpretability runs use exact fp32 arithmetic.
    """
    model = NeoXForCausalLM.from_pretrained(default_model_dir(), dtype=dtype, device=device,
                                            attn_backend=attn_backend)
    attach_default_tokenizer(model)
    return model


def load_or_default(model: str | os.PathLike | None = None, *, cls: type[NeoXPreTrained] | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    attn_backend: str = "auto", device_map: str | dict | None = None,
                    max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
                    ) -> NeoXPreTrained:
    """The model a `--model` argument names: the one way every CLI command (and the demo) loads one.

    None: the shipped model (`load_default`). Otherwise a checkpoint directory or hub id, loaded as
    `cls` when given (generation needs a `NeoXForCausalLM`), else as the class its config.json's
    `architectures` names. `dtype` None keeps the checkpoint's own (the shipped model's is float32:
    its fp16 file is only storage). A tokenizer is attached either way: the checkpoint's own, else
    the package's GPT-NeoX one. `device_map`, `max_memory` and `offload_folder` place a checkpoint
    over several devices (`NeoXPreTrained.from_pretrained`); the shipped model is small and takes none.
    """
    placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if model is None:
        if any(v is not None for v in placement.values()):
            raise ValueError("device_map places a checkpoint over several devices; the shipped model fits "
                             "any one: pass device= instead, or name a checkpoint")
        return load_default(dtype=dtype or torch.float32, device=device, attn_backend=attn_backend)
    directory = resolve_checkpoint(model)
    loaded = (cls or model_class(directory)).from_pretrained(directory, dtype=dtype, device=device,
                                                               attn_backend=attn_backend, **placement)
    attach_default_tokenizer(loaded)
    return loaded


def training_report() -> dict:
    """The shipped model's training.json: config, command, held-out and unigram loss, induction scores."""
    path = default_model_dir() / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild with `python experiments/train_default.py`")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ its corpus
def corpus_files(max_files: int | None = None) -> list[Path]:
    """The shipped model's corpus: the Python standard library's .py files, sorted; `test`/`tests`
    directories and third-party packages left out (every install has them, offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # pruned, not walked: site-packages can be huge
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    files.sort()
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: cannot build the corpus")
    return files[:max_files] if max_files else files


def split_heldout(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held out): every 10th file (by sorted position) is held out, as in training."""
    return [f for i, f in enumerate(files) if i % 10 != 9], [f for i, f in enumerate(files) if i % 10 == 9]


def heldout_windows(tokenizer: NeoXTokenizer, n: int = 8, seq_len: int = 256) -> torch.Tensor:
    """[n seq_len] held-out text: the first `seq_len` tokens of each of the first `n` held-out files
    that long, so that every late token has its own file's beginning as context (what an
    in-context-learning score measures). The text is this Python's standard library, so the numbers
    move a little between Python versions."""
    windows = []
    for path in split_heldout(corpus_files())[1]:
        ids = tokenizer.backend_tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"),
                                                 add_special_tokens=False).ids
        if len(ids) >= seq_len:
            windows.append(ids[:seq_len])
        if len(windows) == n:
            return torch.tensor(windows, dtype=torch.long)
    raise ValueError(f"fewer than {n} held-out standard-library files have {seq_len} tokens")
