"""pytest plugin of neox_lab (registered as the `pytest11` entry point "neox_lab"; loads by itself).

Fixtures
    neox_config      the NeoX config the other fixtures build (a 2-layer d_model 32 model); override
                     it in your conftest.py to test another shape
    neox_tiny_model  a seeded `NeoXForCausalLM(neox_config)` in eval mode with trained-like weights
    neox_pair        a seeded (transformers GPTNeoXForCausalLM, neox_lab NeoXForCausalLM) pair with
                     identical trained-like weights; skips the test when transformers is not installed

Trained-like (`pairs.make_trained_like`, std TRAINED_LIKE_STD): random biases and LayerNorm parameters
and sharp attention (score rms ~3-10). A fresh-init model has zero biases and unit LayerNorms, so a port
that drops a bias or uses GELU-tanh would compute nearly the same thing and pass against it.

Option
    --neox-profile=fast|thorough   load the hypothesis settings profile "neox-fast" (10 examples,
                                   derandomised: reproducible CI) or "neox-thorough" (200 examples).
                                   Without the option no profile is loaded, so a project's own
                                   profiles (or --hypothesis-profile) stay in charge.

At import time this module brings pytest, torch and neox_lab's model classes (its parent package
imports torch anyway); hypothesis and transformers, both optional, load only when the option or a
fixture needs them, and a missing hypothesis only matters if the option is given.
"""

from __future__ import annotations

import pytest
import torch

from ..model.tasks import NeoXForCausalLM
from .pairs import TRAINED_LIKE_STD, build_pair, make_trained_like, tiny_config

PROFILES = {"fast": "neox-fast", "thorough": "neox-thorough"}
_PREVIOUS = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("neox_lab", "neox_lab equivalence testing")
    group.addoption("--neox-profile", choices=sorted(PROFILES), default=None,
                    help="hypothesis settings for neox_lab property tests: fast (10 derandomised "
                         "examples, for CI) or thorough (200 examples)")


def register_profiles() -> None:
    """Register the "neox-fast" and "neox-thorough" hypothesis profiles (idempotent)."""
    from hypothesis import HealthCheck, settings

    # Model-building examples are slow by hypothesis' standards, and fixtures like neox_pair are
    # function-scoped on purpose (each test may edit its models).
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
    settings.register_profile("neox-fast", max_examples=10, derandomize=True, **common)
    settings.register_profile("neox-thorough", max_examples=200, **common)


def pytest_configure(config: pytest.Config) -> None:
    choice = config.getoption("neox_profile", default=None)
    if choice is None:
        return
    try:
        from hypothesis import settings
    except ImportError:
        raise pytest.UsageError("--neox-profile selects hypothesis settings, but hypothesis is not installed "
                                "(pip install hypothesis)") from None
    register_profiles()
    config.stash[_PREVIOUS] = settings.get_current_profile_name()
    settings.load_profile(PROFILES[choice])


def pytest_unconfigure(config: pytest.Config) -> None:
    # Give back the profile that was active before, so an in-process pytest run (pytester) leaves
    # the calling session's hypothesis settings as it found them.
    previous = config.stash.get(_PREVIOUS, None)
    if previous is not None:
        from hypothesis import settings

        settings.load_profile(previous)


def pytest_report_header(config: pytest.Config) -> str | None:
    choice = config.getoption("neox_profile", default=None)
    return None if choice is None else f"neox_lab: hypothesis profile {PROFILES[choice]!r}"


@pytest.fixture
def neox_config():
    """The config `neox_tiny_model` and `neox_pair` build; override this fixture to change it."""
    return tiny_config()


@pytest.fixture
def neox_tiny_model(neox_config):
    """A seeded neox_lab causal LM in eval mode with trained-like weights (seed 0)."""
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(neox_config).eval(), seed=0, std=TRAINED_LIKE_STD)


@pytest.fixture
def neox_pair(neox_config, tmp_path):
    """(transformers model, neox_lab model) with identical seeded trained-like weights, both fp32 eager in
    eval mode."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        pytest.skip("neox_pair needs transformers (pip install transformers)")
    return build_pair(neox_config, seed=0, directory=str(tmp_path / "neox_pair"), trained_like=TRAINED_LIKE_STD)
