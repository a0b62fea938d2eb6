"""Models bigger than one device: placing whole blocks on GPUs, CPU RAM and disk with accelerate.

`from_pretrained(..., device_map=...)` comes here. The placement runtime is accelerate's big-model
inference (`infer_auto_device_map`, `dispatch_model` and its CPU/disk offload hooks); this file plans
the map in neox_lab's module names, loads every tensor straight to where the map puts it, and hands
the model to `dispatch_model`.

The unit of placement is a *placement unit*: the embedding, each block (never split), the final
LayerNorm and the head (`unembed`, `score`, ...). Loading never holds the model twice in host memory:
tensors are read one at a time, each into memory of its own (never a view of the file: a loaded model
must not change when its file does) and sent to its device, and "disk" tensors stay in the checkpoint's
own safetensors files, read at each forward (nothing is copied unless the checkpoint is a .bin one,
whose disk tensors are written to `offload_folder`). Every safetensors header is checked against the
file's size before anything is read; offloaded reads are checked too (`tensor_files.OffloadCheck`: the
file must be the one loaded, and each tensor's first read is checked for its shape and inf/NaN).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config import NeoXConfig
from .loading import (
    CheckpointError,
    attach_tokenizer,
    check_finite_weight,
    check_one_dtype,
    check_weight_dtype,
    fresh_head_keys,
    hf_to_neox_key,
    is_legacy_key,
    neox_to_hf_key,
    plain_safetensors,
    read_tensors,
    resolve_checkpoint,
    weight_files,
)
from .tensor_files import OffloadCheck, StoredTensor, stored_tensors

#: The string device maps accelerate plans for us: "auto" and "balanced" spread blocks evenly over
#: the GPUs, "balanced_low_0" leaves GPU 0 room (for generation's logits), "sequential" fills GPU 0 first.
PLANS = ("auto", "balanced", "balanced_low_0", "sequential")
# Module classes accelerate must never split across devices, and those whose whole weights it must
# load before their forward (Attention reads `out.weight` itself when hook_result is active).
NO_SPLIT = ["Block"]
PRELOAD = ["Attention"]
# Keyword arguments accelerate's hooks must pass through untouched: the Rotary module (its `.to` would
# move the shared module itself) and the KV cache, whose tensors live beside each layer already.
SKIP_KEYS = ["rotary", "kv_cache"]

def require_accelerate():
    """The accelerate package, or an ImportError saying how to install it."""
    try:
        import accelerate
    except ImportError as err:
        raise ImportError("device_map / offloading needs the accelerate package: pip install neox-lab[big]") from err
    return accelerate


# ------------------------------------------------------------------------------------------ unit names
def placement_units(model) -> list[str]:
    """The model's placement units in forward order, as module names ("model.blocks.3", "unembed")."""
    prefix = "" if model.body is model else "model."
    units = [f"{prefix}embed"] + [f"{prefix}blocks.{i}" for i in range(len(model.body.blocks))]
    units.append(f"{prefix}ln_final")
    if model.body is not model:
        units += [name for name, child in model.named_children()
                  if name != "model" and any(True for _ in child.parameters())]
    return units


# transformers module name -> neox_lab's, for device maps written for a transformers model.
_HF_MODULES = [("embed_in", "embed"), ("layers", "blocks"), ("final_layer_norm", "ln_final")]


def neox_module_name(name: str, bare: bool) -> str:
    """A device-map key in neox_lab's module names; transformers' names ("gpt_neox.layers.3",
    "embed_out") are translated, neox_lab's own pass through."""
    if name in ("embed_out", "lm_head"):
        return "unembed"
    body = "" if bare else "model"
    if name == "gpt_neox":
        return body
    rest = name.removeprefix("gpt_neox.") if name.startswith("gpt_neox.") else name
    was_hf = rest != name
    for hf, nx in _HF_MODULES:
        if rest == hf or rest.startswith(hf + "."):
            rest, was_hf = nx + rest[len(hf):], True
            break
    if not was_hf:
        return name
    return rest if bare else f"model.{rest}"


