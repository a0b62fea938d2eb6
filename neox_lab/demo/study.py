"""The demo: a small interpretability study of a NeoX model, end to end, with figures.

    result = neox_lab.demo.run_demo()            # the shipped model, figures into ./neox_lab_demo
    result = run_demo(model, out_dir="out")      # any NeoXForCausalLM with a tokenizer

1. Induction heads: on repeated random word tokens, each head's induction score (mean attention from
   a second-copy token to the token after its first occurrence) and the loss on each copy.
2. Activation patching: clean prompt ``[bos] A_0..A_9 A_0..A_5`` (answer A_6, by induction), corrupted
   prompt with the first copy's A_6 replaced by a new token R (so the model answers R). The metric is
   logit(A_6) - logit(R) at the last position; the clean residual stream is patched into the corrupted
   run one (layer, position) at a time (`hook_resid_pre`) and one head at a time (`hook_z`, every
   position) by `neox_lab.analysis.patching.activation_patch`, reported as the fraction of the
   clean-corrupted gap restored.
3. The logit lens on the clean prompt.
4. Circuit discovery (`demo/circuits.py`): the induction circuit found by EAP-IG among the graph's edges,
   checked against exact edge patching and evaluated with every other edge corrupted.
5. Training dynamics (the shipped model): its kept training checkpoints swept in one model
   (`neox_lab.sweep_checkpoints`), induction and in-context-learning scores against step, and the step
   where the induction heads appear (`dynamics.py`).
Figures go through `neox_lab.plotting`; `summary.txt` says what was found.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis import plotting
from ..analysis.induction import InductionResult, measure_induction, repeated_tokens, word_token_ids
from ..analysis.logit_lens import LogitLens, logit_lens
from ..analysis.patching import activation_patch, logit_diff
from ..default_model import load_or_default
from ..model.shipped import DEFAULT_MODEL_ID
from ..model.tasks import NeoXForCausalLM
from .circuits import CircuitResult, circuit_figures, study_circuit
from .dynamics import DynamicsResult, run_dynamics
from .summary import induction_heads, summarize, token_strs

__all__ = ["DemoResult", "PatchingPrompts", "make_patching_prompts", "run_demo"]

SPAN, ANSWER_AT = 10, 6  # patching prompt: a span of 10 words, then its first 6 again


@dataclass
class PatchingPrompts:
    clean: torch.Tensor  # [batch pos]
    corrupted: torch.Tensor  # [batch pos], differs from clean at `position` only
    answer: torch.Tensor  # [batch] the clean prompt's induction answer
    wrong: torch.Tensor  # [batch] the corrupted prompt's answer
    position: int  # where clean and corrupted differ
    span: int  # length of the first copy; the second (partial) copy starts at 1 + span


@dataclass
class DemoResult:
    """Everything the demo computed, plus its figures (matplotlib Figures) and the files it wrote."""

    out_dir: Path
    model_name: str
    model_cfg: object
    induction: InductionResult
    prompts: PatchingPrompts
    clean_diff: float
    corrupted_diff: float
    resid_patch: torch.Tensor  # [n_layers pos] fraction of the logit difference restored
    head_patch: torch.Tensor  # [n_layers n_heads]
    lens: LogitLens
    dynamics: DynamicsResult | None = None  # the training-history sweep (shipped model only)
    tokens: dict = field(default_factory=dict)  # labels used in the figures
    figures: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    summary: str = ""
    wall_s: float = 0.0
    circuit: CircuitResult | None = None


def make_patching_prompts(candidates: torch.Tensor, batch: int, bos: int,
                          gen: torch.Generator) -> PatchingPrompts:
    """Clean/corrupted induction prompts (see the module docstring), `batch` different spans."""
    draws = repeated_tokens(candidates, SPAN + 1, batch=batch, repeats=1, bos_token_id=None, generator=gen)
    span, fresh = draws[:, :SPAN], draws[:, SPAN]  # fresh: a word not in the span
    bos_col = torch.full((batch, 1), bos, dtype=torch.long)
    clean = torch.cat([bos_col, span, span[:, :ANSWER_AT]], dim=1)
    corrupted = clean.clone()
    corrupted[:, 1 + ANSWER_AT] = fresh
    return PatchingPrompts(clean, corrupted, span[:, ANSWER_AT], fresh, 1 + ANSWER_AT, SPAN)


def _load(model) -> tuple:
    """(model, the name the summary gives it) for run_demo's `model` argument."""
    if model is None or isinstance(model, (str, Path)):
        name = "neox-lab/default (shipped)" if model is None else str(model)
        return load_or_default(model, cls=NeoXForCausalLM, dtype=torch.float32), name
    # Either convention's class: the study runs the transformers view (the same modules and weights).
    return model.hf(), type(model).__name__


