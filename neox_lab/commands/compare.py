"""`neox-lab compare A B`: compare two NeoX implementations (config diff, weight diff, activations on
the same tokens, decoding), print the report and exit with the verdict's status:

    0  equivalent
    1  not equivalent (also for a structural difference: the report and JSON are still written)
    2  a usage or loading error
    3  same function, different parametrisation (the outputs agree within rounding while weights or
       streams differ far beyond it, e.g. a side after fold_ln)
    4  the reference is unusable at this setting (it gave NaN/inf where A did not; the report names
       settings of it that are finite on the same inputs)

A and B are checkpoint directories run by neox_lab, `hf:DIR` to run DIR's weights through
transformers, or `py:package.module:factory`: `factory()` returns anything `compare` takes as a side
(a model, an nn.Module, a callable, or a `neox_lab.testing.Port` bundling a module with its hook map,
weight map and decoding callables); the module is imported from the current directory or PYTHONPATH.
B is the reference. Example (CI): neox-lab compare py:my_port.neox:build hf:./original --json report.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import sys
from pathlib import Path

import torch

from ..config import NeoXConfig
from ..default_model import load_or_default
from ..dtypes import DTYPES
from ..model.kernels import BACKENDS
from ..model.loading import resolve_checkpoint
from ..model.shipped import package_model_dir
from ..model.tasks import model_class
from ..testing.compare import MODES, compare
from ..testing.decoding import DECODE_STEPS
from ..testing.inputs import PROBE_LEN
from ..testing.provenance import file_sha256, versions
from ..testing.side_port import Port
from ..testing.sides import is_port
from ..tokenizer import NeoXTokenizer
from .errors import check_output_file, user_errors

# neox_lab backend name -> transformers attn_implementation ("auto": transformers' own default)
HF_BACKENDS = {"eager": "eager", "sdpa": "sdpa", "flash": "flash_attention_2", "auto": None}
AUTO = "auto"
#: The attention backend a side runs when --backend(-a/-b) does not say: neox_lab's eager kernel (every
#: stream observable); transformers' sdpa, whose fp64 stays fp64 (its eager attention takes the softmax in
#: fp32 and gives NaN for the rows of a left-padded batch in fp64).
DEFAULT_BACKEND = {"neox_lab": "eager", "hf": "sdpa"}
PY = "py:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    dtypes = sorted(DTYPES) + [AUTO]
    parser.add_argument("a", metavar="A", help="checkpoint directory, hf:DIR to run it through transformers, or "
                                               "py:package.module:factory for your port (factory() returns it)")
    parser.add_argument("b", metavar="B",
                        help="the reference: checkpoint directory, hf:DIR or py:package.module:factory")
    parser.add_argument("--dtype", choices=dtypes, default=AUTO,
                        help="dtype of both sides; auto (default): float64 on CPU, where the noise floor is "
                             "~1e-13 and a 1e-3 change of one weight shows, float32 on other devices")
    parser.add_argument("--dtype-a", choices=dtypes, help="dtype of A (overrides --dtype)")
    parser.add_argument("--dtype-b", choices=dtypes, help="dtype of B (overrides --dtype)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="attention backend of both sides (default: eager for neox_lab, sdpa for hf: sides)")
    parser.add_argument("--backend-a", choices=BACKENDS, help="attention backend of A (overrides --backend)")
    parser.add_argument("--backend-b", choices=BACKENDS, help="attention backend of B (overrides --backend)")
    parser.add_argument("--mode", choices=MODES, default="exact",
                        help="exact (default): any changed weight fails; lossy: weights may carry a uniform "
                             "conversion error (quantisation) and the floors follow from the measured one")
    parser.add_argument("--prompts", metavar="FILE",
                        help="text file, one prompt per line, tokenized (left-padded) with --tokenizer; "
                             "default: random token ids")
    parser.add_argument("--tokenizer", metavar="DIR|bundled",
                        help="tokenizer for --prompts: a directory (or file) with tokenizer.json, or 'bundled' "
                             "for neox_lab's GPT-NeoX-20B one; default: A's, else B's checkpoint tokenizer")
    parser.add_argument("--fold-ids", action="store_true",
                        help="with --prompts on a model whose vocabulary is smaller than the tokenizer's: map "
                             "each token id to id %% vocab_size (keeps the prompts' repetition structure)")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON (a CI artifact)")
    parser.add_argument("--seq-len", type=int, default=32,
                        help="tokens per row: random ids' length, and the cut for prompts (default 32)")
    parser.add_argument("--batch", type=int, default=4, help="rows of random ids (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids (default 0)")
    parser.add_argument("--probe-len", type=int, default=PROBE_LEN,
                        help=f"length of the one-row probe through every layer (default {PROBE_LEN}, capped at "
                             "max_position_embeddings and by memory; 0 skips it)")
    parser.add_argument("--no-padded", action="store_true",
                        help="skip the left-padded batch compare adds to the inputs")
    parser.add_argument("--decode-steps", type=int, default=DECODE_STEPS,
                        help=f"decoding steps with the KV cache and greedy tokens to check where a side can decode "
                             f"(default {DECODE_STEPS}; 0 skips the decoding check)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the noise floor by this (prefer --mode lossy for a quantisation)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--device-map", metavar="MAP",
                        help="place each neox_lab side over several devices with accelerate (neox-lab[big]): "
                             "auto, balanced, balanced_low_0, sequential, or a JSON object of module -> device, "
                             "e.g. '{\"\": \"cpu\", \"model.blocks.5\": \"disk\"}' (docs/guides/placement.md)")
    parser.add_argument("--offload-folder", metavar="DIR",
                        help="with --device-map: where .bin checkpoints put their 'disk' parts")
    parser.add_argument("--only-failures", action="store_true", help="print only failing hooks")


def _validate(args) -> None:
    for flag, value in (("--batch", args.batch), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.probe_len < 0:
        raise ValueError(f"--probe-len must be 0 (off) or positive, got {args.probe_len}")
    if args.decode_steps < 0:
        raise ValueError(f"--decode-steps must be 0 (off) or positive, got {args.decode_steps}")
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise ValueError(f"--scale must be a finite number > 0, got {args.scale}")
    if args.fold_ids and args.prompts is None:
        raise ValueError("--fold-ids only applies to --prompts")
    if args.tokenizer is not None and args.prompts is None:
        raise ValueError("--tokenizer only applies to --prompts")
    if args.device_map is not None:
        if args.device is not None:
            raise ValueError("pass either --device (one device) or --device-map (several), not both")
        if any(getattr(args, key).startswith(("hf:", PY)) for key in ("a", "b")):
            raise ValueError("--device-map places neox_lab sides; an hf: side runs on one device, a py: side where "
                             "its factory put it (drop --device-map, or compare two neox_lab checkpoints)")
    elif args.offload_folder is not None:
        raise ValueError("--offload-folder only applies with --device-map")
    for key in ("a", "b"):
        if getattr(args, key).startswith(PY) and getattr(args, f"backend_{key}"):
            raise ValueError(f"--backend-{key} applies to a checkpoint side; {getattr(args, key)} is your port, which "
                             "runs as its factory built it")


def _device_map(text: str | None) -> str | dict | None:
    """--device-map: a plan name, or a JSON object of module name -> device."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--device-map {text!r} is not a JSON object ({err.msg}); e.g. "
                         '\'{"": "cpu", "model.blocks.1": "disk"}\'') from err


