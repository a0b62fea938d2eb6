"""Moved: the matplotlib figures now live in `neox_lab.analysis.plotting`.

An alias so that `import neox_lab.plotting` and `from neox_lab import plotting` keep working: importing it
gives that very module (monkeypatching through either name changes the same functions). New code
imports `neox_lab.analysis.plotting`.
"""

import sys

from .analysis import plotting

sys.modules[__name__] = plotting
