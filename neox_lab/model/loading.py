"""Loading transformers GPTNeoX checkpoints into neox_lab models, and saving them back.

Weights are read from safetensors files located by their checked headers (tensor_files.py), or with
`torch.load(weights_only=True)` for .bin files (zip and legacy formats): nothing is unpickled. The model is
built on the meta device and the read tensors are assigned, so the weights are held once, already in the
requested dtype and on the requested device, in memory of their own: never views of the file, so a
checkpoint overwritten or truncated after loading cannot change (or crash) the loaded model.

A checkpoint is refused, naming the file or tensor, when its JSON is broken, an index points outside the
directory, a file is truncated or a tensor's size disagrees with its header, a weight the model holds in
floating point is stored as integers, its floating tensors mix dtypes (without `dtype=` to cast them),
or a weight holds inf/NaN (a corrupt file; checked on every load, a read of memory already being copied).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..config import NeoXConfig, read_json_object
from ..dtypes import DTYPES, nonfinite_count
from ..tokenizer import NeoXTokenizer
from .compact import is_compact, read_compact, save_compact
from .memory import check_fits
from .shipped import DEFAULT_MODEL_ID, attach_default_tokenizer, default_model_dir, package_model_dir
from .tensor_files import CheckpointError, owned, stored_tensors

# (transformers prefix, neox_lab prefix) inside the body; "{L}" is the layer index. The body sits at
# `gpt_neox.` in transformers' head classes and at `model.` in neox_lab's.
_BODY_NAMES = [
    ("embed_in.", "embed."),
    ("layers.{L}.input_layernorm.", "blocks.{L}.ln1."),
    ("layers.{L}.post_attention_layernorm.", "blocks.{L}.ln2."),
    ("layers.{L}.attention.query_key_value.", "blocks.{L}.attn.qkv."),
    ("layers.{L}.attention.dense.", "blocks.{L}.attn.out."),
    ("layers.{L}.mlp.dense_h_to_4h.", "blocks.{L}.mlp.fc_in."),
    ("layers.{L}.mlp.dense_4h_to_h.", "blocks.{L}.mlp.fc_out."),
    ("final_layer_norm.", "ln_final."),
]


def _rule(src: str, dst: str) -> tuple[re.Pattern, str]:
    return re.compile("^" + re.escape(src).replace(r"\{L\}", r"(\d+)")), dst.replace("{L}", r"\1")


_TO_NEOX = [_rule(hf, nx) for hf, nx in _BODY_NAMES]
_TO_HF = [_rule(nx, hf) for hf, nx in _BODY_NAMES]
_HEAD_RULES = [(r"^(embed_out|lm_head)\.weight$", "unembed.weight")]
# Buffers old checkpoints carry that hold nothing a forward pass needs.
_LEGACY = re.compile(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$|rotary_emb\.inv_freq$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def hf_to_neox_key(key: str, bare: bool) -> str:
    """Translate one transformers state-dict key; `bare` for a NeoXModel (no `model.` prefix)."""
    for pattern, repl in _HEAD_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    body = key[len("gpt_neox."):] if key.startswith("gpt_neox.") else key
    for pattern, repl in _TO_NEOX:
        if pattern.match(body):
            body = pattern.sub(repl, body, count=1)
            return body if bare else "model." + body
    return key


def neox_to_hf_key(key: str) -> str:
    """Translate a neox_lab state-dict key to transformers' (the names on the hub)."""
    if key == "unembed.weight":
        return "embed_out.weight"
    body = key[len("model."):] if key.startswith("model.") else key
    for pattern, repl in _TO_HF:
        if pattern.match(body):
            return "gpt_neox." + pattern.sub(repl, body, count=1)
    return key


