"""Moved to ``cmkd.console`` (below the layers that use it); this name stays for plugins and old imports."""

import sys

from cmkd import console as _moved

sys.modules[__name__] = _moved  # the very same module: monkeypatching either name patches both
