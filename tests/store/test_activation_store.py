"""cache_dataset, CachedActivations, `neox-lab cache`: round trips, resuming a kill, torchrun, bad input."""

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store import shards
from neox_lab.store.manifest import CacheMismatchError, CacheWriteError, shard_sha256
from neox_lab.store.reader import CachedActivations
from neox_lab.store.writer import cache_dataset, expand_hook_patterns, rank_doc_range
from neox_lab.tokenizer import NeoXTokenizer

CFG = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
HOOKS = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.1.ln2.hook_scale",
         "blocks.1.hook_resid_post", "hook_logits"]
WORDS = "the cat sat on a mat dog ran far away and then slept in sun".split()
# Settings shared by the tests that compare files: small shards so every run writes several.
SMALL = dict(batch_size=3, max_length=12, shard_tokens=20, progress=False)


def make_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return NeoXForCausalLM(cfg).eval()


def word_tokenizer() -> NeoXTokenizer:
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return NeoXTokenizer(backend, unk_token="[UNK]")


def random_docs(n=14, seed=1, lo=1, hi=20):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(0, CFG.vocab_size, (int(k),), generator=g).tolist() for k in lengths]


def random_texts(n=13, seed=2):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 18))) for _ in range(n)]


def reference(model, doc, names):
    """Per-token activations of one unpadded document, laid out as the cache stores them."""
    _, cache = model.run_with_cache(torch.tensor([doc]), names_filter=names)
    out = {}
    for name in names:
        t = cache[name][0]
        out[name] = t.permute(1, 0, 2) if name.endswith("hook_pattern") else t  # [query n_heads key]
    return out


def assert_matches_reference(cache, model, docs, atol):
    assert cache.n_documents == len(docs)
    for d, doc in enumerate(docs):
        span = cache.document(d)
        assert cache.tokens(span.start, span.stop).tolist() == doc
        assert cache.doc_ids(span.start, span.stop).tolist() == [d] * len(doc)
        assert cache.positions(span.start, span.stop).tolist() == list(range(len(doc)))
        for name, want in reference(model, doc, cache.hook_names).items():
            got = cache[name][span].float()
            if name.endswith("hook_pattern"):  # the key axis is padded with zeros to max_length
                assert not got[..., len(doc):].any()
                got = got[..., : len(doc)]
            torch.testing.assert_close(got, want, atol=atol, rtol=atol, msg=f"document {d}, {name}")


def dir_bytes(directory: Path) -> dict:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def model():
    return make_model()


# ------------------------------------------------------------------------------------------ round trips
def test_token_ids_round_trip_equals_run_with_cache(model, tmp_path):
    docs = [d[:12] for d in random_docs()]
    cache = cache_dataset(model, docs, HOOKS, tmp_path, dtype=torch.float32, **SMALL)
    assert len(cache) == sum(map(len, docs)) and len(cache.shards) > 2
    assert cache.hook_names == HOOKS
    assert cache["blocks.0.attn.hook_pattern"].shape == (len(cache), 4, 12)
    assert cache["blocks.0.attn.hook_pattern"].axes == ["token", "n_heads", "key_pos"]
    assert_matches_reference(cache, model, docs, atol=1e-5)


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_text_round_trip(model, tmp_path, kind):
    texts, tok = random_texts(), word_tokenizer()
    path = tmp_path / f"data.{kind}"
    lines = texts if kind == "txt" else [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)]
    # blank lines are skipped
    path.write_text("\n\n".join(lines[:4]) + "\n  \n" + "\n".join(lines[4:]) + "\n")
    extra = {"text_field": "body"} if kind == "jsonl" else {}
    cache = cache_dataset(model, path, ["blocks.*.hook_resid_post"], tmp_path / "out", tokenizer=tok, **SMALL,
                          **extra)
    assert cache.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert cache["blocks.0.hook_resid_post"].dtype == torch.float16
    docs = [tok(t)["input_ids"][:12] for t in texts]
    assert_matches_reference(cache, model, docs, atol=1e-2)


