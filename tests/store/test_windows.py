"""Windows: truncation and packing give exactly the documents' tokens, resume at any cursor, and
`cache_dataset` stores them (packing, BOS, skipping, every k-th document, sampling) and resumes mid-document."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store import shards
from neox_lab.store import windows as windows_module
from neox_lab.store.manifest import CacheMismatchError, CacheWriteError, parse_positions, positions_spec
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

    def fail_third(filename, *rest):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(filename, *rest)

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


# ------------------------------------------------------------------------------------------ positions, long texts
@pytest.mark.parametrize("positions", ["last", "0:3", "-2:", "1::2"])
def test_positions_select_each_documents_own_tokens_under_packing(model, tmp_path, positions):
    """Packing puts several documents in a window and cuts documents across windows; "last" and slices
    still mean positions of each document (not of each window)."""
    docs = texts(n=30)
    ids = [model.tokenizer(t)["input_ids"] for t in docs]
    full = cache_dataset(model, docs, ["hook_embed"], tmp_path / "all", **PACKED)
    chosen = cache_dataset(model, docs, ["hook_embed"], tmp_path / positions.replace(":", "_"),
                           positions=positions, **PACKED)
    pick = parse_positions(positions_spec(positions))
    kept = [d for d, row in enumerate(ids) if len(row) >= PACKED["min_tokens"]]
    want = [(d, ids[d][p]) for d in kept for p in range(len(ids[d]))[pick]]
    got = list(zip(chosen.doc_ids().tolist(), chosen.tokens().tolist()))
    assert got == want  # every document's own selection, in order: none lost, no BOS/EOS
    # ... and each stored row is that token's activation in the packed run (same window, same place)
    where, seen = {}, {}
    for row, (d, w_pos) in enumerate(zip(full.doc_ids().tolist(), full.positions().tolist())):
        if w_pos:  # position 0 of every window is its BOS
            seen[d] = seen.get(d, -1) + 1
            where[(d, seen[d])] = row  # (document, place in the document) -> row
    rows = [where[(d, p)] for d in kept for p in range(len(ids[d]))[pick]]
    assert torch.equal(chosen["hook_embed"][:], full["hook_embed"][rows])


def test_a_long_document_is_tokenized_in_bounded_pieces_with_the_same_tokens(model, monkeypatch):
    """Texts past LONG_DOCUMENT characters are cut at single spaces and tokenized piece by piece: the
    tokens are those of the whole text (GPT-NeoX's tokenizer and a word tokenizer), and under truncation
    only what the window needs is tokenized."""
    monkeypatch.setattr(windows_module, "LONG_DOCUMENT", 300)
    monkeypatch.setattr(windows_module, "PIECE_CHARS", 100)
    rng = np.random.default_rng(0)
    words = ["def", "f(x):", "return", "x", "  #", "naïve", "\n", "tab\there", "café,", "12.5", "—", "a"]
    long_text = " ".join(rng.choice(words, 4000))  # ~20,000 characters
    neox = NeoXTokenizer.default()
    for tokenizer in (Counting(neox), Counting(model.tokenizer)):
        spec = WindowSpec(4096, packing=True)
        whole = tokenizer(long_text)["input_ids"]
        tokenizer.calls.clear()
        got = list(windows_module._tokenized(Documents("texts", [long_text, "a b"]), 0, None, spec, tokenizer, True))
        assert got[0][1].tolist() == whole and got[1][1].tolist() == tokenizer("a b")["input_ids"]
        assert max(tokenizer.calls) < 300  # no text handed to the tokenizer was longer than a piece
        first8 = tokenizer(long_text, truncation=True, max_length=8)["input_ids"]
        tokenizer.calls.clear()
        truncated = list(windows_module._tokenized(Documents("texts", [long_text]), 0, None, WindowSpec(8),
                                                   tokenizer, True))
        assert sum(tokenizer.calls) < 5000  # the probe (~3,000 characters) and one piece: not the text
        assert truncated[0][1].tolist() == first8


class Counting:
    """A tokenizer that records the length of every text it was handed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.calls += map(len, [text] if isinstance(text, str) else text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_long_line_costs_memory_of_its_own_size(tmp_path):
    """One 20 MB line with context_size=64 used to cost +4.3 GiB of RSS (the tokenizer's per-token
    records of the whole line). Now truncation tokenizes one piece, and packing holds the text and 4
    bytes per token. Measured as the peak RSS of a child process: an 8 MB line truncated (1.7 GiB
    before) and a 2 MB line packed (0.4 GiB before)."""
    child = """
import resource, sys, torch
from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.writer import cache_dataset
from neox_lab.tokenizer import NeoXTokenizer
model = NeoXForCausalLM(NeoXConfig(vocab_size=50304, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)).eval()
tok = NeoXTokenizer.default()
line = ("def f(x): return x * 2  # a line of code " * 200_000)[:8_000_000]
for packing, text in ((False, line), (True, line[:2_000_000])):
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache_dataset(model, [text, "short one"], ["hook_embed"], sys.argv[1] + str(packing), context_size=64,
                  packing=packing, batch_size=64, tokenizer=tok, progress=False, shard_tokens=8192)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "s")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr
    truncated_gib, packed_gib = map(float, out.stdout.split()[-2:])
    # Truncated: the 8 MB line's utf-8 copy for the fingerprint and one piece: under 64 MiB.
    assert truncated_gib < 1 / 16, truncated_gib
    # Packed: ~500k tokens as int32 (2 MB, a few copies), the windows' Python lists (~30 MB at 64 bytes a
    # token), shards of 8192 tokens: under 96 MiB.
    assert packed_gib < 3 / 32, packed_gib
