"""ActivationStream: every token exactly once across ranks and DataLoader workers, reproducible shuffles,
resume mid-epoch, normalisation statistics."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.manifest import CacheIntegrityError
from neox_lab.store.reader import ActivationStore
from neox_lab.store.writer import cache_dataset

CFG = NeoXConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, rotary_pct=0.5, max_position_embeddings=64)
HOOKS = ["hook_embed", "blocks.0.hook_resid_post"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(0)
    model = NeoXForCausalLM(CFG).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (40,), generator=g)]
    out = tmp_path_factory.mktemp("store")
    return cache_dataset(model, docs, HOOKS, out, batch_size=4, max_length=20, shard_tokens=50, progress=False,
                         dtype=torch.float32)


def keys(batch):
    return list(zip(batch["doc_ids"].tolist(), batch["positions"].tolist()))


def all_keys(store):
    return list(zip(store.doc_ids().tolist(), store.positions().tolist()))


def check_rows(store, batch):
    """Every yielded row is the store's row for that token."""
    index = {k: i for i, k in enumerate(all_keys(store))}
    rows = [index[k] for k in keys(batch)]
    for name in HOOKS:
        assert torch.equal(batch[name], store[name][rows])


settings = dict(batch_size=st.integers(1, 40), buffer_tokens=st.integers(8, 200), chunk=st.integers(1, 8),
                consumers=st.integers(1, 4), seed=st.integers(0, 3), epoch=st.integers(0, 2),
                shuffle=st.booleans())


@given(**settings)
def test_consumers_together_yield_every_token_exactly_once(store, batch_size, buffer_tokens, chunk, consumers,
                                                           seed, epoch, shuffle):
    got = []
    for rank in range(consumers):
        stream = store.stream(HOOKS, batch_size=batch_size, buffer_tokens=buffer_tokens,
                              chunk_tokens=min(chunk * 5, buffer_tokens), seed=seed, epoch=epoch, meta=True,
                              drop_last=False, rank=rank, world_size=consumers, shuffle=shuffle)
        batches = list(stream)
        assert all(len(b["token_ids"]) == batch_size for b in batches[:-1])
        assert len(batches) == stream.num_batches()
        for b in batches:
            check_rows(store, b)
            got += keys(b)
    assert sorted(got) == sorted(all_keys(store))  # no duplicate, no gap


@given(**settings)
def test_drop_last_gives_every_rank_the_same_full_batches(store, batch_size, buffer_tokens, chunk, consumers,
                                                          seed, epoch, shuffle):
    counts, got = set(), []
    for rank in range(consumers):
        batches = list(store.stream(HOOKS, batch_size=batch_size, buffer_tokens=buffer_tokens,
                                    chunk_tokens=min(chunk * 5, buffer_tokens), seed=seed, epoch=epoch,
                                    meta=True, rank=rank, world_size=consumers, shuffle=shuffle))
        counts.add(len(batches))
        assert all(len(b["token_ids"]) == batch_size for b in batches)
        got += [k for b in batches for k in keys(b)]
    assert len(counts) == 1 and len(got) == len(set(got))


@given(**settings, data=st.data())
def test_shuffles_are_reproducible_and_resume_mid_epoch(store, batch_size, buffer_tokens, chunk, consumers, seed,
                                                        epoch, shuffle, data):
    kw = dict(batch_size=batch_size, buffer_tokens=buffer_tokens, chunk_tokens=min(chunk * 5, buffer_tokens),
              seed=seed, epoch=epoch, meta=True, rank=consumers - 1, world_size=consumers, shuffle=shuffle)
    first = [keys(b) for b in store.stream(HOOKS, **kw)]
    assert [keys(b) for b in store.stream(HOOKS, **kw)] == first
    start = data.draw(st.integers(0, len(first)))
    resumed = list(store.stream(HOOKS, start_batch=start, **kw))
    assert [keys(b) for b in resumed] == first[start:]
    for b in resumed:
        check_rows(store, b)
    if not shuffle:  # in order: the consumer's chunks, read straight through
        chunks = store.stream(HOOKS, **kw)._my_chunks(consumers - 1, consumers)
        want = [k for a, b in chunks for k in all_keys(store)[a:b]]
        assert [k for b in first for k in b] == want[: len([k for b in first for k in b])]


