"""Models placed with a device_map (accelerate): on the CPU, blocks in RAM ("cpu") and offloaded to
"disk" (their weights read from the checkpoint at each forward).

Exactness: a placed model runs the same kernels on the same device in the same order as the model
loaded whole, so logits, every hook value, patching and greedy decoding must agree bit for bit in
fp32 (torch.equal). Any difference is a bug: a weight read in the wrong dtype, an input not moved,
a hook that fired on a stale tensor.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from neox_lab import (
    CheckpointError,
    HookedTransformer,
    NeoXConfig,
    NeoXForCausalLM,
    NeoXForSequenceClassification,
    NeoXModel,
)
from neox_lab.analysis.patching import activation_patch, attribution_patch
from neox_lab.model.placement import placement_units
from neox_lab.store.manifest import weights_sha256
from neox_lab.store.writer import cache_dataset
from neox_lab.testing.pairs import tiny_config
from neox_lab.testing.strategies import neox_configs, token_batches

pytest.importorskip("accelerate")

configs = neox_configs(max_layers=3, max_heads=4, head_dims=(8, 16), vocab=(16, 64))


def save_random(cfg, path, seed=0, cls=NeoXForCausalLM):
    """A random checkpoint whose LayerNorms and biases are not the identity / zero."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return path


@st.composite
def device_maps(draw, model):
    """A dict over the model's placement units, each on "cpu" or "disk"; blocks are sometimes named
    as transformers names them, and sometimes one prefix places them all."""
    units = placement_units(model)
    placed = {u: draw(st.sampled_from(["cpu", "disk"])) for u in units}
    if model.cfg.tie_word_embeddings and "unembed" in placed:
        placed["unembed"] = placed[units[0]]
    if draw(st.booleans()):
        placed = {u.replace("model.blocks.", "gpt_neox.layers.").replace("model.embed", "gpt_neox.embed_in"): d
                  for u, d in placed.items()}
    return placed


def metric(logits):
    return logits[:, -1].log_softmax(-1)[:, 0]