def normalize_device(value, where: str) -> str:
    """"cpu", "disk", or a torch device string ("cuda:1"); ints are CUDA indices, as in accelerate."""
    if isinstance(value, bool):
        raise ValueError(f"device_map[{where!r}] = {value!r} is not a device")
    if isinstance(value, int):
        value = f"cuda:{value}"
    text = str(value)
    if text == "disk":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device_map[{where!r}] = {value!r} is not a device: use 'cpu', 'disk', an int "
                         "(CUDA index) or a torch device string such as 'cuda:1'") from err
    if device.type == "meta":
        raise ValueError(f"device_map[{where!r}] = 'meta' holds no weights; use 'cpu', 'disk' or a GPU")
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device_map[{where!r}] = {value!r}, but {count} CUDA device(s) are visible")
        return f"cuda:{index}"
    return str(device)


# ------------------------------------------------------------------------------------------ planning
def plan_device_map(model, device_map, *, max_memory=None, dtype: torch.dtype) -> dict[str, str]:
    """One device per placement unit: from a plan name (`PLANS`, accelerate's `infer_auto_device_map`
    with whole blocks) or from a dict keyed by module names (neox_lab's or transformers', any prefix:
    "model.blocks" places every block, "" everything). `model` may be on the meta device."""
    units = placement_units(model)
    bare = model.body is model
    if isinstance(device_map, str):
        if device_map not in PLANS:
            raise ValueError(f"device_map={device_map!r}: use one of {PLANS} or a dict of module name -> device")
        raw = _infer(model, device_map, max_memory, dtype)
        keep_heads = True
    elif isinstance(device_map, Mapping):
        if max_memory is not None:
            raise ValueError("max_memory budgets a planned device_map ('auto', 'balanced', ...); a dict "
                             "device_map already says where everything goes")
        raw = {neox_module_name(str(k), bare): normalize_device(v, str(k)) for k, v in device_map.items()}
        keep_heads = False
    else:
        raise TypeError(f"device_map must be one of {PLANS} or a dict of module name -> device, "
                        f"got {type(device_map).__name__}")
    placed, used = {}, set()
    for unit in units:
        owners = [k for k in raw if k == "" or unit == k or unit.startswith(k + ".")]
        if not owners:
            continue
        owner = max(owners, key=len)
        used.add(owner)
        placed[unit] = raw[owner]
    missing = [u for u in units if u not in placed]
    if missing:
        raise ValueError(f"device_map places no device for {', '.join(missing)}; add them (or a prefix such "
                         "as 'model.blocks', or '' for the rest) to the dict")
    unknown = [k for k in raw if k not in used and not any(u.startswith(k + ".") for u in units)]
    inside = [k for k in unknown if any(k.startswith(u + ".") for u in units)]
    if inside and not isinstance(device_map, str):
        raise ValueError(f"device_map places parts of a placement unit ({', '.join(map(repr, inside))}); units "
                         f"are placed whole (a block is never split): use {', '.join(units[:2])}, ...")
    if unknown and not isinstance(device_map, str):
        raise ValueError(f"device_map names modules this {type(model).__name__} does not have: "
                         f"{', '.join(map(repr, unknown))}; its placement units are {', '.join(units)}")
    if keep_heads:
        # The embedding, final LayerNorm and head are small and used by every forward (and read by
        # tools: logit lens, the unembedding): a planned map never leaves them on disk.
        for unit in units:
            if not unit.startswith(("model.blocks.", "blocks.")) and placed[unit] == "disk":
                placed[unit] = "cpu"
    if model.cfg.tie_word_embeddings and "unembed" in placed:
        if isinstance(device_map, Mapping) and placed["unembed"] != placed[units[0]]:
            raise ValueError(f"tie_word_embeddings: the unembedding is the embedding, so they share a device; "
                             f"device_map puts {units[0]} on {placed[units[0]]!r} and unembed on "
                             f"{placed['unembed']!r}")
        placed["unembed"] = placed[units[0]]
    return placed


def _infer(model, plan: str, max_memory, dtype) -> dict[str, str]:
    require_accelerate()
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if plan != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT,
                                         dtype=dtype, low_zero=plan == "balanced_low_0")
    raw = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype)
    return {name: normalize_device(device, name) for name, device in raw.items()}


