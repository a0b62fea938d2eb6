"""Loading a checkpoint into a model that already exists, in place: the same tensors, new values.

`model.load_checkpoint_(path)` is what a sweep over training checkpoints runs between measurements.
Every parameter keeps its storage (`data_ptr`), so hooks, a `device_map` placement (with its offload
hooks), the attention backend, references a user holds to `model.W_Q`-style views, and weight
processing all stay. The checks are those of `from_pretrained`: the checkpoint's config must match the
model's (any field that changes shapes or the computation; dropout and the init range may differ),
every tensor must be there with the right shape, a floating weight must be stored as floating point,
no weight may hold inf/NaN, and no tensor may be left over. All of it is checked before the first
value is written, so a refused checkpoint leaves the model as it was; this holds the checkpoint's
tensors in host memory once while checking (tensors of blocks placed on "disk" are not read, as
`from_pretrained` does not read them either: their offload index is pointed at the new file).

Values are converted to each parameter's dtype, as `from_pretrained(dtype=...)` converts them. Weight
processing (TransformerLens' fold_ln, centring, ...) is HookedTransformer's (neox_lab/lens/), which this
layer does not import: a processed model is loaded through `HookedTransformer.load_checkpoint_`, which
hands its processing in as `process`; the raw checkpoint is written, then processed again with the same
steps, and tensors that processing created (an unembedding bias) keep their storage too. Without
`process`, a processed model is refused (its weights would silently stay unprocessed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import NeoXConfig
from .loading import (
    CheckpointError,
    capped,
    check_finite_weight,
    fresh_head_keys,
    hf_to_neox_key,
    is_legacy_key,
    neox_to_hf_key,
    plain_safetensors,
    read_tensors,
    resolve_checkpoint,
    weight_files,
)
from .placement import offload_slot
from .tensor_files import OffloadCheck, stored_tensors

#: Config fields two checkpoints loaded into one model may differ in: they act only in training (or,
#: for tying, are decided by the tensors themselves: see `load_in_place`).
MAY_DIFFER = ("attention_dropout", "hidden_dropout", "classifier_dropout", "initializer_range", "use_cache",
              "tie_word_embeddings")
#: Fields that set tensor shapes (or which tensors exist): a difference is structural.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_labels", "attention_bias")


def config_differences(cfg: NeoXConfig, other: NeoXConfig) -> list[tuple[str, object, object]]:
    """(field, cfg's value, other's value) for every field that may not differ between checkpoints of
    one model (everything but `MAY_DIFFER`), structural fields first."""
    names = [f.name for f in dataclasses.fields(NeoXConfig) if f.name != "extra" and f.name not in MAY_DIFFER]
    names.sort(key=lambda n: n not in SHAPE_FIELDS)
    return [(n, getattr(cfg, n), getattr(other, n)) for n in names if getattr(cfg, n) != getattr(other, n)]


def check_same_config(cfg: NeoXConfig, other: NeoXConfig, where: str, against: str = "the model") -> None:
    """CheckpointError naming `where` and the first differing field unless `other` fits `cfg`."""
    diffs = config_differences(cfg, other)
    if not diffs:
        return
    field, mine, theirs = diffs[0]
    why = ("a structural difference: its tensors have other shapes" if field in SHAPE_FIELDS else
           "the model would keep computing with its own value, silently not this checkpoint's function")
    more = f" (and {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
    raise CheckpointError(f"checkpoint {where}: config field {field!r} is {theirs!r} but {against}'s is {mine!r}"
                          f"{more}; {why}. Checkpoints loaded into one model must share its configuration: "
                          "load this one on its own with from_pretrained")


def _is_tied(model) -> bool:
    unembed = model._modules.get("unembed")
    return unembed is not None and unembed.weight is model.body.embed.weight


def _disk_keys(model, targets: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """key -> (accelerate's weights map, its key) for tensors a placed model keeps on disk."""
    disk = {}
    for key, t in targets.items():
        if t.device.type != "meta":
            continue
        slot = offload_slot(model, key)
        if slot is None:
            raise CheckpointError(f"parameter {key!r} is on the meta device and no offload hook holds its values: "
                                  "only a model with real weights (or placed by from_pretrained(device_map=...)) "
                                  "can be loaded into")
        if slot[1] not in getattr(slot[0], "state_dict", {}):
            disk[key] = slot  # else CPU-offloaded: its values are a tensor in that state dict
    return disk


def _sources(files: list[Path], disk: dict, bare: bool):
    """(transformers key, tensor | header record) for every tensor; a tensor bound for "disk" in a plain
    safetensors file is only located (its header record), never read."""
    for path in files:
        if disk and plain_safetensors(path):
            for item in stored_tensors(path):
                located = hf_to_neox_key(item.key, bare) in disk
                # Read into memory of its own, as every loader does (tensor_files.py): never a view of a file.
                yield item.key, item if located else item.read()
        else:
            yield from read_tensors([path])


@torch.no_grad()
def load_in_place(model, path_or_repo_id, *, revision: str | None = None,
                  process: Callable[[object], None] | None = None) -> Path:
    """Copy a checkpoint's weights into `model`'s own tensors (see the module docstring); returns the
    checkpoint directory. Raises CheckpointError (nothing written) when it does not fit. `process(model)`
    re-applies the weight processing `model.weights_processed` records (required when it records any)."""
    if model.weights_processed and process is None:
        raise CheckpointError(f"this model's weights are processed ({', '.join(sorted(model.weights_processed))}), "
                              "TransformerLens' processing, which a raw checkpoint loaded into it would silently "
                              "lack: load it through the TransformerLens view that processed it, "
                              "`HookedTransformer.load_checkpoint_(...)`, which processes it again")
    directory = resolve_checkpoint(path_or_repo_id, revision)
    cfg = NeoXConfig.from_hf(directory)
    check_same_config(model.cfg, cfg, str(directory))
    bare = model.body is model
    targets = dict(model.state_dict(keep_vars=True))
    tied = _is_tied(model)
    has_unembed = "unembed.weight" in targets
    embed_key = hf_to_neox_key("embed_in.weight", bare)
    if tied:
        targets.pop("unembed.weight")
    # Tensors weight processing added (an unembedding bias): a raw checkpoint has none; zero before reprocessing.
    added: list[str] = []
    if model.weights_processed:
        with torch.device("meta"):
            raw = set(type(model)(model.cfg, attn_backend="eager").state_dict())
        added = [k for k in targets if k not in raw]
    disk = _disk_keys(model, targets)

    staged: dict[str, object] = {}
    unexpected, misshaped, mistyped, shaped_wrong = [], [], [], set()
    head = None
    for hf_key, source in _sources(weight_files(directory), disk, bare):
        if is_legacy_key(hf_key):
            continue
        key = hf_to_neox_key(hf_key, bare)
        if key == "unembed.weight" and not has_unembed:
            continue  # a body or classifier has no use for a causal-LM head (as from_pretrained)
        want = targets.get(key, targets.get(embed_key) if key == "unembed.weight" else None)
        if want is None:
            unexpected.append(hf_key)
            continue
        if tuple(source.shape) != tuple(want.shape):
            misshaped.append(f"{hf_key}: checkpoint {tuple(source.shape)}, model {tuple(want.shape)}")
            shaped_wrong.add(key)
            continue
        if want.is_floating_point() and not source.dtype.is_floating_point:
            mistyped.append(f"{hf_key} ({str(source.dtype).removeprefix('torch.')})")
            continue
        if isinstance(source, torch.Tensor):
            check_finite_weight(hf_key, source, directory)
        if key == "unembed.weight" and tied:
            head = source
            continue
        staged[key] = source
    if mistyped:
        raise CheckpointError(f"checkpoint {directory}: floating weights stored as integers: {capped(mistyped)}")
    if head is not None and not _same_values(head, staged.get(embed_key)):
        raise CheckpointError(f"checkpoint {directory} holds an embed_out different from its embedding, but this "
                              "model ties them (it was loaded from a tied checkpoint); load this checkpoint on its "
                              "own with from_pretrained, which unties the head")
    if has_unembed and not tied and "unembed.weight" not in staged and "unembed.weight" not in shaped_wrong \
            and cfg.tie_word_embeddings and embed_key in staged:
        staged["unembed.weight"] = staged[embed_key]  # a tied checkpoint into an untied model: the same function
    absent = [k for k in targets if k not in staged and k not in shaped_wrong and k not in added]
    # Absent task-head tensors (a classifier over causal-LM checkpoints) keep the values they have.
    fresh_head_keys(type(model), directory, absent, unexpected, misshaped)
    writes_disk = [k for k in staged if k in disk and isinstance(staged[k], torch.Tensor)]
    folder = None if not writes_disk else getattr(disk[writes_disk[0]][0], "save_folder", None)
    if writes_disk and folder is None:
        raise CheckpointError(f"checkpoint {directory} is not a plain safetensors checkpoint, so the tensors of the "
                              f"blocks placed on disk ({capped([neox_to_hf_key(k) for k in writes_disk])}) must be "
                              "written out: load the model with offload_folder=... and device_map")

    for key, value in staged.items():
        target = targets[key]
        if key in disk:
            _store_offloaded(disk[key], value, target.dtype, folder)
        elif target.device.type == "meta":
            weights, full = offload_slot(model, key)
            weights.state_dict[full].copy_(value)
        else:
            target.copy_(value)
    if tied and embed_key in disk and "unembed.weight" in getattr(disk[embed_key][0], "index", {}):
        # accelerate loads the tied head by its own name (placement.load_placed): it follows the embedding.
        disk[embed_key][0].index["unembed.weight"] = disk[embed_key][0].index[disk[embed_key][1]]
    for key in added:
        targets[key].zero_()
    for weights in {id(slot[0]): slot[0] for slot in disk.values()}.values():
        if isinstance(weights, OffloadCheck):
            weights.refresh()  # the files it checks are now the new checkpoint's
    if model.weights_processed:
        process(model)
    return directory


def _same_values(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return isinstance(a, type(b)) and a.path == b.path and a.start == b.start
    return tuple(a.shape) == tuple(b.shape) and bool(torch.equal(a, b.to(a.dtype)))


def _store_offloaded(slot: tuple, value, dtype: torch.dtype, folder) -> None:
    """Point a disk-offloaded tensor at its new values: the new file's tensor (a header record), or the
    values written into the offload folder."""
    weights, full = slot
    name = str(dtype).removeprefix("torch.")
    if isinstance(value, torch.Tensor):
        from accelerate.utils import offload_weight  # noqa: PLC0415 - accelerate is optional (the big extra)

        offload_weight(value.to(dtype), full, os.fspath(folder), index=weights.index)
        return
    weights.index[full] = {"safetensors_file": os.fspath(value.path), "weight_name": value.key, "dtype": name}
