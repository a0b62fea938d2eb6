"""Every neox_lab tool takes either convention's class and gives the same numbers: patching (neox_lab's and
TransformerLens-named), the logit lens, induction, the activation store, equivalence testing, the demo's
loader. The two are views of one model, so equality is exact (same kernels, same order)."""

from __future__ import annotations

import torch

from neox_lab import HookedTransformer, NeoXForCausalLM
from neox_lab.analysis import patching
from neox_lab.analysis.induction import measure_induction, repeated_tokens
from neox_lab.analysis.logit_lens import logit_lens
from neox_lab.analysis.metrics import logit_diff
from neox_lab.store.writer import cache_dataset
from neox_lab.testing.compare import compare
from neox_lab.testing.pairs import make_trained_like, tiny_config


def pair():
    hf = make_trained_like(NeoXForCausalLM(tiny_config(), attn_backend="eager"), 0).eval()
    return hf, HookedTransformer(hf).process_weights_()  # processed, as from_pretrained leaves it


CLEAN, CORRUPTED = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[5, 6, 1, 8, 9]])
METRIC = logit_diff(3, 4)


def test_patching_tools_give_the_same_grids_for_both_classes():
    hf, hooked = pair()
    for target in ("resid_pre", "z", "k"):
        a = patching.activation_patch(hf, CLEAN, CORRUPTED, METRIC, target)
        b = patching.activation_patch(hooked, CLEAN, CORRUPTED, METRIC, target)
        assert torch.equal(a.values, b.values), target
    a = patching.attribution_patch(hf, CLEAN, CORRUPTED, METRIC, "resid_pre")
    b = patching.attribution_patch(hooked, CLEAN, CORRUPTED, METRIC, "resid_pre")
    assert torch.equal(a.values, b.values)
    with torch.no_grad():
        _, hf_cache = hf.run_with_cache(CLEAN)
        _, hooked_cache = hooked.run_with_cache(CLEAN)
    metric = lambda logits: logits[:, -1, 3].sum()  # noqa: E731
    grid = patching.get_act_patch_attn_head_out_by_pos(hooked, CORRUPTED, hooked_cache, metric)
    assert torch.equal(grid, patching.get_act_patch_attn_head_out_by_pos(hf, CORRUPTED, hf_cache, metric))


def test_lens_induction_store_and_compare_take_either_class(tmp_path):
    hf, hooked = pair()
    a, b = logit_lens(hf, CLEAN), logit_lens(hooked, CLEAN)
    assert torch.equal(a.top_probs, b.top_probs) and torch.equal(a.top_ids, b.top_ids)
    reps = repeated_tokens(torch.arange(10, 60), 6, batch=2, generator=torch.Generator().manual_seed(0))
    a, b = measure_induction(hf, reps, 6), measure_induction(hooked, reps, 6)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.copy_loss, b.copy_loss)
    docs = [[5, 6, 7, 8], [9, 10, 11]]
    stores = [cache_dataset(m, docs, ["blocks.1.hook_resid_post"], tmp_path / name, dtype="float32", progress=False)
              for m, name in ((hf, "hf"), (hooked, "hooked"))]
    assert torch.equal(stores[0]["blocks.1.hook_resid_post"][:], stores[1]["blocks.1.hook_resid_post"][:])
    report = compare(hf, hooked, CLEAN)
    assert report.passed and report.logits.max_abs == 0.0