def _dtype(name: str, device: str) -> torch.dtype:
    if name == AUTO:
        return torch.float64 if torch.device(device).type == "cpu" else torch.float32
    return DTYPES[name]


def load_port(spec: str, dtype: torch.dtype | None):
    """What `factory()` of `py:package.module:factory` returns, cast to `dtype` when one is asked for."""
    target = spec[len(PY):]
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec}: write py:package.module:factory (a module path, a colon, a function name)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the current directory's modules are importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{spec}: cannot import {module_name} ({type(err).__name__}: {err}); it must be importable "
                         "from the current directory or PYTHONPATH") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{spec}: {module_name} has no function {attr!r}")
    obj = factory()
    if dtype is not None:
        target_module = obj.model if isinstance(obj, Port) else obj
        if not isinstance(target_module, torch.nn.Module):
            raise ValueError(f"{spec}: --dtype cannot cast a plain callable; drop --dtype for this side, or return a "
                             "Port with the module")
        target_module.to(dtype)
        if isinstance(obj, Port) and obj.dtype is not None:
            obj.dtype = dtype
    return obj, {"argument": spec, "runner": "port" if is_port(obj) else type(obj).__name__,
                 "module": getattr(module, "__file__", None), "factory": target}


def _load(spec: str, dtype: torch.dtype, backend: str, device: str, placement: dict):
    """(model, checkpoint directory) for `DIR` (neox_lab) or `hf:DIR` (transformers). `placement`:
    device_map / offload_folder for a neox_lab side placed with accelerate (then `device` is unused)."""
    if not spec.startswith("hf:"):
        if placement["device_map"] is not None:
            return load_or_default(spec, dtype=dtype, attn_backend=backend, **placement), resolve_checkpoint(spec)
        model = load_or_default(spec, dtype=dtype, device=device, attn_backend=backend)
        return model, resolve_checkpoint(spec)
    directory = resolve_checkpoint(spec[3:])
    arch = model_class(directory).hf_architecture
    try:
        import transformers
    except ImportError as err:
        raise ValueError(f"{spec}: running a checkpoint through transformers needs it installed "
                         "(pip install transformers)") from err
    NeoXConfig.from_hf(directory)  # refuses configs neox_lab could not run either, with the key named
    kwargs = {} if HF_BACKENDS[backend] is None else {"attn_implementation": HF_BACKENDS[backend]}
    try:
        model = getattr(transformers, arch).from_pretrained(directory, dtype=dtype, **kwargs)
    except pickle.UnpicklingError as err:  # weights_only refused the file: nothing was executed
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or ["weights_only refused it"]
        reason = next((line for line in lines if "global" in line.lower()), lines[0]).split(". ")[0]
        raise ValueError(f"{spec}: the weights cannot be loaded safely ({reason}); they hold pickled "
                         "objects that are not tensors. Convert a trusted copy to safetensors") from None
    return model.to(device=device).eval(), directory


