"""Patching results and metrics as TransformerLens users read them (issue 13, items 6 and 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neox_lab import NeoXConfig, NeoXForCausalLM, patching
from neox_lab.analysis.metrics import loss


def test_loss_metric_is_computed_as_the_model_computes_its_loss():
    """fp32 logits at a 50k vocabulary against an fp64 reference. The model's own `labels=` loss
    (cross-entropy over flattened [rows d_vocab] logits) is within ~2e-7 relative of it; the bound,
    1e-6 relative (~16 fp32 units), fails a cross-entropy taken with the vocabulary as axis 1 of
    [batch d_vocab pos] logits (3e-6 here, 3e-4 reported at longer inputs)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 32, 50304) * 3
    tokens = torch.randint(0, 50304, (2, 32))
    ref = F.cross_entropy(logits.double()[:, :-1].reshape(-1, 50304), tokens[:, 1:].reshape(-1),
                          reduction="none").view(2, 31).mean(-1)
    got = loss(tokens, reduce="none")(logits)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref.abs()).max() < 1e-6
    wide = loss(tokens, reduce="none")(logits.double())  # fp64 logits stay fp64
    torch.testing.assert_close(wide, ref, atol=1e-12, rtol=1e-12)


def test_loss_metric_equals_the_models_loss():
    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    model = NeoXForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 9))
    out = model(ids, labels=ids)
    assert torch.equal(loss(ids)(out.logits), out.loss)


def tiny():
    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg, attn_backend="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 97, (1, 6), generator=g), torch.randint(0, 97, (1, 6), generator=g)


def test_z_pos_is_layer_pos_head_as_transformerlens():
    """With n_pos != n_heads a [layer head pos] result cannot pass for [layer pos head]."""
    model, clean, corrupted = tiny()
    metric = patching.logit_diff(3, 5)
    res = patching.activation_patch(model, clean, corrupted, metric, "z_pos")
    assert res.axes == ("layer", "pos", "head") and res.values.shape == (2, 6, 4)
    assert res.col_labels == [str(i) for i in range(6)] and res.depth_labels == [str(h) for h in range(4)]
    one = patching.activation_patch(model, clean, corrupted, metric, "z_pos", layers=[1], positions=[4],
                                    heads=[2])
    assert one.values[0, 0, 0] == res.values[1, 4, 2]


def test_an_int_position_or_head_drops_its_axis():
    model, clean, corrupted = tiny()
    metric = patching.logit_diff(3, 5)
    full = patching.activation_patch(model, clean, corrupted, metric, "z_pos")
    at = patching.activation_patch(model, clean, corrupted, metric, "z_pos", positions=-1)
    assert at.axes == ("layer", "head") and at.values.shape == (2, 4)
    torch.testing.assert_close(at.values, full.values[:, -1])
    head = patching.activation_patch(model, clean, corrupted, metric, "z", heads=1)
    assert head.axes == ("layer",) and head.values.shape == (2,)
    resid = patching.activation_patch(model, clean, corrupted, metric, "resid_pre", positions=[-1])
    assert resid.axes == ("layer", "pos") and resid.values.shape == (2, 1)