def run_demo(model=None, out_dir: str | Path = "neox_lab_demo", *, progress: bool = True, seed: int = 0,
             batch: int = 8, history="auto") -> DemoResult:
    """Run the study on `model` (None: the shipped model; a path: a checkpoint directory; or a loaded
    `NeoXForCausalLM` or `HookedTransformer` with `.tokenizer`), write PNG figures and summary.txt into
    `out_dir`.

    `history`: the training checkpoints section 5 sweeps ("auto": the shipped model's, when `model` is
    the shipped model, else none; or anything `sweep_checkpoints` takes; None skips the section)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shipped = model is None or (isinstance(model, str) and model == DEFAULT_MODEL_ID)
    if history == "auto":
        history = DEFAULT_MODEL_ID if shipped else None
    stages = tqdm(total=8, desc="neox-lab demo", disable=not progress, unit="stage")

    stages.set_postfix_str("loading model")
    model, model_name = _load(model)
    model.eval()
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the demo needs a model with a tokenizer (model.tokenizer is None)")
    bos = tok.eos_token_id if tok.bos_token_id is None else tok.bos_token_id
    candidates = word_token_ids(tok)
    candidates = candidates[candidates < model.cfg.vocab_size]
    gen = torch.Generator().manual_seed(seed)
    stages.update()

    stages.set_postfix_str("induction heads")
    ind_tokens = repeated_tokens(candidates, 15, batch=2 * batch, bos_token_id=bos, generator=gen)
    induction = measure_induction(model, ind_tokens, 15)
    stages.update()

    stages.set_postfix_str("patching")
    prompts = make_patching_prompts(candidates, batch, bos, gen)
    metric = logit_diff(prompts.answer, prompts.wrong)  # at the last position, mean over the prompts
    # Only the last position is scored, so only it is unembedded: with a 50k vocabulary the full
    # [batch pos vocab] logits of every patched run would cost far more than the blocks do.
    resid, heads = (activation_patch(model, prompts.clean, prompts.corrupted, metric, target, batch_size=512,
                                     logits_to_keep=1) for target in ("resid_pre", "z"))
    clean_diff, corrupted_diff = float(resid.clean_value), float(resid.corrupted_value)
    gap = clean_diff - corrupted_diff
    gap = gap if abs(gap) > 1e-6 else 1e-6
    resid_patch, head_patch = (resid.values - corrupted_diff) / gap, (heads.values - corrupted_diff) / gap
    stages.update()

    stages.set_postfix_str("logit lens")
    lens = logit_lens(model, prompts.clean[:1])
    stages.update()

    stages.set_postfix_str("circuit discovery")
    heads = [(layer, head) for layer, head, _ in induction_heads(induction.scores)]
    circuit = study_circuit(model, candidates, bos, gen, batch=batch, induction_heads=heads)
    stages.update()

    stages.set_postfix_str("training dynamics")
    # The shipped history ends with the shipped model, so sweeping it through the shipped model we loaded
    # leaves that model as it was; any other model is not touched (the sweep makes its own).
    reuse = model if shipped and history == DEFAULT_MODEL_ID else None
    dynamics = None if history is None else run_dynamics(history, tok, model=reuse, out_dir=out_dir,
                                                         progress=False)
    stages.update()

    stages.set_postfix_str("figures")
    result = DemoResult(out_dir, model_name, model.cfg, induction, prompts, clean_diff, corrupted_diff,
                        resid_patch, head_patch, lens, dynamics, circuit=circuit)
    _figures(result, tok)
    if dynamics is not None:
        result.figures["training_dynamics"] = dynamics.figure
        result.files.update(dynamics.files)
    stages.update()

    stages.set_postfix_str("summary")
    result.wall_s = time.time() - t0
    result.summary = summarize(result, tok)
    result.files["summary"] = out_dir / "summary.txt"
    result.files["summary"].write_text(result.summary)
    stages.update()
    stages.close()
    return result


def _figures(res: DemoResult, tok) -> None:
    L = res.induction.scores.shape[0]
    words = token_strs(tok, res.induction.tokens[0])
    top = res.induction.top_heads(3)
    patterns = torch.stack([res.induction.patterns[layer][0, head] for layer, head, _ in top])
    clean = token_strs(tok, res.prompts.clean[0])
    pos_labels = [t + ("*" if p == res.prompts.position else "") for p, t in enumerate(clean)]
    lens_tops = [token_strs(tok, row) for row in res.lens.top_ids[:, 0]]
    res.tokens = {"induction": words, "patching": pos_labels}
    span = res.induction.n
    specs = {
        "induction_scores": lambda p: plotting.induction_scores(
            res.induction.scores, title=f"Induction scores (random words repeated, period {span})", save=p),
        "induction_heads": lambda p: plotting.attention_patterns(
            patterns, words, labels=[f"L{la}H{h} (score {s:.2f})" for la, h, s in top], ncols=3,
            title="Top induction heads: attention to the token after the previous occurrence", save=p),
        "patching_resid": lambda p: plotting.patching_heatmap(
            res.resid_patch, row_labels=[f"L{layer}" for layer in range(L)], col_labels=pos_labels,
            xlabel="position (* = corrupted token)", ylabel="resid_pre of layer",
            title="Patching the residual stream: logit-diff gap restored", save=p,
            cbar_label="fraction restored"),
        "patching_heads": lambda p: plotting.patching_heatmap(
            res.head_patch, row_labels=[f"L{layer}" for layer in range(L)],
            col_labels=[f"H{h}" for h in range(res.head_patch.shape[1])], xlabel="head", ylabel="layer",
            title="Patching head outputs (hook_z): logit-diff gap restored", save=p,
            cbar_label="fraction restored"),
        "logit_lens": lambda p: plotting.logit_lens(
            lens_tops, res.lens.top_probs[:, 0], layer_labels=res.lens.labels, position_labels=clean,
            title="Logit lens: top prediction after each layer (clean patching prompt)", save=p),
    }
    for name, draw in specs.items():
        path = res.out_dir / f"{name}.png"
        res.figures[name] = draw(path)
        res.files[name] = path
    if res.circuit is not None:
        for name, (fig, path) in circuit_figures(res.circuit, res.out_dir).items():
            res.figures[name], res.files[name] = fig, path