@given(cfg=configs, data=st.data())
def test_offloaded_model_matches_the_whole_model_bit_for_bit(cfg, data, tmp_path_factory):
    path = save_random(cfg, tmp_path_factory.mktemp("ckpt"))
    ref = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    device_map = data.draw(device_maps(ref), label="device_map")
    placed = NeoXForCausalLM.from_pretrained(path, device_map=device_map, attn_backend="eager")
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=6, padding=("none", "left")), label="batch")
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        assert torch.equal(placed(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)

    # Every hook point, hook_result and the eager-only scores/pattern included (on an offloaded block
    # hook_result reads W_O inside the forward, so the attention's weights must be there).
    every = lambda name: True  # noqa: E731  (run_with_cache() alone leaves hook_result out, as TransformerLens)
    ref_logits, ref_cache = ref.run_with_cache(ids, attention_mask=mask, names_filter=every)
    logits, cache = placed.run_with_cache(ids, attention_mask=mask, device="cpu", names_filter=every)
    assert torch.equal(logits, ref_logits)
    assert sorted(cache.keys()) == sorted(ref_cache.keys()) == sorted(ref.hook_names())
    for name in ref_cache.keys():
        assert cache[name].device.type == "cpu"
        assert torch.equal(cache[name], ref_cache[name]), name

    corrupted = torch.flip(ids, dims=[1])
    for target in ("resid_pre", "z"):
        got = activation_patch(placed, ids, corrupted, metric, target=target)
        want = activation_patch(ref, ids, corrupted, metric, target=target)
        assert torch.equal(got.values, want.values), target

    # Gradients flow through offloaded blocks too (autograd keeps the weights a forward used).
    got = attribution_patch(placed, ids, corrupted, metric, target="resid_pre")
    assert torch.equal(got.values, attribution_patch(ref, ids, corrupted, metric, target="resid_pre").values)

    prompt = ids[:, : max(1, ids.shape[1] - 2)]
    prompt_mask = mask[:, : prompt.shape[1]]
    if bool((prompt_mask.sum(-1) > 0).all()):
        for use_cache in (True, False):
            kw = dict(attention_mask=prompt_mask, max_new_tokens=3, eos_token_id=None, use_cache=use_cache)
            assert torch.equal(placed.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_a_weight_read_from_disk_computes_the_in_memory_bits(tmp_path):
    """A disk-offloaded unembedding read through accelerate's memory map sat 56 bytes past a 64-byte
    boundary, and the CPU matmul gave logits 1 ulp off the in-memory model's (hypothesis' thorough profile
    found it). Every read is now torch-allocated memory: aligned, and the logits equal bit for bit."""
    cfg = NeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16,
                     hidden_act="gelu", rotary_pct=0.0, max_position_embeddings=8, layer_norm_eps=1e-5,
                     use_parallel_residual=False, attention_bias=False, tie_word_embeddings=False)
    path = save_random(cfg, tmp_path / "ckpt")
    ref = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    device_map = {"model.embed": "cpu", "model.blocks.0": "cpu", "model.ln_final": "cpu", "unembed": "disk"}
    placed = NeoXForCausalLM.from_pretrained(path, device_map=device_map, attn_backend="eager")
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(weight.data_ptr() % 64)
        return real_linear(x, weight, bias)

    ids = torch.tensor([[12], [3]])
    with torch.no_grad(), mock.patch.object(torch.nn.functional, "linear", spy):
        logits = placed(ids).logits
    assert seen and all(offset == 0 for offset in seen), seen
    with torch.no_grad():
        assert torch.equal(logits, ref(ids).logits)


def test_device_map_is_reported_in_neox_names(tmp_path):
    path = save_random(tiny_config(num_hidden_layers=3), tmp_path)
    model = NeoXForCausalLM.from_pretrained(
        path, device_map={"gpt_neox.embed_in": "cpu", "gpt_neox.layers": "disk", "model.blocks.1": "cpu",
                          "gpt_neox.final_layer_norm": "cpu", "embed_out": "cpu"})
    assert model.device_map == {"model.embed": "cpu", "model.blocks.0": "disk", "model.blocks.1": "cpu",
                                "model.blocks.2": "disk", "model.ln_final": "cpu", "unembed": "cpu"}
    assert model.hf_device_map == model.device_map  # what accelerate's dispatch_model records
    assert model.input_device == torch.device("cpu")
    # Offloaded weights wait on the meta device between forwards.
    assert model.model.blocks[0].attn.qkv.weight.is_meta and not model.model.blocks[1].attn.qkv.weight.is_meta


def test_stream_flags_on_a_placed_model(tmp_path):
    """The per-head inputs (ln1 applied to each copy, the per-head projection) and hook_mlp_in run inside
    offloaded blocks exactly as in the whole model, hooks and edits included."""
    cfg = tiny_config(num_hidden_layers=3)
    path = save_random(cfg, tmp_path)
    ref = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    placed = NeoXForCausalLM.from_pretrained(
        path, attn_backend="eager", device_map={"": "cpu", "model.blocks.0": "disk", "model.blocks.2": "disk"})
    for model in (ref, placed):
        for flag in ("use_attn_in", "use_split_qkv_input", "use_hook_mlp_in"):
            getattr(model, f"set_{flag}")(True)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))

    def edit(x, *, hook):
        x[..., 0, :3] += 1.0

    every = lambda name: True  # noqa: E731
    hooks = [("blocks.2.hook_k_input", edit), ("blocks.0.hook_attn_in", edit)]
    for fwd in ([], hooks):
        with ref.hooks(fwd_hooks=fwd), placed.hooks(fwd_hooks=fwd):
            ref_logits, ref_cache = ref.run_with_cache(ids, names_filter=every)
            logits, cache = placed.run_with_cache(ids, names_filter=every)
        assert torch.equal(logits, ref_logits)
        assert sorted(cache.keys()) == sorted(ref_cache.keys()) == sorted(ref.hook_names())
        assert all(torch.equal(cache[name], ref_cache[name]) for name in ref_cache.keys())


