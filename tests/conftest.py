"""Hypothesis profiles: "fast" for CI and pre-commit, "thorough" for pre-push and nightly runs.

Pick one with HYPOTHESIS_PROFILE=thorough (or pytest's --hypothesis-profile=thorough).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture])
settings.register_profile("fast", max_examples=12, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=200, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

try:  # transformers' save_pretrained draws a progress bar per call otherwise
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:
    pass

# Tests use tiny models, for which intra-op threads cost more than they give on a shared 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
