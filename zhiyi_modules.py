"""Zhiyi's top-level module names, and the check that each one is Zhiyi's own file.

Zhiyi installs flat top-level modules with generic names (``storage``, ``sse``,
``formats`` ...). Another module of the same name earlier on ``sys.path`` (an embedding
app's own ``storage.py``, found first because the app runs from its folder), or one
imported already, would silently stand in for Zhiyi's and fail far from the cause (an
``AttributeError`` deep in an import). The two modules that import the others,
``zhiyi_server`` and ``processors`` (the one the embedding example imports first), call
:func:`refuse_shadowed_modules` before their sibling imports, so the mix-up is one clear
``ImportError`` naming both files. It looks where each name resolves and runs nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

__all__ = ["EAGER_MODULES", "refuse_shadowed_modules"]

logger = logging.getLogger(__name__)

#: Zhiyi's modules imported when the server or the processors load (``client`` is imported
#: only by the CLI, which checks it there). tests/test_packaging.py holds this to the tree.
EAGER_MODULES = (
    "backup", "engines", "external", "formats", "group_writer", "messages", "metrics",
    "processors", "request_guards", "sandbox", "sse", "storage", "store_model",
    "translation_memory", "worker", "zhiyi_config",
)

HOME = Path(__file__).resolve().parent


def refuse_shadowed_modules(*names: str) -> None:
    """Raise ImportError unless each module ``name`` is (or will be) Zhiyi's own file.

    With no names, every one of :data:`EAGER_MODULES`.
    """
    for name in names or EAGER_MODULES:
        found = _where(name)
        if found is not None and _module_home(Path(found)) == HOME:
            continue
        own = HOME / f"{name}.py" if (HOME / f"{name}.py").exists() else HOME / name
        where = f"resolves to {found}" if found else "is not found"
        raise ImportError(
            f"Zhiyi's module {name!r} {where}, not to Zhiyi's own {own}: another module named "
            f"{name!r} comes first on sys.path or was imported already. Rename that module or "
            f"move it into a package of your own (myapp/{name}.py, imported as myapp.{name}); "
            "see 'Module names' in Zhiyi's README.",
            name=name, path=found)


def _where(name: str) -> str | None:
    """The file ``import name`` gives (or gave), without importing it."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    spec = importlib.util.find_spec(name)
    return spec.origin if spec is not None else None


def _module_home(origin: Path) -> Path:
    """The folder a module's file makes it top-level in (a package's is its parent's)."""
    origin = origin.resolve()
    return origin.parent.parent if origin.name == "__init__.py" else origin.parent