def capped(items: list[str], limit: int = 8) -> str:
    """`items` joined by commas, the first `limit` of them and "and N more" (a 2000-layer config against
    a 2-layer checkpoint would otherwise print a megabyte)."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit:,} more"


def resolve_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name ("float16", "bfloat16", "float32", "float64")."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype ({', '.join(sorted(DTYPES))}) or its name, got "
                         f"{dtype!r}; a model's weights cannot be held as integers")
    return dtype


# ---------------------------------------------------------------------------------------- locating
def resolve_checkpoint(path_or_repo_id, revision: str | None = None) -> Path:
    """A local directory, or a hub id downloaded with huggingface_hub (honours HF_HUB_OFFLINE).

    The reserved id "neox-lab/default" is the small model shipped in the package (`load_default`).
    """
    if os.fspath(path_or_repo_id) == DEFAULT_MODEL_ID:
        return default_model_dir()
    path = Path(os.fspath(path_or_repo_id)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json, so it is not a checkpoint directory "
                                    "(save_pretrained writes one)")
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory holding config.json")
    text = os.fspath(path_or_repo_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint directory at {text!r} (no config.json to read), and it is not "
                                "a hub id 'owner/name' either")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"{text!r} is not a local directory and huggingface_hub is not installed to fetch it from the hub; "
            "download the checkpoint and pass its directory"
        ) from err
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(
            text, revision=revision, local_files_only=offline,
            allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                            "pytorch_model.bin.index.json", "tokenizer*.json", "special_tokens_map.json"],
        ))
    except Exception as err:  # noqa: BLE001 - every hub failure gets the same advice
        at = "" if revision is None else f" at revision {revision!r}"
        raise FileNotFoundError(
            f"could not get {text!r}{at} from the hub ({type(err).__name__}: {err}); if you are offline, download "
            "the checkpoint elsewhere and pass its local directory"
        ) from err


def checkpoint_architecture(directory: Path) -> str:
    """The transformers class a checkpoint's config.json names in `architectures`; GPTNeoXForCausalLM
    when it names none (configs written by hand often leave it out)."""
    config = read_json_object(Path(directory) / "config.json", "config")
    architectures = config.get("architectures") or ["GPTNeoXForCausalLM"]
    if not isinstance(architectures, list) or not isinstance(architectures[0], str):
        raise ValueError(f"config {Path(directory) / 'config.json'}: 'architectures' must be a list of class "
                         f"names, got {architectures!r}")
    return architectures[0]


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = directory / name
        if path.exists():
            if name.endswith(".index.json"):
                return _index_files(directory, path)
            return [path]
    raise FileNotFoundError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}")


def _index_files(directory: Path, index_path: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, each confined to the checkpoint directory."""
    try:
        index = read_json_object(index_path, "checkpoint index")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"checkpoint index {index_path} has no 'weight_map' object mapping tensor names "
                              "to shard files; re-save the checkpoint")
    files = set()
    for key, name in weight_map.items():
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"checkpoint index {index_path}: tensor {key!r} maps to {name!r}, which is "
                                  "not a file inside the checkpoint directory (absolute paths and '..' are refused)")
        files.add(directory / name)
    missing = sorted(str(f) for f in files if not f.is_file())
    if missing:
        raise CheckpointError(f"checkpoint index {index_path} names shard files that do not exist: "
                              f"{capped(missing)}")
    return sorted(files)


def read_tensors(files: list[Path], dtype=None, device=None):
    """Yield (transformers key, tensor) for every tensor in the files, one at a time, each converted and
    in memory of its own (never a view of the file)."""
    for path in files:
        if path.suffix == ".safetensors" and _compact(path):
            # neox_lab's own compact history checkpoints: low-bit matrices decoded to float32 (compact.py).
            try:
                for key, t in read_compact(path):
                    yield key, _convert(t, dtype, device)
            except (ValueError, SafetensorError) as err:
                raise CheckpointError(f"{path} is not a readable compact checkpoint: {err}") from err
        elif path.suffix == ".safetensors":
            for item in stored_tensors(path):
                yield item.key, _convert(item.read(), dtype, device)
        else:
            mapped = zipfile.is_zipfile(path)
            state = _torch_load(path, mapped)
            for key in list(state):
                stored = state.pop(key)
                yield key, owned(_convert(stored, dtype, device), stored if mapped else None)


