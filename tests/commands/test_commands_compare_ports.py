"""`neox-lab compare` with a port side (`py:package.module:factory`) and the verdicts' exit statuses:
0 equivalent, 1 not equivalent, 2 usage error, 3 same function with another parametrisation, 4 the
reference unusable at that setting."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from neox_lab import NeoXForCausalLM
from neox_lab.cli import main
from neox_lab.testing.pairs import make_trained_like, tiny_config

CFG = tiny_config(num_hidden_layers=2)

FACTORY = '''
import copy, types
import torch
import torch.nn.functional as F
from neox_lab import HookedTransformer, NeoXForCausalLM
from neox_lab.testing.plain_port import PlainNeoX, port

def build():
    return port(PlainNeoX.from_neox(NeoXForCausalLM.from_pretrained({path!r})))

def build_buggy():
    plain = PlainNeoX.from_neox(NeoXForCausalLM.from_pretrained({path!r}))
    fc2 = plain.layers[1].mlp.fc2
    fc2.forward = types.MethodType(lambda self, x: F.linear(x, self.weight), fc2)  # bias dropped in layer 1
    return port(plain)

def folded():
    """A model after TransformerLens' weight processing (it cannot be saved as a transformers checkpoint)."""
    return HookedTransformer(NeoXForCausalLM.from_pretrained({path!r}, dtype=torch.float64)).process_weights_()

def logits_only():
    plain = PlainNeoX.from_neox(NeoXForCausalLM.from_pretrained({path!r}))
    return lambda ids, mask: plain(ids, mask)
'''


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ports")
    torch.manual_seed(0)
    model = make_trained_like(NeoXForCausalLM(CFG).eval(), seed=0, std=0.2)
    model.save_pretrained(root / "ref")
    return root


def _factory(tmp_path, monkeypatch, ckpt, name):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY.format(path=str(ckpt / "ref"))))
    monkeypatch.chdir(tmp_path)
    return name


def test_a_port_factory_is_a_side(ckpt, tmp_path, monkeypatch, capsys):
    mod = _factory(tmp_path, monkeypatch, ckpt, "port_factory_a")
    out = tmp_path / "r.json"
    assert main(["compare", f"py:{mod}:build", str(ckpt / "ref"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "A: py:port_factory_a:build: port PlainNeoX float32" in printed and "EQUIVALENT" in printed
    rep = json.loads(out.read_text())
    assert rep["provenance"]["checkpoint_a"]["runner"] == "port" and rep["sides"]["model_a"]["library"] == "port"
    assert rep["verdict"] == "equivalent" and rep["decoding"]["consistency"]["model_a"]
    assert main(["compare", f"py:{mod}:build_buggy", str(ckpt / "ref"), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["first_divergence"]["name"] == "blocks.1.hook_mlp_out"
    # a callable: logits only, still caught by them; --dtype casts a module, not a callable
    assert main(["compare", f"py:{mod}:logits_only", str(ckpt / "ref")]) == 0
    assert main(["compare", f"py:{mod}:logits_only", str(ckpt / "ref"), "--dtype-a", "float16"]) == 2
    assert "--dtype cannot cast a plain callable" in capsys.readouterr().err


def test_bad_port_specs_are_usage_errors(ckpt, tmp_path, monkeypatch, capsys):
    mod = _factory(tmp_path, monkeypatch, ckpt, "port_factory_b")
    ref = str(ckpt / "ref")
    for spec, said in ((f"py:{mod}", "write py:package.module:factory"),
                       ("py:no_such_module_here:build", "cannot import no_such_module_here"),
                       (f"py:{mod}:nothing", "has no function 'nothing'")):
        assert main(["compare", spec, ref]) == 2
        assert said in capsys.readouterr().err
    assert main(["compare", f"py:{mod}:build", ref, "--backend-a", "sdpa"]) == 2
    assert "--backend-a applies to a checkpoint side" in capsys.readouterr().err
    assert main(["compare", ref, ref, "--decode-steps", "-1"]) == 2


def test_a_processed_model_exits_three(ckpt, tmp_path, monkeypatch, capsys):
    mod = _factory(tmp_path, monkeypatch, ckpt, "port_factory_c")
    assert main(["compare", f"py:{mod}:folded", str(ckpt / "ref")]) == 3
    assert "SAME FUNCTION, DIFFERENT PARAMETRISATION (center_unembed, center_writing_weights, fold_ln" in \
        capsys.readouterr().out


def test_transformers_runs_sdpa_by_default_and_a_nan_reference_exits_four(ckpt, capsys):
    pytest.importorskip("transformers")
    ref = str(ckpt / "ref")
    assert main(["compare", ref, "hf:" + ref]) == 0
    assert "transformers GPTNeoXForCausalLM float64/hf-sdpa" in capsys.readouterr().out
    # its eager attention in fp64 gives NaN on the left-padded batch compare adds
    assert main(["compare", ref, "hf:" + ref, "--backend-b", "eager"]) == 4
    printed = capsys.readouterr().out
    assert "REFERENCE UNUSABLE: the reference is unusable on the left-padded batch" in printed
    assert "transformers (sdpa, float64) is finite on the same inputs (--backend-b sdpa)" in printed
