"""Compact checkpoints (low-bit matrices with per-group scales): what is stored is exactly what loads, the
rounding stays within half a quantisation step, and damaged files are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neox_lab import CheckpointError, NeoXForCausalLM
from neox_lab.model.compact import METADATA_KEY, compact_header, decode, encode, is_compact, save_compact
from neox_lab.model.loading import save_pretrained
from neox_lab.testing.pairs import make_trained_like, tiny_config


@st.composite
def matrices(draw):
    bits = draw(st.sampled_from([4, 8]))
    groups = draw(st.integers(1, 4))
    group = draw(st.sampled_from([2, 4, 8]))
    rows = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e4]))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        x[0] = 0.0  # an all-zero row
    return x, bits, group


@given(case=matrices())
def test_decoding_is_exact_and_within_half_a_step(case):
    x, bits, group = case
    q, scale = encode(x, bits, group)
    got = decode(q, scale, bits)
    assert got.dtype == torch.float32 and got.shape == x.shape
    qmax = 2 ** (bits - 1) - 1
    step = scale.double().repeat_interleave(group, dim=1)
    # decode is exact: q * scale computed in float64 (exact for <= 8-bit q and bf16 scales) equals it.
    ints = torch.round(got.double() / step)
    assert torch.equal(ints * step, got.double())
    assert int(ints.abs().max()) <= qmax
    # Each value is rounded to the nearest step, never clipped: the scale is rounded up, not down.
    assert bool(((got.double() - x.double()).abs() <= step / 2 + 1e-300).all())


def test_four_bit_values_pack_two_per_byte():
    x = torch.randn(3, 8)
    q, scale = encode(x, 4, 4)
    assert q.dtype == torch.uint8 and q.shape == (3, 4) and scale.shape == (3, 2)
    with pytest.raises(ValueError, match="must divide the row length"):
        encode(x, 8, 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        encode(x, 6, 4)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = make_trained_like(NeoXForCausalLM(tiny_config(tie_word_embeddings=True)))
    model.save_pretrained(tmp_path / "full")
    return model, tmp_path


def write_compact(src, dst, bits=8, group=None, edit=None):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_compact(tensors, dst / "model.safetensors", bits=bits, group=group, min_size=64)
    if edit is not None:
        stored = load_file(dst / "model.safetensors")
        with safe_open(dst / "model.safetensors", "pt") as fh:
            meta = fh.metadata()
        edit(stored, meta)
        save_file(stored, dst / "model.safetensors", metadata=meta)
    return dst, tensors


@pytest.mark.parametrize("bits,group", [(8, None), (4, 8)])
def test_a_compact_checkpoint_loads_as_exactly_its_decoded_values(ckpt, bits, group):
    _, root = ckpt
    path, tensors = write_compact(root / "full", root / "compact", bits, group)
    header = compact_header(path / "model.safetensors")
    assert is_compact(path / "model.safetensors") and not is_compact(root / "full" / "model.safetensors")
    assert "gpt_neox.embed_in.weight" in header["tensors"]
    model = NeoXForCausalLM.from_pretrained(path)
    stored = load_file(path / "model.safetensors")
    w = "gpt_neox.layers.0.attention.query_key_value.weight"
    want = decode(stored[w + ".qweight"], stored[w + ".qscale"], bits)
    assert torch.equal(model.state_dict()["model.blocks.0.attn.qkv.weight"], want)
    assert model.model.embed.weight.dtype == torch.float32
    # Small and 1-D tensors are kept whole, as float32.
    assert torch.equal(model.model.ln_final.weight, tensors["gpt_neox.final_layer_norm.weight"].float())
    # Round trip: a loaded compact checkpoint saves as an ordinary one with the same values.
    model.save_pretrained(root / "again")
    assert torch.equal(NeoXForCausalLM.from_pretrained(root / "again").model.embed.weight, model.model.embed.weight)


def test_damaged_compact_files_are_refused_by_name(ckpt):
    _, root = ckpt
    w = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"

    def drop_scale(stored, meta):
        del stored[w + ".qscale"]

    path, _ = write_compact(root / "full", root / "noscale", edit=drop_scale)
    with pytest.raises(CheckpointError, match=r"not a readable compact checkpoint.*dense_h_to_4h"):
        NeoXForCausalLM.from_pretrained(path)

    def bad_version(stored, meta):
        header = json.loads(meta[METADATA_KEY])
        header["version"] = 99
        meta[METADATA_KEY] = json.dumps(header)

    path, _ = write_compact(root / "full", root / "version", edit=bad_version)
    with pytest.raises(CheckpointError, match="header version 99"):
        NeoXForCausalLM.from_pretrained(path)

    def wrong_dtype(stored, meta):
        stored[w + ".qweight"] = stored[w + ".qweight"].to(torch.int16)

    path, _ = write_compact(root / "full", root / "dtype", edit=wrong_dtype)
    with pytest.raises(CheckpointError, match="must be stored as int8"):
        NeoXForCausalLM.from_pretrained(path)


def test_placed_loading_decodes_compact_files(ckpt):
    pytest.importorskip("accelerate")
    _, root = ckpt
    path, _ = write_compact(root / "full", root / "compact")
    whole = NeoXForCausalLM.from_pretrained(path, attn_backend="eager")
    ids = torch.randint(0, 97, (2, 6))
    placed = NeoXForCausalLM.from_pretrained(path, attn_backend="eager", device_map={"": "cpu"})
    assert torch.equal(placed(ids).logits, whole(ids).logits)
    # Blocks on disk are read from plain safetensors in place; compact values must be written out first.
    with pytest.raises(ValueError, match="not a plain safetensors checkpoint.*offload_folder"):
        NeoXForCausalLM.from_pretrained(path, device_map={"": "cpu", "model.blocks.1": "disk"})
    placed = NeoXForCausalLM.from_pretrained(path, attn_backend="eager", offload_folder=root / "offload",
                                             device_map={"": "cpu", "model.blocks.1": "disk"})
    assert torch.equal(placed(ids).logits, whole(ids).logits)


def test_save_pretrained_writes_a_compact_checkpoint(ckpt, tmp_path):
    model, _ = ckpt
    save_pretrained(model, tmp_path / "c", compact={"bits": 4, "group": 16, "min_size": 64})
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "float32"
    header = compact_header(tmp_path / "c" / "model.safetensors")
    assert header["tensors"]["gpt_neox.embed_in.weight"] == {"bits": 4, "group": 16, "shape": [97, 32]}
    assert "embed_out.weight" not in load_file(tmp_path / "c" / "model.safetensors")  # tied: stored once
    loaded = NeoXForCausalLM.from_pretrained(tmp_path / "c")
    q, scale = encode(model.model.embed.weight, 4, 16)
    assert torch.equal(loaded.model.embed.weight, decode(q, scale, 4))


def test_overrides_give_one_tensor_its_own_encoding(ckpt, tmp_path):
    model, root = ckpt
    tensors = load_file(root / "full" / "model.safetensors")
    embed = "gpt_neox.embed_in.weight"
    encoded = save_compact(tensors, tmp_path / "m.safetensors", bits=8, min_size=64,
                           overrides={embed: {"bits": 4, "group": 8}})
    assert encoded[embed] == {"bits": 4, "group": 8, "shape": [97, 32]}
    assert encoded["gpt_neox.layers.0.attention.dense.weight"]["bits"] == 8
    with pytest.raises(ValueError, match="overrides name tensors that are not there: nope"):
        save_compact(tensors, tmp_path / "n.safetensors", overrides={"nope": {"bits": 4}})
