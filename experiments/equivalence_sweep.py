"""How close is neox_lab to transformers? Largest differences over many random configs and inputs.

    python experiments/equivalence_sweep.py --examples 200

Draws configs and padded batches with `neox_lab.testing.strategies` (the same space as the test suite),
builds a seeded transformers GPTNeoXForCausalLM, saves it, loads it with neox_lab, and records, in fp32
and in fp64, the largest absolute and relative (||a - b|| / ||b||) logit and hidden-state differences at
real (non-pad) positions. transformers takes its attention softmax in fp32 even for fp64 models, so the
fp64 run also reports the gap with that one downcast lifted (as tests/model/test_equivalence.py does).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neox_lab.testing.strategies import build_pair, neox_configs, token_batches


@contextlib.contextmanager
def softmax_keeps_fp64(enabled: bool):
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and x.dtype == torch.float64:
            dtype = torch.float64
        return original(x, dim=dim, dtype=dtype)

    if enabled:
        torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def measure(cfg, batch, seed, dtype, lift_softmax=False):
    hf, nx = build_pair(cfg, seed, "causal_lm", dtype=dtype)
    valid = batch.attention_mask.bool()
    with torch.no_grad(), softmax_keeps_fp64(lift_softmax):
        ref = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 output_hidden_states=True)
        out = nx(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    pairs = [(out.logits, ref.logits)] + list(zip(out.hidden_states, ref.hidden_states))
    rel = max(float((a[valid] - b[valid]).norm() / b[valid].norm()) for a, b in pairs)
    abs_ = max(float((a[valid] - b[valid]).abs().max()) for a, b in pairs)
    return rel, abs_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    worst = {"fp32": [0.0, 0.0], "fp64 (transformers' fp32 softmax)": [0.0, 0.0], "fp64": [0.0, 0.0]}

    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cfg=neox_configs(), data=st.data(), seed=st.integers(0, 2**16))
    def sweep(cfg, data, seed):
        batch = data.draw(token_batches(cfg))
        for label, dtype, lift in (("fp32", torch.float32, False),
                                   ("fp64 (transformers' fp32 softmax)", torch.float64, False),
                                   ("fp64", torch.float64, True)):
            rel, abs_ = measure(cfg, batch, seed, dtype, lift)
            worst[label] = [max(worst[label][0], rel), max(worst[label][1], abs_)]

    sweep()
    print(f"{args.examples} random configs x inputs; logits and every hidden state, real positions only")
    print(f"{'precision':<36} {'max rel ||a-b||/||b||':>22} {'max abs':>12}")
    for label, (rel, abs_) in worst.items():
        print(f"{label:<36} {rel:>22.3e} {abs_:>12.3e}")


if __name__ == "__main__":
    main()
