"""Windows: truncation and packing give exactly the documents' tokens, resume at any cursor, and
`cache_dataset` stores them (packing, BOS, skipping, every k-th document, sampling) and resumes mid-document."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store import shards
from neox_lab.store.manifest import CacheMismatchError, CacheWriteError
from neox_lab.store.sources import Documents
from neox_lab.store.windows import WindowSpec, count_docs, iter_batches, iter_windows, sample_positions
from neox_lab.store.writer import cache_dataset
from neox_lab.tokenizer import NeoXTokenizer

BOS, EOS = 95, 96
CFG = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)

specs = st.builds(WindowSpec, context_size=st.integers(3, 7), packing=st.booleans(), prepend_bos=st.booleans(),
                  min_tokens=st.sampled_from([None, 1, 2]), every_k_documents=st.integers(1, 3))
id_docs = st.lists(st.lists(st.integers(0, 90), max_size=12), max_size=10)


def expected_windows(docs, spec):
    """The windows the module docstring promises, computed the obvious way."""
    bos = [BOS] if spec.prepend_bos else []
    kept = [(d, ids) for d, ids in enumerate(docs)
            if d % spec.every_k_documents == 0 and len(ids[: None if spec.packing else spec.body])
            >= (spec.min_tokens or 1)]
    if not spec.packing:
        return [(bos + ids[: spec.body], [d] * (len(bos) + len(ids[: spec.body]))) for d, ids in kept]
    stream = [t for _, ids in kept for t in ids + [EOS]]
    owner = [d for d, ids in kept for _ in range(len(ids) + 1)]
    return [(bos + stream[a : a + spec.body], owner[a : a + 1] * len(bos) + owner[a : a + spec.body])
            for a in range(0, len(stream), spec.body)]


def windows(docs, spec, cursor=(0, 0)):
    return list(iter_windows(Documents("token_ids", docs), spec, None, cursor, len(docs), bos_id=BOS, eos_id=EOS))


@given(docs=id_docs, spec=specs)
def test_windows_hold_exactly_the_documents_and_resume_at_every_cursor(docs, spec):
    got = windows(docs, spec)
    assert [(w.tokens, w.doc_ids) for w in got] == expected_windows(docs, spec)
    for i, w in enumerate(got):  # a run resumed where window i starts (or ends) writes the same rest
        assert [v.tokens for v in windows(docs, spec, w.start)] == [v.tokens for v in got[i:]]
        assert [v.tokens for v in windows(docs, spec, w.end)] == [v.tokens for v in got[i + 1:]]
        assert [v.start for v in windows(docs, spec, w.start)] == [v.start for v in got[i:]]


@given(docs=id_docs, spec=specs, batch_size=st.integers(1, 4))
def test_batches_keep_every_window_and_count_every_document(docs, spec, batch_size):
    got = windows(docs, spec)
    batches = list(count_docs(iter_batches(iter(got), batch_size, (0, 0), len(docs)), (0, 0)))
    assert [w for b in batches for w in b.windows] == got
    assert sum(b.n_docs for b in batches) == len(docs)
    assert all(len(b.windows) == batch_size for b in batches[:-1])
    if batches:
        assert batches[-1].end == (len(docs), 0)


@given(n=st.integers(1, 20), k=st.integers(1, 25), seed=st.integers(0, 3), doc=st.integers(0, 5))
def test_samples_are_uniform_subsets_fixed_by_seed_and_cursor(n, k, seed, doc):
    spec = WindowSpec(32, sample_tokens=k, seed=seed)
    allowed = np.arange(3, 3 + n)
    a = sample_positions(allowed, spec, (doc, 0))
    assert len(a) == min(k, n) and len(set(a.tolist())) == len(a) and set(a.tolist()) <= set(allowed.tolist())
    assert (a == sample_positions(allowed, spec, (doc, 0))).all()


def test_bad_window_settings_are_named():
    with pytest.raises(ValueError, match="min_tokens=9 can never be met"):
        WindowSpec(8, prepend_bos=True, min_tokens=9)
    with pytest.raises(ValueError, match="every_k_documents must be a positive integer"):
        WindowSpec(8, every_k_documents=0)


# ------------------------------------------------------------------------------------------ cache_dataset
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = NeoXForCausalLM(CFG).eval()
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(60)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    m.tokenizer = NeoXTokenizer(backend, unk_token="[UNK]")
    return m


def texts(n=23, seed=3):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, 60, rng.integers(0, 30))) for _ in range(n)]


PACKED = dict(context_size=16, packing=True, prepend_bos=True, min_tokens=2, batch_size=3, shard_tokens=40,
              progress=False, dtype=torch.float32)


def test_packed_store_holds_the_windows_and_their_activations(model, tmp_path):
    docs = texts()
    store = cache_dataset(model, docs, ["blocks.1.hook_resid_post"], tmp_path, **PACKED)
    spec = WindowSpec(16, packing=True, prepend_bos=True, min_tokens=2)
    ids = [model.tokenizer(t)["input_ids"] for t in docs]
    want = list(iter_windows(Documents("token_ids", ids), spec, None, (0, 0), len(ids), bos_id=0, eos_id=0))
    assert store.tokens().tolist() == [t for w in want for t in w.tokens]
    assert store.doc_ids().tolist() == [d for w in want for d in w.doc_ids]
    assert store.positions().tolist() == [p for w in want for p in range(len(w.tokens))]
    assert store.n_documents == len(docs) and store.manifest["settings"]["windows"]["packing"]
    a = 0
    for w in want:  # every window's activations are those of one unpadded forward over it
        _, cache = model.run_with_cache(torch.tensor([w.tokens]), names_filter=["blocks.1.hook_resid_post"])
        got = store["blocks.1.hook_resid_post"][a : a + len(w.tokens)]
        torch.testing.assert_close(got, cache["blocks.1.hook_resid_post"][0], atol=1e-5, rtol=1e-5)
        a += len(w.tokens)
    with pytest.raises(ValueError, match="packed store has no per-document"):
        store.document(0)


def test_sampling_settings_are_identity_and_select_positions(model, tmp_path):
    docs = texts()
    kw = dict(context_size=16, batch_size=4, progress=False)
    every = cache_dataset(model, docs, ["hook_embed"], tmp_path / "k", every_k_documents=3, **kw)
    assert set(every.doc_ids().tolist()) <= set(range(0, len(docs), 3))
    sampled = cache_dataset(model, docs, ["hook_embed"], tmp_path / "s", sample_tokens=3, seed=5, **kw)
    full = cache_dataset(model, docs, ["hook_embed"], tmp_path / "f", **kw)
    for d in range(len(docs)):
        whole, span = full.document(d), sampled.document(d)
        n = whole.stop - whole.start
        assert span.stop - span.start == min(3, n)
        pos = sampled.positions(span.start, span.stop)
        torch.testing.assert_close(sampled["hook_embed"][span], full["hook_embed"][whole][pos],
                                   atol=0, rtol=0)
    again = cache_dataset(model, docs, ["hook_embed"], tmp_path / "s2", sample_tokens=3, seed=5, **kw)
    assert again.positions().tolist() == sampled.positions().tolist()
    with pytest.raises(CacheMismatchError, match="settings.windows"):
        cache_dataset(model, docs, ["hook_embed"], tmp_path / "s", sample_tokens=3, seed=6, **kw)


def test_packed_run_killed_mid_document_resumes_byte_identical(model, tmp_path, monkeypatch):
    docs = texts(n=30)
    names = ["blocks.0.hook_resid_post"]
    cache_dataset(model, docs, names, tmp_path / "clean", **PACKED)
    real_save, calls = shards.write_shard_file, []

    def fail_third(filename, tensors, metadata):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(filename, tensors, metadata)

    monkeypatch.setattr(shards, "write_shard_file", fail_third)
    with pytest.raises(CacheWriteError):
        cache_dataset(model, docs, names, tmp_path / "broken", **PACKED)
    manifest = json.loads((tmp_path / "broken" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2
    assert manifest["next_offset"] > 0  # the kill fell inside a document: resuming needs the offset
    monkeypatch.setattr(shards, "write_shard_file", real_save)
    cache_dataset(model, docs, names, tmp_path / "broken", **PACKED)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}
    assert files(tmp_path / "broken") == files(tmp_path / "clean")


def test_one_shot_iterator_caches_once_and_refuses_a_rerun(model, tmp_path):
    docs = texts(n=7)
    store = cache_dataset(model, iter(docs), ["hook_embed"], tmp_path, context_size=8, progress=False)
    ref = cache_dataset(model, docs, ["hook_embed"], tmp_path / "list", context_size=8, progress=False)
    assert store.tokens().tolist() == ref.tokens().tolist() and store.n_documents == 7
    with pytest.raises(CacheMismatchError, match="one-shot iterator source cannot be checked"):
        cache_dataset(model, iter(docs), ["hook_embed"], tmp_path, context_size=8, progress=False)


def test_cli_caches_a_packed_compressed_corpus_and_names_a_missing_extra(tmp_path, monkeypatch, capsys):
    import gzip
    import sys

    from neox_lab.cli import main

    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as fh:
        for i in range(6):
            fh.write(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n")
    args = ["cache", "--data", str(tmp_path / "docs.jsonl.gz"), "--hooks", "hook_embed", "--out",
            str(tmp_path / "out"), "--context-size", "16", "--packing", "--prepend-bos", "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["windows"]["packing"] and manifest["settings"]["max_length"] == 16
    assert manifest["source"]["kind"] == "jsonl.gz" and manifest["n_documents"] == 6
    (tmp_path / "docs.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if the corpus extra were not installed
    args[2], args[6] = str(tmp_path / "docs.jsonl.zst"), str(tmp_path / "out2")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "needs the 'zstandard' package" in err and "neox-lab[corpus]" in err
