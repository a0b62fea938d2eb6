"""`neox-lab compare A B`: exit codes, the printed table, the JSON artifact, hf:DIR and --prompts."""

from __future__ import annotations

import json

import pytest
import torch

from neox_lab import NeoXForCausalLM, NeoXTokenizer
from neox_lab.cli import main
from neox_lab.testing.pairs import tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny checkpoint and a copy with one weight of layer 1 moved."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = NeoXForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    model.save_pretrained(root / "a")
    with torch.no_grad():
        model.model.blocks[1].mlp.fc_in.weight[5, 7] += 1.0
    model.save_pretrained(root / "edited")
    return root


def test_identical_checkpoints_exit_zero(checkpoints, capsys):
    assert main(["compare", str(checkpoints / "a"), str(checkpoints / "a"), "--batch", "2", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "hook_embed" in out and out.rstrip().splitlines()[-1].startswith("EQUIVALENT")


def test_an_edited_checkpoint_exits_one_and_names_the_layer(checkpoints, tmp_path, capsys):
    out_json = tmp_path / "ci" / "report.json"
    code = main(["compare", str(checkpoints / "edited"), str(checkpoints / "a"), "--json", str(out_json),
                 "--only-failures"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "first divergence at blocks.1.mlp.hook_pre (layer 1)" in printed
    assert "blocks.0." not in printed  # --only-failures: nothing upstream fails
    report = json.loads(out_json.read_text())
    assert report["equivalent"] is False and report["first_divergence"]["layer"] == 1


def test_per_side_dtype_uses_that_pairs_floor(checkpoints, capsys):
    a = str(checkpoints / "a")
    assert main(["compare", a, a, "--dtype-a", "float16", "--dtype-b", "float32", "--seq-len", "8"]) == 0
    assert "measured: 4 x the rounding of the reference in float16, float32 against float64" in capsys.readouterr().out
    # The same fp16 gap against a floor shrunk 10^4 times is a failure.
    assert main(["compare", a, a, "--dtype-a", "float16", "--dtype-b", "float32", "--scale", "1e-4",
                 "--seq-len", "8"]) == 1


def test_checkpoint_against_its_weights_in_transformers(checkpoints, capsys):
    pytest.importorskip("transformers")
    a = str(checkpoints / "a")
    assert main(["compare", a, "hf:" + a, "--backend-b", "sdpa", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "transformers GPTNeoXForCausalLM float64/hf-sdpa" in out  # fp64 by default on CPU
    # rot_q/k, scores, pattern, per-head results and LayerNorm statistics are recomputed from its modules
    assert "skipped" not in out and "blocks.2.attn.hook_rot_q" in out and "ln1.hook_scale" in out


def test_prompts_are_tokenized_with_the_checkpoints_tokenizer(tmp_path, capsys):
    tok = NeoXTokenizer.default()
    torch.manual_seed(0)
    model = NeoXForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=16, num_attention_heads=2,
                                        num_hidden_layers=1)).eval()
    model.tokenizer = tok
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nA much longer second prompt, padded on the left of the first\n")
    assert main(["compare", str(tmp_path / "m"), str(tmp_path / "m"), "--prompts", str(prompts)]) == 0
    assert "real positions" in capsys.readouterr().out


def test_prompts_outside_the_vocabulary_and_missing_checkpoints_exit_two(checkpoints, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world, in GPT-NeoX token ids far above 97\n")
    a = str(checkpoints / "a")
    assert main(["compare", a, a, "--prompts", str(prompts), "--tokenizer", "bundled"]) == 2
    assert "outside the model's vocabulary of 97" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nowhere"), a]) == 2
    assert "no config.json" in capsys.readouterr().err
