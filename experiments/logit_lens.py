"""The logit lens: how the prediction forms layer by layer, on code and on a repeated random sequence.

    python experiments/logit_lens.py                               # the shipped model, built-in snippet
    python experiments/logit_lens.py --model DIR --file some.py --out DIR

The residual stream after each layer is put through the final LayerNorm and the unembedding. For each
depth it prints the top-1 accuracy against the actual next token and the mean probability of that
token, on (a) Python source and (b) the second copy of a repeated random word sequence, where only an
induction circuit can predict: there the prediction should appear only after the induction layer.
Saves logit_lens_code.png and logit_lens_repeated.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from neox_lab import NeoXForCausalLM
from neox_lab.analysis import plotting
from neox_lab.analysis.induction import repeated_tokens, word_token_ids
from neox_lab.analysis.logit_lens import logit_lens
from neox_lab.default_model import load_or_default

SNIPPET = '''def read_lines(path):
    """Return the lines of a text file."""
    with open(path) as f:
        return [line.rstrip() for line in f]


for line in read_lines(path):
    print(line)
'''


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--out", type=Path, default=Path("logit_lens_out"), help="figure directory")
    p.add_argument("--file", type=Path, default=None, help="text to read (default: a built-in snippet)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens of the text to use")
    p.add_argument("--n", type=int, default=10, help="span length of the repeated random sequence")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(model_dir):
    return load_or_default(model_dir, cls=NeoXForCausalLM, dtype=torch.float32)


def report(name: str, lens, tokens: torch.Tensor, start: int) -> None:
    """Per depth: top-1 accuracy and mean p(next token) over positions start .. end-1."""
    target = tokens[0, start + 1:]
    print(f"{name}: {target.numel()} predictions")
    for d, label in enumerate(lens.labels):
        acc = float((lens.top_ids[d, 0, start:-1] == target).float().mean())
        prob = float(lens.target_probs[d, 0, start:-1].mean())
        print(f"  {label:>9s}: top-1 accuracy {acc:.2f}, mean p(next) {prob:.3f}")


def plot(lens, tokens, tok, title: str, path: Path) -> None:
    decode = lambda ids: [tok.decode([int(i)]) for i in ids]  # noqa: E731
    plotting.logit_lens([decode(row) for row in lens.top_ids[:, 0]], lens.top_probs[:, 0],
                        layer_labels=lens.labels, position_labels=decode(tokens[0]), title=title, save=path)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load(args.model)
    tok = model.tokenizer
    text = args.file.read_text(encoding="utf-8", errors="replace") if args.file else SNIPPET
    code = torch.tensor([tok.encode(text)[: args.max_tokens]])
    if code.shape[1] < 2:
        raise SystemExit("the text has fewer than 2 tokens")
    code_lens = logit_lens(model, code)
    report("code", code_lens, code, 0)

    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    candidates = word_token_ids(tok)
    candidates = candidates[candidates < model.cfg.vocab_size]
    gen = torch.Generator().manual_seed(args.seed)
    rep = repeated_tokens(candidates, args.n, batch=1, bos_token_id=bos, generator=gen)
    rep_lens = logit_lens(model, rep)
    report("repeated random words, second copy", rep_lens, rep, 1 + args.n)

    final = rep_lens.target_probs[:, 0, 1 + args.n:-1].mean(-1)
    jump = max(range(1, len(final)), key=lambda d: float(final[d] - final[d - 1]))
    if not math.isnan(float(final[jump])):
        print(f"the copied token's probability rises most at '{rep_lens.labels[jump]}' "
              f"({float(final[jump - 1]):.2f} -> {float(final[jump]):.2f})")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(code_lens, code, tok, "Logit lens on Python source", args.out / "logit_lens_code.png")
    plot(rep_lens, rep, tok, "Logit lens on a repeated random sequence", args.out / "logit_lens_repeated.png")
    print(f"figures: {args.out / 'logit_lens_code.png'}, {args.out / 'logit_lens_repeated.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
