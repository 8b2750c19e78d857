"""One generic registry, one instance per kind of component.

Registering an entry also makes it a gin configurable named ``<kind>.<name>`` so recipes can
say ``classifier.backbone = @backbones.ast``.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gin

from cmkd.errors import CmkdError

# Set while a plugin module is imported, so its entries are attributed to the plugin.
_current_origin: contextvars.ContextVar[str | None] = contextvars.ContextVar("cmkd_origin", default=None)


class RegistryError(CmkdError, KeyError):
    """A registry lookup or registration went wrong; the message says what to do."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Callable[..., Any]
    origin: str  # "cmkd" for built-ins, "plugin <dist>" or the defining module otherwise

    @property
    def doc(self) -> str:
        # the object's own docstring: a plugin class without one must not show nn.Module's
        own = vars(self.obj).get("__doc__") if inspect.isclass(self.obj) else getattr(self.obj, "__doc__", None)
        return (inspect.cleandoc(own) if isinstance(own, str) else "").split("\n", 1)[0]


class Registry:
    """Named components of one kind (``backbones``, ``losses``, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable:
        """Decorator: ``@backbones.register("ast")`` registers and gin-wraps the object."""

        def decorate(obj: Callable) -> Callable:
            key = name or obj.__name__
            if key in self._entries and not override:
                raise RegistryError(
                    f"{self.kind}.{key} is already registered by {self._entries[key].origin}; "
                    f"pick another name or pass override=True to replace it"
                )
            selector = f"{self.kind}.{key}"
            if key in self._entries:
                _forget_gin_configurable(selector)
            configurable = gin.configurable(key, module=self.kind)(obj)
            origin = _current_origin.get() or _module_origin(obj)
            self._entries[key] = Entry(key, configurable, origin)
            return configurable

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name].obj
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown {self.kind} entry {name!r}.{hint} Known: {', '.join(sorted(self._entries)) or 'none'}. "
            f"Run `cmkd registry {self.kind}` to list them; plugins register more."
        )

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


def _module_origin(obj: Any) -> str:
    module = getattr(obj, "__module__", "") or ""
    return "cmkd" if module.split(".")[0] == "cmkd" else module


def _forget_gin_configurable(selector: str) -> None:
    # gin has no public "unregister"; overriding an entry must drop the old selector first.
    registry = gin.config._REGISTRY  # noqa: SLF001 - gin offers no API for this
    if selector in registry:
        registry.pop(selector)


@contextlib.contextmanager
def origin(label: str) -> Iterator[None]:
    """Attribute entries registered inside this block to ``label`` (used for plugins)."""
    token = _current_origin.set(label)
    try:
        yield
    finally:
        _current_origin.reset(token)


featurizers = Registry("featurizers")
backbones = Registry("backbones")
poolers = Registry("poolers")
heads = Registry("heads")
losses = Registry("losses")
datasets = Registry("datasets")
strategies = Registry("strategies")
loggers = Registry("loggers")  # experiment trackers: TensorBoard built in, W&B / MLflow optional

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (featurizers, backbones, poolers, heads, losses, datasets, strategies, loggers)
}


def call_with_context(factory: Callable[..., Any], **context: Any) -> Any:
    """Call ``factory`` with the subset of ``context`` its signature accepts.

    Components are referenced uncalled in gin (``@backbones.ast``) and built by their owner,
    which knows shapes and class counts; each factory takes only what it needs.
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**context)
    return factory(**{k: v for k, v in context.items() if k in params})
