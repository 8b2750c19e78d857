"""Loading every component: the built-ins, then third-party plugins (entry points)."""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from importlib.metadata import entry_points

from cmkd.registry import origin

log = logging.getLogger(__name__)

# Importing these registers cmkd's own components; nothing else happens at import time. They are
# named, not imported: the training loop and the experiment register gin configurables (train,
# experiment) that a saved config binds, yet they sit above every module that loads a checkpoint.
BUILTIN_MODULES = (
    "cmkd.audio.features",
    "cmkd.models.backbones",
    "cmkd.models.poolers",
    "cmkd.models.heads",
    "cmkd.models.classifier",
    "cmkd.distill.losses",
    "cmkd.distill.strategies",
    "cmkd.data.stream",
    "cmkd.data.synthetic.dataset",
    "cmkd.train.loop",
    "cmkd.train.loggers",
    "cmkd.experiment",
)

PLUGIN_GROUP = "cmkd.plugins"


@dataclass
class PluginStatus:
    name: str
    module: str
    distribution: str
    error: str | None = None


_loaded = False
plugin_status: list[PluginStatus] = []


def plugin_modules() -> list[str]:
    """The modules that installed packages name as cmkd plugins (entry points), imported or not."""
    return [ep.module for ep in entry_points(group=PLUGIN_GROUP)]


def load_all() -> list[PluginStatus]:
    """Register built-ins and discover plugins, once per process.

    A plugin that fails to import is recorded (and reported by `cmkd registry`) but never
    fatal: runs that do not use it go on; runs that do get an unknown-name error.
    """
    global _loaded
    if _loaded:
        return plugin_status
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=PLUGIN_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        status = PluginStatus(ep.name, ep.value, dist)
        try:
            with origin(f"plugin {dist}"):
                ep.load()
        except Exception as err:  # noqa: BLE001 - any plugin bug must not stop cmkd
            status.error = f"{type(err).__name__}: {err}"
            log.warning("cmkd plugin %r (%s from %s) failed to import: %s", ep.name, ep.value, dist, status.error)
        plugin_status.append(status)
    _loaded = True
    return plugin_status


_REFERENCE = re.compile(r"@(\w+)\.(\w+)")


def plugin_components(config_text: str) -> dict[str, str]:
    """``{"backbones.tiny_cnn": "my-plugin"}``: the components ``config_text`` names that a plugin
    registered, with the package that provides them (a checkpoint keeps it, to say what to install)."""
    from cmkd.registry import REGISTRIES

    found = {}
    for kind, name in _REFERENCE.findall(config_text or ""):
        registry = REGISTRIES.get(kind)
        entry = {e.name: e for e in registry.entries()}.get(name) if registry else None
        if entry is not None and entry.origin.startswith("plugin "):
            found[f"{kind}.{name}"] = entry.origin.removeprefix("plugin ")
    return found


def install_hint(recorded: dict[str, str] | None, message: str) -> str:
    """For an error about a component the checkpoint's plugin provided: which package to install."""
    packages = sorted({dist for selector, dist in (recorded or {}).items() if selector in message})
    if not packages:
        return ""
    names = " ".join(packages)
    return (f"; {'it is' if len(packages) == 1 else 'they are'} provided by the plugin package "
            f"{', '.join(repr(p) for p in packages)}: `pip install {names}` and try again")
