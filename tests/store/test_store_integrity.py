"""The store checks what it serves: damaged or swapped shards, edited manifests, another model or backend,
attached hooks, empty documents, fp16 overflow, the lock, and a fault-injection run over all of them."""

import fcntl
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.lock import StoreLock
from neox_lab.store.manifest import CacheIntegrityError, CacheMismatchError, weights_sha256
from neox_lab.store.reader import ActivationStore
from neox_lab.store.writer import cache_dataset

CFG = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
NAMES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
# Every document 6 tokens and every shard 18 tokens (3 documents): all shards have the same size, so a
# swap or a same-size overwrite is invisible to a size check.
SMALL = dict(batch_size=3, max_length=12, shard_tokens=18, progress=False)
DAMAGED = (CacheIntegrityError, CacheMismatchError)


def make_model(seed=0):
    torch.manual_seed(seed)
    return NeoXForCausalLM(CFG).eval()


def equal_docs(n=15, seed=1, length=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n, length), generator=g).tolist()


def dir_bytes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def read_all(store: ActivationStore) -> dict:
    return {name: store[name][:] for name in [*store.hook_names, "token_ids", "doc_ids", "positions"]}


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def clean(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    store = cache_dataset(model, equal_docs(), NAMES, out, **SMALL)
    sizes = {s["bytes"] for s in store.shards}
    assert len(store.shards) == 5 and len(sizes) == 1  # the premise of the swap tests
    return out


def copy_of(clean, tmp_path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(clean, out)
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------ damaged shards are never served
def test_a_flipped_byte_is_caught_on_first_read_and_by_a_rerun(model, clean, tmp_path):
    out = copy_of(clean, tmp_path)
    flip(out / "shard-00002.safetensors", -3)  # inside the last tensor's data: same size, valid header
    store = ActivationStore(out)
    read_all_before = store["blocks.0.hook_resid_post"][:18]  # shard 0 is fine
    assert read_all_before.shape == (18, 32)
    with pytest.raises(CacheIntegrityError, match=r"shard-00002\.safetensors does not match its sha256"):
        store["positions"][:]
    rerun = cache_dataset(model, equal_docs(), NAMES, out, **SMALL)  # a finished store is returned ...
    with pytest.raises(CacheIntegrityError, match="shard-00002"):  # ... but not served unchecked
        read_all(rerun)
    with pytest.raises(CacheIntegrityError, match="shard-00002"):
        ActivationStore(out, check="open")


def test_swapped_shards_are_caught(clean, tmp_path):
    out = copy_of(clean, tmp_path)
    a, b = out / "shard-00001.safetensors", out / "shard-00003.safetensors"
    tmp = out / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(CacheIntegrityError, match=r"shard-00001\.safetensors does not match"):
        read_all(ActivationStore(out))


def test_a_resume_does_not_build_on_a_damaged_shard(model, clean, tmp_path):
    out = copy_of(clean, tmp_path)
    edit_manifest(out, lambda m: m.update(completed=False, n_tokens=36, n_documents=6, shards=m["shards"][:2]))
    for extra in ("shard-00002.safetensors", "shard-00003.safetensors", "shard-00004.safetensors"):
        (out / extra).unlink()
    flip(out / "shard-00001.safetensors", -3)
    with pytest.raises(CacheIntegrityError, match=r"shard-00001\.safetensors does not match its sha256"):
        cache_dataset(model, equal_docs(), NAMES, out, **SMALL)


def test_truncated_and_zeroed_header_shards_name_the_file(clean, tmp_path):
    out = copy_of(clean, tmp_path)
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheIntegrityError, match=r"shard-00001\.safetensors has \d+ bytes, the manifest says"):
        ActivationStore(out)
    out = copy_of(clean, tmp_path / "b")
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\0" * 64 + data[64:])
    with pytest.raises(CacheIntegrityError, match=r"shard-00001\.safetensors"):
        read_all(ActivationStore(out))
    with pytest.raises(CacheIntegrityError, match=r"shard-00001\.safetensors cannot be read as safetensors"):
        read_all(ActivationStore(out, check="sizes"))  # without the hash, the header check still names it


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(n_tokens=m["n_tokens"] + 1), "says n_tokens="),
    (lambda m: m["shards"][1].update(first_token=17), "shard 1 .* starts at token 17"),
    (lambda m: m["shards"][2].update(file="../escape.safetensors"), "points outside the store"),
    (lambda m: m["shards"][2].update(file="/etc/passwd"), "points outside the store"),
    (lambda m: m.update(shards=m["shards"][:4], n_tokens=72, n_documents=12), "marked completed but covers"),
    (lambda m: m["shards"][3].update(file="shard-00002.safetensors"), "listed twice"),
    (lambda m: m.pop("shards"), "lacks or garbles a field"),
    (lambda m: m["settings"].update(dtype="int8"), r"settings\.dtype is 'int8', not one of"),
    (lambda m: m["settings"].update(hook_names="blocks.0.hook_resid_post"), "settings.hook_names is"),
])
def test_an_edited_manifest_is_refused_on_open(clean, tmp_path, change, message):
    out = copy_of(clean, tmp_path)
    edit_manifest(out, change)
    with pytest.raises(CacheIntegrityError, match=message):
        ActivationStore(out)


