"""Mistakes a user can make on the command line: one ``neox-lab CMD: error: ...`` line and exit 2, never a
traceback, and (where the mistake is visible up front) nothing done."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.cli import main

CFG = NeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 rotary_pct=0.5, max_position_embeddings=32)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message of a CPU-only torch")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    NeoXForCausalLM(CFG).save_pretrained(root / "model")
    np.save(root / "ids.npy", np.random.default_rng(0).integers(0, 64, (4, 6)))
    return root


def cache_argv(ckpt, out, *extra):
    return ["cache", "--model", str(ckpt / "model"), "--data", str(ckpt / "ids.npy"), "--hooks", "hook_embed",
            "--out", str(out), "--no-progress", *extra]


def fails_with(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err


@no_cuda
@pytest.mark.parametrize("command", ["cache", "generate"])
def test_device_cuda_on_a_cpu_torch(ckpt, tmp_path, capsys, command):
    argv = (cache_argv(ckpt, tmp_path / "o", "--device", "cuda") if command == "cache" else
            ["generate", "--model", str(ckpt / "model"), "--device", "cuda", "x"])
    fails_with(capsys, argv, rf"neox-lab {command}: error: --device cuda: this torch .* sees no CUDA device")
    assert not (tmp_path / "o").exists()


def test_a_device_that_is_no_device(ckpt, tmp_path, capsys):
    fails_with(capsys, cache_argv(ckpt, tmp_path / "o", "--device", "gpu0"), r"--device 'gpu0' is not a torch device")


def test_cache_out_is_a_file(ckpt, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails_with(capsys, cache_argv(ckpt, tmp_path / "f"), r"error: --out .*f is a file, not a directory")
    fails_with(capsys, cache_argv(ckpt, tmp_path / "f" / "sub"), r"error: --out .*f is a file, so no directory")


def test_cache_out_not_writable(ckpt, tmp_path, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    fails_with(capsys, cache_argv(ckpt, tmp_path / "o"), r"error: --out .*o: .* is not writable \(permission denied\)")


def test_cache_permission_denied_while_writing(ckpt, tmp_path, capsys, monkeypatch):
    # Root passes every access() check; what the kernel refuses later must still be one line and exit 2.
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    fails_with(capsys, cache_argv(ckpt, tmp_path / "o"), r"neox-lab cache: error: .*Permission denied")


def test_cache_data_not_utf8(ckpt, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin1"))
    argv = cache_argv(ckpt, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(tmp_path / "latin1.txt")
    fails_with(capsys, argv, r"data file .*latin1\.txt is not UTF-8 text .*iconv")


@pytest.mark.parametrize("content, pattern", [
    (b"\xff\xfe{}", r"config .*config\.json is not UTF-8 text"),
    (b"{\"hidden_size\": ", r"config .*config\.json is not valid JSON"),
    (b"[]", r"config .*config\.json holds a JSON list"),
])
def test_a_broken_config(ckpt, tmp_path, capsys, content, pattern):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(content)
    argv = cache_argv(ckpt, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(model)
    fails_with(capsys, argv, pattern)
    fails_with(capsys, ["generate", "--model", str(model), "x"], pattern)


def test_demo_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails_with(capsys, ["demo", "--out", str(tmp_path / "f"), "--no-progress"],
               r"neox-lab demo: error: --out .*f is a file")


def test_compare_json_unwritable(ckpt, tmp_path, capsys):
    (tmp_path / "report.json").mkdir()  # a directory where the report file should go
    model = str(ckpt / "model")
    fails_with(capsys, ["compare", model, model, "--seq-len", "4", "--batch", "1", "--json",
                        str(tmp_path / "report.json")], r"neox-lab compare: error: .*report\.json")
