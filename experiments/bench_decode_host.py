"""Benchmark: the host's share of plain (uncompiled) decoding on the CUDA path, measured on a CPU.

Batch-1 decoding of a GPU model is bound by the host: per token, every layer's Python and every kernel
launch. This measures that work without a GPU: the model runs on one CPU core with the CUDA path's
branches taken (LayerNorm's fused kernel, the "flash" backend through torch's fused kernels with the
kernel choice already made, as after the first timed call on a GPU) and widths shrunk to nothing
(d_model 64, 8 heads, vocab 512; the preset's depth), so time per token is framework work, against
transformers' sdpa model holding the same weights. It also counts the aten operations one decoding
step dispatches (each a kernel launch or a view on a GPU).

Emulating the CUDA branches needs three internals replaced (`LayerNorm.forward`'s device test, the
backend resolver, FlashKernel's device check); this is the one script in experiments/ that reaches past
the public API, because what it measures is that path. `bench_generate.py` is the GPU measurement.

    python experiments/bench_decode_host.py                    # pythia-1.4b depth, batch 1 and 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import build_models  # noqa: E402

from neox_lab import PRESETS  # noqa: E402
from neox_lab.model import base, flash, layernorm  # noqa: E402


class _Chosen(dict):
    """The flash backend's kernel-choice table after a GPU's timing: torch's flash kernel for every call."""

    def get(self, key, default=None):
        return "flash"


def take_cuda_branches() -> None:
    """The CUDA path's choices, on CPU tensors (module docstring)."""
    layernorm.LayerNorm.forward = lambda self, x: F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
    base.resolve_backend = lambda name, x: "flash"
    flash.FlashKernel.__call__ = flash.FlashKernel.dispatch
    flash._TORCH_CHOICE = _Chosen()


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(generate, short: int = 2, long: int = 10) -> float:
    """aten operations one decoding step dispatches: the difference of two generations over the steps."""
    counts = []
    for n in (short, long):
        mode = _CountOps()
        with torch.inference_mode(), mode:
            generate(n)
        counts.append(mode.count)
    return (counts[1] - counts[0]) / (long - short)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="pythia-1.4b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the fastest of each is kept")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    take_cuda_branches()
    cfg = PRESETS[args.preset].replace(hidden_size=64, intermediate_size=256, num_attention_heads=8,
                                       vocab_size=512)
    hf, nx = build_models(cfg, torch.float32, "cpu")
    hf.set_attn_implementation("sdpa")
    print(f"{args.preset} depth ({cfg.num_hidden_layers} layers), tiny widths, fp32 on one CPU core, CUDA "
          f"branches emulated; prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.rounds}")
    print("| batch | hf_sdpa ms/token | neox ms/token | neox / hf time | aten ops/step hf | neox | neox kernel |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        runs = {
            "hf": lambda n, ids=ids: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0),
            "neox": lambda n, ids=ids: nx.generate(ids, max_new_tokens=n, eos_token_id=None),
        }
        best = {name: float("inf") for name in runs}
        with torch.inference_mode():
            for run in runs.values():
                run(4)  # warm-up
            for _ in range(args.rounds):  # alternating, so a slow moment of the machine hits both
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    run(args.new_tokens)
                    best[name] = min(best[name], time.perf_counter() - t0)
        ms = {name: 1e3 * seconds / args.new_tokens for name, seconds in best.items()}
        ops = {name: ops_per_step(run) for name, run in runs.items()}
        print(f"| {batch} | {ms['hf']:.2f} | {ms['neox']:.2f} | {ms['neox'] / ms['hf']:.3f} | {ops['hf']:.0f} | "
              f"{ops['neox']:.0f} | {nx.attn_kernels()[0]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
