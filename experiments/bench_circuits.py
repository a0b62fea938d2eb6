"""The cost of circuit discovery against plain forwards, on a pythia-160m-shaped model (random weights).

    python experiments/bench_circuits.py                  # 12 layers x 12 heads, d_model 768, 1 x 128, CPU
    python experiments/bench_circuits.py --device cuda    # the same on a GPU (fp32; --dtype float16 too)
    python experiments/bench_circuits.py --quick          # tiny sizes, seconds (the smoke test)

Measured in one process on the same inputs, best of --repeats:

    forward       model(tokens) without gradients
    fwd+bwd       a forward with gradients from the embeddings and the backward of the metric to them
                  (activations' gradients only, as EAP takes them)
    split fwd+bwd the same with every head's q/k/v input and every MLP input materialised for backward
                  hooks (TransformerLens' `use_split_qkv_input`, `use_hook_mlp_in`): for comparison, what
                  a gradient run on split inputs costs before any scoring (EAP does not use them)
    EAP           attribute(..., "EAP"): a corrupted and a clean recording forward, then a clean forward
                  with gradients and one backward whose hooks score every edge
    EAP-IG        attribute(..., "EAP-IG", ig_steps=m): the same recordings, then m path points

and printed as ratios: EAP / forward (goal <= ~3) and EAP-IG / fwd+bwd (goal <= ~m + 2). The metric
is a logit difference at the last position and every run unembeds the last position only
(`logits_to_keep=1`), so the vocabulary does not dominate.

Memory: each of fwd+bwd and EAP runs once more in a fresh subprocess (glibc's mmap threshold pinned low, so
RSS follows live tensors); after building the model and one warm-up call the peak-RSS counter is reset
and "peak MB" is the growth of peak RSS during one call. EAP's bound: one activation per sender node per
position, senders x batch x pos x d_model x 4 bytes (the sender changes it keeps), beyond what the
forward and backward themselves hold; per edge it would be ~200x that. On CUDA the peaks are
torch.cuda.max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.circuits import Graph, attribute
from neox_lab.patching import logit_diff

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build(args):
    cfg = NeoXConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.d_model, rotary_pct=0.25,
                     max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg).to(args.device, DTYPES[args.dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # an analysis setting: only activations' gradients are taken
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, args.seq // 2] = (corrupted[:, args.seq // 2] + 1) % args.vocab
    return model, clean.to(args.device), corrupted.to(args.device), logit_diff(1, 2)


def runners(model, clean, corrupted, metric, steps: int) -> dict:
    graph = Graph.from_model(model)
    common = dict(logits_to_keep=1, batch_size=clean.shape[0] * max(1, steps))

    def forward():
        with torch.no_grad():
            return model(clean, logits_to_keep=1).logits

    def forward_backward():
        leaf = {}

        def start(x, *, hook):
            leaf["x"] = x.detach().requires_grad_()
            return leaf["x"]
        with torch.enable_grad():
            logits = model.run_with_hooks(clean, logits_to_keep=1, fwd_hooks=[("hook_embed", start)]).logits
            return torch.autograd.grad(metric(logits), leaf["x"])

    def split_forward_backward():
        # EAP's gradient run without its scoring: per-head q/k/v copies and MLP inputs materialised
        # (backward hooks on them), then the same forward and backward.
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        try:
            names = [n for n in model.hook_names() if n.endswith(("_input", "hook_mlp_in"))]
            with model.hooks(bwd_hooks=[(n, lambda grad, *, hook: None) for n in names]):
                return forward_backward()
        finally:
            model.set_use_split_qkv_input(False)
            model.set_use_hook_mlp_in(False)

    return {
        "forward": forward,
        "fwd+bwd": forward_backward,
        "split fwd+bwd": split_forward_backward,
        "EAP": lambda: attribute(model, graph, clean, corrupted, metric, "EAP", **common),
        "EAP-IG": lambda: attribute(model, graph, clean, corrupted, metric, "EAP-IG", ig_steps=steps, **common),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_mb(fn, device: str) -> float:
    """Growth of peak memory (MB) during one call of `fn`, after a warm-up call."""
    fn()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _status_kb("VmRSS")
    except OSError:
        return float("nan")
    fn()
    peak = _status_kb("VmHWM")
    return float("nan") if before is None or peak is None else (peak - before) / 1024


def memory_in_subprocess(variant: str, argv: list[str]) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run([sys.executable, __file__, *argv, "--_memory-child", variant], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


# ----------------------------------------------------------------------------- main
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke test")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG's ig_steps (m)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory", choices=("subprocess", "off"), default="subprocess")
    parser.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.heads, args.d_model, args.vocab, args.seq, args.repeats = 2, 4, 64, 512, 16, 1
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, clean, corrupted, metric = build(args)
    runs = runners(model, clean, corrupted, metric, args.steps)
    if args._memory_child:
        print(json.dumps({"peak_mb": peak_mb(runs[args._memory_child], args.device)}))
        return 0
    graph = Graph.from_model(model)
    n_senders = len(graph.senders)
    print(f"model: {args.layers} layers x {args.heads} heads, d_model {args.d_model}, vocab {args.vocab}, "
          f"{args.dtype} on {args.device}; input {args.batch} x {args.seq}; {len(graph)} edges, {n_senders} senders; "
          f"{torch.get_num_threads()} thread(s)")
    times = {name: best_time(fn, args.repeats, args.device) for name, fn in runs.items()}
    for name, seconds in times.items():
        print(f"{name:>13}: {seconds:8.3f} s")
    m = args.steps
    print(f"EAP / forward            {times['EAP'] / times['forward']:6.2f}   (goal <= ~3)")
    print(f"EAP-IG (m={m}) / fwd+bwd   {times['EAP-IG'] / times['fwd+bwd']:6.2f}   (goal <= ~{m + 2})")
    print(f"fwd+bwd / forward        {times['fwd+bwd'] / times['forward']:6.2f}")
    print(f"EAP / fwd+bwd            {times['EAP'] / times['fwd+bwd']:6.2f}")
    print(f"split fwd+bwd / forward  {times['split fwd+bwd'] / times['forward']:6.2f}   (split q/k/v inputs, for "
          "comparison)")
    if args.memory == "subprocess":
        peaks = {v: memory_in_subprocess(v, argv) for v in ("fwd+bwd", "EAP")}
        bound = n_senders * args.batch * args.seq * args.d_model * 4 / 2**20
        print(f"peak MB: fwd+bwd {peaks['fwd+bwd']:.1f}, EAP {peaks['EAP']:.1f}; EAP - fwd+bwd "
              f"{peaks['EAP'] - peaks['fwd+bwd']:.1f} vs one activation per sender and position {bound:.1f} "
              f"(per edge: {len(graph) * args.batch * args.seq * args.d_model * 4 / 2**20:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
