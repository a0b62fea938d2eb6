"""Moved: activation and attribution patching now live in `neox_lab.analysis.patching`.

An alias so that `import neox_lab.patching` and `from neox_lab import patching` keep working: importing it
gives that very module (monkeypatching through either name changes the same functions). New code
imports `neox_lab.analysis.patching`.
"""

import sys

from .analysis import patching

sys.modules[__name__] = patching