def _compact(path: Path) -> bool:
    # The header checks first: safetensors' own reader would refuse a truncated file with a message that
    # names no tensor and no byte.
    stored_tensors(path)
    try:
        return is_compact(path)
    except (ValueError, SafetensorError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def plain_safetensors(path: Path) -> bool:
    """True for an ordinary safetensors file, whose tensors can be read (or memory-mapped) as stored;
    False for other formats and for compact files, whose tensors must be decoded."""
    return path.suffix == ".safetensors" and not _compact(path)


def _torch_load(path: Path, mapped: bool) -> dict:
    """A .bin state dict with `torch.load(weights_only=True)`: memory-mapped when it is a zip file (each
    tensor is then copied out as it is used), read whole when it is the legacy (pre-1.6) format, which
    cannot be mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as err:  # noqa: BLE001 - unpickling refusals, truncation and format errors alike
        raise CheckpointError(f"{path} could not be read as weights-only torch data: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def _convert(t: torch.Tensor, dtype, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def check_weight_dtype(key: str, t, expected: torch.Tensor, directory: Path) -> None:
    """A weight the model holds in floating point must not be stored as integers (no cast can tell what
    the integers were meant to be: a quantised tensor needs its scales). `t`: a tensor or anything with
    its `dtype`."""
    if expected.dtype.is_floating_point and not t.dtype.is_floating_point:
        stored = str(t.dtype).removeprefix("torch.")
        raise CheckpointError(f"checkpoint {directory}: tensor {key!r} is stored as {stored} but the model holds "
                              "it in floating point; the file is damaged or quantised (dequantise it before "
                              "loading)")


# ---------------------------------------------------------------------------------------- loading
def load_pretrained(cls, path_or_repo_id, *, dtype=None, device=None, attn_backend="auto", revision=None):
    dtype = resolve_dtype(dtype)
    directory = resolve_checkpoint(path_or_repo_id, revision)
    cfg = NeoXConfig.from_hf(directory)
    files = _weight_files(directory)
    # The weights' dtype, from the safetensors headers (a .bin file says it only once read), to refuse a
    # model that cannot fit before anything is read.
    stored = next((t.dtype for f in files if f.suffix == ".safetensors" for t in stored_tensors(f)
                   if t.dtype.is_floating_point), None)
    if dtype or stored:
        check_fits(cfg, dtype or stored, torch.device(device) if device is not None else torch.device("cpu"))
    with torch.device("meta"):
        model = cls(cfg, attn_backend=attn_backend)
    expected = {k: v for k, v in model.state_dict().items()}
    bare = not any(k.startswith("model.") for k in expected)
    has_unembed = "unembed.weight" in expected
    tied = cfg.tie_word_embeddings and has_unembed
    if tied:
        expected.pop("unembed.weight")
    loaded, unexpected, misshaped, shaped_wrong = {}, [], [], set()
    head_in_file = None
    for hf_key, tensor in read_tensors(files, dtype, device):
        if _LEGACY.search(hf_key):
            continue
        key = hf_to_neox_key(hf_key, bare)
        if key == "unembed.weight" and tied:
            check_finite_weight(hf_key, tensor, directory)
            head_in_file = tensor  # kept only if it differs from the embedding (see below)
            continue
        if key == "unembed.weight" and not has_unembed:
            continue  # a body or classifier has no use for a causal-LM head
        if key not in expected:
            unexpected.append(hf_key)
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            misshaped.append(f"{hf_key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}")
            shaped_wrong.add(key)
        else:
            check_weight_dtype(hf_key, tensor, expected[key], directory)
            loaded[key] = tensor
            check_finite_weight(hf_key, tensor, directory)
    check_one_dtype(loaded, directory)
    if head_in_file is not None and not _same(head_in_file, loaded.get(hf_to_neox_key("embed_in.weight", bare))):
        # What transformers 5 does with such a checkpoint: keep the stored head, untied, and warn. Tying
        # silently would compute another function than the checkpoint's own library does.
        warnings.warn(f"{directory}: config.json says tie_word_embeddings=true but the weights hold an "
                      "embed_out different from the embedding; like transformers, the model keeps that "
                      "embed_out and is NOT tied (set tie_word_embeddings=false in config.json to silence this)",
                      stacklevel=3)
        tied = False
        loaded["unembed.weight"] = head_in_file
        cfg = _untie(model, cfg)
    absent = [k for k in expected if k not in loaded and k not in shaped_wrong]
    fresh = fresh_head_keys(cls, directory, absent, unexpected, misshaped)
    if fresh:
        param_dtype = dtype or next(iter(loaded.values())).dtype
        for key in fresh:
            shape = expected[key].shape
            t = torch.zeros(shape, dtype=param_dtype, device=device)
            if key.endswith("weight"):
                t.normal_(0.0, cfg.initializer_range)
            loaded[key] = t
        warnings.warn(f"{cls.__name__}: initialised new head weights not in the checkpoint: {fresh}",
                      stacklevel=3)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model._reset_buffers(device)
    model.eval()
    _attach_tokenizer(model, directory)
    return model


def fresh_head_keys(cls, directory: Path, absent: list[str], unexpected: list[str], misshaped: list[str]) -> list[str]:
    """The absent keys a task head may initialise fresh (a classifier over a causal-LM checkpoint, as
    transformers does); any other absent, unexpected or mis-shaped tensor is a CheckpointError."""
    heads = tuple(getattr(cls, "head_modules", ()))
    fresh = [k for k in absent if heads and k.startswith(heads)]
    # Named as the checkpoint would name them, since that is what the user can go and look at.
    missing = [neox_to_hf_key(k) for k in absent if k not in fresh]
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys):,}): {capped(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise CheckpointError(f"checkpoint {directory} does not fit {cls.__name__}: " + "; ".join(parts))
    return fresh


def check_finite_weight(key: str, t: torch.Tensor, directory: Path) -> None:
    """inf/NaN in a weight is a damaged file (a flipped exponent bit): every logit would come out NaN."""
    bad = nonfinite_count(t)
    if bad:
        raise CheckpointError(f"checkpoint {directory}: tensor {key!r} holds {bad:,} non-finite value(s) "
                              "(inf/NaN); the file is damaged or was saved from a diverged run")


def check_one_dtype(loaded: dict, directory: Path) -> None:
    """Floating weights in more than one dtype would fail (or silently promote) in the first matmul."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, t in loaded.items():
        if t.is_floating_point():
            by_dtype.setdefault(t.dtype, []).append(neox_to_hf_key(key))
    if len(by_dtype) > 1:
        common = max(by_dtype, key=lambda d: len(by_dtype[d]))
        odd = [f"{k} ({str(d).removeprefix('torch.')})" for d, keys in by_dtype.items() if d != common
               for k in keys]
        raise CheckpointError(f"checkpoint {directory} mixes dtypes: most tensors are "
                              f"{str(common).removeprefix('torch.')} but {capped(odd)}; pass dtype= "
                              "(e.g. dtype=torch.float32) to cast every tensor at load")
def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and tuple(a.shape) == tuple(b.shape) and bool(torch.equal(a, b))


def _untie(model, cfg: NeoXConfig) -> NeoXConfig:
    """Give the model (and every submodule sharing its config) an untied config; returns it."""
    untied = cfg.replace(tie_word_embeddings=False)
    for module in model.modules():
        if getattr(module, "cfg", None) is cfg:
            module.cfg = untied
    return untied


def _attach_tokenizer(model, directory: Path) -> None:
    if (directory / "tokenizer.json").exists():
        model.tokenizer = NeoXTokenizer.from_pretrained(directory)
    elif package_model_dir().resolve() in (directory.resolve(), *directory.resolve().parents):
        attach_default_tokenizer(model)  # the shipped model (and its kept checkpoints) use the package's file


# ---------------------------------------------------------------------------------------- saving
def save_pretrained(model, directory, state: dict[str, torch.Tensor] | None = None, *,
                    compact: dict | None = None) -> None:
    """`state`: the tensors to write (default `model.state_dict()`; a placed model passes its stored values).
    `compact`: write a compact checkpoint (compact.py) with these `save_compact` arguments, e.g.
    ``{"bits": 8}``: neox_lab reads it, transformers does not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict() if state is None else state)
    if model.cfg.tie_word_embeddings:
        state.pop("unembed.weight", None)
    with torch.device("meta"):
        layout = type(model)(model.cfg, attn_backend="eager").state_dict()
    extra = sorted(set(state) - set(layout))
    if extra:
        # TransformerLens' fold_ln (neox_lab.lens) can add biases (the final LayerNorm's bias into the unembedding)
        # that a transformers GPTNeoX has no place for: writing the file without them would be silently wrong.
        raise CheckpointError(f"cannot save {type(model).__name__} as a transformers checkpoint: it has tensors "
                              f"transformers' GPTNeoX has no place for ({', '.join(extra)}), added by weight "
                              "processing (HookedTransformer.from_pretrained / process_weights_); save the "
                              "unprocessed model, or torch.save(model.state_dict()) to keep processed weights")
    bare = not any(k.startswith("model.") for k in state)
    # transformers' bare GPTNeoXModel names its tensors without the `gpt_neox.` prefix.
    tensors = {(neox_to_hf_key(k).removeprefix("gpt_neox.") if bare else neox_to_hf_key(k)):
               v.detach().contiguous().cpu() for k, v in state.items()}
    dtype = torch.float32 if compact is not None else next(iter(tensors.values())).dtype
    config = model.cfg.to_hf()
    config.update(architectures=[model.hf_architecture], torch_dtype=str(dtype).removeprefix("torch."))
    tmp = directory / "model.safetensors.tmp"
    if compact is not None:
        save_compact(tensors, tmp, **compact)
    else:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "tokenizer", None) is not None and hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------- shared with placement
def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: the single file, or every shard its index names."""
    return _weight_files(directory)


def is_legacy_key(key: str) -> bool:
    """True for buffers old checkpoints carry that no forward pass needs (skipped on load)."""
    return bool(_LEGACY.search(key))


def attach_tokenizer(model, directory: Path) -> None:
    """Give a loaded model its checkpoint's tokenizer (or the package's, for the shipped model)."""
    _attach_tokenizer(model, directory)
