"""Moved to ``cmkd.plugins``; this name stays for plugins and old imports."""

import sys

from cmkd import plugins as _moved

sys.modules[__name__] = _moved  # the very same module: monkeypatching either name patches both