def test_epochs_and_seeds_reorder_and_the_buffer_mixes_shards(store):
    kw = dict(batch_size=len(store), buffer_tokens=64, chunk_tokens=8, meta=True, drop_last=False)
    orders = {(s, e): keys(next(iter(store.stream(HOOKS, seed=s, epoch=e, **kw)))) for s in (0, 1) for e in (0, 1)}
    assert len({tuple(v) for v in orders.values()}) == 4
    stream = store.stream(HOOKS, seed=0, **kw)
    stream.set_epoch(1)
    assert keys(next(iter(stream))) == orders[(0, 1)]
    ordered = store.stream(HOOKS, shuffle=False, **kw)
    assert keys(next(iter(ordered))) == all_keys(store)
    # the first 16 tokens out of a shuffled stream come from several shards
    first = store.stream(HOOKS, batch_size=16, buffer_tokens=64, chunk_tokens=8, meta=True)
    docs = next(iter(first))["doc_ids"]
    shard_of = np.searchsorted([s["first_doc"] for s in store.shards], docs.numpy(), side="right")
    assert len(set(shard_of.tolist())) > 1


def test_dataloader_workers_and_ranks_split_without_duplicates_and_resume(store):
    kw = dict(batch_size=7, buffer_tokens=60, chunk_tokens=10, seed=3, meta=True)
    got = []
    for rank in range(2):
        loader = DataLoader(store.stream(HOOKS, rank=rank, world_size=2, drop_last=False, **kw), batch_size=None,
                            num_workers=2)
        got += [k for b in loader for k in keys(b)]
    assert sorted(got) == sorted(all_keys(store))
    stream = store.stream(HOOKS, rank=1, world_size=2, **kw)
    full = [keys(b) for b in DataLoader(stream, batch_size=None, num_workers=2)]
    assert len(full) == stream.num_batches(num_workers=2)
    for start in (1, 4):
        resumed = store.stream(HOOKS, rank=1, world_size=2, start_batch=start, **kw)
        assert [keys(b) for b in DataLoader(resumed, batch_size=None, num_workers=2)] == full[start:]


