"""A config that says tie_word_embeddings=true over weights that hold a different embed_out: neox_lab
does what transformers 5 does (keeps that embed_out, untied, and warns), so both libraries compute the
same function from one checkpoint. Before, neox_lab silently tied and dropped the stored head."""

from __future__ import annotations

import json

import pytest
import torch

from neox_lab import NeoXForCausalLM
from neox_lab.testing import compare
from neox_lab.testing.pairs import tiny_config


@pytest.fixture
def tied_config_distinct_head(tmp_path):
    torch.manual_seed(0)
    model = NeoXForCausalLM(tiny_config()).eval()  # untied: embed_out is its own random matrix
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, model


def test_distinct_head_is_kept_untied_with_a_warning(tied_config_distinct_head):
    path, original = tied_config_distinct_head
    with pytest.warns(UserWarning, match="NOT tied"):
        loaded = NeoXForCausalLM.from_pretrained(path)
    assert loaded.cfg.tie_word_embeddings is False
    assert torch.equal(loaded.unembed.weight, original.unembed.weight)
    assert loaded.unembed.weight.data_ptr() != loaded.model.embed.weight.data_ptr()


def test_equal_head_stays_tied_silently(tmp_path):
    torch.manual_seed(0)
    model = NeoXForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    loaded = NeoXForCausalLM.from_pretrained(path := tmp_path)
    assert loaded.cfg.tie_word_embeddings and loaded.unembed.weight is loaded.model.embed.weight, path


def test_neox_lab_and_transformers_agree_on_such_a_checkpoint(tied_config_distinct_head):
    transformers = pytest.importorskip("transformers")
    path, _ = tied_config_distinct_head
    with pytest.warns(UserWarning):
        ours = NeoXForCausalLM.from_pretrained(path)
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    report = compare(ours, theirs, torch.randint(0, 97, (2, 8)))
    assert report.equivalent, report.table()
    assert report.config == []  # transformers' model is untied too, whatever its config says
