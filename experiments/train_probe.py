"""Linear probes for "this token is inside a string literal / a comment", trained from a store's stream.

    python experiments/train_probe.py                   # the shipped model, ~400 stdlib chunks (a minute)
    python experiments/train_probe.py --files 8 --chunks 30 --epochs 1   # the smoke-test size

1. Corpus: the Python standard library's own .py files (every install has them), cut into chunks of
   at least --lines lines, each starting outside any string literal, written as a .jsonl.zst when
   zstandard is installed (else .jsonl) and streamed from there by `cache_dataset`, like any corpus.
2. Labels: Python's `tokenize` marks each file's string literals (quotes included) and comments; a model
   token is "in a string" / "in a comment" when its first character is. Character offsets come from
   the tokenizer itself.
3. Cache: `hook_embed` and the residual stream after --layer of the shipped model (`load_default`),
   every chunk cut to --context tokens, into a store in a temporary folder (or --store).
4. Probe: logistic regression on each hook, trained with Adam from `store.stream(...)` (shuffled,
   normalised with the stored statistics), documents split 4:1 into train and held-out by their index.
   The embedding probe sees only the token itself, so the gap to the residual-stream probe is what the
   model's context adds (a quote token is often, but not always, a string's first or last character).

Prints held-out accuracy of each probe and of always answering the majority class.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import sysconfig
import tempfile
import tokenize
from pathlib import Path

import numpy as np
import torch

from neox_lab import load_default
from neox_lab.store.reader import ActivationStore
from neox_lab.store.writer import cache_dataset

STRING_TOKENS = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                      "FSTRING_END") if hasattr(tokenize, n)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=60, help="stdlib files to read (sorted by path)")
    p.add_argument("--lines", type=int, default=12, help="lines per document")
    p.add_argument("--chunks", type=int, default=400, help="documents to cache at most")
    p.add_argument("--context", type=int, default=96, help="tokens per window")
    p.add_argument("--layer", type=int, default=None, help="residual stream after this block (default: the last)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512, help="tokens per probe step")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", help="folder for the store (default: a temporary one, deleted afterwards)")
    return p.parse_args(argv)


#: Character classes; a probe is trained for each but CODE.
CODE, STRING, COMMENT = 0, 1, 2
TASKS = {"inside a string literal": STRING, "inside a comment": COMMENT}


def char_classes(source: str) -> np.ndarray | None:
    """CODE / STRING (quotes included) / COMMENT for each character of a Python file (None if it does
    not tokenize)."""
    starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
    classes = np.full(len(source), CODE, dtype=np.uint8)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            kind = STRING if tok.type in STRING_TOKENS else COMMENT if tok.type == tokenize.COMMENT else None
            if kind is not None:
                a = starts[tok.start[0] - 1] + tok.start[1]
                b = starts[tok.end[0] - 1] + tok.end[1]
                classes[int(a) : int(b)] = kind
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    return classes


def corpus(n_files: int, lines: int, max_chunks: int) -> list[tuple[str, np.ndarray]]:
    """(text, class of each character) of chunks of the standard library's .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))
    chunks = []
    for path in files[:n_files]:
        source = path.read_text(encoding="utf-8", errors="replace")
        flag = char_classes(source)
        if flag is None or not flag.any():
            continue
        # A chunk starts only at a line outside any string, so whether a token is in a string is always
        # decidable from the chunk itself (a chunk starting inside a docstring would make labels guesses).
        starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
        a = 0
        for i in range(len(starts) - 1):
            b = int(starts[i + 1])
            at_line_end = i + 1 == len(starts) - 1 or flag[min(b, len(flag) - 1)] != STRING
            if starts[i + 1] - starts[a] and (i + 1 - a >= lines and at_line_end or i + 1 == len(starts) - 1):
                text = source[int(starts[a]) : b]
                if text.strip():
                    chunks.append((text, flag[int(starts[a]) : b]))
                a = i + 1
                if len(chunks) >= max_chunks:
                    return chunks
    return chunks


