"""`neox_lab.testing.compare` between neox_lab models: identity, single-weight edits, head swaps,
dtypes and backends, padding, the report's renderings and `assert_equivalent`.

The edits are far above every floor (a weight moved by 1.0 in a model whose weights are ~N(0, 0.02)
changes its stream by tens of percent, the fp32 floor is ~2e-5), and everything upstream of an edit
is computed by bit-identical code on bit-identical inputs, so it must show exactly zero error.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import NeoXForCausalLM
from neox_lab.testing import NotEquivalentError, Tolerance, assert_equivalent, compare, policy_for
from neox_lab.testing.pairs import tiny_config

CFG = tiny_config(num_hidden_layers=3)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return NeoXForCausalLM(CFG, attn_backend="eager").eval()  # "auto" is sdpa on CPU


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))


def test_model_against_itself_is_exact(base, ids):
    report = compare(base, copy.deepcopy(base), ids)
    assert report.equivalent and report.first_divergence is None
    assert len(report.hooks) == len(base.hook_names())  # eager on both sides: every hook compared
    assert all(h.rel == 0.0 and h.max_abs == 0.0 for h in report.hooks)
    assert report.logits.rel == 0.0 and report.logits.kl_max == 0.0 and report.logits.top1_agreement == 1.0
    assert_equivalent(report)


# param -> the first hook its edit reaches (forward order; hook_result is built from W_O when cached)
EDITS = {
    "attn.qkv.weight": None,  # hook_q, hook_k or hook_v, by the edited row
    "attn.out.weight": "attn.hook_result",
    "attn.out.bias": "hook_attn_out",
    "ln1.weight": "ln1.hook_ln_out",
    "ln2.bias": "ln2.hook_ln_out",
    "mlp.fc_in.weight": "mlp.hook_pre",
    "mlp.fc_out.weight": "hook_mlp_out",
}


@given(layer=st.integers(0, CFG.num_hidden_layers - 1), param=st.sampled_from(sorted(EDITS)), data=st.data())
def test_one_edited_weight_diverges_first_in_its_layer(base, ids, layer, param, data):
    edited = copy.deepcopy(base)
    weight = edited.get_parameter(f"model.blocks.{layer}.{param}")
    index = tuple(data.draw(st.integers(0, n - 1)) for n in weight.shape)
    with torch.no_grad():
        weight[index] += 1.0
    expected = EDITS[param]
    if expected is None:  # rows are laid out (n_heads qkv d_head)
        expected = "attn.hook_" + "qkv"[(index[0] // CFG.head_dim) % 3]
    report = compare(edited, base, ids)
    first = report.first_divergence
    assert first is not None and not report.equivalent
    assert (first.layer, first.name) == (layer, f"blocks.{layer}.{expected}"), report.table()
    upstream = report.hooks[:report.hooks.index(first)]
    assert all(h.rel == 0.0 for h in upstream)
    with pytest.raises(NotEquivalentError, match=rf"first divergence at blocks\.{layer}\.{expected}"):
        assert_equivalent(report)


def _swap_heads(model, layer, i, j, *, qkv: bool, w_o: bool):
    """Exchange heads i and j of one layer: their fused-QKV rows ((n_heads qkv d_head) layout) and/or
    their W_O columns ((n_heads d_head) in out.weight)."""
    attn = model.model.blocks[layer].attn
    d = CFG.head_dim
    rows = lambda h: slice(3 * d * h, 3 * d * (h + 1))
    cols = lambda h: slice(d * h, d * (h + 1))
    with torch.no_grad():
        if qkv:
            for p in (attn.qkv.weight, attn.qkv.bias):
                a, b = p[rows(i)].clone(), p[rows(j)].clone()
                p[rows(i)], p[rows(j)] = b, a
        if w_o:
            a, b = attn.out.weight[:, cols(i)].clone(), attn.out.weight[:, cols(j)].clone()
            attn.out.weight[:, cols(i)], attn.out.weight[:, cols(j)] = b, a


def test_consistent_head_swap_keeps_the_output_but_is_caught_per_head(base, ids):
    """Swapping both the QKV rows and the W_O columns of two heads is a symmetry: the model computes the
    same function (logits agree to rounding). What changes is which index each head lives at, which
    breaks every per-head finding (patching, attribution). compare holds per-head streams to the
    reference's head order, so it reports the permutation at the first per-head hook."""
    swapped = copy.deepcopy(base)
    _swap_heads(swapped, 1, 0, 2, qkv=True, w_o=True)
    report = compare(swapped, base, ids)
    assert report.logits.passed and report["blocks.1.hook_attn_out"].passed
    assert report.first_divergence.name == "blocks.1.attn.hook_q"
    assert all(h.passed for h in report.hooks if h.layer != 1 or ".attn." not in h.name)


