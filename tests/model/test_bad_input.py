"""Bad checkpoints and bad forward/generate arguments: one clear error naming the file, tensor or argument
(and the fix), never a raw torch traceback or a silently different result."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from neox_lab import (
    CheckpointError,
    NeoXConfig,
    NeoXForCausalLM,
    NeoXForQuestionAnswering,
    NeoXForSequenceClassification,
    NeoXForTokenClassification,
)
from neox_lab.default_model import load_or_default
from neox_lab.dtypes import nonfinite_count
from neox_lab.model import generation
from neox_lab.model.kv_cache import KVCache

CFG = NeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 rotary_pct=0.5, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return NeoXForCausalLM(CFG).eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path


def copy_of(ckpt, dst, edit=None):
    shutil.copytree(ckpt, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def load(path, **kw):
    return NeoXForCausalLM.from_pretrained(path, **kw)


# ------------------------------------------------------------------ dtype argument
def test_dtype_names_are_accepted_and_integer_dtypes_refused_in_one_line(ckpt):
    assert load(ckpt, dtype="float16").unembed.weight.dtype == torch.float16
    assert load(ckpt, dtype="torch.bfloat16").unembed.weight.dtype == torch.bfloat16
    for bad in (torch.int8, "int8", "fp17"):
        with pytest.raises(ValueError) as err:
            load(ckpt, dtype=bad)
        assert len(str(err.value)) < 300 and "float16" in str(err.value)


# ------------------------------------------------------------------ JSON files
@pytest.mark.parametrize("text, message", [
    ("{not json", r"config .*config\.json is not valid JSON \(line 1"),
    ("[1, 2]", r"config .*config\.json holds a JSON list, not an object"),
])
def test_a_broken_config_names_the_file(ckpt, tmp_path, text, message):
    bad = copy_of(ckpt, tmp_path / "c")
    (bad / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load(bad)
    with pytest.raises(ValueError, match=message):
        load_or_default(bad)  # what a --model argument goes through (reads architectures first)


def sharded(ckpt, dst, index):
    dst.mkdir()
    shutil.copy(ckpt / "config.json", dst / "config.json")
    shutil.copy(ckpt / "model.safetensors", dst / "part-1.safetensors")
    (dst / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return dst


@pytest.mark.parametrize("index, message", [
    ("{oops", r"checkpoint index .*model\.safetensors\.index\.json is not valid JSON"),
    ({"metadata": {}}, r"index\.json has no 'weight_map'"),
    ({"weight_map": {"embed_out.weight": "../outside.safetensors"}}, r"maps to '\.\./outside.safetensors'.*refused"),
    ({"weight_map": {"embed_out.weight": "/etc/passwd"}}, r"maps to '/etc/passwd'"),
    ({"weight_map": {"embed_out.weight": "nope.safetensors"}}, r"names shard files that do not exist"),
])
def test_a_broken_index_names_the_file(ckpt, tmp_path, index, message):
    with pytest.raises(CheckpointError, match=message):
        load(sharded(ckpt, tmp_path / "s", index))


# ------------------------------------------------------------------ tensors
def test_mixed_dtypes_are_refused_naming_the_tensor_unless_cast(ckpt, tmp_path):
    def one_half(t):
        t["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = t["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].half()
    mixed = copy_of(ckpt, tmp_path / "m", one_half)
    message = r"mixes dtypes: most tensors are float32 but gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.weight \(float16\)"
    with pytest.raises(CheckpointError, match=message + "; pass dtype="):
        load(mixed)
    cast = load(mixed, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    cast(IDS)  # no matmul dtype error


def test_a_2000_layer_config_gives_a_short_error(ckpt, tmp_path):
    big = copy_of(ckpt, tmp_path / "big")
    config = json.loads((big / "config.json").read_text())
    config["num_hidden_layers"] = 2000
    (big / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load(big)
    msg = str(err.value)
    assert len(msg) < 2000 and "missing (23,976):" in msg and "and 23,968 more" in msg


def test_non_finite_weights_are_refused_naming_the_tensor(ckpt, tmp_path):
    def flip(t):
        t["gpt_neox.layers.0.attention.dense.weight"][3, 5] = float("nan")
    with pytest.raises(CheckpointError, match=r"'gpt_neox\.layers\.0\.attention\.dense\.weight' holds 1 non-finite"):
        load(copy_of(ckpt, tmp_path / "nan", flip))


def test_a_legacy_non_zip_bin_loads_with_weights_only(ckpt, model, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(ckpt / "config.json", legacy / "config.json")
    state = load_file(ckpt / "model.safetensors")
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = load(legacy)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_a_zeroed_header_names_the_file(ckpt, tmp_path):  # already so before issue 15; kept as a guard
    bad = copy_of(ckpt, tmp_path / "z")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(b"\0" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"z/model\.safetensors is not a readable safetensors file"):
        load(bad)


# ------------------------------------------------------------------ forward arguments
@pytest.mark.parametrize("mask_value", [2, 0.5])
def test_attention_masks_other_than_0_1_are_refused(model, mask_value):
    mask = torch.ones(IDS.shape)
    mask[0, 3] = mask_value
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1"):
        model(IDS, attention_mask=mask)
    model(IDS, attention_mask=torch.ones(IDS.shape, dtype=torch.bool))  # bool and 0/1 floats are fine
    model(IDS, attention_mask=torch.ones(IDS.shape))


def test_python_lists_and_uint8_ids_name_the_argument(model):
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor, got list"):
        model(IDS.tolist())
    with pytest.raises(TypeError, match=r"attention_mask must be a torch\.Tensor, got list"):
        model(IDS, attention_mask=[[1] * 7] * 2)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor .* got torch\.uint8 .*\.long\(\)"):
        model(IDS.to(torch.uint8))
    model(IDS.int())


def test_fp16_inputs_embeds_on_an_fp32_model_names_the_cast(model):
    embeds = model.model.embed(IDS).half()
    with pytest.raises(ValueError, match=r"inputs_embeds is torch\.float16 but the model's weights are torch\.float32"):
        model(inputs_embeds=embeds)


def test_foreign_short_and_wrong_batch_caches_name_past_key_values(model):
    out = model(IDS, use_cache=True)
    hf_style = tuple((k, v) for k, v in zip(out.past_key_values.keys, out.past_key_values.values))
    with pytest.raises(TypeError, match=r"past_key_values must be a neox_lab KVCache .* got tuple"):
        model(IDS[:, :1], past_key_values=hf_style)
    with pytest.raises(ValueError, match=r"KVCache for 1 layers; this model has 2"):
        model(IDS, past_key_values=KVCache(1), use_cache=True)
    with pytest.raises(ValueError, match=r"past_key_values holds 2 rows but this call's batch is 1"):
        model(IDS[:1, :1], past_key_values=out.past_key_values)


def test_generate_with_a_huge_budget_grows_the_cache_in_chunks(model, monkeypatch):
    sizes = []

    class Recording(KVCache):
        def update(self, layer, k, v):
            result = super().update(layer, k, v)
            sizes.append(self.keys[layer].shape[1])
            return result

    monkeypatch.setattr(generation, "KVCache", Recording)
    first = int(model(IDS[:1]).logits[0, -1].argmax())
    out = model.generate(IDS[:1], max_new_tokens=2_000_000, eos_token_id=first, use_cache=True)
    assert out.shape[1] == IDS.shape[1] + 1  # eos came first
    assert max(sizes) <= KVCache.MIN_CAPACITY  # old code allocated all 2,000,007 positions up front


def test_the_kv_cache_grows_by_doubling_and_keeps_its_contents():
    cache = KVCache(1, max_length=1000)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 700, 2, 3, generator=g)
    capacity = []
    for a in range(0, 700, 100):
        k, _ = cache.update(0, keys[:, a : a + 100], keys[:, a : a + 100])
        assert torch.equal(k, keys[:, : a + 100])
        capacity.append(cache.keys[0].shape[1])
    assert capacity == [256, 256, 512, 512, 512, 1000, 1000]  # doubling, capped at max_length
    with pytest.raises(ValueError, match="exceed max_length=1000"):
        cache.update(0, keys[:, :301], keys[:, :301])


def test_the_fast_non_finite_check_counts_exactly():
    big = torch.full((10,), 60000.0, dtype=torch.float16)  # finite values whose fp16 sum overflows
    assert not torch.isfinite(big.sum()) and nonfinite_count(big) == 0
    big[3], big[7] = float("-inf"), float("inf")
    assert nonfinite_count(big) == 2 and nonfinite_count(torch.tensor([1.0, float("nan")])) == 1
    assert nonfinite_count(torch.empty(0)) == 0 and nonfinite_count(torch.tensor([1, 2])) == 0


def test_inputs_on_the_meta_device_name_the_argument(model):
    with pytest.raises(ValueError, match=r"input_ids is on the meta device, which holds shapes but no values"):
        model(IDS.to("meta"))
    with pytest.raises(ValueError, match=r"attention_mask is on the meta device"):
        model(IDS, attention_mask=torch.ones(IDS.shape, device="meta"))


def test_labels_of_the_wrong_shape_name_the_argument_before_the_forward(model, tmp_path):
    with pytest.raises(ValueError, match=r"labels must be \[2, 7\] \(one token id \(or -100\) per input token\) to "
                                         r"match the input, got \[2, 6\]"):
        model(IDS, labels=IDS[:, :6])
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor"):
        model(IDS, labels=IDS.tolist())
    assert model(IDS, labels=IDS).loss.isfinite()
    cfg = model.cfg.replace(pad_token_id=0)
    classifier = NeoXForSequenceClassification(cfg).eval()
    with pytest.raises(ValueError, match=r"labels must be \[2, \.\.\.\] \(one label \(or row of labels\) per input "
                                         r"row\) to match the input, got \[3\]"):
        classifier(IDS, labels=torch.tensor([0, 1, 1]))
    assert classifier(IDS, labels=torch.tensor([0, 1])).loss.isfinite()
    tagger = NeoXForTokenClassification(cfg).eval()
    with pytest.raises(ValueError, match=r"labels must be \[2, 7\]"):
        tagger(IDS, labels=torch.zeros(2, 8, dtype=torch.long))
    qa = NeoXForQuestionAnswering(cfg).eval()
    with pytest.raises(ValueError, match=r"end_positions must be \[2, \.\.\.\]"):
        qa(IDS, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([1, 2, 3]))


def test_a_pos_slice_that_is_no_selection_names_the_argument_before_the_forward(model):
    for bad in ("abc", 1.5, [0.5]):
        with pytest.raises(TypeError, match=r"pos_slice must be None, an int, a slice or a list / tensor of int "
                                            r"indices, got"):
            model.run_with_cache(IDS, pos_slice=bad)
    _, cache = model.run_with_cache(IDS, pos_slice=[0, 3])
    assert cache["blocks.0.hook_resid_post"].shape[1] == 2
