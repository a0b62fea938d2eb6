"""`neox-lab compare` v2: the small bugs caught at default settings, structural differences as
exit 1 with a report, JSON provenance, argument validation, tokenizer choice for --prompts."""

from __future__ import annotations

import json

import pytest
import torch

from neox_lab import NeoXForCausalLM, NeoXTokenizer
from neox_lab.cli import main
from neox_lab.testing.mutations import one_weight_element, residual_kind, rotary_base
from neox_lab.testing.pairs import make_trained_like, tiny_config

CFG = tiny_config(num_hidden_layers=6)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A 6-layer trained-like checkpoint and three broken copies."""
    root = tmp_path_factory.mktemp("v2")
    torch.manual_seed(0)
    base = make_trained_like(NeoXForCausalLM(CFG).eval(), seed=0, std=0.2)
    base.save_pretrained(root / "base")
    for name, (model, _) in {"rope": rotary_base(base), "element": one_weight_element(base, layer=5),
                             "sequential": residual_kind(base)}.items():
        model.save_pretrained(root / name)
    return root


def _run(args, tmp_path):
    out = tmp_path / "r.json"
    code = main(["compare", *map(str, args), "--json", str(out)])
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_rope_theta_plus_one_is_caught_at_default_settings(ckpts, tmp_path):
    code, rep = _run([ckpts / "rope", ckpts / "base"], tmp_path)
    assert code == 1
    assert rep["config"][0]["field"] == "rope_theta" and rep["config"][0]["changes_function"]
    # fp64 by default: the activations show it too, at the first rotated stream
    assert rep["first_divergence"]["name"] == "blocks.0.attn.hook_rot_q"


def test_one_weight_element_times_1e3_in_layer_5_is_caught_at_default_settings(ckpts, tmp_path):
    code, rep = _run([ckpts / "element", ckpts / "base"], tmp_path)
    assert code == 1
    (bad,) = [t for t in rep["weights"]["tensors"] if not t["passed"]]
    assert (bad["name"], bad["layer"], bad["n_changed"]) == ("blocks.5.mlp.fc_in.weight", 5, 1)
    first = rep["first_divergence"]
    assert (first["name"], first["layer"], first["heads"], first["batch"]) == ("blocks.5.mlp.hook_pre", 5, [], "main")


def test_structural_difference_exits_one_with_the_full_report(ckpts, tmp_path, capsys):
    code, rep = _run([ckpts / "sequential", ckpts / "base"], tmp_path)
    assert code == 1
    assert "FAIL config use_parallel_residual" in capsys.readouterr().out
    assert rep["equivalent"] is False and rep["config"][0]["structural"]
    assert rep["provenance"]["checkpoint_a"]["path"].endswith("sequential")


def test_json_says_what_was_compared(ckpts, tmp_path):
    code, rep = _run([ckpts / "base", ckpts / "base", "--seed", "7", "--batch", "2", "--seq-len", "9"], tmp_path)
    assert code == 0
    prov = rep["provenance"]
    assert prov["inputs"] == {"kind": "random token ids", "seed": 7, "shape": [2, 9]}
    assert prov["arguments"]["seq_len"] == 9 and prov["device"] == "cpu"
    assert prov["versions"]["torch"] and "neox_lab" in prov["versions"]
    assert rep["sides"]["model_a"]["dtype"] == "float64" and rep["sides"]["model_b"]["backend"] == "eager"
    assert isinstance(rep["hooks"][0]["rel"], float)


@pytest.mark.parametrize("args", [["--batch", "0"], ["--seq-len", "0"], ["--scale", "nan"], ["--scale", "0"],
                                  ["--scale", "-2"], ["--scale", "inf"], ["--probe-len", "-1"]])
def test_bad_numbers_are_usage_errors(ckpts, args, capsys):
    assert main(["compare", str(ckpts / "base"), str(ckpts / "base"), *args]) == 2
    assert "error: --" in capsys.readouterr().err


def test_unwritable_json_is_exit_two(ckpts, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compare", str(ckpts / "base"), str(ckpts / "base"), "--seq-len", "4",
                 "--json", str(blocker / "r.json")]) == 2
    err = capsys.readouterr().err  # refused before comparing, naming the flag and why
    assert err.startswith("neox-lab compare: error: --json") and "is a file" in err, err


def test_prompts_need_a_named_tokenizer_and_small_vocabularies_fold_on_request(ckpts, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\nthe same words again, hello world\n")
    base = str(ckpts / "base")
    assert main(["compare", base, base, "--prompts", str(prompts)]) == 2
    assert "neither checkpoint has a tokenizer.json" in capsys.readouterr().err
    assert main(["compare", base, base, "--prompts", str(prompts), "--tokenizer", "bundled"]) == 2
    assert "--fold-ids" in capsys.readouterr().err  # GPT-NeoX ids do not fit a 97-token vocabulary
    code, rep = _run([base, base, "--prompts", prompts, "--tokenizer", "bundled", "--fold-ids"], tmp_path)
    assert code == 0
    inputs = rep["provenance"]["inputs"]
    assert inputs["tokenizer"].startswith("bundled") and inputs["ids_folded_modulo"] == CFG.vocab_size
    assert len(inputs["sha256"]) == 64


def test_prompts_use_the_checkpoints_own_tokenizer_and_say_so(tmp_path):
    tok = NeoXTokenizer.default()
    torch.manual_seed(0)
    model = NeoXForCausalLM(tiny_config(vocab_size=len(tok), hidden_size=16, num_attention_heads=2,
                                        num_hidden_layers=1)).eval()
    model.tokenizer = tok
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")
    code, rep = _run([tmp_path / "m", tmp_path / "m", "--prompts", prompts], tmp_path)
    assert code == 0 and rep["provenance"]["inputs"]["tokenizer"].endswith("m/tokenizer.json")