@pytest.mark.parametrize(("qkv", "w_o", "first"), [(True, False, "attn.hook_q"), (False, True, "attn.hook_result")])
def test_half_a_head_swap_changes_the_function(base, ids, qkv, w_o, first):
    """Swapping only one side pairs each head's values with the other head's output projection: a
    different function, caught at the first stream it touches, and visible in the logits."""
    swapped = copy.deepcopy(base)
    _swap_heads(swapped, 2, 1, 3, qkv=qkv, w_o=w_o)
    report = compare(swapped, base, ids)
    assert report.first_divergence.name == f"blocks.2.{first}"
    assert not report["blocks.2.hook_attn_out"].passed and not report.logits.passed_error


def test_fp16_passes_under_the_fp16_policy_and_fails_under_the_fp32_one(base, ids):
    half = copy.deepcopy(base).half()  # torch 2.13's CPU kernels run fp16 end to end
    report = compare(half, base, ids)
    assert report.equivalent, report.table()
    assert report.tolerance.label == "float16/eager vs float32/eager"
    assert max(h.rel for h in report.hooks) > 1e-5  # a real fp16 gap, not a no-op cast
    strict = compare(half, base, ids, tolerance=policy_for(torch.float32, torch.float32, width=64))
    assert not strict.equivalent and strict.first_divergence.name == "hook_embed"


def test_bf16_passes_under_its_policy(base, ids):
    assert compare(copy.deepcopy(base).bfloat16(), base, ids).equivalent


def test_sdpa_against_eager_skips_only_the_eager_streams(base, ids):
    sdpa = copy.deepcopy(base)
    sdpa.set_attn_backend("sdpa")
    report = compare(sdpa, base, ids)
    assert report.equivalent, report.table()
    assert set(report.skipped) == {f"blocks.{i}.attn.{h}" for i in range(3) for h in ("hook_attn_scores",
                                                                                      "hook_pattern")}
    assert "eager kernel" in next(iter(report.skipped.values()))


def _add_at(model, name, rows, cols, value):
    def fn(t, *, hook):
        t = t.clone()
        t[rows, cols] += value
        return t
    model.add_hook(name, fn, permanent=True)


# The edits above address one batch's [row, position]: compare only that batch.
MAIN_ONLY = dict(padded=False, probe_len=None, decode_steps=0)


def test_only_real_positions_are_compared(base):
    ids = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    at_pad = copy.deepcopy(base)
    _add_at(at_pad, "blocks.0.hook_resid_post", 0, 1, 5.0)  # row 0, a left-pad position
    assert compare(at_pad, base, ids, attention_mask=mask, **MAIN_ONLY).equivalent
    at_real = copy.deepcopy(base)
    _add_at(at_real, "blocks.0.hook_resid_post", 0, 2, 5.0)
    report = compare(at_real, base, {"input_ids": ids, "attention_mask": mask}, **MAIN_ONLY)
    assert report.first_divergence.name == "blocks.0.hook_resid_post"
    assert report.n_positions == 10


