"""Equivalence testing as a product: strategies, model comparison reports, tolerances, a pytest plugin.

    from neox_lab.testing import compare, assert_equivalent, policy_for
    report = compare(my_model, reference_model, token_ids)   # per-hook errors, first divergence
    print(report.table())
    assert_equivalent(report)                                # names the first diverging hook

`neox_lab.testing.strategies` (hypothesis strategies and seeded model pairs) needs hypothesis and is
imported explicitly; nothing here imports hypothesis or transformers.
"""

from .compare import compare, default_tolerance
from .config_diff import ConfigDifference, diff_configs
from .report import EquivalenceReport, HookResult, LogitsResult, NotEquivalentError, assert_equivalent
from .tolerance import Tolerance, policy_for, policy_table
from .weight_diff import TensorResult, WeightDiff, diff_weights

__all__ = ["ConfigDifference", "EquivalenceReport", "HookResult", "LogitsResult", "NotEquivalentError",
           "TensorResult", "Tolerance", "WeightDiff", "assert_equivalent", "compare", "default_tolerance",
           "diff_configs", "diff_weights", "policy_for", "policy_table"]