def _tokenizer(args, dirs: list[Path]) -> tuple[NeoXTokenizer, str]:
    """The tokenizer for --prompts and where it came from; never a silent fallback."""
    if args.tokenizer == "bundled":
        return NeoXTokenizer.default(), "bundled GPT-NeoX-20B tokenizer (--tokenizer bundled)"
    if args.tokenizer is not None:
        path = Path(args.tokenizer)
        if not (path.is_file() or (path / "tokenizer.json").is_file()):
            raise ValueError(f"--tokenizer {path}: no tokenizer.json there (pass a directory holding one, "
                             "the file itself, or 'bundled')")
        return NeoXTokenizer.from_pretrained(path), f"{path.resolve()} (--tokenizer)"
    for directory in dirs:
        if (directory / "tokenizer.json").is_file():
            return NeoXTokenizer.from_pretrained(directory), f"{(directory / 'tokenizer.json').resolve()}"
        if directory.resolve() == package_model_dir().resolve():
            return NeoXTokenizer.default(), "bundled GPT-NeoX-20B tokenizer (the shipped model's own)"
    raise ValueError("--prompts: neither checkpoint has a tokenizer.json, so there is no tokenizer the models were "
                     "made for; pass --tokenizer DIR (a tokenizer.json) or --tokenizer bundled (neox_lab's "
                     "GPT-NeoX-20B tokenizer, what Pythia uses)")


