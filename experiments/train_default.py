"""Train the small GPT-NeoX shipped as neox_lab's default model (`neox_lab.load_default()`).

    python experiments/train_default.py                      # the shipped model -> neox_lab/data/default
    python experiments/train_default.py --quick --out /tmp/x # smoke test: a few steps on a few files

The corpus is the Python standard library's own .py sources (every install has them offline), files
in sorted order, every 10th held out; `test`/`tests` directories and site-packages are left out. The
model is neox_lab's own NeoXForCausalLM: parallel residual, partial rotary (rotary_pct 0.25), the
GPT-NeoX-20B tokenizer's ids (vocab 50304 as Pythia), tied embeddings and a small d_model so that the
fp16 weights fit in the package (config.json + model.safetensors <= 12 MB).

Induction heads. Besides corpus windows, training uses short sequences (--syn-len 64 tokens) made of a
span of 4-20 distinct random tokens repeated to fill the sequence, which can only be predicted by
copying: the standard trick for growing induction heads in a small model (read the shipped model's
induction numbers as those of a model trained to copy). Three phases:
  1. steps 0..--core-steps: repeated spans only, drawn from the --core-vocab most frequent train ids;
  2. ..--copy-warmup: repeated spans only, drawn from those ids plus the tokenizer's " word" tokens (the
     tokens `neox_lab.demo` builds its random sequences from);
  3. ..--steps: corpus windows and repeated spans together, the learning rate decaying (cosine).
Why, as measured on this architecture (4 layers x 4 heads, d_model 96): the circuit forms after a plateau
that grows with the context (an untrained head spreads attention over every earlier key, ~1/pos of it on
the target): 256-token repeated sequences mixed 3:5 with code gave no induction head in 500 steps,
64-token ones in a 1:1 token mix none in 600. Alone, 64-token spans over the 4096 most frequent ids form
one at ~225 steps at a constant learning rate, but not over all 20k train ids by step 250 with a
decaying one; and a head formed on some ids does not copy tokens never seen in the spans (so phase 2).

Training history. The weights at --keep-steps (0 is the initialisation) are kept in OUT/checkpoints/stepN
as compact checkpoints (neox_lab.model.compact: int8 matrices with a bfloat16 scale per row, the tied
embedding, 90% of the values, int4 with a scale per 32: ~3.2 MB each, so the package stays under 40 MB);
the shipped model is the last step. Each is measured as stored
and at full precision with the demo's measurement (neox_lab.demo.dynamics), recorded in training.json.
Keeping and measuring reads the weights only. `--measure-kept` trains nothing: it measures the kept
checkpoints and the model already in OUT and rewrites that record. The shipped history (steps 0-250)
came from a rerun of this script that matched the shipped run's loss curve through step 275 and was
stopped there: see training.json, checkpoints.note.

Deterministic on CPU: fixed seed, 2 threads, sorted files, every random draw from one seeded
generator; `torch.use_deterministic_algorithms` guards the kernels. Writes config.json,
model.safetensors (fp16), checkpoints/ and training.json (metrics, loss curve, kept checkpoints, the
exact command, corpus digest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.analysis.induction import measure_induction, repeated_tokens, word_token_ids
from neox_lab.default_model import corpus_files, split_heldout
from neox_lab.demo.dynamics import history_measurement
from neox_lab.model.loading import save_pretrained
from neox_lab.tokenizer import NeoXTokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "neox_lab" / "data" / "default"
EOT = 0  # <|endoftext|> in the GPT-NeoX tokenizer: separates files in the token stream

#: How training windows begin: the shipped model's reason for tokenizing without a BOS by default.
BOS_NOTE = ("none: corpus windows are slices of the token stream starting anywhere (files separated by "
            "<|endoftext|>), and repeated-span sequences start with the span; no BOS is put in front")

MODEL = dict(vocab_size=50304, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=384, rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=True,
             use_parallel_residual=True, bos_token_id=EOT, eos_token_id=EOT)


#: The checkpoints kept during training (weights after that many optimizer steps; 0 is the initialisation).
#: Before (0, 150), during (200: the best code-token induction head at ~0.3) and after (250: ~0.7) the
#: induction phase change; the shipped model (step 800) is the history's last point.
KEEP_STEPS = [0, 150, 200, 250]


def _steps(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",") if s.strip()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: package data)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=6, help="corpus windows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per corpus window")
    p.add_argument("--syn-batch", type=int, default=32, help="repeated-span sequences per step")
    p.add_argument("--syn-len", type=int, default=64, help="tokens per repeated-span sequence")
    p.add_argument("--core-vocab", type=int, default=4096, help="size of the core copy vocabulary: the most "
                   "frequent train ids, which the first --core-steps spans draw from")
    p.add_argument("--core-steps", type=int, default=300)
    p.add_argument("--copy-warmup", type=int, default=450,
                   help="the first steps train on repeated spans only (no corpus windows)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--eval-windows", type=int, default=160, help="held-out windows scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N corpus files")
    p.add_argument("--keep-steps", type=_steps, default=KEEP_STEPS,
                   help="training checkpoints to keep (comma-separated steps before --steps; the shipped model "
                        "is the last): written compactly to OUT/checkpoints/step{N}")
    p.add_argument("--keep-bits", type=int, default=8, choices=(4, 8), help="bits per kept weight value")
    p.add_argument("--keep-group", type=int, default=None,
                   help="values per quantisation scale in kept checkpoints (default: one per row)")
    p.add_argument("--keep-embed-bits", type=int, default=4, choices=(4, 8),
                   help="bits per value of the kept embedding (most of this model's values)")
    p.add_argument("--keep-embed-group", type=int, default=32, help="embedding values per scale")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 12 files, short sequences")
    p.add_argument("--measure-kept", action="store_true",
                   help="train nothing: measure the checkpoints already in OUT/checkpoints and the model in OUT "
                        "as stored, and rewrite the 'checkpoints' record of OUT/training.json")
    p.add_argument("--note", default=None, help="with --measure-kept: where the kept checkpoints came from")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.syn_batch, args.syn_len, args.warmup = 3, 2, 64, 4, 32, 1
        args.eval_windows, args.max_files, args.copy_warmup, args.core_steps = 4, args.max_files or 12, 1, 1
        args.keep_steps = [0, 2]
    if any(not 0 <= s < args.steps for s in args.keep_steps):
        p.error(f"--keep-steps must lie in [0, --steps={args.steps}); the last step is the shipped model itself")
    return args


# ------------------------------------------------------------------------------------------ corpus
def tokenize(files: list[Path], tok: NeoXTokenizer) -> torch.Tensor:
    """One stream: each file's tokens followed by <|endoftext|>."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [i for enc in encodings for i in [*enc.ids, EOT]]
    return torch.tensor(ids, dtype=torch.long)


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository where it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ batches
def make_batch(train: torch.Tensor, vocab_ids: torch.Tensor, args,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Corpus windows [batch seq_len] and repeated random spans [syn_batch syn_len]."""
    starts = torch.randint(0, train.numel() - args.seq_len, (args.batch,), generator=gen)
    corpus = torch.stack([train[s: s + args.seq_len] for s in starts.tolist()])
    rows = []
    for _ in range(args.syn_batch):
        n = int(torch.randint(4, 21, (1,), generator=gen))
        span = vocab_ids[torch.randperm(vocab_ids.numel(), generator=gen)[:n]]
        rows.append(span.repeat(math.ceil(args.syn_len / n))[: args.syn_len])
    return corpus, torch.stack(rows)


def lm_loss(model: NeoXForCausalLM, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # The unembedding applied to positions 0..T-2 only: no full-size slice of the [batch pos 50304] logits.
    hidden = model.model(tokens).last_hidden_state[:, :-1]
    logits = model.unembed(hidden)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction=reduction)


def lr_at(step: int, args) -> float:
    """Linear warmup, the peak through the copy warm-up (a decaying rate stalls the induction head's
    formation), then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    start = max(args.warmup, args.copy_warmup)
    progress = max(0, step - start) / max(1, args.steps - start)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------ evaluation
def eval_windows(held: torch.Tensor, args) -> torch.Tensor:
    """Up to --eval-windows non-overlapping windows spread evenly over the held-out stream."""
    n_all = held.numel() // args.seq_len
    pick = torch.linspace(0, n_all - 1, min(args.eval_windows, n_all)).round().long().unique()
    return held[: n_all * args.seq_len].view(n_all, args.seq_len)[pick]


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor) -> float:
    losses = [lm_loss(model, windows[i: i + 8], reduction="sum") for i in range(0, len(windows), 8)]
    return float(torch.stack(losses).sum() / (windows.shape[0] * (windows.shape[1] - 1)))