def test_a_nan_on_one_side_is_an_infinite_error(base, ids):
    broken = copy.deepcopy(base)
    _add_at(broken, "blocks.1.mlp.hook_post", 0, 3, float("nan"))
    report = compare(broken, base, ids, **MAIN_ONLY)
    assert report.first_divergence.name == "blocks.1.mlp.hook_post"
    assert report.first_divergence.rel == float("inf")
    assert "non-finite" in report.summary()
    hooks = {h["name"]: h for h in json.loads(report.to_json())["hooks"]}
    # strict JSON: null with a flag, not Infinity (and not a string in a numeric field)
    assert hooks["blocks.1.mlp.hook_post"]["rel"] is None
    assert hooks["blocks.1.mlp.hook_post"]["rel_nonfinite"] == "inf"


def test_report_renderings_and_error_message(base, ids):
    edited = copy.deepcopy(base)
    with torch.no_grad():
        edited.model.blocks[1].mlp.fc_in.weight[3, 4] += 1.0
    report = compare(edited, base, ids, hooks=lambda n: "resid" in n or "mlp" in n)
    d = json.loads(report.to_json())
    assert d["equivalent"] is False
    assert d["first_divergence"] == {"name": "blocks.1.mlp.hook_pre", "layer": 1, "heads": [], "batch": "main",
                                     "positions": []}
    assert d["verdict"] == "not equivalent" and d["exit_status"] == 1
    assert {h["name"] for h in d["hooks"]} == {h.name for h in report.hooks}
    assert all("resid" in h.name or "mlp" in h.name for h in report.hooks)
    table = report.table()
    assert "blocks.1.mlp.hook_pre" in table and "<- first divergence" in table and "NOT EQUIVALENT" in table
    with pytest.raises(AssertionError) as err:
        assert_equivalent(report, "after my edit")
    message = str(err.value)
    assert message.startswith("after my edit") and "blocks.1.mlp.hook_pre (layer 1)" in message
    assert f"{report.first_divergence.rel:.3g}" in message and "blocks.0.hook_resid_post" not in message


def test_hook_selection_and_custom_tolerance(base, ids):
    only = compare(base, base, ids, hooks="blocks.1.hook_resid_post")
    assert [h.name for h in only.hooks] == ["blocks.1.hook_resid_post"]
    assert compare(base, base, ids, hooks=None).hooks == []
    flat = Tolerance(rel=1e-3)
    assert flat.rel_at(1) == flat.rel_at(40) == 1e-3
    assert compare(base, base, ids, tolerance=flat).tolerance is flat
    with pytest.raises(KeyError, match="hook_resid_mid"):
        compare(base, base, ids, hooks=["blocks.0.hook_resid_mid"])  # parallel blocks have none


def test_bad_inputs_are_refused_with_the_reason(base, ids):
    other = NeoXForCausalLM(CFG.replace(num_hidden_layers=2))
    structural = compare(other, base, ids)  # not an error: a report that says why they differ
    assert not structural.equivalent and "config num_hidden_layers: model_a 2, model_b 3" in structural.summary()
    with pytest.raises(ValueError, match="at least one real"):
        compare(base, base, ids, attention_mask=torch.tensor([[0] * 10, [1] * 10]))
    with pytest.raises(TypeError, match="an nn.Module, a callable"):
        compare(42, base, ids)
    # Any module is a port; one that is not a NeoX says so when it is called, naming the side and the call.
    with pytest.raises(RuntimeError, match=r"model_a: calling the port as Linear\(input_ids\)"):
        compare(torch.nn.Linear(2, 2), base, ids)


def test_policy_orders_the_formats():
    rel = {d: policy_for(d).rel for d in ("float64", "float32", "float16", "bfloat16")}
    assert rel["float64"] < rel["float32"] < rel["float16"] < rel["bfloat16"]
    assert policy_for("fp16", "float32").rel == policy_for(torch.float32, torch.float16).rel
    assert policy_for(torch.float64, torch.float64, "eager", "hf-eager").rel > 1e3 * rel["float64"]
    tol = policy_for(torch.float32)
    assert tol.rel_at(4) == pytest.approx(2 * tol.rel) and tol.scaled(3).rel == pytest.approx(3 * tol.rel)
    with pytest.raises(ValueError, match="int8"):
        policy_for("int8")