def write_jsonl(chunks, folder: Path) -> Path:
    lines = "".join(json.dumps({"text": text}) + "\n" for text, _ in chunks).encode()
    try:
        import zstandard
    except ImportError:
        path = folder / "corpus.jsonl"
        path.write_bytes(lines)
        return path
    path = folder / "corpus.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    return path


def token_labels(chunks, tokenizer, context: int) -> list[np.ndarray]:
    """Per document: the class of each of its first `context` tokens (that of its first character)."""
    labels = []
    for text, flag in chunks:
        offsets = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets[:context]
        labels.append(np.array([flag[min(a, len(flag) - 1)] for a, _ in offsets], dtype=np.uint8))
    return labels


def train_probe(store: ActivationStore, hook: str, label_of, args) -> tuple[float, float]:
    """Held-out accuracy of a logistic-regression probe on `hook`, and the majority-class accuracy."""
    torch.manual_seed(args.seed)
    d = int(np.prod(store[hook].shape[1:]))
    probe = torch.nn.Linear(d, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=args.lr)
    stream = store.stream(hook, batch_size=args.batch_size, buffer_tokens=max(4 * args.batch_size, 4096),
                          seed=args.seed, meta=True, normalize="center_scale", drop_last=False)
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        for batch in stream:
            train = batch["doc_ids"] % 5 != 0
            if not train.any():
                continue
            x, y = batch[hook][train].reshape(-1, d), label_of(batch)[train]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(-1), y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    correct = total = positives = 0
    with torch.no_grad():
        for batch in store.stream(hook, batch_size=4096, shuffle=False, meta=True, normalize="center_scale",
                                  drop_last=False):
            held = batch["doc_ids"] % 5 == 0
            x, y = batch[hook][held].reshape(-1, d), label_of(batch)[held]
            correct += int(((probe(x).squeeze(-1) > 0) == y).sum())
            total += len(y)
            positives += int(y.sum())
    return correct / total, max(positives, total - positives) / total


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load_default()
    layer = model.cfg.num_hidden_layers - 1 if args.layer is None else args.layer
    hooks = ["hook_embed", f"blocks.{layer}.hook_resid_post"]
    chunks = corpus(args.files, args.lines, args.chunks)
    if len(chunks) < 5:
        raise SystemExit("too few stdlib chunks with string literals; raise --files")
    labels = token_labels(chunks, model.tokenizer, args.context)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(chunks, Path(tmp))
        out = Path(args.store) if args.store else Path(tmp) / "store"
        store = cache_dataset(model, data, hooks, out, context_size=args.context, batch_size=16,
                              dtype=torch.float32, progress=False)
        table = np.zeros((len(chunks), args.context), dtype=np.uint8)
        for d, classes in enumerate(labels):
            table[d, : len(classes)] = classes
        # The store's token ids must be the ones the labels were computed on.
        for d in (0, len(chunks) - 1):
            span = store.document(d)
            ids = model.tokenizer.backend_tokenizer.encode(chunks[d][0], add_special_tokens=False).ids
            assert store.tokens(span.start, span.stop).tolist() == ids[: args.context], "tokens differ"
        n_labelled = sum(map(len, labels))
        shares = ", ".join(f"{task} {(table == c).sum() / n_labelled:.2f}" for task, c in TASKS.items())
        print(f"corpus: {len(chunks)} chunks of >= {args.lines} lines from {args.files} stdlib files ({data.name}); "
              f"store: {len(store):,} tokens, {len(store.shards)} shards; token shares: {shares}")
        results = {}
        for task, cls in TASKS.items():
            label_of = lambda batch, cls=cls: torch.from_numpy(
                table[batch["doc_ids"].numpy(), batch["positions"].numpy()] == cls)
            results[task] = {hook: train_probe(store, hook, label_of, args) for hook in hooks}
        store.close()
    print("held-out accuracy of linear probes (documents split 4:1 by index):")
    print(f"| probe on | {' | '.join(TASKS)} |")
    print("|---|" + "---|" * len(TASKS))
    print("| majority class | " + " | ".join(f"{next(iter(r.values()))[1]:.3f}" for r in results.values()) + " |")
    for hook in hooks:
        print(f"| {hook} | " + " | ".join(f"{r[hook][0]:.3f}" for r in results.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
