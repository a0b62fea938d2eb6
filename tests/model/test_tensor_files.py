"""A loaded model owns its weights: the checkpoint file changing, truncated or replaced after loading
does not change (or crash) it; offloaded weights are checked when read; every tensor's size is checked
against the header on every loader path."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neox_lab import CheckpointError, NeoXForCausalLM
from neox_lab.testing.pairs import tiny_config

pytest.importorskip("accelerate")

IDS = torch.tensor([[1, 2, 3, 4, 5]])
LOADERS = {
    "whole": {},
    "whole, cast": {"dtype": torch.float64},
    "device_map": {"device_map": {"": "cpu"}},
    "device_map, cast": {"device_map": {"": "cpu"}, "dtype": torch.float64},
}


def save_random(path: Path, seed: int, bin_format: bool = False) -> Path:
    torch.manual_seed(seed)
    model = NeoXForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    if bin_format:  # the same weights as a zip pytorch_model.bin (torch.load memory-maps it)
        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.double()


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_loaded_model_does_not_change_when_its_file_is_overwritten(tmp_path, loader, fmt):
    """`cp other/model.safetensors ckpt/` after loading silently turned the loaded model into the other
    checkpoint (its weights were copy-on-write maps of the file)."""
    path = save_random(tmp_path / "a", seed=0, bin_format=fmt == "bin")
    other = save_random(tmp_path / "b", seed=1, bin_format=fmt == "bin")
    model = NeoXForCausalLM.from_pretrained(path, **LOADERS[loader])
    before = logits(model)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    shutil.copyfile(other / name, path / name)  # in place: same inode, new bytes
    assert torch.equal(logits(model), before)
    assert not torch.equal(logits(NeoXForCausalLM.from_pretrained(path, **LOADERS[loader])), before)


CHILD = """
import os, sys, torch
from neox_lab import NeoXForCausalLM
kwargs = {kwargs}
model = NeoXForCausalLM.from_pretrained(sys.argv[1], **kwargs)
with torch.no_grad():
    before = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
os.truncate(os.path.join(sys.argv[1], "model.safetensors"), 100)
with torch.no_grad():
    after = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
print("same" if torch.equal(before, after) else "changed")
"""


@pytest.mark.parametrize("loader", ["whole", "device_map"])
def test_truncating_the_file_after_loading_does_not_kill_the_process(tmp_path, loader):
    """Truncating the file killed the process with SIGBUS at the next forward (run in a child process)."""
    path = save_random(tmp_path / "a", seed=0)
    kwargs = {k: v for k, v in LOADERS[loader].items() if k != "dtype"}
    out = subprocess.run([sys.executable, "-c", CHILD.format(kwargs=kwargs), str(path)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.split()[-1] == "same"


def test_weights_on_disk_are_checked_when_read(tmp_path):
    """A NaN in a block placed on "disk" loaded without complaint and made every logit NaN; a checkpoint
    replaced after loading silently fed the other weights to the offloaded block."""
    path = save_random(tmp_path / "a", seed=0)
    weights = load_file(path / "model.safetensors")
    weights["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"][2, 7] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    on_disk = {"": "cpu", "model.blocks.1": "disk"}
    model = NeoXForCausalLM.from_pretrained(path, device_map=on_disk)  # not read at load: offloading's point
    with pytest.raises(CheckpointError, match=r"'gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight' holds 1 "
                                              r"non-finite"):
        model(IDS)

    path = save_random(tmp_path / "b", seed=0)
    model = NeoXForCausalLM.from_pretrained(path, device_map=on_disk)
    before = logits(model)
    assert torch.equal(logits(model), before)  # read again at each forward: the same
    shutil.copyfile(save_random(tmp_path / "c", seed=1) / "model.safetensors", path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors changed \(or was removed\) since the model was "
                                              r"loaded.*load the model again"):
        model(IDS)


def edit_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize("loader", LOADERS)
def test_sizes_are_checked_against_the_header_on_every_loader_path(tmp_path, loader):
    """A truncated checkpoint loaded with device_map and a dtype cast loaded with its tail zero-filled
    (logits off by 0.32); without the cast it gave a raw reshape error."""
    path = save_random(tmp_path / "a", seed=0)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-448 * 4])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' ends at byte [\d,]+ but the file "
                                              r"holds [\d,]+ bytes; the file was truncated"):
        NeoXForCausalLM.from_pretrained(path, **LOADERS[loader])

    path = save_random(tmp_path / "b", seed=0)
    key = "gpt_neox.layers.0.attention.dense.weight"
    edit_header(path / "model.safetensors", lambda h: h[key].update(shape=[h[key]["shape"][0] - 1,
                                                                           h[key]["shape"][1]]))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is F32 \[31, 32\], 3,968 bytes, but its header "
                                              r"gives it 4,096"):
        NeoXForCausalLM.from_pretrained(path, **LOADERS[loader])


@pytest.mark.parametrize("loader", LOADERS)
def test_an_integer_weight_is_a_checkpoint_error_naming_it(tmp_path, loader):
    path = save_random(tmp_path / "a", seed=0)
    weights = load_file(path / "model.safetensors")
    weights["gpt_neox.layers.1.attention.dense.weight"] = weights["gpt_neox.layers.1.attention.dense.weight"].int()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'gpt_neox\.layers\.1\.attention\.dense\.weight' is stored as int32 "
                                              r"but the model holds it in floating point"):
        NeoXForCausalLM.from_pretrained(path, **LOADERS[loader])
