"""Benchmark: torch's fused attention kernels (flash, cuDNN, memory-efficient) and FlashAttention-4 per
shape, and the one neox_lab's "flash" backend picks for it.

Shapes are the attention calls of the Pythia presets at batch 8 x 2048 (causal prefill, a padded
prefill, decoding one token over 2048 cached keys at batch 1 and 16). Each kernel is timed with CUDA
events (median of --repeats after warm-up) on fresh random q, k, v in [batch pos n_heads d_head] and
checked against fp32 math attention (relative error of z); the FLOP count is the causal half of
QK^T and PV (4 * b * h * s^2 * d / 2) for prefill, 4 * b * h * k * d for decoding.

FlashAttention-4 (the `flash-attn-4` package, `flash_attn.cute`, CuTe-DSL kernels for Hopper and
Blackwell) is measured as "fa4" when it imports: `flash_attn_func` for the causal prefill and for
decoding (its causal mask is aligned bottom-right, so one query sees every cached key), and
`flash_attn_varlen_func` on the gathered real tokens for the padded prefill, the gather and scatter
timed with it (what a model using it would pay). Its first call of each shape compiles the kernel
(seconds each): the compile time is printed separately and not in the median.

    python experiments/bench_attention_kernels.py          # CUDA, fp16 (about 20 s; FA4 adds compiles)
    python experiments/bench_attention_kernels.py --kernels fa4 flash cudnn
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox_lab import PRESETS, NeoXForCausalLM
from neox_lab.model.kernels import AttnMask

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}

try:  # the flash-attn-4 package is optional; it is brought to the GPU machine as wheels
    from flash_attn.cute import flash_attn_func as fa4_func  # type: ignore
    from flash_attn.cute import flash_attn_varlen_func as fa4_varlen  # type: ignore
except Exception as err:  # noqa: BLE001 - any import failure (missing CUDA libs too) means "not here"
    fa4_func = fa4_varlen = None
    FA4_MISSING = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


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
    p.add_argument("--kernels", nargs="+", default=[*KERNELS, "fa4"], choices=[*KERNELS, "fa4"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    dtype = torch.float16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}, fp16")
    if "fa4" in args.kernels and fa4_func is None:
        print(f"fa4: flash_attn.cute does not import ({FA4_MISSING}); its rows are left out")
    print("| preset | call | b x q x k | kernel | ms | TFLOP/s | rel err vs fp32 | neox_lab picks |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, call, b, q_len, k_len, h, d in cases(args.batch, args.seq):
        torch.manual_seed(0)
        q = torch.randn(b, h, q_len, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h, k_len, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h, k_len, d, device="cuda", dtype=dtype)
        mask, causal, keep = None, q_len == k_len, None
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
        runs = {name: (lambda backend=backend, q=q, k=k, v=v, mask=mask, causal=causal:
                       _sdpa(backend, q, k, v, mask, causal))
                for name, backend in KERNELS.items() if name in args.kernels}
        if "fa4" in args.kernels and fa4_func is not None:
            runs["fa4"] = fa4_call(q, k, v, keep)
        for name, run in runs.items():
            compile_s = ""
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    z = run()
                    torch.cuda.synchronize()
                    if name == "fa4":
                        compile_s = f" (first call {time.perf_counter() - t0:.1f} s)"
                    ms = timed(run, args.repeats)
            except (RuntimeError, AssertionError, ValueError, TypeError) as err:
                print(f"| {preset} | {call} | {b}x{q_len}x{k_len} | {name} | - | - | refused: "
                      f"{str(err).splitlines()[0][:60] if str(err) else type(err).__name__} | {picked} |")
                continue
            err = float((z.float() - ref).norm() / ref.norm()) if keep is None else float(
                ((z.float() - ref) * keep[:, None, :, None]).norm() / (ref * keep[:, None, :, None]).norm())
            print(f"| {preset} | {call} | {b}x{q_len}x{k_len} | {name}{compile_s} | {ms:.3f} | "
                  f"{flops / ms / 1e9:.0f} | {err:.1e} | {picked} |", flush=True)
    return 0


def _sdpa(backend, q, k, v, mask, causal):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def fa4_call(q, k, v, keep):
    """A call of FlashAttention-4 on the bench's [b h s d] tensors, returning z in the same layout.

    Its layout is [b s h d], prepared outside the timed call. Causal masks align bottom-right, so a
    decoding query (q_len 1) sees every key, as in torch's; the padded prefill runs the varlen kernel
    on the real tokens, the gather and the scatter back inside the timed call."""
    b, h, q_len, d = q.shape
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    scale = d**-0.5

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if keep is None:
        return lambda: first(fa4_func(qt, kt, vt, softmax_scale=scale, causal=True)).transpose(1, 2)
    k_len = k.shape[2]
    idx = keep.flatten().nonzero().squeeze(-1)
    lens = keep.sum(-1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lens.max())

    def padded():
        out = first(fa4_varlen(qt.reshape(b * q_len, h, d)[idx], kt.reshape(b * k_len, h, d)[idx],
                               vt.reshape(b * k_len, h, d)[idx], cu_seqlens_q=cu, cu_seqlens_k=cu,
                               max_seqlen_q=longest, max_seqlen_k=longest, softmax_scale=scale, causal=True))
        z = out.new_zeros(b * q_len, h, d).index_copy(0, idx, out)
        return z.view(b, q_len, h, d).transpose(1, 2)
    return padded


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