def test_planned_map_offloads_blocks_but_not_the_embedding_or_head(tmp_path):
    cfg = tiny_config(num_hidden_layers=4)
    path = save_random(cfg, tmp_path)
    ref = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    # Room in "RAM" for about two blocks: accelerate sends the rest to disk.
    block_bytes = sum(p.numel() * 4 for p in ref.model.blocks[0].parameters())
    head_bytes = sum(p.numel() * 4 for n, p in ref.named_parameters() if "blocks" not in n)
    placed = NeoXForCausalLM.from_pretrained(path, device_map="auto", attn_backend="eager",
                                             max_memory={"cpu": head_bytes + 2 * block_bytes})
    where = placed.device_map
    assert "disk" in where.values() and where["model.blocks.0"] == "cpu"
    assert where["model.embed"] == where["model.ln_final"] == where["unembed"] == "cpu"
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, ref(ids).logits)


def test_dtype_conversion_and_a_task_head(tmp_path):
    cfg = tiny_config(pad_token_id=0)
    path = save_random(cfg, tmp_path, cls=NeoXForSequenceClassification)
    ref = NeoXForSequenceClassification.from_pretrained(path, dtype=torch.float64)
    units = placement_units(ref)
    assert units[-1] == "score"
    placed = NeoXForSequenceClassification.from_pretrained(
        path, dtype=torch.float64, device_map={"": "disk", "model.embed": "cpu"})
    ids = torch.randint(1, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = placed(ids).logits
        assert got.dtype == torch.float64 and torch.equal(got, ref(ids).logits)
    body = NeoXModel.from_pretrained(save_random(cfg, tmp_path / "lm"),
                                     device_map={"embed": "cpu", "blocks": "disk", "ln_final": "cpu"})
    assert body.device_map["blocks.1"] == "disk"


def test_bin_checkpoint_on_disk_needs_an_offload_folder(tmp_path):

    src = save_random(tiny_config(), tmp_path / "st")
    dst = tmp_path / "bin"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    with pytest.raises(ValueError, match="offload_folder"):
        NeoXForCausalLM.from_pretrained(dst, device_map={"": "disk", "model.embed": "cpu"})
    placed = NeoXForCausalLM.from_pretrained(dst, device_map={"": "disk", "model.embed": "cpu"},
                                             offload_folder=tmp_path / "off")
    ref = NeoXForCausalLM.from_pretrained(src)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("device_map, kwargs, message", [
    ({"model.embed": "cpu"}, {}, "places no device for model.blocks.0"),
    ({"": "cpu", "model.blocks.9": "cpu"}, {}, "does not have: 'model.blocks.9'"),
    ({"": "cpu", "model.blocks.0.mlp": "disk"}, {}, "placed whole"),
    ({"": "floppy"}, {}, "is not a device"),
    ({"": 3}, {}, "CUDA device"),
    ({"": "cpu"}, {"max_memory": {"cpu": "1GiB"}}, "max_memory budgets a planned"),
    ({"": "cpu"}, {"device": "cpu"}, "either device= .* or device_map="),
    ({"": "cpu", "unembed": "disk"}, {}, "tie_word_embeddings"),
    ("everywhere", {}, "use one of"),
])
def test_bad_device_maps_say_what_to_fix(tmp_path, device_map, kwargs, message):
    path = save_random(tiny_config(tie_word_embeddings=True), tmp_path)
    with pytest.raises(ValueError, match=message):
        NeoXForCausalLM.from_pretrained(path, device_map=device_map, **kwargs)


def test_offload_folder_without_a_device_map_is_refused(tmp_path):
    path = save_random(tiny_config(), tmp_path)
    with pytest.raises(ValueError, match="device_map='auto'"):
        NeoXForCausalLM.from_pretrained(path, offload_folder=tmp_path / "off")


def test_misfit_checkpoint_is_refused_whole(tmp_path):
    path = save_random(tiny_config(), tmp_path)
    other = tiny_config(intermediate_size=48)
    (path / "config.json").write_text((save_random(other, tmp_path / "o") / "config.json").read_text())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        NeoXForCausalLM.from_pretrained(path, device_map="auto")


def test_without_accelerate_the_error_names_the_extra(tmp_path, monkeypatch):
    path = save_random(tiny_config(), tmp_path)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r"pip install neox-lab\[big\]"):
        NeoXForCausalLM.from_pretrained(path, device_map="auto")


