"""Equivalence testing as a product: compare any two NeoX implementations (neox_lab, transformers,
your own port), strategies, tolerances, bug injections, a pytest plugin.

    from neox_lab.testing import compare, assert_equivalent, Port
    report = compare(my_port, reference_model)   # config, weights, every stream, logits, decoding
    print(report.table())
    assert_equivalent(report)                    # names the first diverging hook

`neox_lab.testing.strategies` (hypothesis strategies and seeded model pairs) needs hypothesis and is
imported explicitly; nothing here imports hypothesis or transformers. Bug injections for checking a
harness: `neox_lab.testing.mutations` (weights and config) and `neox_lab.testing.code_bugs` (code).
"""

from .compare import compare, default_tolerance
from .config_diff import ConfigDifference, diff_configs
from .report import (
    EQUIVALENT,
    EXIT_STATUS,
    NOT_EQUIVALENT,
    REFERENCE_UNUSABLE,
    REPARAMETRISED,
    EquivalenceReport,
    HookResult,
    LogitsResult,
    NotEquivalentError,
    assert_equivalent,
)
from .side_port import Port, qkv_part
from .tolerance import Tolerance, policy_for, policy_table
from .weight_diff import TensorResult, WeightDiff, diff_weights

__all__ = ["EQUIVALENT", "EXIT_STATUS", "NOT_EQUIVALENT", "REFERENCE_UNUSABLE", "REPARAMETRISED", "ConfigDifference",
           "EquivalenceReport", "HookResult", "LogitsResult", "NotEquivalentError", "Port", "TensorResult",
           "Tolerance", "WeightDiff", "assert_equivalent", "compare", "default_tolerance", "diff_configs",
           "diff_weights", "policy_for", "policy_table", "qkv_part"]