def test_a_wrong_length_boolean_mask_raises(clean):
    view = ActivationStore(clean)["blocks.0.hook_resid_post"]
    mask = torch.zeros(len(view), dtype=torch.bool)
    mask[[3, 40]] = True
    assert torch.equal(view[mask], view[[3, 40]])
    for bad in (mask[:10], torch.ones(len(view) + 1, dtype=torch.bool), [True, False]):
        with pytest.raises(IndexError, match=r"one entry per cached token"):
            view[bad]


def test_integer_indices_of_any_width_are_positions_and_a_torch_uint8_index_is_refused(clean):
    view = ActivationStore(clean)["blocks.0.hook_resid_post"]
    want = view[[1, 0, 1]]
    for index in (np.array([1, 0, 1], dtype=np.uint8), np.array([1, 0, 1], dtype=np.int16),
                  torch.tensor([1, 0, 1], dtype=torch.int32)):
        assert torch.equal(view[index], want)
    with pytest.raises(TypeError, match=r"torch\.uint8 index is ambiguous .*index\.bool\(\).*index\.long\(\)"):
        view[torch.tensor([1, 0, 1], dtype=torch.uint8)]


# ------------------------------------------------------------------ the store's identity
def test_a_model_differing_past_the_first_values_of_a_tensor_is_refused(model, clean, tmp_path):
    other = make_model()
    with torch.no_grad():
        other.unembed.weight.view(-1)[-1] += 1.0  # the old fingerprint read the first 1024 values only
    assert weights_sha256(other) != weights_sha256(model)
    out = copy_of(clean, tmp_path)
    edit_manifest(out, lambda m: m.update(completed=False, n_tokens=36, n_documents=6, shards=m["shards"][:2]))
    with pytest.raises(CacheMismatchError, match=r"model\.weights_sha256"):
        cache_dataset(other, equal_docs(), NAMES, out, **SMALL)


def test_attached_hooks_are_refused_or_recorded(model, tmp_path):
    def ablate(t, hook):
        return t * 0

    model.add_hook("blocks.0.hook_mlp_out", ablate, permanent=True)
    try:
        with pytest.raises(ValueError, match=r"blocks\.0\.hook_mlp_out: .*ablate.*allow_hooks=True"):
            cache_dataset(model, equal_docs(n=3), NAMES, tmp_path / "a", **SMALL)
        assert not (tmp_path / "a").exists()
        store = cache_dataset(model, equal_docs(n=3), NAMES, tmp_path / "a", allow_hooks=True, **SMALL)
        assert list(store.manifest["model"]["hooks"]) == ["blocks.0.hook_mlp_out"]
    finally:
        model.reset_hooks(including_permanent=True)
    with pytest.raises(CacheMismatchError, match=r"model\.hooks"):  # the clean model is another identity
        cache_dataset(model, equal_docs(n=3), NAMES, tmp_path / "a", **SMALL)
    handle = model.model.blocks[1].register_forward_hook(lambda module, args, out: None)
    try:
        with pytest.raises(ValueError, match=r"module model\.blocks\.1"):
            cache_dataset(model, equal_docs(n=3), NAMES, tmp_path / "b", **SMALL)
    finally:
        handle.remove()


