"""The "flash" attention backend: FlashAttention-2 on CUDA in fp16/bf16.

With the flash-attn package (>= 2.1, where causal masks align bottom-right as a KV cache needs):

    flash_attn.func     no padding, no past (prefill, training)
    flash_attn.kvcache  a past in the cache (decoding, chunked prefill), no padding or left padding only
                        (`cache_leftpad`, flash-attn >= 2.6); inference only (the kernel has no backward)
    flash_attn.varlen   any other padding: real tokens gathered, `flash_attn_varlen_func`, scattered back

Without it, torch's own fused kernels: FlashAttention ("sdpa.flash", no mask possible), cuDNN
("sdpa.cudnn") or, for a padding mask torch's flash kernel cannot take, memory-efficient
("sdpa.efficient"). Each kind of call (dtype, head size, mask kind, decoding or not, gradients or not,
key length to the next power of two) is timed once over the kernels that accept it and the fastest is
remembered (process-wide), so cuDNN runs where it is faster. cuDNN is offered for inference only and
only on CUDA >= 12.9: its backward has given NaN gradients with a mask (pytorch#196678) and torch turns
it off by default on older CUDA (pytorch#171627). torch's global switches
(`torch.backends.cuda.enable_flash_sdp(False)`, ...) are honoured. The math kernel is never used.

`FlashKernel.last` names the kernel that ran on the latest call; `model.attn_kernels()` lists it per
layer, and the first choice of a torch kernel is logged (logger "neox_lab", level INFO).
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
import torch.nn.functional as F

from ..dtypes import HALF
from .kernels import AttnMask, StaticDecodeMask, finish, log, sdpa_mask


def _flash_attn_version_ok(version: str) -> bool:
    nums = [int(n) for n in re.findall(r"\d+", version)[:2]]
    return len(nums) == 2 and tuple(nums) >= (2, 1)


try:  # the flash-attn package is optional (the `flash` extra)
    import flash_attn  # type: ignore
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # type: ignore

    # Before 2.1 a causal mask with q_len < k_len was aligned top-left: wrong for a KV cache.
    HAVE_FLASH_ATTN = _flash_attn_version_ok(getattr(flash_attn, "__version__", "0"))
    FLASH_KVCACHE_LEFTPAD = "cache_leftpad" in inspect.signature(flash_attn_with_kvcache).parameters
except Exception:  # noqa: BLE001 - any import failure (missing CUDA libs too) means "not available"
    flash_attn_func = flash_attn_varlen_func = flash_attn_with_kvcache = None
    HAVE_FLASH_ATTN = FLASH_KVCACHE_LEFTPAD = False

MAX_HEAD_DIM = 256  # flash-attn 2's limit

# Which torch kernel won the timing for a kind of call (the key built in `_torch_fused`), shared by every layer.
_TORCH_CHOICE: dict[tuple, str] = {}


def _cudnn_offered(needs_grad: bool) -> bool:
    """Whether cuDNN attention is a candidate (module docstring: inference on CUDA >= 12.9 only)."""
    if needs_grad or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    return _cuda_at_least_12_9(torch.version.cuda)


@functools.lru_cache(maxsize=8)
def _cuda_at_least_12_9(version: str | None) -> bool:
    nums = re.findall(r"\d+", version or "")[:2]
    return len(nums) == 2 and (int(nums[0]), int(nums[1])) >= (12, 9)


#: Each torch SDPA kernel's global switch (its getter and setter), the four a CUDA call can run.
_SDPA_SWITCHES = {
    "flash": ("flash_sdp_enabled", "enable_flash_sdp"),
    "efficient": ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
    "cudnn": ("cudnn_sdp_enabled", "enable_cudnn_sdp"),
    "math": ("math_sdp_enabled", "enable_math_sdp"),
}


class only_sdpa_kernel:  # noqa: N801 - used as a context manager, like torch's sdpa_kernel
    """Within the block torch's SDPA may run only `name`'s kernel ("flash", "efficient" or "cudnn"); the
    global switches are restored on exit.

    What `torch.nn.attention.sdpa_kernel([backend])` does, for a third of its host time (4.5 against
    13.6 us a block on one CPU core): torch's reads and writes every backend's switch through `getattr`
    on entry and exit. The flash backend enters it once per layer and decoding step, and batch-1
    decoding is bound by the host (on an H200, pythia-1.4b decoded at 10.5 ms a token against
    transformers' 9.2 before this and the other per-step savings).
    """

    def __init__(self, name: str):
        self.name = name
        self.saved: list[bool] = []

    def __enter__(self) -> None:
        cuda = torch.backends.cuda
        self.saved = [getattr(cuda, get)() for get, _ in _SDPA_SWITCHES.values()]
        for name, (_, set_) in _SDPA_SWITCHES.items():
            getattr(cuda, set_)(name == self.name)

    def __exit__(self, *exc) -> None:
        cuda = torch.backends.cuda
        for (_, set_), on in zip(_SDPA_SWITCHES.values(), self.saved, strict=True):
            getattr(cuda, set_)(on)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _time_ms(fn, repeats: int = 3) -> float:
    """Best of `repeats` CUDA-event timings after one untimed call (cuDNN builds its plan on first use)."""
    with torch.no_grad():
        fn()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
    return best


class FlashKernel:
    """FlashAttention-2: the flash-attn package when importable, else torch's fused CUDA kernels.

    One per layer. `last` names the kernel that actually ran on the latest call: "flash_attn.func",
    "flash_attn.kvcache", "flash_attn.varlen", "sdpa.flash", "sdpa.cudnn" or "sdpa.efficient".
    """

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, q, k, v, mask: AttnMask | StaticDecodeMask, *, scale, head_mask=None, dropout_p=0.0):
        if not q.is_cuda or q.dtype not in HALF:
            raise ValueError(
                f"attn_backend 'flash' needs CUDA tensors in float16/bfloat16, got {q.dtype} on {q.device}; "
                "use 'eager' or 'sdpa' (or 'auto', which picks flash only where it can run)"
            )
        return self.dispatch(q, k, v, mask, scale=scale, head_mask=head_mask, dropout_p=dropout_p)

    def dispatch(self, q, k, v, mask, *, scale, head_mask=None, dropout_p=0.0):
        """Pick and run a kernel (no device check: the CPU tests drive this with stand-in kernels)."""
        if HAVE_FLASH_ATTN and q.shape[-1] <= MAX_HEAD_DIM and not (
                isinstance(mask, StaticDecodeMask) and not mask.flash_kvcache):
            z = self._flash_attn(q, k, v, mask, scale, dropout_p)
        else:
            z = self._torch_fused(q, k, v, mask, scale, dropout_p)
        return finish(z, mask, head_mask)

    # ------------------------------------------------------------------------------- flash-attn package
    def _flash_attn(self, q, k, v, mask, scale, dropout_p):
        if isinstance(mask, StaticDecodeMask):
            # The whole preallocated cache, with lengths read on the device: capturable in a CUDA graph.
            self.last = "flash_attn.kvcache"
            extra = {} if mask.leftpad is None else {"cache_leftpad": mask.leftpad}
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=mask.cache_seqlens, softmax_scale=scale,
                                           causal=True, **extra)
        past = mask.k_len > mask.q_len
        # The KV-cache kernel has no backward and no dropout, and (unlike the others) no internal
        # padding of odd head dims.
        if past and not dropout_p and not _needs_grad(q, k, v) and q.shape[-1] % 8 == 0:
            # Decoding: the split-KV kernel parallelises over keys, which one query row cannot.
            # cache_seqlens counts slots from 0, padding included; keys [leftpad, k_len) are attended,
            # causally aligned bottom-right, exactly AttnMask.allowed for left padding.
            if mask.key_mask is None:
                self.last = "flash_attn.kvcache"
                return flash_attn_with_kvcache(q, k, v, cache_seqlens=mask.k_len, softmax_scale=scale,
                                               causal=True)
            if FLASH_KVCACHE_LEFTPAD and mask.leftpad is not None:
                self.last = "flash_attn.kvcache"
                return flash_attn_with_kvcache(q, k, v, cache_seqlens=mask.k_len, cache_leftpad=mask.leftpad,
                                               softmax_scale=scale, causal=True)
        if mask.key_mask is None:
            # flash-attn >= 2.1 aligns the causal mask bottom-right when q_len < k_len, as a cache needs.
            self.last = "flash_attn.func"
            return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True)
        self.last = "flash_attn.varlen"
        b, q_len, h, d = q.shape
        q_idx, k_idx, cu_q, cu_k, max_q, max_k = mask.unpadded
        z = q.new_zeros(b * q_len, h, d)
        if q_idx.numel():
            # Per row, the real queries are the last of its real keys: causal=True (bottom-right) is exact.
            out = flash_attn_varlen_func(
                q.reshape(b * q_len, h, d)[q_idx], k.reshape(-1, h, d)[k_idx], v.reshape(-1, h, d)[k_idx],
                cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, softmax_scale=scale, causal=True,
            )
            z = z.index_copy(0, q_idx, out)  # out of place, so autograd sees it
        return z.view(b, q_len, h, d)

    # ------------------------------------------------------------------------------- torch fused kernels
    def _torch_fused(self, q, k, v, mask, scale, dropout_p):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if mask.key_mask is None and mask.q_len > 1 and mask.k_len > mask.q_len:
            return self._lower_right(args, mask, scale, dropout_p)
        attn_mask = sdpa_mask(mask)
        kind = "causal" if mask.plain_causal else ("none" if attn_mask is None else "mask")
        needs_grad = _needs_grad(q, k, v)
        candidates = []
        if _cudnn_offered(needs_grad):
            candidates.append("cudnn")
        if kind != "mask" and torch.backends.cuda.flash_sdp_enabled():  # torch's flash kernel takes no mask
            candidates.append("flash")
        if kind == "mask" and torch.backends.cuda.mem_efficient_sdp_enabled():
            candidates.append("efficient")

        def run(name, quiet=False):
            with only_sdpa_kernel(name):
                if not quiet:
                    return F.scaled_dot_product_attention(*args, attn_mask=attn_mask, is_causal=mask.plain_causal,
                                                          dropout_p=dropout_p, scale=scale)
                with warnings.catch_warnings():
                    # A kernel that cannot take this call warns why before raising: we only try it.
                    warnings.simplefilter("ignore", UserWarning)
                    return F.scaled_dot_product_attention(*args, attn_mask=attn_mask, is_causal=mask.plain_causal,
                                                          dropout_p=dropout_p, scale=scale)

        # Batch and head counts are in the key because the ranking depends on them: on an H200 a decoding
        # step at batch 16 (d_head 128) ran 0.089 ms on cuDNN against 0.132 ms on flash, yet reused the
        # choice timed at another batch size (flash) while the key lacked the batch.
        key = (q.device, q.dtype, q.shape[-1], q.shape[0].bit_length(), q.shape[2], kind, mask.q_len == 1,
               needs_grad, mask.k_len.bit_length(), tuple(candidates))
        choice = _TORCH_CHOICE.get(key)
        errors = {}
        # Timing needs a real device, no randomness (dropout) and no graph being captured; a call that
        # cannot be timed takes the first kernel that accepts it and leaves the choice to a later call.
        if choice is None and q.is_cuda and not dropout_p and not torch.cuda.is_current_stream_capturing():
            timings = {}
            for name in candidates:
                try:
                    timings[name] = _time_ms(lambda name=name: run(name, quiet=True))
                except RuntimeError as err:
                    errors[name] = str(err).splitlines()[0]
            if timings:
                choice = _TORCH_CHOICE[key] = min(timings, key=timings.get)
                log.info("neox_lab flash backend: torch sdpa %s kernel for %s (ms: %s)", choice, key, timings)
        order = sorted(candidates, key=lambda name: name != choice)
        for name in order:
            if name in errors:
                continue
            try:
                z = run(name, quiet=name != choice)
            except RuntimeError as err:
                errors[name] = str(err).splitlines()[0]
                continue
            self.last = f"sdpa.{name}"
            return z.transpose(1, 2)
        tried = "; ".join(f"{n}: {e}" for n, e in errors.items()) or "every candidate is switched off"
        raise RuntimeError(f"attn_backend 'flash': no fused attention kernel accepted this call ({tried}); "
                           "use attn_backend='sdpa' or 'eager'")

    def _lower_right(self, args, mask, scale, dropout_p):
        """A chunk of queries after a past, no padding: a bottom-right causal `CausalBias`.

        torch dispatches that bias itself, to its flash kernel when the call allows it, else the
        memory-efficient one, whatever `sdpa_kernel` says; ask the same predicates so `last` names the
        kernel that ran. (On CPU, where the tests drive this, torch's CPU flash kernel takes the mask.)
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        name = "flash"
        if args[0].is_cuda:
            from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

            params = SDPAParams(*args, None, dropout_p, False, False)
            name = ("flash" if can_use_flash_attention(params) else
                    "efficient" if can_use_efficient_attention(params) else None)
            if name is None:
                raise RuntimeError("attn_backend 'flash': neither torch's flash nor its memory-efficient kernel "
                                   f"accepts a chunk of {mask.q_len} queries after {mask.k_len - mask.q_len} "
                                   f"cached keys ({args[0].dtype}, d_head {args[0].shape[-1]}); use "
                                   "attn_backend='sdpa' or 'eager'")
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            z = F.scaled_dot_product_attention(*args, attn_mask=causal_lower_right(mask.q_len, mask.k_len),
                                               dropout_p=dropout_p, scale=scale)
        self.last = f"sdpa.{name}"
        return z.transpose(1, 2)