def main_device(units: list[str], placed: dict[str, str]) -> str:
    """Where offloaded units run and inputs go: the embedding's device when it is an accelerator, else
    the first accelerator in the map, else the CPU."""
    accelerators = [placed[u] for u in units if placed[u] not in ("cpu", "disk")]
    return accelerators[0] if accelerators else "cpu"


# ------------------------------------------------------------------------------------------ loading
def load_placed(cls, path_or_repo_id, *, device_map, max_memory=None, offload_folder=None,
                dtype: torch.dtype | None = None, attn_backend: str = "auto", revision: str | None = None):
    """`from_pretrained` with a device map: plan, load each tensor to its unit's device, dispatch."""
    require_accelerate()
    from accelerate import dispatch_model
    from accelerate.utils import offload_weight, save_offload_index

    directory = resolve_checkpoint(path_or_repo_id, revision)
    cfg = NeoXConfig.from_hf(directory)
    with torch.device("meta"):
        model = cls(cfg, attn_backend=attn_backend)
    files = weight_files(directory)
    stored = [item for f in files if plain_safetensors(f) for item in stored_tensors(f)]
    file_dtype = next((s.dtype for s in stored if s.dtype.is_floating_point), None)
    placed = plan_device_map(model, device_map, max_memory=max_memory,
                             dtype=dtype or file_dtype or torch.float32)
    units = placement_units(model)

    expected = dict(model.state_dict())
    bare = model.body is model
    has_unembed = "unembed.weight" in expected
    tied = cfg.tie_word_embeddings and has_unembed
    if tied:
        expected.pop("unembed.weight")

    def unit_of(key: str) -> str:
        return max((u for u in units if key.startswith(u + ".")), key=len)

    loaded, index, unexpected, misshaped, shaped_wrong = {}, {}, [], [], set()
    for hf_key, source in _sources(files, stored):
        if is_legacy_key(hf_key):
            continue
        key = hf_to_neox_key(hf_key, bare)
        if key == "unembed.weight" and (tied or not has_unembed):
            continue
        if key not in expected:
            unexpected.append(hf_key)
            continue
        shape = source.shape
        if tuple(shape) != tuple(expected[key].shape):
            misshaped.append(f"{hf_key}: checkpoint {tuple(shape)}, model {tuple(expected[key].shape)}")
            shaped_wrong.add(key)
            continue
        check_weight_dtype(hf_key, source, expected[key], directory)
        device = placed[unit_of(key)]
        want = dtype if dtype is not None and source.dtype.is_floating_point else source.dtype
        if device == "disk":
            if isinstance(source, StoredTensor):
                # accelerate reads it from the checkpoint itself at each forward, converting to `want`.
                index[key] = {"safetensors_file": os.fspath(source.path), "weight_name": source.key,
                              "dtype": str(want).removeprefix("torch.")}
            else:
                if offload_folder is None:
                    raise ValueError(f"device_map puts {unit_of(key)} on 'disk' and {directory} is not a "
                                     "plain safetensors checkpoint, so its tensors must be written out: pass "
                                     "offload_folder=<a directory with room for them>")
                os.makedirs(offload_folder, exist_ok=True)
                offload_weight(source.to(want), key, os.fspath(offload_folder), index=index)
            # accelerate casts what it loads to the parameter's dtype: give the placeholder the right one.
            loaded[key] = torch.empty(shape, dtype=want, device="meta")
            continue
        loaded[key] = _to_device(source, device, want)
        # Tensors kept on "disk" are not read at load (that is the point of offloading): only these are checked.
        check_finite_weight(hf_key, loaded[key], directory)
    check_one_dtype(loaded, directory)  # meta placeholders carry their dtype too
    absent = [k for k in expected if k not in loaded and k not in index and k not in shaped_wrong]
    fresh = fresh_head_keys(cls, directory, absent, unexpected, misshaped)
    for key in fresh:
        device = placed[unit_of(key)]
        t = torch.zeros(expected[key].shape, dtype=dtype or file_dtype or torch.float32,
                        device="cpu" if device == "disk" else device)
        if key.endswith("weight"):
            t.normal_(0.0, cfg.initializer_range)
        loaded[key] = t
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.tie_weights()
        if "model.embed.weight" in index:
            # accelerate loads each offloaded module's weights by its own name: the unembedding's are
            # the embedding's.
            index["unembed.weight"] = index["model.embed.weight"]
    main = main_device(units, placed)
    model._reset_buffers(torch.device(main))
    model.eval()
    if index and offload_folder is not None and any("safetensors_file" not in v for v in index.values()):
        save_offload_index(index, os.fspath(offload_folder))
    # accelerate logs "Some parameters are on the meta device because they were offloaded to the cpu
    # and disk" for any map naming "cpu", even where "cpu" is where the model runs: `device_map` says
    # what is offloaded, without that noise at every load.
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        dispatch_model(model, device_map=dict(placed), main_device=main, offload_dir=offload_folder,
                       offload_index=index or None, skip_keys=SKIP_KEYS, preload_module_classes=PRELOAD)
    finally:
        quiet.setLevel(level)
    _check_offloaded_reads(model, expected, directory)
    model.set_placement(placed, main)
    attach_tokenizer(model, directory)
    return model


