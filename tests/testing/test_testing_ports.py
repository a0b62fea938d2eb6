"""`compare` on a user's own port: a plain `nn.Module` (`PlainNeoX`, separate q/k/v, its own names), a
callable, a `Port` bundle, and a transformers model whose MLP was replaced. Logits-only is the floor; a
hook map locates a bug at the right layer and stream; a weight map diffs the port's tensors against the
checkpoint's through the fused-QKV transform.

Floors are measured (fp32: 4 x the reference's own fp32 rounding, ~1e-6 relative here); the injected
bugs move a stream by 1e-2 or more, so nothing here sits near a bound.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from neox_lab import HookedTransformer, NeoXForCausalLM
from neox_lab.testing import Port, compare
from neox_lab.testing.pairs import build_pair, make_trained_like, tiny_config
from neox_lab.testing.plain_port import PlainNeoX, hook_map, port, weight_map

CFG = tiny_config(num_hidden_layers=3, max_position_embeddings=128)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(CFG, attn_backend="eager").eval(), seed=0, std=0.2)


@pytest.fixture(scope="module")
def plain(ref):
    return PlainNeoX.from_neox(ref)


def _drop_fc2_bias(plain, layer):
    """A code bug in the port: layer `layer`'s MLP output projection computed without its bias."""
    bad = copy.deepcopy(plain)
    fc2 = bad.layers[layer].mlp.fc2
    fc2.forward = types.MethodType(lambda self, x: F.linear(x, self.weight), fc2)
    return bad


def test_a_module_port_with_maps_matches_and_a_bug_is_located(ref, plain):
    report = compare(plain, ref, hook_map=hook_map(), weight_map=weight_map(CFG), step=plain.step)
    assert report.equivalent, report.table()
    mapped = {h.name for h in report.hooks}
    assert "blocks.2.attn.hook_z" in mapped and "blocks.1.mlp.hook_post" in mapped
    assert "blocks.0.attn.hook_pattern" in report.skipped  # not in the map: listed, not an error
    assert report.weights.passed and len(report.weights.tensors) > 30  # q/k/v rows through qkv_part
    assert "model_a" in report.decoding.consistency  # its step was checked against its own forward

    bad = compare(_drop_fc2_bias(plain, 1), ref, hook_map=hook_map(), weight_map=weight_map(CFG))
    assert not bad.equivalent and bad.weights.passed  # a code bug: the weights are right
    first = bad.first_divergence
    assert (first.name, first.layer, first.batch) == ("blocks.1.hook_mlp_out", 1, "main"), bad.table()
    assert all(h.passed for h in bad.hooks if h.layer == 0)


def test_a_callable_port_is_compared_by_its_logits_and_located_with_a_module_to_read(ref, plain):
    logits_only = compare(lambda ids, mask: plain(ids, mask), ref)
    assert logits_only.equivalent and logits_only.hooks == [] and logits_only.logits is not None
    assert "model_a is a port without a hook map" in set(logits_only.skipped.values())
    assert logits_only.padded_logits.passed and logits_only.probe_logits.passed  # padding and the long probe too

    bad = _drop_fc2_bias(plain, 2)
    caught = compare(lambda ids, mask: bad(ids, mask), ref)
    assert not caught.equivalent and not caught.logits.passed
    located = compare(Port(bad, logits=lambda ids, mask: bad(ids, mask), hooks=hook_map()), ref)
    assert located.first_divergence.name == "blocks.2.hook_mlp_out", located.table()


def test_the_port_bundle_and_a_wrong_fused_weight(ref, plain):
    assert compare(port(plain), ref).equivalent
    swapped = copy.deepcopy(plain)
    with torch.no_grad():
        swapped.layers[1].attn.k_proj.weight.copy_(plain.layers[1].attn.q_proj.weight)  # q rows loaded as k
    report = compare(port(swapped), ref)
    (bad,) = report.weights.failures
    assert bad.name == "layers.1.attn.k_proj.weight = blocks.1.attn.qkv.weight" and bad.layer == 1
    assert report.first_divergence.name == "blocks.1.attn.hook_k"


