"""`model.load_checkpoint_`: another checkpoint loaded into the same tensors, exactly what `from_pretrained`
loads, hooks / backend / placement / processing kept, and every refusal leaves the model untouched.

Exactness: loading in place writes the same converted values `from_pretrained` assigns, and the
forward runs the same kernels on them, so weights and logits must agree bit for bit (torch.equal).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from neox_lab import CheckpointError, HookedTransformer, NeoXForCausalLM, NeoXForSequenceClassification
from neox_lab.testing.pairs import make_trained_like, tiny_config

CFG = tiny_config()
IDS = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def save_random(path, seed, cfg=CFG, dtype=torch.float32):
    torch.manual_seed(seed)
    model = make_trained_like(NeoXForCausalLM(cfg), seed).to(dtype)
    model.save_pretrained(path)
    return path


def pointers(model):
    return {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.stored_state_dict().items()}


def assert_same_state(a, b):
    sa, sb = a.stored_state_dict(), b.stored_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def ckpts(tmp_path):
    return [save_random(tmp_path / f"step{i}", seed=i) for i in range(3)]


@given(order=st.permutations([0, 1, 2]), backend=st.sampled_from(["eager", "sdpa"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), tie=st.booleans())
def test_in_place_equals_from_pretrained_and_keeps_every_tensor(order, backend, dtype, tie, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    cfg = tiny_config(tie_word_embeddings=tie)
    paths = [save_random(root / f"s{i}", i, cfg, torch.float16 if i == 1 else torch.float32) for i in range(3)]
    model = NeoXForCausalLM.from_pretrained(paths[order[0]], dtype=dtype, attn_backend=backend)
    seen = []
    model.add_hook("blocks.0.attn.hook_z", lambda z, hook: seen.append(hook.name))
    before = pointers(model)
    for i in order[1:] + order[:1]:
        assert model.load_checkpoint_(paths[i]) is model
        ref = NeoXForCausalLM.from_pretrained(paths[i], dtype=dtype, attn_backend=backend)
        assert_same_state(model, ref)
        assert pointers(model) == before  # not one tensor reallocated
        assert model.attn_backend == backend
        with torch.no_grad():
            seen.clear()
            assert torch.equal(model(IDS).logits, ref(IDS).logits)
            assert seen == ["blocks.0.attn.hook_z"]  # the hook is still there
    assert (model.unembed.weight is model.model.embed.weight) == tie


def refused(model, path, match):
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        model.load_checkpoint_(path)
    after = model.stored_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint changed the model"


def edited(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checks_as_strict_as_from_pretrained_and_nothing_half_written(ckpts, tmp_path):
    model = NeoXForCausalLM.from_pretrained(ckpts[0])
    src = ckpts[1]
    qkv = "gpt_neox.layers.1.attention.query_key_value.weight"

    def layers(c):
        c["num_hidden_layers"] = 3

    refused(model, edited(src, tmp_path / "deep", edit_config=layers),
            r"config field 'num_hidden_layers' is 3 but the model's is 2.*structural")

    def base(c):
        c["rotary_emb_base"] = 500.0

    refused(model, edited(src, tmp_path / "base", edit_config=base), r"'rotary_emb_base' is 500.0.*silently")

    def nan(t):
        t[qkv][3, 4] = float("nan")

    # The bad tensor is the last one read: every other tensor was fine, and none may have been written.
    refused(model, edited(src, tmp_path / "nan", nan), r"layers.1.attention.query_key_value.weight.*non-finite")

    def missing(t):
        del t[qkv]

    refused(model, edited(src, tmp_path / "missing", missing), r"missing \(1\): " + qkv)

    def extra(t):
        t["gpt_neox.layers.9.mlp.dense_h_to_4h.weight"] = torch.zeros(2)

    refused(model, edited(src, tmp_path / "extra", extra), "unexpected")

    def shape(t):
        t[qkv] = t[qkv][:-1]

    refused(model, edited(src, tmp_path / "shape", shape), "mis-shaped")

    def ints(t):
        t[qkv] = t[qkv].to(torch.int32)

    refused(model, edited(src, tmp_path / "ints", ints), "stored as integers.*query_key_value")
    # Dropout and the init range do not change what an eval-mode model computes: accepted.

    def dropout(c):
        c.update(hidden_dropout=0.1, initializer_range=0.5)

    model.load_checkpoint_(edited(src, tmp_path / "dropout", edit_config=dropout))
    assert_same_state(model, NeoXForCausalLM.from_pretrained(src))


def test_a_tied_model_refuses_a_head_that_differs_from_the_embedding(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    model = NeoXForCausalLM.from_pretrained(save_random(tmp_path / "a", 0, cfg))

    def head(t):
        t["embed_out.weight"] = t["gpt_neox.embed_in.weight"] + 1

    refused(model, edited(tmp_path / "a", tmp_path / "b", head), "embed_out different from its embedding")


def test_an_untied_model_takes_a_tied_checkpoint(tmp_path):
    untied = NeoXForCausalLM.from_pretrained(save_random(tmp_path / "u", 0, tiny_config()))
    tied_path = save_random(tmp_path / "t", 1, tiny_config(tie_word_embeddings=True))
    untied.load_checkpoint_(tied_path)
    assert torch.equal(untied.unembed.weight, untied.model.embed.weight)
    assert untied.unembed.weight is not untied.model.embed.weight
    with torch.no_grad():
        assert torch.equal(untied(IDS).logits, NeoXForCausalLM.from_pretrained(tied_path)(IDS).logits)


def test_a_processed_model_is_processed_again(ckpts):
    # Processing is HookedTransformer's (lens/); its load_checkpoint_ hands the processing in.
    model = HookedTransformer.from_pretrained(ckpts[0], dtype=torch.float64)
    before = pointers(model)
    model.load_checkpoint_(ckpts[1])
    ref = HookedTransformer.from_pretrained(ckpts[1], dtype=torch.float64)
    assert pointers(model) == before
    assert model.weights_processed == ref.weights_processed == {"fold_ln", "center_writing_weights",
                                                                 "center_unembed", "fold_value_biases"}
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        # Processing is the same float64 arithmetic on the same raw values; the one difference is an
        # unembedding bias the reload zeroes before folding (0 + shift == shift exactly).
        assert torch.equal(a, b), k


def test_a_processed_model_refuses_a_raw_reload(ckpts):
    # Through the transformers-convention class, the processing would be silently lost: refused, untouched.
    hooked = HookedTransformer.from_pretrained(ckpts[0], dtype=torch.float64)
    state = snapshot(hooked.hf())
    with pytest.raises(CheckpointError, match=r"processed \(center_unembed, .*HookedTransformer.load_checkpoint_"):
        hooked.hf().load_checkpoint_(ckpts[1])
    after = hooked.hf().stored_state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_a_classifier_keeps_its_head_over_causal_lm_checkpoints(ckpts):
    with pytest.warns(UserWarning, match="initialised new head weights"):
        model = NeoXForSequenceClassification.from_pretrained(ckpts[0])
    head = model.score.weight.detach().clone()
    model.load_checkpoint_(ckpts[1])
    assert torch.equal(model.score.weight, head)
    assert torch.equal(model.model.embed.weight, NeoXForCausalLM.from_pretrained(ckpts[1]).model.embed.weight)


@given(placement=st.sampled_from([{"": "cpu"}, {"": "cpu", "model.blocks.1": "disk"},
                                  {"": "cpu", "model.blocks": "disk"}]))
def test_a_placed_model_stays_placed(placement, tmp_path_factory):
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("placed")
    paths = [save_random(root / f"s{i}", i) for i in range(2)]
    model = NeoXForCausalLM.from_pretrained(paths[0], device_map=placement, attn_backend="eager")
    before = {k: p for k, p in pointers(model).items() if p}  # disk tensors are meta placeholders (0)
    model.load_checkpoint_(paths[1])
    ref = NeoXForCausalLM.from_pretrained(paths[1], attn_backend="eager")
    assert {k: p for k, p in pointers(model).items() if p} == before
    assert model.device_map == NeoXForCausalLM.from_pretrained(paths[0], device_map=placement).device_map
    assert_same_state(model, ref)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_a_reloaded_disk_block_checks_the_new_checkpoints_file(tmp_path):
    """After `load_checkpoint_` points a "disk" block at the new checkpoint's file, that file is the one
    checked at each forward: replacing it is an error; the first checkpoint's file no longer matters."""
    pytest.importorskip("accelerate")
    first, second, other = (save_random(tmp_path / name, seed) for seed, name in enumerate("abc"))
    model = NeoXForCausalLM.from_pretrained(first, device_map={"": "cpu", "model.blocks.1": "disk"})
    model.load_checkpoint_(second)
    (first / "model.safetensors").unlink()  # read no more
    with torch.no_grad():
        model(IDS)
    shutil.copyfile(other / "model.safetensors", second / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"b/model\.safetensors changed \(or was removed\) since the model"):
        model(IDS)
