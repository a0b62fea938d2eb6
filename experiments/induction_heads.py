"""Find a model's induction heads, and check them causally by ablation.

    python experiments/induction_heads.py                       # the shipped model
    python experiments/induction_heads.py --model DIR --out DIR  # any NeoX checkpoint

1. Scores every head on ``[bos] + n random word tokens, repeated twice``: the mean attention from each
   second-copy token to the token right after its first occurrence (1 for a perfect induction head).
2. Loss on the first copy (unpredictable) vs the second (predictable by copying).
3. Zero-ablates each of the top heads (its `hook_z` set to 0) and reports how much the second-copy
   loss rises: a head that scores high *and* whose ablation hurts copying is an induction head.
Saves induction_scores.png and induction_patterns.png (the top heads on a short sequence).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from neox_lab import NeoXForCausalLM
from neox_lab.analysis import plotting
from neox_lab.analysis.induction import copy_losses, measure_induction, repeated_tokens, word_token_ids
from neox_lab.default_model import load_or_default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--out", type=Path, default=Path("induction_heads_out"), help="figure directory")
    p.add_argument("--n", type=int, default=50, help="span length (the sequence is bos + 2n tokens)")
    p.add_argument("--batch", type=int, default=16, help="random sequences scored")
    p.add_argument("--top", type=int, default=4, help="heads to ablate and plot")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(model_dir):
    return load_or_default(model_dir, cls=NeoXForCausalLM, dtype=torch.float32)


@torch.no_grad()
def ablated_copy_loss(model, tokens: torch.Tensor, n: int, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Per-copy loss with the given (layer, head)s' outputs (hook_z) set to zero."""
    def zero(head):
        def hook_fn(z, *, hook):
            z[:, :, head] = 0.0
            return z
        return hook_fn

    hooks = [(f"blocks.{layer}.attn.hook_z", zero(head)) for layer, head in heads]
    return copy_losses(model.run_with_hooks(tokens, fwd_hooks=hooks).logits, tokens, n)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = load(args.model)
    tok = model.tokenizer
    candidates = word_token_ids(tok)
    candidates = candidates[candidates < model.cfg.vocab_size]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    gen = torch.Generator().manual_seed(args.seed)
    tokens = repeated_tokens(candidates, args.n, batch=args.batch, bos_token_id=bos, generator=gen)
    res = measure_induction(model, tokens, args.n)

    print(f"induction scores ({args.batch} sequences of bos + 2 x {args.n} random word tokens):")
    print("layer | " + " | ".join(f"H{h:<4d}" for h in range(res.scores.shape[1])))
    for layer, row in enumerate(res.scores):
        print(f"L{layer:<4d} | " + " | ".join(f"{float(v):.3f}" for v in row))
    first, second = (float(v) for v in res.copy_loss)
    print(f"loss: first copy {first:.3f} nats/token, second copy {second:.3f}")
    top = res.top_heads(args.top)
    print("top heads (score; second-copy loss with the head zero-ablated):")
    for layer, head, score in top:
        ablated = float(ablated_copy_loss(model, tokens, args.n, [(layer, head)])[1])
        print(f"  L{layer}H{head}: score {score:.3f}; ablated loss {ablated:.3f} ({ablated - second:+.3f})")
    together = float(ablated_copy_loss(model, tokens, args.n, [(la, h) for la, h, _ in top])[1])
    print(f"  all {len(top)} together: ablated loss {together:.3f} ({together - second:+.3f}; first copy {first:.3f})")

    args.out.mkdir(parents=True, exist_ok=True)
    plotting.induction_scores(res.scores, title="Induction scores", save=args.out / "induction_scores.png")
    short_n = min(args.n, 12)
    short = repeated_tokens(candidates, short_n, batch=1, bos_token_id=bos, generator=gen)
    short_res = measure_induction(model, short, short_n)
    labels = [tok.decode([int(i)]) for i in short[0]]
    patterns = torch.stack([short_res.patterns[layer][0, head] for layer, head, _ in top])
    plotting.attention_patterns(patterns, labels, labels=[f"L{la}H{h} ({s:.2f})" for la, h, s in top],
                                ncols=len(top), title="Top induction heads",
                                save=args.out / "induction_patterns.png")
    print(f"figures: {args.out / 'induction_scores.png'}, {args.out / 'induction_patterns.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
