"""A reader never damages a store, and a writer never deletes finished shards it cannot prove damaged:
a reader computing normalisation statistics while `cache_dataset` writes, a manifest replaced by an
older copy, foreign and damaged shard files, edited statistics."""

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.manifest import CacheIntegrityError
from neox_lab.store.reader import ActivationStore
from neox_lab.store.writer import cache_dataset

CFG = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
NAMES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
SMALL = dict(batch_size=3, max_length=12, shard_tokens=18, progress=False)
N_DOCS = 60  # 20 shards of 3 documents


def make_model():
    torch.manual_seed(0)
    return NeoXForCausalLM(CFG).eval()


def docs(n=N_DOCS):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CFG.vocab_size, (n, 6), generator=g).tolist()


def dir_bytes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def inodes(directory: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("shard-*")}


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    cache_dataset(model, docs(), NAMES, out, **SMALL)
    return out


# The writer, slowed down per shard so that a reader sees the store while it grows.
WRITER = """
import sys, time, torch
from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store import shards
from neox_lab.store.writer import cache_dataset
flush = shards.ShardWriter.flush
def slow(*args):
    time.sleep(0.15)
    return flush(*args)
shards.ShardWriter.flush = slow
torch.manual_seed(0)
model = NeoXForCausalLM(NeoXConfig(**{cfg!r})).eval()
g = torch.Generator().manual_seed(1)
docs = torch.randint(0, {vocab}, ({n}, 6), generator=g).tolist()
cache_dataset(model, docs, {names!r}, sys.argv[1], **{small!r})
"""


def test_a_reader_computing_statistics_during_a_run_damages_nothing(model, reference, tmp_path):
    """The data-loss case: a reader opened with allow_incomplete=True while cache_dataset writes computes
    normalisation statistics, during the run and again after it ended (its manifest is then stale). The
    store must finish, open, resume to nothing, and equal a run nobody read, byte for byte."""
    cfg = {k: getattr(CFG, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "rotary_pct", "max_position_embeddings")}
    child = WRITER.format(cfg=cfg, vocab=CFG.vocab_size, n=N_DOCS, names=NAMES, small=SMALL)
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", child, str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    readers, seen = [], set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                reader = ActivationStore(out, allow_incomplete=True)
            except (FileNotFoundError, ValueError):  # no manifest yet, or a shard not yet complete
                time.sleep(0.02)
                continue
            if len(reader) and len(reader.shards) not in seen:
                seen.add(len(reader.shards))
                next(iter(reader.stream(NAMES[0], batch_size=4, buffer_tokens=16, normalize="center_scale")))
                readers.append(reader)
            time.sleep(0.02)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(seen) >= 2, "the reader never saw the store unfinished: the writer was too fast for this test"
    for reader in readers:  # the store they opened was unfinished: what they hold is stale now
        reader.normalization_stats(NAMES[1])
    store = ActivationStore(out)
    assert store.manifest["completed"] and len(store.shards) == N_DOCS // 3
    before = inodes(out)
    cache_dataset(model, docs(), NAMES, out, **SMALL)  # a rerun: finished, nothing to do
    assert inodes(out) == before
    assert dir_bytes(out) == dir_bytes(reference)


def test_a_manifest_replaced_by_an_older_copy_loses_no_shard(model, reference, tmp_path):
    """What the reader used to leave behind: the writer's manifest overwritten by the 3-shard manifest it
    read early on. The next run takes the finished shards back (hashed) instead of deleting them."""
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["shards"][:3]
    manifest.update(completed=False, shards=kept, n_tokens=sum(s["n_tokens"] for s in kept),
                    n_documents=sum(s["n_docs"] for s in kept))
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = inodes(out)
    with pytest.warns(UserWarning, match=r"17 finished shard\(s\) were on disk but not in manifest\.json"):
        cache_dataset(model, docs(), NAMES, out, **SMALL)
    assert inodes(out) == before  # no shard deleted or rewritten
    assert dir_bytes(out) == dir_bytes(reference)


@pytest.mark.parametrize("damage", ["cut short", "a flipped byte"])
def test_unlisted_shards_are_kept_unless_damaged_and_foreign_ones_stop_the_run(model, reference, tmp_path, damage):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(completed=False, shards=manifest["shards"][:2], n_tokens=36, n_documents=6)
    (out / "manifest.json").write_text(json.dumps(manifest))
    # shard 2 is provably damaged (not the size its header says, or bytes that differ from the digests it
    # was written with), so the chain stops there; shards 3.. are this store's and are rewritten with the
    # same bytes when the run reaches them.
    shard2 = out / "shard-00002.safetensors"
    data = bytearray(shard2.read_bytes())
    if damage == "cut short":
        del data[-7:]
    else:
        data[-3] ^= 0x10
    shard2.write_bytes(bytes(data))
    foreign = tmp_path / "foreign"
    cache_dataset(make_model(), docs(9), NAMES, foreign, **{**SMALL, "max_length": 6})
    shutil.copy(foreign / "shard-00001.safetensors", out / "shard-00030.safetensors")
    with pytest.raises(CacheIntegrityError, match=r"shard-00030\.safetensors.*refusing to delete"):
        cache_dataset(model, docs(), NAMES, out, **SMALL)
    assert (out / "shard-00030.safetensors").exists() and (out / "shard-00005.safetensors").exists()
    (out / "shard-00030.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache_dataset(model, docs(), NAMES, out, **SMALL)
    assert dir_bytes(out) == dir_bytes(reference)


def test_statistics_never_touch_the_manifest_and_an_edited_mean_is_not_used(reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    manifest = (out / "manifest.json").read_bytes()
    x = ActivationStore(out)[NAMES[0]][:].double()
    stats = ActivationStore(out).normalization_stats(NAMES[0])
    assert (out / "manifest.json").read_bytes() == manifest
    saved = json.loads((out / "stats.json").read_text())
    assert {k: saved["hooks"][NAMES[0]][k] for k in stats} == stats
    saved["hooks"][NAMES[0]]["mean"][0] += 1.0  # an edit, without recomputing the entry's hash
    (out / "stats.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"stats\.json: the statistics of 'blocks\.0\.hook_resid_post' do not "
                                         r"match their sha256"):
        again = ActivationStore(out, check="open").normalization_stats(NAMES[0])
    # computed again in float64 from the same values: equal to the last bit
    assert again == stats
    torch.testing.assert_close(torch.tensor(again["mean"], dtype=torch.float64), x.mean(0), rtol=1e-12, atol=1e-12)
    assert json.loads((out / "stats.json").read_text())["hooks"][NAMES[0]] == {
        **stats, "shards": saved["hooks"][NAMES[0]]["shards"], "sha256": saved["hooks"][NAMES[0]]["sha256"]}


def test_statistics_of_an_unfinished_store_are_not_saved(reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(completed=False, shards=manifest["shards"][:2], n_tokens=36, n_documents=6)
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = dir_bytes(out)
    partial = ActivationStore(out, allow_incomplete=True)
    stats = partial.normalization_stats(NAMES[0])
    assert stats["n_tokens"] == 36 and partial.normalization_stats(NAMES[0]) is stats
    assert dir_bytes(out) == before
