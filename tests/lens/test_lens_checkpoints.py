"""HookedTransformer picks and reloads training checkpoints through model/checkpoints.py, the one list of
Pythia's steps and the one checkpoint_index / checkpoint_value resolver."""

from __future__ import annotations

import pytest
import torch

from neox_lab import HookedTransformer, NeoXForCausalLM
from neox_lab.lens import hooked_transformer
from neox_lab.testing.pairs import make_trained_like, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    for step in (0, 50, 200):
        torch.manual_seed(step)
        make_trained_like(NeoXForCausalLM(tiny_config()), step).save_pretrained(root / f"step{step}")
    return root


def test_one_list_of_pythia_steps():
    assert not hasattr(hooked_transformer, "PYTHIA_CHECKPOINTS")


def test_a_pythia_value_that_is_no_checkpoint_is_refused_before_any_download():
    with pytest.raises(ValueError, match=r"checkpoint_value=1500 is not a checkpoint .*nearest are 1000 and 2000"):
        HookedTransformer.from_pretrained("EleutherAI/pythia-70m", checkpoint_value=1500)
    with pytest.raises(ValueError, match="revision='step5' or checkpoint_index/checkpoint_value, not both"):
        HookedTransformer.from_pretrained("EleutherAI/pythia-70m", checkpoint_index=3, revision="step5")


def test_from_pretrained_picks_a_step_directory_and_records_it(run_dir):
    model = HookedTransformer.from_pretrained(run_dir, checkpoint_value=50, dtype=torch.float64)
    ref = HookedTransformer.from_pretrained(run_dir / "step50", dtype=torch.float64)
    assert (model.cfg.from_checkpoint, model.cfg.checkpoint_index, model.cfg.checkpoint_value) == (True, 1, 50)
    assert model.cfg.checkpoint_label_type == "step"
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_load_checkpoint_in_place_processes_again_and_records_the_step(run_dir):
    model = HookedTransformer.from_pretrained(run_dir, checkpoint_index=0, dtype=torch.float64)
    pointers = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    model.load_checkpoint_(run_dir, checkpoint_index=-1)
    assert (model.cfg.checkpoint_index, model.cfg.checkpoint_value) == (2, 200)
    assert {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()} == pointers
    ref = HookedTransformer.from_pretrained(run_dir / "step200", dtype=torch.float64)
    tokens = torch.randint(0, ref.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The same float64 arithmetic on the same raw values, processed by the same steps.
        assert torch.equal(model(tokens), ref(tokens))
