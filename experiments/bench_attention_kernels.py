"""Benchmark: torch's fused attention kernels (flash, cuDNN, memory-efficient) per shape, and the one
neox_lab's "flash" backend picks for it.

Shapes are the attention calls of the Pythia presets at batch 8 x 2048 (causal prefill, a padded
prefill, decoding one token over 2048 cached keys at batch 1 and 16). Each kernel is timed with CUDA
events (median of --repeats after warm-up) on fresh random q, k, v in [batch pos n_heads d_head] and
checked against fp32 math attention (relative error of z); the FLOP count is the causal half of
QK^T and PV (4 * b * h * s^2 * d / 2) for prefill, 4 * b * h * k * d for decoding.

    python experiments/bench_attention_kernels.py          # CUDA, fp16 (about 20 s)
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox_lab import PRESETS, NeoXForCausalLM
from neox_lab.model.kernels import AttnMask

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cases(batch: int, seq: int):
    for preset in ("pythia-410m", "pythia-1.4b"):
        cfg = PRESETS[preset]
        h, d = cfg.num_attention_heads, cfg.head_dim
        yield preset, "causal", batch, seq, seq, h, d
        yield preset, "padded", batch, seq, seq, h, d
        yield preset, "decode b1", 1, 1, seq, h, d
        yield preset, "decode b16", 16, 1, seq, h, d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    dtype = torch.float16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}, fp16")
    print("| preset | call | b x q x k | kernel | ms | TFLOP/s | rel err vs fp32 | neox_lab picks |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, call, b, q_len, k_len, h, d in cases(args.batch, args.seq):
        torch.manual_seed(0)
        q = torch.randn(b, h, q_len, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h, k_len, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h, k_len, d, device="cuda", dtype=dtype)
        mask, causal = None, q_len == k_len
        if call == "padded":
            keep = torch.ones(b, k_len, dtype=torch.bool, device="cuda")
            keep[::2, : k_len // 8] = False  # every other row left-padded by 1/8
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device="cuda").tril()
            mask = (allowed[None] & keep[:, None, :])[:, None] | ~keep[:, None, :, None]
            causal = False
        flops = (2 * b * h * q_len * k_len * d) if q_len == k_len else 4 * b * h * k_len * d
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        # neox_lab's own choice for this shape: a one-layer model's flash kernel on the same tensors
        picked = pick(q, k, v, mask is not None, q_len, k_len)
        for name, backend in KERNELS.items():
            def run(backend=backend, q=q, k=k, v=v, mask=mask, causal=causal):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    z = run()
                    ms = timed(run, args.repeats)
            except RuntimeError as err:
                print(f"| {preset} | {call} | {b}x{q_len}x{k_len} | {name} | - | - | refused: "
                      f"{str(err).splitlines()[0][:60]} | {picked} |")
                continue
            err = float((z.float() - ref).norm() / ref.norm())
            print(f"| {preset} | {call} | {b}x{q_len}x{k_len} | {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                  f"{err:.1e} | {picked} |", flush=True)
    return 0


def pick(q, k, v, padded: bool, q_len: int, k_len: int) -> str:
    """The kernel neox_lab's flash backend runs for this call (through a 1-layer model's attention)."""
    model = NeoXForCausalLM(PRESETS["pythia-14m"].replace(num_hidden_layers=1), attn_backend="flash")
    kernel = model.model.blocks[0].attn.flash
    key_mask = None
    if padded:
        key_mask = torch.ones(q.shape[0], k_len, dtype=torch.bool, device="cuda")
        key_mask[::2, : k_len // 8] = False
    mask = AttnMask(q_len=q_len, k_len=k_len, device=q.device, key_mask=key_mask)
    with torch.no_grad():
        kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=q.shape[-1] ** -0.5)
    return kernel.last


if __name__ == "__main__":
    raise SystemExit(main())
