"""Moved: the ready-made hook functions now live in `neox_lab.analysis.interventions`.

An alias so that `import neox_lab.interventions` and `from neox_lab import interventions` keep working: importing it
gives that very module (monkeypatching through either name changes the same functions). New code
imports `neox_lab.analysis.interventions`.
"""

import sys

from .analysis import interventions

sys.modules[__name__] = interventions