def test_normalisation_statistics_are_computed_once_and_applied(store, tmp_path):
    x = store["blocks.0.hook_resid_post"][:].double()
    stats = store.normalization_stats("blocks.0.hook_resid_post")
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), x.mean(0), rtol=1e-12, atol=1e-12)
    assert stats["norm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-12)
    assert stats["centered_norm"] == pytest.approx(float((x - x.mean(0)).norm(dim=1).mean()), rel=1e-12)
    on_disk = json.loads((store.dir / "stats.json").read_text())["hooks"]["blocks.0.hook_resid_post"]
    assert {k: on_disk[k] for k in stats} == stats
    assert ActivationStore(store.dir).normalization_stats("blocks.0.hook_resid_post") == stats
    batch = next(iter(store.stream("blocks.0.hook_resid_post", batch_size=len(store), shuffle=False,
                                   normalize="center_scale")))["blocks.0.hook_resid_post"]
    want = (x - x.mean(0)) * (16 ** 0.5 / stats["centered_norm"])
    # float32 output of float32 inputs: a few ulps of values of size ~ sqrt(d)
    torch.testing.assert_close(batch.double(), want, rtol=1e-5, atol=1e-5)
    assert float(batch.double().norm(dim=1).mean()) == pytest.approx(16 ** 0.5, rel=1e-5)


def test_bad_stream_arguments_are_named(store):
    with pytest.raises(KeyError, match="nope"):
        store.stream("nope")
    with pytest.raises(ValueError, match="chunk_tokens=10 exceeds buffer_tokens=5"):
        store.stream(HOOKS, buffer_tokens=5, chunk_tokens=10)
    with pytest.raises(ValueError, match="normalize must be one of"):
        store.stream(HOOKS, normalize="zscore")


def test_statistics_of_a_read_only_store_are_kept_in_memory(store, tmp_path, monkeypatch):
    import shutil

    import neox_lab.store.stats as stats_module

    def read_only(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    copy = tmp_path / "copy"
    shutil.copytree(store.dir, copy)
    (copy / "stats.json").unlink(missing_ok=True)
    monkeypatch.setattr(stats_module, "atomic_write_json", read_only)
    fresh = ActivationStore(copy)
    with pytest.warns(UserWarning, match="could not be saved"):
        stats = fresh.normalization_stats("hook_embed")
    assert stats["n_tokens"] == len(store) and fresh.normalization_stats("hook_embed") is stats
    assert not (copy / "stats.json").exists()


def test_a_damaged_shard_is_refused_by_the_stream(store, tmp_path):
    import shutil

    from neox_lab.store.manifest import CacheIntegrityError

    copy = tmp_path / "copy"
    shutil.copytree(store.dir, copy)
    shard = copy / store.shards[2]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # a flipped bit in the last token's data
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheIntegrityError, match=store.shards[2]["file"]):
        list(ActivationStore(copy).stream(HOOKS, batch_size=7, buffer_tokens=40, chunk_tokens=10, shuffle=False))
    with pytest.raises(CacheIntegrityError, match=store.shards[2]["file"]):
        list(ActivationStore(copy).stream(HOOKS, batch_size=7, buffer_tokens=40, chunk_tokens=10))


def test_set_epoch_and_the_seed_are_checked(store):
    stream = store.stream(HOOKS, batch_size=4, buffer_tokens=40, chunk_tokens=10)
    for bad in (dict(start_batch=-2), dict(epoch=-1), dict(epoch=1.5), dict(start_batch=True)):
        with pytest.raises(ValueError, match=r"(epoch|start_batch) must be a non-negative integer"):
            stream.set_epoch(**{"epoch": 0, **bad})
    assert (stream.epoch, stream.start_batch) == (0, 0)  # nothing half-set
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -3"):
        store.stream(HOOKS, seed=-3)


@pytest.mark.parametrize("start_batch", [0, 3])
def test_set_epoch_reaches_persistent_dataloader_workers(store, start_batch):
    kw = dict(batch_size=5, buffer_tokens=40, chunk_tokens=10, meta=True)
    stream = store.stream(HOOKS, **kw)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(3):
        stream.set_epoch(epoch, start_batch=start_batch)
        epochs.append([keys(b) for b in loader])
    for epoch, got in enumerate(epochs):  # each epoch is what a fresh loader of that epoch yields
        fresh = store.stream(HOOKS, epoch=epoch, start_batch=start_batch, **kw)
        assert got == [keys(b) for b in DataLoader(fresh, batch_size=None, num_workers=2)]
    assert epochs[0] != epochs[1] != epochs[2]


def replace_by_rename(path, data):
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.parametrize("how", ["renamed", "in place"])
def test_a_shard_changed_after_its_first_read_is_checked_again_by_view_and_stream(store, tmp_path, how):
    """After a verified shard's file is replaced (write-then-rename) the view served the checked bytes
    it had mapped and the stream the new, unhashed file; damage in place after the first read was served
    by both. Now every read compares the file's identity and hashes a changed file again."""
    copy = tmp_path / "copy"
    shutil.copytree(store.dir, copy)
    opened = ActivationStore(copy)
    kw = dict(batch_size=7, buffer_tokens=40, chunk_tokens=10, meta=True)
    view = opened["blocks.0.hook_resid_post"]
    clean, clean_batches = view[:], [keys(b) for b in opened.stream(HOOKS, **kw)]
    shard = copy / store.shards[2]["file"]
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF  # the last token's data: same size, valid header
    if how == "renamed":
        replace_by_rename(shard, bytes(bad))
    else:
        with open(shard, "r+b") as fh:
            fh.seek(len(good) - 5)
            fh.write(bytes(bad[-5:-4]))
    name = store.shards[2]["file"]
    with pytest.raises(CacheIntegrityError, match=rf"{name} does not match its sha256"):
        view[:]
    with pytest.raises(CacheIntegrityError, match=rf"{name} does not match its sha256"):
        list(opened.stream(HOOKS, **kw))
    replace_by_rename(shard, good)  # the right bytes again, in a new file: checked, then served
    assert torch.equal(view[:], clean)
    assert [keys(b) for b in opened.stream(HOOKS, **kw)] == clean_batches