def unigram_loss(train: torch.Tensor, windows: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats) of the scored held-out tokens under train unigram counts, add-one smoothed."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[windows[:, 1:].flatten()].mean())


def best_induction(model, tokens: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    score = float(measure_induction(model, tokens, 30).scores.max())
    model.train(was_training)
    return score


def induction_report(model, tokenizer, corpus_ids: torch.Tensor, seed: int) -> dict:
    out = {}
    for name, candidates, n in (("word_tokens", word_token_ids(tokenizer), 30),
                                ("corpus_tokens", corpus_ids, 30), ("word_tokens_n60", word_token_ids(tokenizer), 60)):
        gen = torch.Generator().manual_seed(seed + 1)
        tokens = repeated_tokens(candidates, n, batch=8, bos_token_id=EOT, generator=gen)
        res = measure_induction(model, tokens, n)
        out[name] = {
            "seq": f"bos + 2 x {n} distinct random tokens, batch 8",
            "loss_first_copy": round(float(res.copy_loss[0]), 4),
            "loss_second_copy": round(float(res.copy_loss[1]), 4),
            "scores": [[round(float(v), 4) for v in row] for row in res.scores],
            "top_heads": [{"layer": la, "head": h, "score": round(s, 4)} for la, h, s in res.top_heads(4)],
        }
    return out


# ------------------------------------------------------------------------------------------ kept checkpoints
def _numbers(values: dict) -> dict:
    """A measurement's result for training.json: tensors as (nested) lists, every float kept exactly."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in values.items()
            if k != "loss_per_token"}


def keep_checkpoint(model, step: int, directory: Path, args, measure) -> dict:
    """Write the training model's weights as a compact checkpoint; measure it as stored (what a sweep
    reads) and the full-precision weights it came from (what compression cost)."""
    embedding = {"gpt_neox.embed_in.weight": {"bits": args.keep_embed_bits, "group": args.keep_embed_group}}
    save_pretrained(model, directory, compact={"bits": args.keep_bits, "group": args.keep_group,
                                               "overrides": embedding})
    stored = NeoXForCausalLM.from_pretrained(directory, dtype=torch.float32)
    live = model.state_dict()
    error = max(float((t.double() - live[k].double()).norm() / live[k].double().norm().clamp(min=1e-30))
                for k, t in stored.state_dict().items())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        full = measure(model)
    model.train(was_training)
    return {"step": step, "max_relative_error": error, "stored": _numbers(measure(stored)),
            "full_precision": _numbers(full)}


def history_block(args, kept_dir: Path, records: list[dict], final_step: int) -> dict:
    """training.json's record of the kept checkpoints."""
    return {
        "directory": "checkpoints", "steps": [r["step"] for r in records[:-1]], "final_step": final_step,
        "storage": f"int{args.keep_bits} weight matrices with one bfloat16 scale per "
                   f"{'row' if args.keep_group is None else f'{args.keep_group} values'}, the (tied) "
                   f"embedding int{args.keep_embed_bits} with a scale per {args.keep_embed_group} values, "
                   "other tensors float32 (neox_lab.model.compact); the final step is the shipped model (fp16)",
        "bytes": sum(f.stat().st_size for f in kept_dir.rglob("*") if f.is_file()),
        "measurement": "neox_lab.demo.dynamics.history_measurement: induction score per head on held-out code "
                       "tokens and on ' word' tokens (15 random tokens repeated, 8 sequences, seed 0) and the "
                       "ICL score on held-out code; 'stored' measures the checkpoint as kept, 'full_precision' "
                       "(written by a training run only) the fp32 training weights",
        "records": records,
    }