def test_map_mistakes_are_named_with_the_fix(ref, plain):
    with pytest.raises(KeyError, match="hook_resid_pos'.*did you mean 'blocks.0.hook_resid_post'"):
        compare(plain, ref, hook_map={"blocks.{L}.hook_resid_pos": "layers.{L}"})
    with pytest.raises(KeyError, match="no module 'layers.0.mpl'.*did you mean"):
        compare(plain, ref, hook_map={"blocks.{L}.hook_mlp_out": "layers.{L}.mpl"})
    with pytest.raises(ValueError, match=r"hook_scale \(batch pos 1\) read from layers.0.ln_attn"):
        compare(plain, ref, hook_map={"blocks.{L}.ln1.hook_scale": "layers.{L}.ln_attn"})
    with pytest.raises(KeyError, match="no tensor 'layers.0.attn.qkv.weight'"):
        compare(plain, ref, weight_map={"layers.{L}.attn.qkv.weight": "blocks.{L}.attn.qkv.weight"})
    with pytest.raises(TypeError, match="both sides are ports"):
        compare(plain, copy.deepcopy(plain), hook_map=hook_map())
    with pytest.raises(TypeError, match="apply to a port"):
        compare(ref, ref, hook_map=hook_map())


def test_a_transformers_model_with_a_replaced_mlp_compares_without_crashing():
    cfg = tiny_config(num_hidden_layers=2)
    hf, nx = build_pair(cfg, 0, trained_like=0.2)
    old = hf.gpt_neox.layers[1].mlp

    class FusedMLP(torch.nn.Module):
        """The same MLP with its weights under other names (as a fused kernel would hold them)."""

        def __init__(self):
            super().__init__()
            self.w_in, self.b_in = torch.nn.Parameter(old.dense_h_to_4h.weight.clone()), \
                torch.nn.Parameter(old.dense_h_to_4h.bias.clone())
            self.w_out, self.b_out = torch.nn.Parameter(old.dense_4h_to_h.weight.clone()), \
                torch.nn.Parameter(old.dense_4h_to_h.bias.clone())

        def forward(self, x):
            return F.linear(F.gelu(F.linear(x, self.w_in, self.b_in)), self.w_out, self.b_out)

    hf.gpt_neox.layers[1].mlp = FusedMLP()
    for weights in (True, False):
        report = compare(nx, hf, weights=weights)
        assert report.equivalent, report.table()
    assert "blocks.1.mlp.hook_pre" in report.skipped and "blocks.0.mlp.hook_pre" not in report.skipped
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h is missing" in report.skipped["blocks.1.mlp.hook_pre"]
    assert "blocks.1.hook_mlp_out" in {h.name for h in report.hooks}  # the module's output is still read
    diff = compare(nx, hf).weights
    assert diff.passed and "blocks.1.mlp.w_in" in diff.unmatched and "blocks.1.mlp.fc_in.weight" in diff.unmatched


def test_a_port_as_the_reference_and_two_ports(ref, plain):
    """A port cannot be re-run in another dtype: with one as the reference the candidate's rounding is
    measured instead; with ports on both sides the analytic floor applies, and the report says which."""
    plain64 = port(copy.deepcopy(plain).double())
    as_reference = compare(ref, plain64)
    assert as_reference.equivalent and as_reference.floors.startswith("measured: 4 x the rounding of the candidate")
    both = compare(port(plain), plain64)
    assert both.equivalent and both.floors.startswith("analytic (neither side can be re-run")


def test_a_hooked_transformer_is_a_side_through_its_view(ref, plain):
    """TransformerLens' front door is the same model: compare runs its transformers-convention view
    (`.hf()`), as candidate or reference, and a port can be built from it."""
    hooked = HookedTransformer(ref)
    for report in (compare(hooked, ref), compare(ref, hooked)):
        assert report.equivalent and report.sides["model_a"]["library"] == "neox_lab", report.table()
        assert report.weights.passed and "blocks.2.attn.hook_rot_q" in {h.name for h in report.hooks}
    from_hooked = PlainNeoX.from_neox(hooked)
    assert torch.equal(from_hooked.layers[1].mlp.fc2.bias, plain.layers[1].mlp.fc2.bias)
    assert not compare(_drop_fc2_bias(from_hooked, 1), hooked, hook_map=hook_map()).equivalent
