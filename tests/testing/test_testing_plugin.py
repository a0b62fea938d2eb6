"""The pytest plugin from a user's point of view: a separate project with its own test file, run by
pytester, getting `neox_pair` / `neox_tiny_model` and `--neox-profile` from the installed entry point."""

from __future__ import annotations

from hypothesis import settings

pytest_plugins = ["pytester"]

USER_TESTS = '''
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from neox_lab.testing import assert_equivalent, compare


def test_pair_is_equivalent(neox_pair):
    hf, nx = neox_pair
    ids = torch.randint(0, nx.cfg.vocab_size, (2, 8))
    assert_equivalent(compare(nx, hf, ids))


def test_pair_is_fresh_per_test(neox_pair, neox_tiny_model):
    hf, nx = neox_pair
    with torch.no_grad():
        nx.model.blocks[0].mlp.fc_in.weight.add_(1.0)  # must not leak into the next test
    assert nx.cfg == neox_tiny_model.cfg and not neox_tiny_model.training


def test_fixtures_are_trained_like_so_a_dropped_bias_fails(neox_tiny_model, neox_pair):
    from neox_lab.testing.code_bugs import gelu_tanh, mlp_bias_dropped

    block = neox_tiny_model.model.blocks[0]
    assert block.mlp.fc_out.bias.abs().max() > 0.05 and (block.ln1.weight - 1).abs().max() > 0.05
    assert neox_pair[0].gpt_neox.layers[0].mlp.dense_4h_to_h.bias.abs().max() > 0.05
    for bug in (mlp_bias_dropped, gelu_tanh):
        broken, _ = bug(neox_tiny_model)
        assert not compare(broken, neox_tiny_model).equivalent


def test_pair_again_unedited(neox_pair):
    hf, nx = neox_pair
    assert compare(nx, hf, torch.randint(0, 97, (1, 5))).equivalent


@given(st.integers(0, 1000))
def test_profile(x):
    assert settings().max_examples == {PROFILE_EXAMPLES}


@pytest.fixture
def no_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_pair_skips_without_transformers(no_transformers, neox_pair):
    raise AssertionError("neox_pair should have skipped")
'''


def _project(pytester, examples: int):
    pytester.makepyfile(test_user=USER_TESTS.replace("{PROFILE_EXAMPLES}", str(examples)))


def test_fixtures_and_fast_profile_in_a_separate_project(pytester):
    before = settings.get_current_profile_name()
    _project(pytester, 10)
    result = pytester.runpytest("--neox-profile=fast", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, skipped=1)
    result.stdout.fnmatch_lines(["neox_lab: hypothesis profile 'neox-fast'"])
    assert settings.get_current_profile_name() == before  # the in-process run gave the profile back


def test_without_the_option_no_profile_is_loaded(pytester):
    current = settings().max_examples
    _project(pytester, current)
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "profile")
    result.assert_outcomes(passed=1)


def test_the_option_is_in_the_help_and_validated(pytester):
    pytester.runpytest("--help").stdout.fnmatch_lines(["*--neox-profile*"])
    result = pytester.runpytest("--neox-profile=slow")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*invalid choice*slow*"])