def test_compare_takes_a_placed_model_on_either_side(tmp_path):
    from neox_lab.default_model import load_or_default
    from neox_lab.testing.compare import compare

    cfg = tiny_config(num_hidden_layers=2)
    path = save_random(cfg, tmp_path)
    whole = load_or_default(path, attn_backend="eager")
    placed = load_or_default(path, attn_backend="eager",
                             device_map={"": "cpu", "model.blocks.1": "disk"})
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    for a, b in ((placed, whole), (whole, placed)):
        report = compare(a, b, ids)
        assert report.equivalent and report.hooks
        # The same arithmetic: every stream and the logits equal bit for bit.
        assert all(h.max_abs == 0.0 for h in report.hooks) and report.logits.max_abs == 0.0
    with pytest.raises(ValueError, match="shipped model"):
        load_or_default(None, device_map="auto")


def test_eager_fallback_on_an_offloaded_layer(tmp_path):
    cfg = tiny_config(num_hidden_layers=3)
    path = save_random(cfg, tmp_path)
    ref = NeoXForCausalLM.from_pretrained(path, attn_backend="sdpa")
    placed = NeoXForCausalLM.from_pretrained(path, attn_backend="sdpa",
                                             device_map={"": "cpu", "model.blocks.2": "disk"})
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    name = "blocks.2.attn.hook_pattern"
    with pytest.warns(UserWarning, match="layer 2: attention scores/pattern") as caught:
        logits, cache = placed.run_with_cache(ids, names_filter=name)
    assert caught[0].filename == __file__  # the warning points here, past accelerate's wrappers
    assert placed.attn_kernels() == ["sdpa", "sdpa", "eager (fallback)"]
    with pytest.warns(UserWarning):
        ref_logits, ref_cache = ref.run_with_cache(ids, names_filter=name)
    assert torch.equal(logits, ref_logits) and torch.equal(cache[name], ref_cache[name])


def test_cache_dataset_runs_on_a_placed_model_and_fingerprints_its_offloaded_weights(tmp_path):
    """The store hashes every weight: on a placed model the offloaded ones are meta placeholders, so the
    fingerprint must read the stored values (and equal the whole model's), and caching must work."""
    cfg = tiny_config(num_hidden_layers=2)
    path = save_random(cfg, tmp_path / "ckpt")
    whole = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    placed = NeoXForCausalLM.from_pretrained(path, attn_backend="eager",
                                             device_map={"": "cpu", "model.blocks.1": "disk"})
    assert weights_sha256(placed) == weights_sha256(whole)
    docs = [[1, 2, 3, 4], [5, 6, 7]]
    got = cache_dataset(placed, docs, ["blocks.1.hook_resid_post"], tmp_path / "placed", progress=False)
    want = cache_dataset(whole, docs, ["blocks.1.hook_resid_post"], tmp_path / "whole", progress=False)
    assert torch.equal(got["blocks.1.hook_resid_post"][:], want["blocks.1.hook_resid_post"][:])


