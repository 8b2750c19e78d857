"""Moved to ``cmkd.checkpoint`` (below the layers that use it); this name stays for plugins and old imports."""

import sys

from cmkd import checkpoint as _moved

sys.modules[__name__] = _moved  # the very same module: monkeypatching either name patches both