def test_a_resume_on_another_backend_is_refused_unless_asked(clean, tmp_path):
    out = copy_of(clean, tmp_path)
    edit_manifest(out, lambda m: m.update(completed=False, n_tokens=36, n_documents=6, shards=m["shards"][:2]))
    for extra in ("shard-00002.safetensors", "shard-00003.safetensors", "shard-00004.safetensors"):
        (out / extra).unlink()
    sdpa = make_model()
    sdpa.set_attn_backend("sdpa")
    with pytest.raises(CacheMismatchError, match=r"attention backend/device .*allow_backend_change=True"):
        cache_dataset(sdpa, equal_docs(), NAMES, out, **SMALL)
    store = cache_dataset(sdpa, equal_docs(), NAMES, out, allow_backend_change=True, **SMALL)
    assert [s["backend"] for s in store.shards] == ["auto@cpu"] * 2 + ["sdpa@cpu"] * 3
    read_all(store)


# ------------------------------------------------------------------ bad sources, fp16 overflow
def test_empty_documents_are_skipped_with_a_count_and_resume_identically(model, tmp_path):
    docs = equal_docs(n=10)
    docs[4], docs[6], docs[7], docs[8] = [], [], [], []  # batch 2 (documents 6-8) is empty altogether
    with pytest.warns(UserWarning, match="4 document"):
        store = cache_dataset(model, docs, NAMES, tmp_path / "a", **SMALL)
    assert store.n_documents == 10 and len(store) == 6 * 6
    assert store.document(4) == slice(24, 24) and store.document(5) == slice(24, 30)
    assert store.doc_ids().unique().tolist() == [0, 1, 2, 3, 5, 9]
    reference = dir_bytes(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    edit_manifest(tmp_path / "b", lambda m: m.update(completed=False, n_tokens=m["shards"][0]["n_tokens"],
                                                     n_documents=3, shards=m["shards"][:1]))
    for later in sorted((tmp_path / "b").glob("shard-*"))[1:]:
        later.unlink()  # killed before they were written: the resume computes them
    with pytest.warns(UserWarning, match="document"):
        cache_dataset(model, docs, NAMES, tmp_path / "b", **SMALL)
    assert dir_bytes(tmp_path / "b") == reference


@pytest.mark.parametrize("source", [[], "empty.txt", "blank.jsonl"])
def test_an_empty_source_is_refused_before_any_work(model, tmp_path, source):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "blank.jsonl").write_text("")
    if isinstance(source, str):
        source = tmp_path / source
    with pytest.raises(ValueError, match="holds no documents"):
        cache_dataset(model, source, NAMES, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_warns_and_suggests_bf16(tmp_path):
    big = make_model()
    with torch.no_grad():
        big.model.embed.weight.mul_(1e8)  # embeddings far past fp16's 65504
    with pytest.warns(UserWarning, match=r"hook_embed.*non-finite.*float16.*bfloat16"):
        cache_dataset(big, equal_docs(n=3), ["hook_embed"], tmp_path / "a", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache_dataset(big, equal_docs(n=3), ["hook_embed"], tmp_path / "b", dtype=torch.float32, **SMALL)


# ------------------------------------------------------------------ the lock
def test_the_lock_file_outlives_release_so_two_holders_are_impossible(tmp_path):
    first = StoreLock(tmp_path)
    waiting = os.open(tmp_path / ".lock", os.O_RDWR)  # a second writer, between open() and flock()
    first.release()
    third = StoreLock(tmp_path)  # a third writer takes the lock ...
    try:
        with pytest.raises(BlockingIOError):  # ... and the second must not get it too
            fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(waiting)
        third.release()


def test_the_lock_is_held_until_the_run_ends(model, tmp_path, monkeypatch):
    from neox_lab.store import shards

    seen = []

    def probe(self) -> dict:
        result = finish(self)
        with pytest.raises(RuntimeError, match="another process is writing"):
            StoreLock(self.dir)
        seen.append(True)
        return result

    finish = shards.ShardWriter.finish
    monkeypatch.setattr(shards.ShardWriter, "finish", probe)
    cache_dataset(model, equal_docs(n=3), NAMES, tmp_path, **SMALL)
    assert seen == [True]
    StoreLock(tmp_path).release()  # released after the run


# ------------------------------------------------------------------ fault injection
CHILD = """
import sys, torch
from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.writer import cache_dataset
cfg = NeoXConfig(**{cfg!r})
torch.manual_seed(0)
model = NeoXForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(1)
docs = torch.randint(0, cfg.vocab_size, (15, 6), generator=g).tolist()
print("start", flush=True)
cache_dataset(model, docs, {names!r}, sys.argv[1], **{small!r})
"""


def test_fault_injection_never_serves_a_wrong_read(model, clean, tmp_path):
    """Random kills resume byte-identically; random byte flips, shard swaps, deletions and manifest edits
    either leave the store readable with exactly the clean values or raise a clear error."""
    rng = random.Random(15)
    want, reference = read_all(ActivationStore(clean)), dir_bytes(clean)
    cfg = {k: getattr(CFG, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "rotary_pct", "max_position_embeddings")}
    child = CHILD.format(cfg=cfg, names=NAMES, small=SMALL)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(3):  # SIGKILL at a random moment of the run
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([sys.executable, "-c", child, str(out)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline() == b"start\n"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        cache_dataset(model, equal_docs(), NAMES, out, **SMALL)
        assert dir_bytes(out) == reference, f"trial {trial}"

    def flip_random(out):
        shard = out / rng.choice([s for s in reference if s.startswith("shard")])
        flip(shard, rng.randrange(shard.stat().st_size))

    def swap_random(out):
        a, b = rng.sample([s for s in reference if s.startswith("shard")], 2)
        (out / a).rename(out / "x"), (out / b).rename(out / a), (out / "x").rename(out / b)

    def edit_random(out):
        field = rng.choice(["n_tokens", "first_token", "n_docs", "first_doc", "bytes", "sha256", "file"])
        def change(m):
            if field == "n_tokens":
                m["n_tokens"] += rng.choice([-1, 1])
            else:
                s = rng.choice(m["shards"])
                s[field] = (s[field] + rng.choice([-1, 1]) if isinstance(s[field], int) else
                            rng.choice(["../x", "/x", "shard-00000.safetensors", "a" * 64]))
        edit_manifest(out, change)

    def delete_random(out):
        (out / rng.choice([s for s in reference if s.startswith("shard")])).unlink()

    faults = [flip_random, swap_random, edit_random, delete_random] * 4
    for trial, fault in enumerate(faults):
        out = copy_of(clean, tmp_path / f"fault{trial}")
        fault(out)
        for opener in (lambda out=out: ActivationStore(out),
                       lambda out=out: cache_dataset(model, equal_docs(), NAMES, out, **SMALL)):
            try:
                got = read_all(opener())
            except DAMAGED as err:
                assert "manifest" in str(err) or ".safetensors" in str(err), err
                continue
            for name in want:  # served: then it must be exactly the clean store
                assert torch.equal(got[name], want[name]), f"{fault.__name__} (trial {trial}) served {name}"


# ------------------------------------------------------------------ what identifies an attached hook
def head_ablation(head):
    def ablate(z, hook):
        z[:, :, head] = 0
        return z
    return ablate


def scale_heads(z, hook, head, by=0.0):
    z[:, :, head] = z[:, :, head] * by
    return z


SCALE = 0.0


def scale_by_global(z, hook):
    return z * SCALE


def unfinished(out: Path) -> None:
    """What a killed run leaves: two shards done, the rest never written."""
    edit_manifest(out, lambda m: m.update(completed=False, n_tokens=36, n_documents=6, shards=m["shards"][:2]))
    for later in sorted(out.glob("shard-*"))[2:]:
        later.unlink()


@pytest.mark.parametrize("first, second", [
    (lambda: head_ablation(0), lambda: head_ablation(3)),  # a closure value
    (lambda: functools.partial(scale_heads, head=0), lambda: functools.partial(scale_heads, head=3)),
    (lambda: functools.partial(scale_heads, head=0), lambda: functools.partial(scale_heads, head=0, by=0.5)),
], ids=["closure", "partial", "partial-keyword"])
def test_a_resume_with_the_same_hook_function_on_other_arguments_is_refused(model, tmp_path, first, second):
    """Hooks were identified by qualified name only: "ablate head 0" resumed with "ablate head 3" mixed
    both in one store."""
    out = tmp_path / "store"

    def run(fn):
        model.add_hook("blocks.1.attn.hook_z", fn, permanent=True)
        try:
            return cache_dataset(model, equal_docs(), NAMES, out, allow_hooks=True, **SMALL)
        finally:
            model.reset_hooks(including_permanent=True)

    reference = run(first())
    want = read_all(reference)
    unfinished(out)
    with pytest.raises(CacheMismatchError, match=r"model\.hooks"):
        run(second())
    resumed = run(first())  # the same behaviour in a new function object: resumed
    for name, t in read_all(resumed).items():
        assert torch.equal(t, want[name]), name


def test_a_changed_global_changes_the_identity_and_unhashable_values_need_a_name(model, tmp_path):
    global SCALE
    model.add_hook("blocks.0.hook_resid_post", scale_by_global, permanent=True)
    try:
        cache_dataset(model, equal_docs(), NAMES, tmp_path / "a", allow_hooks=True, **SMALL)
        unfinished(tmp_path / "a")
        SCALE = 0.5
        with pytest.raises(CacheMismatchError, match=r"model\.hooks"):
            cache_dataset(model, equal_docs(), NAMES, tmp_path / "a", allow_hooks=True, **SMALL)
    finally:
        SCALE = 0.0
        model.reset_hooks(including_permanent=True)
    lock = threading.Lock()

    def guarded(t, hook):
        with lock:
            return t

    model.add_hook("blocks.0.hook_resid_post", guarded, permanent=True)
    try:
        with pytest.raises(ValueError, match=r"closure variable 'lock' is a _thread\.lock.*allow_hooks='<a string"):
            cache_dataset(model, equal_docs(), NAMES, tmp_path / "b", allow_hooks=True, **SMALL)
        assert not (tmp_path / "b").exists()
        store = cache_dataset(model, equal_docs(), NAMES, tmp_path / "b", allow_hooks="identity, guarded v1",
                              **SMALL)
        assert store.manifest["model"]["hooks"]["identity"] == "identity, guarded v1"
        unfinished(tmp_path / "b")
        with pytest.raises(CacheMismatchError, match=r"model\.hooks"):
            cache_dataset(model, equal_docs(), NAMES, tmp_path / "b", allow_hooks="identity, guarded v2", **SMALL)
        cache_dataset(model, equal_docs(), NAMES, tmp_path / "b", allow_hooks="identity, guarded v1", **SMALL)
    finally:
        model.reset_hooks(including_permanent=True)


def test_shards_hashed_whole_by_earlier_versions_still_verify(clean, tmp_path):
    """Shards are hashed tensor by tensor as they are written (no pass over a finished shard); entries
    without "digest" hold the plain file sha256 of earlier versions, and still verify."""
    from neox_lab.store.manifest import file_sha256

    out = copy_of(clean, tmp_path)
    assert {s["digest"] for s in ActivationStore(out).shards} == {"tensors"}
    edit_manifest(out, lambda m: [s.update(sha256=file_sha256(out / s["file"])) or s.pop("digest")
                                  for s in m["shards"]])
    ActivationStore(out).verify()
    flip(out / "shard-00003.safetensors", -3)
    with pytest.raises(CacheIntegrityError, match=r"shard-00003\.safetensors does not match its sha256"):
        ActivationStore(out, check="open")