def test_compare_cli_places_neox_lab_sides_with_device_map(tmp_path, capsys):
    from neox_lab.cli import main

    path = str(save_random(tiny_config(num_hidden_layers=2), tmp_path / "ckpt"))
    out = tmp_path / "report.json"
    placed = '{"": "cpu", "model.blocks.1": "disk"}'
    assert main(["compare", path, path, "--seq-len", "6", "--batch", "2", "--device-map", placed,
                 "--json", str(out)]) == 0
    sides = json.loads(out.read_text())["provenance"]
    assert sides["checkpoint_a"]["device_map"]["model.blocks.1"] == "disk"
    capsys.readouterr()
    usage_errors = [
        (["--device-map", placed, "--device", "cpu"], "either --device"),
        (["--offload-folder", "x"], "only applies with --device-map"),
        (["--device-map", "{nope"], "not a JSON object"),
    ]
    for extra, says in usage_errors:
        assert main(["compare", path, path, *extra]) == 2
        assert says in capsys.readouterr().err
    assert main(["compare", path, f"hf:{path}", "--device-map", "auto"]) == 2
    assert "an hf: side runs on one device" in capsys.readouterr().err


def test_placed_loading_refuses_non_finite_and_mixed_dtype_weights_it_reads(tmp_path):
    """Issue 15's load checks on the placed path: tensors read to a device are checked (a "disk" tensor
    is not read at load, which is what offloading is for), and dtypes are one unless dtype= casts."""
    path = save_random(tiny_config(num_hidden_layers=2), tmp_path / "ckpt")
    weights = load_file(path / "model.safetensors")
    weights["gpt_neox.layers.0.attention.dense.weight"][3, 5] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    on_cpu = {"": "cpu", "model.blocks.1": "disk"}
    with pytest.raises(CheckpointError, match=r"'gpt_neox\.layers\.0\.attention\.dense\.weight' holds 1 non-finite"):
        NeoXForCausalLM.from_pretrained(path, device_map=on_cpu)

    path = save_random(tiny_config(num_hidden_layers=2), tmp_path / "mixed")
    weights = load_file(path / "model.safetensors")
    weights["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = weights["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].half()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mixes dtypes: .*gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.weight"):
        NeoXForCausalLM.from_pretrained(path, device_map=on_cpu)  # the fp16 tensor is on "disk": still refused
    cast = NeoXForCausalLM.from_pretrained(path, device_map=on_cpu, dtype=torch.float32)
    cast(torch.tensor([[1, 2, 3]]))


def test_placed_model_saves_refuses_processing_and_runs_tl_patching(tmp_path):
    """Reading weights outside a forward on a placed model: save_pretrained writes the offloaded ones too,
    process_weights_ refuses before changing anything, and TransformerLens-style patching (whose inputs go
    to the model's input device, not its first parameter's meta device) equals the whole model's."""
    from neox_lab.analysis import patching

    path = save_random(tiny_config(num_hidden_layers=2), tmp_path / "ckpt")
    whole = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    placed = NeoXForCausalLM.from_pretrained(path, attn_backend="eager",
                                             device_map={"model.embed": "disk", "": "cpu", "model.blocks.1": "disk"})
    placed.save_pretrained(tmp_path / "resaved")
    again = load_file(tmp_path / "resaved" / "model.safetensors")
    assert all(torch.equal(t, load_file(path / "model.safetensors")[k]) for k, t in again.items())

    before = weights_sha256(placed)
    with pytest.raises(ValueError, match="load it without device_map"):
        HookedTransformer(placed).process_weights_()
    assert weights_sha256(placed) == before and not placed.weights_processed

    clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[4, 3, 2, 1]])
    _, clean_cache = whole.run_with_cache(clean)
    got = patching.get_act_patch_resid_pre(placed, corrupted, clean_cache, metric)
    assert torch.equal(got, patching.get_act_patch_resid_pre(whole, corrupted, clean_cache, metric))
