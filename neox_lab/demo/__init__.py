"""The demo: induction heads, activation patching and the logit lens on a NeoX model, with figures.

    study    `run_demo`: the study end to end, figures through `neox_lab.analysis.plotting`
    summary  its summary.txt, in words and numbers

Sits on top: it loads the shipped model (`neox_lab.default_model`) and uses `neox_lab.analysis`;
nothing in the package but the `demo` CLI command imports it.
"""

from .study import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
