"""Activation-patching study: which layers, positions and heads carry the answer from clean to corrupted.

    python experiments/activation_patching.py --model DIR [--out DIR]

With a checkpoint (and its tokenizer, or the bundled GPT-NeoX one) it patches an IOI prompt pair:
clean "... John gave a drink to" (answer " Mary") against corrupted "... Mary gave a drink to"
(answer " John"), with the metric logit(" Mary") - logit(" John"). Without `--model` it uses
`neox_lab.load_default()` where that exists, else a random tiny model (with a warning) on a
repeated-token pair: clean = A A[:-1] (induction predicts A's last token), corrupted = B A[:-1].
For each target it saves a normalised heatmap (1 = the patch restores the clean metric, 0 = no effect),
prints the strongest cells, and compares attribution patching with the exact grid.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

import neox_lab
from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.analysis.patching import activation_patch, attribution_patch, logit_diff, normalize
from neox_lab.analysis.plotting import patching_heatmap
from neox_lab.tokenizer import NeoXTokenizer

IOI = ("When Mary and John went to the store, {} gave a drink to", " Mary", " John")
TARGETS = ("resid_pre", "attn_out", "mlp_out", "z")


def load(model_dir: str | None):
    if model_dir:
        return NeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), "checkpoint"
    why = "neox_lab has no load_default()"
    if hasattr(neox_lab, "load_default"):
        try:
            return neox_lab.load_default().eval(), "default"
        except OSError as err:  # the shipped weights are package data that may be absent
            why = f"load_default() failed: {err}"
    warnings.warn(f"no --model and {why}; using a RANDOM tiny model: the heatmaps only show the pipeline "
                  "working, not a circuit", stacklevel=2)
    cfg = NeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    return NeoXForCausalLM(cfg).eval(), "random"


def ioi_pair(tokenizer):
    """Token ids of the clean / corrupted IOI prompts and the two answers, or None if they misalign."""
    template, good, bad = IOI
    clean = tokenizer.encode(template.format("John"), add_special_tokens=False)
    corrupted = tokenizer.encode(template.format("Mary"), add_special_tokens=False)
    answers = [tokenizer.encode(t, add_special_tokens=False) for t in (good, bad)]
    if len(clean) != len(corrupted) or any(len(a) != 1 for a in answers):
        return None
    labels = [tokenizer.decode([t]) for t in clean]
    return torch.tensor([clean]), torch.tensor([corrupted]), answers[0][0], answers[1][0], labels


def repeated_pair(vocab: int, half: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab, (half,), generator=g)
    b = (a + torch.randint(1, vocab, (half,), generator=g)) % vocab  # differs from A everywhere
    clean = torch.cat([a, a[:-1]])[None]
    corrupted = torch.cat([b, a[:-1]])[None]
    labels = [f"A{i}" for i in range(half)] + [f"A{i}'" for i in range(half - 1)]
    return clean, corrupted, int(a[-1]), int(b[-1]), labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (transformers GPT-NeoX layout)")
    parser.add_argument("--out", default="out/activation_patching", help="where heatmaps go")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    model, kind = load(args.model)
    pair = None
    if kind != "random":
        tokenizer = model.tokenizer or NeoXTokenizer.default()
        pair = ioi_pair(tokenizer)
        if pair is None:
            print("IOI prompts tokenise to different lengths; using a repeated-token pair instead")
    if pair is None:
        pair = repeated_pair(model.cfg.vocab_size)
        print("prompt: repeated random tokens A A[:-1]; corrupted: B A[:-1]; metric: logit(A_last) - "
              "logit(B_last)")
    else:
        print(f"prompt: {IOI[0].format('John')!r} -> {IOI[1]!r}; corrupted subject 'Mary'; "
              f"metric: logit({IOI[1]!r}) - logit({IOI[2]!r})")
    clean, corrupted, good, bad, labels = pair
    metric = logit_diff(good, bad)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    for target in TARGETS:
        res = activation_patch(model, clean, corrupted, metric, target, batch_size=args.batch_size)
        if target == TARGETS[0]:
            print(f"clean metric {float(res.clean_value):+.4f}, corrupted {float(res.corrupted_value):+.4f}")
        norm = normalize(res).values
        per_pos = res.axes[-1] == "pos"
        cols = [f"{i}:{t}" for i, t in enumerate(labels)] if per_pos else [f"H{h}" for h in res.col_labels]
        path = out_dir / f"{target}.png"
        patching_heatmap(norm, row_labels=[f"L{r}" for r in res.row_labels], col_labels=cols,
                         xlabel="position" if per_pos else "head", ylabel="layer",
                         title=f"activation patching: {target} (normalised)", save=path)
        top = norm.flatten().abs().topk(min(3, norm.numel())).indices
        cells = [f"L{int(i) // norm.shape[1]} {cols[int(i) % norm.shape[1]]}={float(norm.flatten()[i]):+.2f}"
                 for i in top]
        attr = attribution_patch(model, clean, corrupted, metric, target)
        exact, approx = (res.values - res.corrupted_value).flatten(), attr.values.flatten()
        corr = float(torch.corrcoef(torch.stack([exact, approx]))[0, 1])
        print(f"{target:>10}: strongest cells {', '.join(cells)}; attribution-vs-exact r={corr:.3f}; "
              f"saved {path}")
    if kind == "random":
        print("note: a random model has no circuit; with a trained model, resid_pre shows the answer's "
              "information moving from the earlier token to the final position across layers.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
