"""Loading every checkpoint layout transformers writes, and refusing bad checkpoints whole."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import neox_lab
from neox_lab import CheckpointError, NeoXConfig
from neox_lab.testing.strategies import hf_config

transformers = pytest.importorskip("transformers")

CFG = NeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 rotary_pct=0.5, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(hf_config(CFG)).eval()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    with torch.no_grad():
        logits = hf(IDS).logits
    return path, logits


def copy_ckpt(src, dst, edit=None, name="model.safetensors"):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, dst / name, metadata={"format": "pt"})
    return dst


def assert_logits(path, expected, **kw):
    model = neox_lab.NeoXForCausalLM.from_pretrained(path, **kw)
    with torch.no_grad():
        got = model(IDS.to(model.model.embed.weight.device)).logits.float().cpu()
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)
    return model


def test_safetensors_and_lm_head_name(hf_dir, tmp_path):
    src, logits = hf_dir
    assert_logits(src, logits)

    def rename(t):
        t["lm_head.weight"] = t.pop("embed_out.weight")
    assert_logits(copy_ckpt(src, tmp_path / "lm_head", rename), logits)


def test_sharded_safetensors(hf_dir, tmp_path):
    src, logits = hf_dir
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(src)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_logits(tmp_path, logits)


def test_pytorch_bin_plain_and_sharded_with_legacy_buffers(hf_dir, tmp_path):
    src, logits = hf_dir
    state = load_file(src / "model.safetensors")
    for i in range(CFG.num_hidden_layers):  # what old Pythia checkpoints carry
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text((src / "config.json").read_text())
    torch.save(state, plain / "pytorch_model.bin")
    assert_logits(plain, logits)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((src / "config.json").read_text())
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for fname, ks in halves.items():
        torch.save({k: state[k] for k in ks}, sharded / fname)
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_logits(sharded, logits)


def test_bin_files_are_never_unpickled_as_objects(hf_dir, tmp_path):
    src, _ = hf_dir

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        neox_lab.NeoXForCausalLM.from_pretrained(tmp_path)


def test_dtype_and_device_are_honoured(hf_dir):
    src, logits = hf_dir
    model = neox_lab.NeoXForCausalLM.from_pretrained(src, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert not any(p.is_meta for p in model.parameters()) and not model.model.rotary.inv_freq.is_meta
    bf16 = neox_lab.NeoXForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_bad_checkpoints_list_every_problem_and_load_nothing(hf_dir, tmp_path):
    src, _ = hf_dir

    def break_it(t):
        del t["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
        t["gpt_neox.layers.0.attention.extra_thing"] = torch.zeros(3)
        t["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(32, 31)
    bad = copy_ckpt(src, tmp_path / "bad", break_it)
    with pytest.raises(CheckpointError) as err:
        neox_lab.NeoXForCausalLM.from_pretrained(bad)
    msg = str(err.value)
    assert "missing (1): gpt_neox.layers.1.mlp.dense_4h_to_h.bias" in msg
    assert "unexpected (1): gpt_neox.layers.0.attention.extra_thing" in msg
    assert "mis-shaped (1): gpt_neox.layers.0.attention.dense.weight: checkpoint (32, 31), model (32, 32)" in msg


def test_truncated_safetensors_is_a_clear_error(hf_dir, tmp_path):
    src, _ = hf_dir
    dst = copy_ckpt(src, tmp_path / "trunc")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' ends at byte [\d,]+ but the file "
                                              r"holds [\d,]+ bytes; the file was truncated"):
        neox_lab.NeoXForCausalLM.from_pretrained(dst)


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        neox_lab.NeoXForCausalLM.from_pretrained(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local directory"):
        neox_lab.NeoXForCausalLM.from_pretrained("EleutherAI/pythia-70m-no-such-rev")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(CFG.to_hf()))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        neox_lab.NeoXForCausalLM.from_pretrained(empty)


def test_heads_from_a_causal_lm_checkpoint_initialise_their_layers(hf_dir):
    src, _ = hf_dir
    for cls, layer in [(neox_lab.NeoXForSequenceClassification, "score"),
                       (neox_lab.NeoXForTokenClassification, "classifier"),
                       (neox_lab.NeoXForQuestionAnswering, "qa_outputs")]:
        with pytest.warns(UserWarning, match=f"initialised new head weights.*{layer}"):
            model = cls.from_pretrained(src)
        assert torch.isfinite(getattr(model, layer).weight).all()
    body = neox_lab.NeoXModel.from_pretrained(src)
    lm = neox_lab.NeoXForCausalLM.from_pretrained(src)
    torch.testing.assert_close(body(IDS).last_hidden_state, lm(IDS).last_hidden_state, rtol=0, atol=0)


def test_tied_embeddings_save_once_and_stay_tied(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=True)
    model = neox_lab.NeoXForCausalLM(cfg)
    assert model.unembed.weight is model.model.embed.weight
    model.save_pretrained(tmp_path)
    assert "embed_out.weight" not in load_file(tmp_path / "model.safetensors")
    again = neox_lab.NeoXForCausalLM.from_pretrained(tmp_path)
    assert again.unembed.weight is again.model.embed.weight


def test_out_of_range_token_ids_raise_before_any_kernel():
    model = neox_lab.NeoXForCausalLM(CFG)
    calls = []
    model.add_hook("hook_embed", lambda x, hook: calls.append(1))
    for bad in (torch.tensor([[1, 64]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 64\)"):
            model(bad)
    assert calls == []
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


@pytest.mark.parametrize("name", ["GPTNeoXModel", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification",
                                  "GPTNeoXForTokenClassification", "GPTNeoXForQuestionAnswering"])
def test_every_class_saves_what_transformers_loads(name, tmp_path):
    from neox_lab.model.tasks import MODEL_CLASSES

    torch.manual_seed(1)
    model = MODEL_CLASSES[name](CFG.replace(num_labels=3, pad_token_id=1)).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [name]
    hf = getattr(transformers, name).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours, theirs = model(IDS), hf(IDS)
    pick = {"GPTNeoXModel": "last_hidden_state", "GPTNeoXForQuestionAnswering": "start_logits"}.get(name, "logits")
    torch.testing.assert_close(getattr(ours, pick), getattr(theirs, pick), rtol=2e-5, atol=2e-6)