def _check_offloaded_reads(model, expected: dict, directory: Path) -> None:
    """Put `OffloadCheck` between accelerate's hooks and the weights they read from the checkpoint."""
    def first_read(key: str, t: torch.Tensor) -> None:
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"checkpoint {directory}: tensor {neox_to_hf_key(key)!r} read from disk is "
                                  f"{tuple(t.shape)}, the model needs {tuple(expected[key].shape)}")
        check_finite_weight(neox_to_hf_key(key), t, directory)

    checks: dict[int, OffloadCheck] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)):
            prefixed = getattr(h, "weights_map", None)
            loader = getattr(prefixed, "dataset", None)
            if loader is None or not getattr(loader, "index", None):
                continue  # nothing read from files there
            if id(loader) not in checks:
                checks[id(loader)] = loader if isinstance(loader, OffloadCheck) else OffloadCheck(loader, first_read)
            prefixed.dataset = checks[id(loader)]


def _sources(files: list[Path], stored: list[StoredTensor]) -> Iterator[tuple[str, StoredTensor | torch.Tensor]]:
    """(transformers key, where its tensor is): safetensors located from their checked headers, other
    files read by `read_tensors`."""
    yield from ((s.key, s) for s in stored)
    others = [f for f in files if not plain_safetensors(f)]
    if others:
        yield from read_tensors(others)


def _to_device(source: StoredTensor | torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source.to(device=device, dtype=dtype)
    # Read alone into its own memory, then moved and converted: at most one tensor is ever held twice.
    return source.read().to(device=device).to(dtype)


def offload_slot(model, name: str) -> tuple[Mapping, str] | None:
    """(accelerate's weights map, the key in it) holding the values of `name`, a tensor of a unit placed
    offloaded; None when no offload hook holds it. The map is accelerate's `OffloadedWeightsLoader`:
    values in its `state_dict` (CPU-offloaded) or named by its `index` (on disk)."""
    parts = name.split(".")
    # The hook sits on the offloaded module (a block, or the embedding...); its map is keyed relative to it.
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)):
            weights = getattr(h, "weights_map", None)
            if weights is not None:
                dataset, prefix = getattr(weights, "dataset", weights), getattr(weights, "prefix", "")
                return dataset, prefix + ".".join(parts[cut:])
    return None


def stored_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state_dict with values everywhere (tied tensors under each name), also for the parts
    of a placed model that accelerate keeps offloaded between forwards: their module tensors are meta
    placeholders there, and the values come from the offload hook's weight map, read on demand.

    For code that reads weights outside a forward: a weight-by-weight comparison, a fingerprint."""
    return {name: t.detach() if t.device.type != "meta" else _offloaded_value(model, name)
            for name, t in model.state_dict(keep_vars=True).items()}


def _offloaded_value(model, name: str) -> torch.Tensor:
    found = offload_slot(model, name)
    if found is not None:
        return found[0][found[1]].detach()
    raise ValueError(f"parameter {name!r} is on the meta device and no offload hook holds its values: the model "
                     "was not loaded with from_pretrained(device_map=...), or its weights were never loaded")
