"""`neox-lab compare` on legitimate variants and injected bugs of a trained-like checkpoint.

    python experiments/compare_variants.py [--layers 6] [--out DIR]

Builds a 6-layer Pythia-14m-shaped checkpoint (d_model 128, 4 heads, d_mlp 512, rotary_pct 0.25,
vocab 128 so that a transposed unembedding keeps its shape) with trained-like statistics
(`make_trained_like`: weights ~N(0, 0.2), random biases and LayerNorms, attention-score rms ~3-10),
then runs the CLI at its default settings on
- legitimate variants: the margin is bound / error of the worst hook (> 1 passes), and of the KL;
- every bug class of `neox_lab.testing.mutations`: exit code and the place the report names first;
- lossy conversions: int8 per-channel weights in --mode lossy and exact, and int8 plus a zeroed
  attention bias; plus the largest activation error per (delta_max sqrt(depth)), which calibrates
  `lossy.ACTIVATION_GAIN`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from neox_lab import NeoXForCausalLM
from neox_lab.cli import main
from neox_lab.testing.mutations import MUTATIONS
from neox_lab.testing.pairs import make_trained_like, tiny_config


def checkpoint(layers: int) -> NeoXForCausalLM:
    cfg = tiny_config(num_hidden_layers=layers, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                      rotary_pct=0.25, vocab_size=128, max_position_embeddings=2048)
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(cfg).eval(), seed=0, std=0.2)


def run_cli(args: list[str]) -> tuple[int, dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(["compare", *args, "--json", str(out)])
        secs = time.perf_counter() - t0
        return code, (json.loads(out.read_text()) if out.exists() else {}), secs


def margin(report: dict) -> tuple[float, str, float]:
    """bound / error of the worst hook (inf when every hook is exact), and that hook."""
    worst, name = 0.0, "-"
    for h in report["hooks"] + ((report.get("padded") or {}).get("hooks") or []) + \
            ((report.get("probe") or {}).get("hooks") or []):
        r = (h["rel"] or math.inf) / h["bound"] if h["rel"] else 0.0
        if r > worst:
            worst, name = r, h["name"]
    lg = report.get("logits")
    kl = lg["kl_bound"] / lg["kl_mean"] if lg and lg["kl_mean"] else math.inf
    return (1 / worst if worst else math.inf), name, kl


def int8(model, zero_bias_layer: int | None = None):
    """Symmetric per-output-channel int8 round trip of every weight matrix (biases, LayerNorms kept)."""
    q = NeoXForCausalLM(model.cfg).eval()
    q.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(-1, keepdim=True) / 127
                p.copy_((p / scale).round().clamp(-127, 127) * scale)
        if zero_bias_layer is not None:
            q.model.blocks[zero_bias_layer].attn.out.bias.zero_()
    return q


def main_(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp())
    base = checkpoint(args.layers)
    last = args.layers - 1
    base.save_pretrained(root / "base")
    b = str(root / "base")
    resaved = NeoXForCausalLM.from_pretrained(b)
    resaved.save_pretrained(root / "resaved")

    print("## legitimate variants (default settings unless stated)")
    print(f"{'variant':<44} {'exit':>4} {'margin':>9} {'worst hook':<32} {'KL margin':>9} {'time':>6}")
    variants = {
        "copy (fp64 default)": [b, b],
        "re-saved copy": [str(root / "resaved"), b],
        "vs transformers sdpa (fp64, the default)": [b, "hf:" + b],
        "vs transformers eager (fp64: exit 4, its NaN)": [b, "hf:" + b, "--backend-b", "eager"],
        "vs transformers eager, fp32": [b, "hf:" + b, "--backend-b", "eager", "--dtype", "float32"],
        "sdpa vs eager, fp64": [b, b, "--backend-a", "sdpa"],
        "sdpa vs eager, fp32": [b, b, "--backend-a", "sdpa", "--dtype", "float32"],
        "fp32 vs fp64": [b, b, "--dtype-a", "float32"],
        "fp16 vs fp32": [b, b, "--dtype-a", "float16", "--dtype-b", "float32"],
        "bf16 vs fp32": [b, b, "--dtype-a", "bfloat16", "--dtype-b", "float32"],
    }
    for label, cli in variants.items():
        code, rep, secs = run_cli(cli)
        m, name, kl = margin(rep)
        print(f"{label:<44} {code:>4} {m:>9.3g} {name:<32} {kl:>9.3g} {secs:>5.1f}s")

    print("\n## injected bugs (default settings: fp64 on CPU)")
    print(f"{'bug':<22} {'exit':>4}  named first / first activation divergence")
    for name, bug in MUTATIONS.items():
        kw = {"layer": last} if name in ("one_weight_element", "bias_zeroed") else {}
        kw = {"layer": min(3, last), "i": 1, "j": 2} if name == "head_permutation" else kw
        kw = {"i": 1, "j": 2} if name == "layer_swap" else kw
        broken, _ = bug(base, **kw)
        broken.save_pretrained(root / name)
        code, rep, _ = run_cli([str(root / name), b])
        first = rep.get("first_divergence") or {}
        where = f"{first.get('name')} heads {first.get('heads')}" if first else "-"
        print(f"{name:<22} {code:>4}  {rep['reasons'][0] if rep.get('reasons') else rep.get('summary')}"
              f"  || {where}")

    print("\n## lossy: int8 per-channel weights")
    int8(base).save_pretrained(root / "int8")
    int8(base, zero_bias_layer=2).save_pretrained(root / "int8_nobias")
    for label, cli in {"int8, --mode exact": [str(root / "int8"), b],
                       "int8, --mode lossy": [str(root / "int8"), b, "--mode", "lossy"],
                       "int8 + zeroed attn bias (layer 2), lossy": [str(root / "int8_nobias"), b, "--mode", "lossy"],
                       "int8, --scale 8 (old advice)": [str(root / "int8"), b, "--dtype", "float32", "--scale", "8"]
                       }.items():
        code, rep, _ = run_cli(cli)
        lg = rep.get("logits") or {}
        w = rep.get("weights") or {}
        delta = max((t["rel"] for t in w.get("tensors", []) if t["n_changed"]), default=0.0)
        gain = max((h["rel"] / (delta * math.sqrt((h["layer"] if h["layer"] is not None else args.layers) + 1))
                    for h in rep.get("hooks", []) if delta and h["rel"] is not None), default=0.0)
        m, name, _ = margin(rep)
        print(f"{label:<42} exit {code}  weight delta_max {delta:.2e}  gain {gain:.2f}  margin {m:.3g} ({name})  "
              f"top-1 {lg.get('top1_agreement')}  KL {lg.get('kl_mean', 0):.2e}  | {rep.get('summary', '')[:110]}")


if __name__ == "__main__":
    main_()
