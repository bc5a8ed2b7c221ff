"""The one lazy-import style of diffmem's packages (PEP 562, like scikit-image's
``lazy_loader``): a package lists which names come from which of its modules, and
``__getattr__ = lazy_getattr(__name__, WHERE)`` imports a module on the first use of one of its
names. Importing a package therefore stays cheap (no torch, diffusers or open_clip), so
``diffmem --help`` is fast; everywhere else imports sit at the top of the module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``name`` from the module
    ``where[name]`` on first use.

    Examples
    --------
    >>> getattr_ = lazy_getattr("demo", {"dumps": "json"})
    >>> getattr_("dumps")([1])
    '[1]'
    >>> getattr_("nope")
    Traceback (most recent call last):
    ...
    AttributeError: module 'demo' has no attribute 'nope'
    """
    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
