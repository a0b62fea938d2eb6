"""Training checkpoints: Pythia's revision names, step directories, and TransformerLens' checkpoint_index /
checkpoint_value (no network: the hub is only named, and an offline fetch must fail saying which revision)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import NeoXForCausalLM, get_checkpoint_labels
from neox_lab.model.checkpoints import (
    PYTHIA_CHECKPOINTS,
    CheckpointRef,
    checkpoint_revisions,
    list_checkpoints,
    pick_checkpoint,
    resolve_checkpoint_choice,
    step_directories,
    step_of,
)
from neox_lab.testing.pairs import tiny_config


def test_pythia_has_154_revisions_log_spaced_then_every_1000():
    revisions = checkpoint_revisions("EleutherAI/pythia-160m")
    assert len(revisions) == 154
    assert revisions[:12] == ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64", "step128",
                              "step256", "step512", "step1000"]
    assert revisions[-2:] == ["step142000", "step143000"]
    assert get_checkpoint_labels("EleutherAI/pythia-1.4b-deduped") == (PYTHIA_CHECKPOINTS, "step")
    # The models before the April 2023 retraining kept only the every-1000 checkpoints.
    labels, kind = get_checkpoint_labels("EleutherAI/pythia-70m-v0")
    assert labels[0] == 1000 and len(labels) == 143 and kind == "step"


def test_labels_match_transformer_lens():
    loading = pytest.importorskip("transformer_lens.loading_from_pretrained")
    for name in ("EleutherAI/pythia-160m", "EleutherAI/pythia-70m-v0"):
        assert get_checkpoint_labels(name) == loading.get_checkpoint_labels(name)


@pytest.mark.parametrize("name,step", [("step100", 100), ("step_7", 7), ("global_step42", 42),
                                       ("checkpoint-300", 300), ("iter_0000500", 500), ("final", None),
                                       ("step", None), ("stepper100", None)])
def test_step_of_directory_names(name, step):
    assert step_of(name) == step


@given(value=st.sampled_from(PYTHIA_CHECKPOINTS), index=st.integers(-154, 153))
def test_value_and_index_pick_as_transformer_lens(value, index):
    ref = pick_checkpoint("EleutherAI/pythia-410m", checkpoint_value=value)
    assert (ref.source, ref.revision, ref.step) == ("EleutherAI/pythia-410m", f"step{value}", value)
    # An index indexes the label list, negative from the end (TransformerLens' HookedTransformer: labels[i]).
    assert pick_checkpoint("EleutherAI/pythia-410m", checkpoint_index=index).step == PYTHIA_CHECKPOINTS[index]


def test_a_value_that_is_not_a_checkpoint_is_refused_naming_the_nearest():
    # TransformerLens asserts the value is a label; it never rounds to a nearby checkpoint.
    with pytest.raises(ValueError, match=r"checkpoint_value=1500 is not a checkpoint .*nearest are 1000 and 2000"):
        pick_checkpoint("EleutherAI/pythia-70m", checkpoint_value=1500)
    with pytest.raises(ValueError, match="checkpoint_value=0 is not a checkpoint"):
        pick_checkpoint("EleutherAI/pythia-70m-v0", checkpoint_value=0)
    with pytest.raises(IndexError, match="checkpoint_index=154 is out of range"):
        pick_checkpoint("EleutherAI/pythia-70m", checkpoint_index=154)
    with pytest.raises(ValueError, match="not both"):
        pick_checkpoint("EleutherAI/pythia-70m", checkpoint_index=0, checkpoint_value=0)
    with pytest.raises(ValueError, match="revision='step0' or checkpoint_index"):
        resolve_checkpoint_choice("EleutherAI/pythia-70m", "step0", None, 1000)
    with pytest.raises(ValueError, match="is not checkpointed"):
        get_checkpoint_labels("EleutherAI/gpt-neox-20b")


def test_resolution_gives_the_hub_revision():
    assert resolve_checkpoint_choice("EleutherAI/pythia-70m", None, None, 1000) == ("EleutherAI/pythia-70m",
                                                                                  "step1000")
    assert resolve_checkpoint_choice("EleutherAI/pythia-70m", None, -1, None) == ("EleutherAI/pythia-70m",
                                                                                "step143000")
    assert resolve_checkpoint_choice("some/dir", "main", None, None) == ("some/dir", "main")


def test_offline_fetch_of_a_revision_fails_naming_it(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to find locally
    with pytest.raises(FileNotFoundError, match=r"'EleutherAI/pythia-70m' at revision 'step1000'.*offline"):
        NeoXForCausalLM.from_pretrained("EleutherAI/pythia-70m", checkpoint_value=1000)


@pytest.fixture
def run_dir(tmp_path):
    """A training run's folder: step directories (each a checkpoint), and things that are not."""
    cfg = tiny_config()
    for step in (0, 50, 200):
        torch.manual_seed(step)
        NeoXForCausalLM(cfg).save_pretrained(tmp_path / f"step{step}")
    (tmp_path / "step300").mkdir()  # no config.json: not a checkpoint
    (tmp_path / "logs").mkdir()
    return tmp_path


def test_a_folder_of_step_directories_is_listed_in_step_order(run_dir):
    refs = list_checkpoints(run_dir)
    assert [r.step for r in refs] == [0, 50, 200]
    assert refs[1] == CheckpointRef(50, str(run_dir / "step50"))
    assert get_checkpoint_labels(run_dir) == ([0, 50, 200], "step")
    (run_dir / "global_step50").mkdir()
    (run_dir / "global_step50" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="both name step 50"):
        step_directories(run_dir)


def test_from_pretrained_picks_a_step_directory(run_dir):
    model = NeoXForCausalLM.from_pretrained(run_dir, checkpoint_value=50)
    ref = NeoXForCausalLM.from_pretrained(run_dir / "step50")
    assert torch.equal(model.model.embed.weight, ref.model.embed.weight)
    last = NeoXForCausalLM.from_pretrained(run_dir, checkpoint_index=-1)
    assert torch.equal(last.model.embed.weight, NeoXForCausalLM.from_pretrained(run_dir / "step200").model.embed.weight)
    with pytest.raises(ValueError, match="checkpoint_value=100 is not a checkpoint.*nearest are 50 and 200"):
        NeoXForCausalLM.from_pretrained(run_dir, checkpoint_value=100)