def measure_kept(args) -> int:
    """--measure-kept: measure OUT/checkpoints/step*/ and the model in OUT as stored; rewrite the record."""
    torch.set_num_threads(args.threads)
    report_path = args.out / "training.json"
    report = json.loads(report_path.read_text())
    measure = history_measurement(NeoXTokenizer.default())
    kept_dir = args.out / "checkpoints"
    dirs = sorted((d for d in kept_dir.glob("step*") if (d / "config.json").is_file()),
                  key=lambda d: int(d.name.removeprefix("step")))
    if not dirs:
        raise SystemExit(f"no kept checkpoints (step*/ with a config.json) in {kept_dir}")
    final_step = report["hyperparameters"]["steps"]
    records = [{"step": int(d.name.removeprefix("step")),
                "stored": _numbers(measure(NeoXForCausalLM.from_pretrained(d, dtype=torch.float32)))} for d in dirs]
    records.append({"step": final_step,
                    "stored": _numbers(measure(NeoXForCausalLM.from_pretrained(args.out, dtype=torch.float32)))})
    block = history_block(args, kept_dir, records, final_step)
    if args.note:
        block["note"] = args.note
    block["measured_by"] = "python experiments/train_default.py --measure-kept"
    report["checkpoints"] = block
    report["model_sha256"] = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    for rec in records:
        best = max(map(max, rec["stored"]["induction_score"]))
        print(f"step {rec['step']}: best induction head {best:.2f}, ICL score {rec['stored']['icl_score']:.3f}")
    print(f"wrote the 'checkpoints' record of {report_path}")
    return 0


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_kept:
        return measure_kept(args)
    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = NeoXTokenizer.default()
    files = corpus_files(args.max_files)
    train_files, held_files = split_heldout(files)
    train, held = tokenize(train_files, tokenizer), tokenize(held_files, tokenizer)
    vocab_ids = torch.unique(train)  # sorted: deterministic
    counts = torch.bincount(train, minlength=MODEL["vocab_size"])
    order = torch.sort(-counts, stable=True).indices  # most frequent first, ties by id
    core_ids = torch.sort(order[: args.core_vocab]).values
    words = word_token_ids(tokenizer)  # what the demo's random sequences are made of
    wide_ids = torch.unique(torch.cat([core_ids, words]))
    print(f"corpus: {len(train_files)} train files ({train.numel():,} tokens), {len(held_files)} held-out "
          f"({held.numel():,} tokens), {vocab_ids.numel():,} distinct train ids [{time.time() - t0:.1f}s]")

    cfg = NeoXConfig(**MODEL)
    model = NeoXForCausalLM(cfg, attn_backend="sdpa").train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    # Fixed probes from their own generator, so probing never changes the training batches.
    probes = {name: repeated_tokens(ids, 30, batch=4, bos_token_id=EOT,
                                    generator=torch.Generator().manual_seed(args.seed + 2))
              for name, ids in (("core", core_ids), ("words", words))}
    # The demo's measurement of the kept checkpoints (neox_lab.demo.dynamics): recorded here to check it by.
    measure = history_measurement(tokenizer)
    kept_dir = args.out / "checkpoints"
    if kept_dir.exists():
        shutil.rmtree(kept_dir)  # a previous run's checkpoints would join this run's history
    kept = []
    curve, tokens_seen, t_train = [], 0, time.time()
    for step in range(args.steps):
        if step in args.keep_steps:
            kept.append(keep_checkpoint(model, step, kept_dir / f"step{step}", args, measure))
            print(f"kept step {step}: best induction head {max(map(max, kept[-1]['stored']['induction_score'])):.2f},"
                  f" ICL score {kept[-1]['stored']['icl_score']:.3f}", flush=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        corpus, synthetic = make_batch(train, core_ids if step < args.core_steps else wide_ids, args, gen)
        # every predicted token weighs the same, whichever kind of sequence it is in
        if step < args.copy_warmup:
            corpus = corpus[:0]  # drawn all the same, so the batches after the warm-up do not depend on it
        corpus_sum = lm_loss(model, corpus, "sum") if len(corpus) else torch.zeros(())
        synthetic_sum = lm_loss(model, synthetic, "sum")
        tokens_seen += corpus.numel() + synthetic.numel()
        loss = (corpus_sum + synthetic_sum) / (corpus[:, 1:].numel() + synthetic[:, 1:].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            rate = tokens_seen / elapsed
            corpus_loss = corpus_sum.item() / max(1, corpus[:, 1:].numel())
            point = {"step": step, "loss": round(loss.item(), 4), "corpus_loss": round(corpus_loss, 4),
                     "elapsed_s": round(elapsed, 1)}
            if step % 100 == 0 or step == args.steps - 1:  # when does the induction head form?
                for name, probe in probes.items():
                    point[f"best_induction_{name}"] = round(best_induction(model, probe), 4)
            curve.append(point)
            note = "".join(f"  induction[{name}] {point[f'best_induction_{name}']:.2f}"
                           for name in probes if f"best_induction_{name}" in point)
            print(f"step {step:4d}  loss {loss.item():.3f} (code {corpus_loss:.3f})  lr {lr_at(step, args):.2e}  "
                  f"{rate:,.0f} tok/s  [{elapsed:.0f}s]{note}", flush=True)
    train_s = time.time() - t_train

    model.eval()
    windows = eval_windows(held, args)
    model.half().float()  # score what ships: the fp16-rounded weights (in place)
    heldout = heldout_loss(model, windows)
    unigram = unigram_loss(train, windows, cfg.vocab_size)
    induction = induction_report(model, tokenizer, vocab_ids, args.seed)
    print(f"held-out loss {heldout:.3f} nats/token vs unigram baseline {unigram:.3f} "
          f"({windows.numel():,} held-out tokens)")
    for name, rep in induction.items():
        tops = ", ".join(f"L{h['layer']}H{h['head']} {h['score']:.2f}" for h in rep["top_heads"])
        print(f"induction ({name}): loss first copy {rep['loss_first_copy']:.2f}, second copy "
              f"{rep['loss_second_copy']:.2f}; top heads {tops}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)  # no tokenizer: load_default attaches the package's own
    shipped = NeoXForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    kept.append({"step": args.steps, "stored": _numbers(measure(shipped))})
    command = "python experiments/train_default.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "model": MODEL,
        "hyperparameters": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": {
            "source": "Python standard library .py files (sysconfig stdlib path), sorted; test/tests and "
                      "site-packages excluded; every 10th file held out",
            "python": platform.python_version(),
            "train_files": len(train_files), "heldout_files": len(held_files),
            "train_tokens": train.numel(), "heldout_tokens": held.numel(), "train_sha256_16": digest(train),
            "heldout_sha256_16": digest(held),
        },
        "synthetic": f"{args.syn_batch} sequences of {args.syn_len} tokens per step (a span of 4-20 distinct "
                     f"random token ids repeated), alone for {args.copy_warmup} steps (from the "
                     f"{args.core_vocab} most frequent train ids for the first {args.core_steps}, then those "
                     f"plus {words.numel()} ' word' tokens), then beside {args.batch} corpus windows of "
                     f"{args.seq_len}",
        # What HookedTransformer's cfg.default_prepend_bos (False, TransformerLens' GPT-NeoX setting) rests on.
        "prepend_bos": BOS_NOTE,
        # What reproducing this run must give, byte for byte (training is deterministic on CPU).
        "model_sha256": hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest(),
        "heldout_loss": round(heldout, 4), "unigram_loss": round(unigram, 4),
        "heldout_tokens_scored": int(windows[:, 1:].numel()),
        "induction": induction,
        "checkpoints": history_block(args, kept_dir, kept, args.steps),
        "loss_curve": curve,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__, "threads": args.threads,
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    size = sum((args.out / f).stat().st_size for f in ("config.json", "model.safetensors"))
    print(f"wrote {args.out} (config + weights {size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
