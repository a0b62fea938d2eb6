"""Circuit discovery end to end on a model bigger than the shipped one: every method's time, its rank
agreement with exact edge patching, and how much of the metric its top 5% of edges recover.

    python experiments/circuit_discovery.py                       # trained-like random 6 x 8, d_model 256
    python experiments/circuit_discovery.py --layers 8 --heads 8 --sequential
    python experiments/circuit_discovery.py --model default       # the shipped model, more prompts than the demo
    python experiments/circuit_discovery.py --quick               # tiny sizes, seconds (the smoke test)

The task is the demo's (neox_lab/demo/circuits.py): [bos] A A[:-1] with the first copy's A[-2] replaced
by another token X; metric logit(A[-1]) - logit(X) at the last position, every run unembedding only
that position. A random model has no induction circuit, so there the numbers measure the methods (time,
agreement, faithfulness of their top edges), not a mechanism. "trained-like" weights
(`neox_lab.testing.pairs.make_trained_like`) have random biases and LayerNorms and sharp attention, so
the attributions are far from uniform.
"""

from __future__ import annotations

import argparse
import time

import torch

import neox_lab
from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.analysis.induction import word_token_ids
from neox_lab.circuits import Graph, attribute, evaluate_many
from neox_lab.circuits.agreement import spearman
from neox_lab.demo.circuits import make_circuit_prompts
from neox_lab.patching import logit_diff
from neox_lab.testing.pairs import make_trained_like

METHODS = ("exact", "EAP", "EAP-IG", "EAP-IG-activations")


def build(args):
    if args.model == "default":
        model = neox_lab.load_default().eval()
        words = word_token_ids(model.tokenizer)
        return model, words[words < model.cfg.vocab_size]
    cfg = NeoXConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.d_model, rotary_pct=0.25,
                     use_parallel_residual=not args.sequential, max_position_embeddings=256)
    torch.manual_seed(args.seed)
    model = make_trained_like(NeoXForCausalLM(cfg).eval(), args.seed, std=0.1, bias_std=0.05)
    return model, torch.arange(1, args.vocab)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("random", "default"), default="random")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke test")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sequential", action="store_true", help="sequential residual (default: parallel)")
    parser.add_argument("--batch", type=int, default=4, help="prompt pairs")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each gradient method, best kept (the first pays one-time setup)")
    parser.add_argument("--span", type=int, default=10, help="tokens per copy")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward")
    parser.add_argument("--budget", type=float, default=0.05, help="circuit size as a fraction of the edges")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.heads, args.d_model, args.vocab, args.batch, args.span = 2, 2, 32, 128, 2, 5
    if args.threads:
        torch.set_num_threads(args.threads)

    model, candidates = build(args)
    graph = Graph.from_model(model)
    prompts = make_circuit_prompts(candidates, args.batch, 0, torch.Generator().manual_seed(args.seed), args.span)
    metric = logit_diff(prompts.answer, prompts.wrong)
    run = dict(logits_to_keep=1, batch_size=args.batch_size)
    cfg = model.cfg
    print(f"model: {args.model}, {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, d_model "
          f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {'parallel' if cfg.use_parallel_residual else 'sequential'}"
          f" residual; {len(graph)} edges; {args.batch} prompt pairs of {prompts.clean.shape[1]} tokens; "
          f"{torch.get_num_threads()} thread(s)")

    scores, seconds = {}, {}
    for method in METHODS:
        seconds[method] = float("inf")
        for _ in range(1 if method == "exact" else max(1, args.repeats)):  # exact: long enough as it is
            start = time.perf_counter()
            scores[method] = attribute(model, graph, prompts.clean, prompts.corrupted, metric, method,
                                       ig_steps=args.ig_steps, **run)
            seconds[method] = min(seconds[method], time.perf_counter() - start)

    budget = max(1, int(args.budget * len(graph)))
    circuits = [graph.prune(graph.top_edges(scores[m], budget)) for m in METHODS]
    clean, corrupted, *values = evaluate_many(model, graph, [graph.edges, [], *circuits], prompts.clean,
                                              prompts.corrupted, metric, **run)
    print(f"metric: clean {clean:.3f}, corrupted {corrupted:.3f}; circuits: top {budget} edges by |score|, pruned")
    if abs(clean - corrupted) < 0.1 * max(1.0, abs(clean)):
        print("note: the corruption barely moves this model's metric (random weights have no induction "
              "circuit), so the recovered fractions below are ratios of small numbers; time and agreement "
              "still compare the methods")
    print(f"{'method':>19}  {'time s':>8}  {'Spearman':>8}  {'|s| Spearman':>12}  {'edges':>5}  recovered")
    for method, circuit, value in zip(METHODS, circuits, values):
        rho = spearman(scores[method], scores["exact"])
        rho_abs = spearman(scores[method], scores["exact"], absolute=True)
        fraction = (value - corrupted) / (clean - corrupted) if clean != corrupted else float("nan")
        print(f"{method:>19}  {seconds[method]:8.2f}  {rho:8.3f}  {rho_abs:12.3f}  {len(circuit):5d}  {fraction:8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
