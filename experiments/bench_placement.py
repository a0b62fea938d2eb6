"""Loading and running a model placed with a device_map: peak host memory while loading, and the
speed of an offloaded (CPU RAM + disk) forward relative to the same model held in memory.

    python experiments/bench_placement.py                      # pythia-1.4b shapes, fp16 checkpoint
    python experiments/bench_placement.py --preset pythia-160m --tokens 32 --repeats 2   # quick
    python experiments/bench_placement.py --device cuda       # GPU offload (PCIe-bound), forward only

A random checkpoint with the preset's shapes is written (fp16, one safetensors file, as the hub's
Pythia checkpoints are) to a temporary directory and deleted at the end. Every measurement runs in a
fresh interpreter, so one run's memory cannot hide in another's:

* memory: peak resident set (VmHWM, file-backed pages of memory-mapped files included) of a process
  that imports neox_lab, loads the checkpoint, then runs one forward; printed as the increase over the
  process's own baseline before loading, in units of the largest shard. The target for loading is
  <= 1.2x: each tensor is read once, never held twice.
* speed: median forward time of the in-memory model and of a map with half the blocks in CPU RAM and
  half on disk (read from the checkpoint at every forward), both fp32, same input; the ratio is what
  offloading costs on this machine.

With `--device cuda` only the forward table is measured, in fp16 on cuda:0, synchronised: the model
whole on the GPU, half its blocks in CPU RAM, and a quarter in RAM plus a quarter on disk. Offloaded
blocks' weights cross PCIe at every forward (accelerate's offload hooks), so the ratio is bound by the
bus: about 2 bytes x parameters offloaded / PCIe bandwidth a forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# `python experiments/bench_placement.py` from the repository root imports this checkout's neox_lab.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

from neox_lab import PRESETS, NeoXForCausalLM  # noqa: E402
from neox_lab.model.loading import neox_to_hf_key  # noqa: E402

MAPS = {
    "whole (no device_map)": None,
    'device_map="auto"': "auto",
    "blocks on disk": "disk",
}


def write_checkpoint(preset: str, directory: Path) -> int:
    """A random fp16 checkpoint with `preset`'s shapes; returns its size in bytes."""
    cfg = PRESETS[preset]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NeoXForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {neox_to_hf_key(k): (torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}
    config = cfg.to_hf()
    config.update(architectures=["GPTNeoXForCausalLM"], torch_dtype="float16")
    save_file(tensors, os.fspath(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return (directory / "model.safetensors").stat().st_size


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(args) -> None:
    """One measurement, in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    directory = Path(args.child_dir)
    n_layers = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.child_map == "auto":
        kwargs["device_map"] = "auto"
    elif args.child_map == "disk":
        kwargs["device_map"] = {"": "disk", "model.embed": "cpu", "model.ln_final": "cpu", "unembed": "cpu"}
    elif args.child_map == "half":
        blocks = {f"model.blocks.{i}": "cpu" if i < n_layers // 2 else "disk" for i in range(n_layers)}
        kwargs["device_map"] = {"model.embed": "cpu", **blocks, "model.ln_final": "cpu", "unembed": "cpu"}
    elif args.child_map == "gpu":
        kwargs["device"] = "cuda:0"
    elif args.child_map in ("gpu+cpu", "gpu+cpu+disk"):
        # The first half of the blocks on the GPU; the second half in RAM (and its last half on disk).
        def where(i: int):
            if i < n_layers // 2:
                return 0
            return "disk" if args.child_map.endswith("disk") and i >= 3 * n_layers // 4 else "cpu"
        kwargs["device_map"] = {"model.embed": 0, **{f"model.blocks.{i}": where(i) for i in range(n_layers)},
                                "model.ln_final": 0, "unembed": 0}
    base = _hwm_bytes()
    t0 = time.perf_counter()
    model = NeoXForCausalLM.from_pretrained(directory, **kwargs)
    load_s = time.perf_counter() - t0
    loaded = _hwm_bytes()
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.input_device)
    cuda = model.input_device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        if cuda:
            model(ids, logits_to_keep=1)  # kernel choice and CUDA context warm-up, untimed
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
    print(json.dumps({"base": base, "loaded": loaded, "forward_peak": _hwm_bytes(), "load_s": load_s,
                      "forward_s": sorted(times)[len(times) // 2]}))


def measure(directory: Path, device_map: str | None, dtype: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child-dir", os.fspath(directory), "--child-map", device_map or "none",
           "--dtype", dtype, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pythia-1.4b", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=64, help="sequence length of the timed forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU offload table only (fp16), module docstring")
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-map", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_dir:
        child(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        shard = write_checkpoint(args.preset, directory)
        gib = 2.0**30
        if args.device == "cuda":
            return gpu_table(directory, shard, args)
        print(f"{args.preset}-shaped random checkpoint: one fp16 shard of {shard / gib:.2f} GiB; "
              f"{args.threads} threads, forward over {args.tokens} tokens, median of {args.repeats}\n")
        print("| load (fp16) | load time | peak RSS increase, loading | ratio to shard | "
              "after one forward | ratio |")
        print("|---|---|---|---|---|---|")
        for label, device_map in MAPS.items():
            m = measure(directory, device_map, "float16", args)
            loading, forward = m["loaded"] - m["base"], m["forward_peak"] - m["base"]
            print(f"| {label} | {m['load_s']:.1f} s | {loading / gib:.2f} GiB | {loading / shard:.2f}x | "
                  f"{forward / gib:.2f} GiB | {forward / shard:.2f}x |")
        print("\n| forward (fp32) | median time | relative to in memory |")
        print("|---|---|---|")
        whole = measure(directory, None, "float32", args)
        half = measure(directory, "half", "float32", args)
        disk = measure(directory, "disk", "float32", args)
        print(f"| in memory | {whole['forward_s']:.2f} s | 1.00x |")
        print(f"| half the blocks in RAM, half on disk | {half['forward_s']:.2f} s | "
              f"{half['forward_s'] / whole['forward_s']:.2f}x |")
        print(f"| every block on disk | {disk['forward_s']:.2f} s | {disk['forward_s'] / whole['forward_s']:.2f}x |")
    return 0


def gpu_table(directory: Path, shard: int, args) -> int:
    """The forward on cuda:0: whole, and with blocks offloaded to CPU RAM and disk (fp16)."""
    print(f"{args.preset}-shaped random checkpoint, fp16 ({shard / 2.0**30:.2f} GiB) on "
          f"{torch.cuda.get_device_name()}; forward over {args.tokens} tokens, median of {args.repeats}\n")
    print("| forward (fp16, cuda:0) | median time | relative to whole on the GPU |")
    print("|---|---|---|")
    labels = {"gpu": "whole on the GPU", "gpu+cpu": "half the blocks in CPU RAM",
              "gpu+cpu+disk": "a quarter in CPU RAM, a quarter on disk"}
    whole = None
    for child_map, label in labels.items():
        m = measure(directory, child_map, "float16", args)
        whole = whole or m["forward_s"]
        print(f"| {label} | {1e3 * m['forward_s']:.1f} ms | {m['forward_s'] / whole:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