def _inputs(args, dirs: list[Path], vocab_size: int) -> tuple[dict, dict]:
    """(inputs, provenance of the inputs)."""
    if args.prompts is None:
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=gen)
        return {"input_ids": ids}, {"kind": "random token ids", "seed": args.seed, "shape": list(ids.shape)}
    path = Path(args.prompts)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts {args.prompts}: no non-empty lines")
    tok, source = _tokenizer(args, dirs)
    enc = tok(lines, padding=True, padding_side="left", truncation=True, max_length=args.seq_len,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    top = int(ids[mask.bool()].max())
    folded = False
    if top >= vocab_size:
        if not args.fold_ids:
            raise ValueError(f"--prompts: the tokenizer ({source}) gives token id {top}, outside the model's "
                             f"vocabulary of {vocab_size}; use the model's own tokenizer (--tokenizer DIR), or "
                             f"--fold-ids to map ids to id % {vocab_size}")
        ids, folded = ids % vocab_size, True
    info = {"kind": "prompts", "file": str(path.resolve()), "sha256": file_sha256(path), "n_prompts": len(lines),
            "tokenizer": source, "padding": "left", "max_length": args.seq_len, "shape": list(ids.shape),
            "ids_folded_modulo": vocab_size if folded else None}
    return {"input_ids": ids, "attention_mask": mask}, info


@user_errors("compare", also=(RuntimeError, FileNotFoundError))
def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sides, dirs, provenance = {}, [], {}
    _validate(args)
    placement = {"device_map": _device_map(args.device_map), "offload_folder": args.offload_folder}
    if args.json:  # refused before minutes of comparing, not after
        check_output_file(args.json, "--json")
    for key in ("a", "b"):
        spec = getattr(args, key)
        dtype_name = getattr(args, f"dtype_{key}") or args.dtype
        if spec.startswith(PY):
            # A port runs as its factory built it unless a dtype is asked for explicitly.
            dtype = None if dtype_name == AUTO else _dtype(dtype_name, device)
            sides[key], provenance[f"checkpoint_{key}"] = load_port(spec, dtype)
            continue
        dtype = _dtype(dtype_name, device)
        backend = getattr(args, f"backend_{key}") or args.backend or DEFAULT_BACKEND[
            "hf" if spec.startswith("hf:") else "neox_lab"]
        model, directory = _load(spec, dtype, backend, device, placement)
        sides[key] = model
        dirs.append(directory)
        provenance[f"checkpoint_{key}"] = {"argument": spec, "path": str(Path(directory).resolve()),
                                           "runner": "transformers" if spec.startswith("hf:") else "neox_lab",
                                           "dtype": str(dtype).removeprefix("torch."), "backend": backend,
                                           "device_map": getattr(model, "device_map", None)}
    model_a, model_b = sides["a"], sides["b"]
    vocab = [m.config.vocab_size for m in (model_a, model_b) if not is_port(m)]
    vocab += [m.config.vocab_size for m in (model_a, model_b) if isinstance(m, Port) and m.config is not None]
    if not vocab:
        raise ValueError("both sides are ports without a config: return a Port(..., config=NeoXConfig(...)) from "
                         "one factory, so the inputs can be drawn from its vocabulary")
    inputs, provenance["inputs"] = _inputs(args, dirs, min(vocab))
    report = compare(model_a, model_b, inputs, mode=args.mode, scale=args.scale, probe_len=args.probe_len or None,
                     probe_seed=args.seed, padded=not args.no_padded, decode_steps=args.decode_steps)
    report.provenance = {**provenance, "device": device, "arguments": _arguments(args), "versions": versions()}
    print(report.table(only_failures=args.only_failures))
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
        except OSError as err:
            raise ValueError(f"--json {args.json}: could not write the report ({err})") from err
    return report.exit_status


def _arguments(args) -> dict:
    """The parsed command-line arguments (argparse's own bookkeeping left out)."""
    return {k: v for k, v in vars(args).items()
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