def test_sources_npy_tensor_and_lists_agree(model, tmp_path):
    ids = torch.randint(0, CFG.vocab_size, (7, 9), generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    caches = [cache_dataset(model, src, ["blocks.1.hook_resid_post"], tmp_path / name, **SMALL)
              for name, src in (("npy", tmp_path / "ids.npy"), ("tensor", ids), ("list", ids.tolist()))]
    digests = {c.manifest["source"]["documents_sha256"] for c in caches}
    assert len(digests) == 1
    for c in caches[1:]:
        assert torch.equal(c["blocks.1.hook_resid_post"][:], caches[0]["blocks.1.hook_resid_post"][:])


def test_positions_last_and_slice(model, tmp_path):
    docs = random_docs(n=8)
    full = cache_dataset(model, docs, ["hook_logits"], tmp_path / "all", **SMALL)
    last = cache_dataset(model, docs, ["hook_logits"], tmp_path / "last", positions="last", **SMALL)
    some = cache_dataset(model, docs, ["hook_logits"], tmp_path / "some", positions="1:5:2", **SMALL)
    assert len(last) == len(docs) and last.doc_ids().tolist() == list(range(len(docs)))
    for d, doc in enumerate(docs):
        span, n = full.document(d), min(len(doc), 12)
        assert last.positions()[d] == n - 1
        assert torch.equal(last["hook_logits"][d], full["hook_logits"][span.stop - 1])
        kept = some.document(d)
        assert some.positions(kept.start, kept.stop).tolist() == list(range(n))[1:5:2]
        assert torch.equal(some["hook_logits"][kept], full["hook_logits"][span][1:5:2])


# ------------------------------------------------------------------------------------------ reader
def test_reader_is_lazy_and_indexes_like_a_tensor(model, tmp_path):
    cache = cache_dataset(model, random_docs(n=20), ["blocks.0.hook_resid_post"], tmp_path, **SMALL)
    cache = CachedActivations(tmp_path)  # fresh: no shard opened yet
    view = cache["blocks.0.hook_resid_post"]
    assert cache._handles == {}
    first = view[0:3]
    assert list(cache._handles) == [0] and first.shape == (3, 32)
    whole = view.load()
    assert whole.shape == view.shape and len(cache._handles) == len(cache.shards) > 3
    n = len(cache)
    for a, b in [(0, n), (5, 47), (19, 21), (n - 3, n + 10), (30, 10)]:
        assert torch.equal(view[a:b], whole[a:b])
    assert torch.equal(view[3:50:7], whole[3:50:7])
    assert torch.equal(view[-1], whole[-1]) and torch.equal(view[7], whole[7])
    assert torch.equal(view[4:9, 2], whole[4:9, 2]) and torch.equal(view[8, 1:3], whole[8, 1:3])
    assert torch.equal(view[[n - 1, 0, 33, 33, 2]], whole[[n - 1, 0, 33, 33, 2]])
    assert torch.equal(torch.cat(list(cache.iter_batches("blocks.0.hook_resid_post", 7))), whole)
    shards = list(cache.iter_shards())
    assert torch.equal(torch.cat([s["token_ids"] for s in shards]), cache.tokens())
    with pytest.raises(IndexError, match="out of range"):
        view[n]
    with pytest.raises(KeyError, match="not in this cache"):
        cache["blocks.1.hook_resid_post"]
    cache.verify()
    shard = tmp_path / cache.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its sha256"):
        CachedActivations(tmp_path, check="sizes").verify()


def test_shards_end_on_batch_boundaries_and_runs_are_byte_identical(model, tmp_path):
    docs = random_docs(n=17)
    a = cache_dataset(model, docs, ["blocks.1.hook_resid_post"], tmp_path / "a", **SMALL)
    cache_dataset(model, docs, ["blocks.1.hook_resid_post"], tmp_path / "b", **SMALL)
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    # .lock stays: deleting a lock file others may have open would let two writers in
    assert sorted(dir_bytes(tmp_path / "a")) == [".lock", "manifest.json"] + [s["file"] for s in a.shards]
    for s in a.shards[:-1]:
        assert s["n_docs"] % SMALL["batch_size"] == 0 and s["n_tokens"] >= SMALL["shard_tokens"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["completed"] and manifest["n_tokens"] == len(a) and manifest["n_documents"] == 17
    assert manifest["settings"]["dtype"] == "float16" and manifest["model"]["config"]["hidden_size"] == 32
    assert all(shard_sha256(tmp_path / "a" / s["file"]) == s["sha256"] for s in manifest["shards"])


def test_finished_cache_is_returned_without_work(model, tmp_path):
    docs = random_docs(n=6)
    cache_dataset(model, docs, ["hook_embed"], tmp_path, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = cache_dataset(model, docs, ["hook_embed"], tmp_path, **SMALL)
    assert len(again) == sum(min(len(d), 12) for d in docs)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_rank_ranges_are_whole_batches_and_cover_everything():
    for n_docs, bs, world in [(17, 3, 2), (5, 8, 3), (0, 4, 2), (100, 7, 5)]:
        ranges = [rank_doc_range(n_docs, bs, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n_docs
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(lo % bs == 0 for lo, _ in ranges)


def test_explicit_ranks_without_a_process_group_merge_when_the_last_finishes(model, tmp_path):
    docs, names = random_docs(n=17), ["blocks.1.hook_resid_post"]
    single = cache_dataset(model, docs, names, tmp_path / "single", **SMALL)
    multi_dir = tmp_path / "multi"
    assert cache_dataset(model, docs, names, multi_dir, rank=1, world_size=3, **SMALL) is None
    with pytest.raises(CacheMismatchError, match="another number of processes"):
        cache_dataset(model, docs, names, multi_dir, **SMALL)
    assert cache_dataset(model, docs, names, multi_dir, rank=0, world_size=3, **SMALL) is None
    multi = cache_dataset(model, docs, names, multi_dir, rank=2, world_size=3, **SMALL)
    assert multi.manifest["world_size"] == 3 and multi.manifest["n_documents"] == 17
    assert [s["first_doc"] for s in multi.shards] == sorted(s["first_doc"] for s in multi.shards)
    for name in [*names, "token_ids", "doc_ids", "positions"]:
        assert torch.equal(single[name][:], multi[name][:]), name


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_hooks_fail_before_any_work(model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyError, match="hook_resid_psot"):
        cache_dataset(model, random_docs(), ["blocks.0.hook_resid_psot"], out, **SMALL)
    with pytest.raises(KeyError, match="matches no hook point"):
        cache_dataset(model, random_docs(), ["blocks.*.hook_nothing"], out, **SMALL)
    with pytest.raises(KeyError, match="parallel residual"):
        cache_dataset(model, random_docs(), ["blocks.0.hook_resid_mid"], out, **SMALL)
    assert not out.exists()
    assert expand_hook_patterns(model, ["blocks.?.hook_resid_post", "hook_embed"]) == [
        "hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_another_models_cache_is_refused(model, tmp_path):
    docs = random_docs(n=6)
    cache_dataset(model, docs, ["hook_embed"], tmp_path, **SMALL)
    cases = [
        (dict(model=make_model(cfg=CFG.replace(rotary_pct=0.25))), "model.config_sha256"),
        (dict(model=make_model(seed=5)), "model.weights_sha256"),
        (dict(names=["blocks.0.hook_resid_post"]), "settings.hook_names"),
        (dict(dtype=torch.bfloat16), "settings.dtype"),
        (dict(max_length=11), "settings.max_length"),
        (dict(source=random_docs(n=6, seed=9)), "source.documents_sha256"),
    ]
    for change, field in cases:
        kw = dict(model=model, source=docs, names=["hook_embed"], out_dir=tmp_path, **SMALL)
        kw.update(change)
        with pytest.raises(CacheMismatchError, match=field.replace(".", r"\.")):
            cache_dataset(**kw)
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-00000.safetensors").write_bytes(b"not ours")
    with pytest.raises(CacheMismatchError, match="no manifest.json"):
        cache_dataset(model, docs, ["hook_embed"], other, **SMALL)


# How a full disk surfaces: OSError from write() or from fsync().
DISK_FULL = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "Input/output error")]


@pytest.mark.parametrize("error", DISK_FULL, ids=["ENOSPC", "EIO"])
def test_write_error_keeps_complete_shards_and_resumes_byte_identical(model, tmp_path, monkeypatch, error):
    docs, names = random_docs(n=16), ["blocks.0.hook_resid_post", "hook_logits"]
    cache_dataset(model, docs, names, tmp_path / "clean", **SMALL)
    real_save, calls = shards.write_shard_file, []

    def disk_full(filename, *rest):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
            raise error
        return real_save(filename, *rest)

    monkeypatch.setattr(shards, "write_shard_file", disk_full)
    broken = tmp_path / "broken"
    with pytest.raises(CacheWriteError, match=rf"shard-00002\.safetensors failed.*{error.strerror}") as info:
        cache_dataset(model, docs, names, broken, **SMALL)
    assert isinstance(info.value, OSError) and info.value.__cause__ is error
    manifest = json.loads((broken / "manifest.json").read_text())
    assert not manifest["completed"] and len(manifest["shards"]) == 2
    assert sorted(p.name for p in broken.iterdir()) == [".lock", "manifest.json", "shard-00000.safetensors",
                                                         "shard-00001.safetensors"]
    with pytest.raises(ValueError, match="unfinished"):
        CachedActivations(broken)
    partial = CachedActivations(broken, allow_incomplete=True)
    partial.verify()
    assert len(partial) == sum(s["n_tokens"] for s in manifest["shards"])
    monkeypatch.setattr(shards, "write_shard_file", real_save)
    # leftovers of a kill in the middle of the next shard, which the resumed run must discard
    (broken / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")
    (broken / "shard-00002.safetensors").write_bytes(b"renamed, manifest not yet updated")
    (broken / "manifest.json.tmp").write_bytes(b"{")
    (broken / ".tmpAb12Cd").write_bytes(b"safetensors' own temporary file")
    cache_dataset(model, docs, names, broken, **SMALL)
    assert dir_bytes(broken) == dir_bytes(tmp_path / "clean")


def test_a_second_writer_is_refused(model, tmp_path):
    from neox_lab.store.lock import StoreLock

    lock = StoreLock(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="another process is writing"):
            cache_dataset(model, random_docs(n=3), ["hook_embed"], tmp_path, **SMALL)
    finally:
        lock.release()


def test_text_without_tokenizer_and_bad_files(model, tmp_path):
    (tmp_path / "a.txt").write_text("the cat\n")
    with pytest.raises(ValueError, match="need a tokenizer"):
        cache_dataset(model, tmp_path / "a.txt", ["hook_embed"], tmp_path / "o", **SMALL)
    (tmp_path / "b.jsonl").write_text('{"text": "the cat"}\n{"txt": "sat"}\n')
    with pytest.raises(ValueError, match=r"line 2: no 'text' field"):
        cache_dataset(model, tmp_path / "b.jsonl", ["hook_embed"], tmp_path / "o", tokenizer=word_tokenizer())
    (tmp_path / "c.csv").write_text("the cat\n")
    with pytest.raises(ValueError, match="unknown suffix '.csv'"):
        cache_dataset(model, tmp_path / "c.csv", ["hook_embed"], tmp_path / "o", tokenizer=word_tokenizer())


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny model with its word tokenizer, and a .txt dataset for it."""
    root = tmp_path_factory.mktemp("ckpt")
    make_model().save_pretrained(root / "model")
    word_tokenizer().backend_tokenizer.save(str(root / "model" / "tokenizer.json"))
    (root / "data.txt").write_text("\n".join(random_texts(n=23, seed=4)) + "\n")
    return root


def cli(args, env=None, torchrun=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    prefix = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prefix += ["-m", "torch.distributed.run", f"--nproc-per-node={torchrun}", "--master-addr=127.0.0.1",
                   f"--master-port={port}"]
    return subprocess.run([*prefix, "-m", "neox_lab", "cache", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


# The child a test kills mid-run: the CLI with ShardWriter.flush wrapped to say when shard N is safely on
# disk and then wait there, so the test can kill it from outside (SIGKILL, as the OOM killer or a lost
# node would) at a known point; the production code carries no test switch.
PAUSE_AFTER_SHARDS = """
import sys
from neox_lab.cli import main
from neox_lab.store.shards import ShardWriter

flush, wanted = ShardWriter.flush, int(sys.argv[1])


def flush_then_pause(self, axes):
    flush(self, axes)
    if len(self.manifest["shards"]) >= wanted:
        print("paused", flush=True)
        sys.stdin.readline()  # killed while waiting here


ShardWriter.flush = flush_then_pause
sys.exit(main(sys.argv[2:]))
"""


def cli_killed_after_shards(n_shards, args):
    """`neox-lab cache ARGS` in a child process, killed with SIGKILL once its n-th shard is on disk."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_SHARDS, str(n_shards), "cache", *map(str, args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    try:
        said = child.stdout.readline()
    finally:
        child.kill()
        _, err = child.communicate(timeout=120)
    assert said == "paused\n", f"the run ended before its shard {n_shards}: {err}"
    return child


def cache_args(checkpoint, out):
    return ["--model", checkpoint / "model", "--data", checkpoint / "data.txt", "--hooks",
            "blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern", "--out", out, "--batch-size", "3",
            "--max-length", "12", "--shard-tokens", "20", "--no-progress"]


@pytest.fixture(scope="module")
def single_run(checkpoint):
    """An uninterrupted single-process `neox-lab cache` run, shared by the resume and torchrun tests."""
    out = checkpoint / "single"
    done = cli(cache_args(checkpoint, out))
    assert done.returncode == 0, done.stderr
    assert "cached" in done.stdout
    return out


def test_cli_killed_run_resumes_to_identical_files(checkpoint, single_run, tmp_path):
    killed = cli_killed_after_shards(2, cache_args(checkpoint, tmp_path))
    assert killed.returncode == -signal.SIGKILL
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not manifest["completed"] and len(manifest["shards"]) == 2
    resumed = cli(cache_args(checkpoint, tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert dir_bytes(tmp_path) == dir_bytes(single_run)
    cache = CachedActivations(single_run)
    assert cache.n_documents == 23 and len(cache.shards) > 3


def test_cli_reports_bad_hooks_without_writing(checkpoint, tmp_path, capsys):
    from neox_lab.commands import cache as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = [str(a) for a in cache_args(checkpoint, tmp_path / "out")]
    args = parser.parse_args(argv + ["--hooks", "blocks.0.hook_nope"])
    assert command.run(args) == 2
    assert "error: no hook point 'blocks.0.hook_nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_torchrun_two_processes_equal_single_process(checkpoint, single_run, tmp_path):
    multi = cli(cache_args(checkpoint, tmp_path), torchrun=2)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    a, b = CachedActivations(single_run), CachedActivations(tmp_path)
    assert b.manifest["world_size"] == 2 and {s["file"].split("/")[0] for s in b.shards} == {
        "rank-00000-of-00002", "rank-00001-of-00002"}
    assert (len(a), a.n_documents, a.manifest["hooks"]) == (len(b), b.n_documents, b.manifest["hooks"])
    for name in [*a.hook_names, "token_ids", "doc_ids", "positions"]:
        assert torch.equal(a[name][:], b[name][:]), name
