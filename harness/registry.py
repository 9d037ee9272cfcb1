"""The one way a registry package (methods/, sources/, launchers/) finds its entries and looks one up."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def discover(package: str, path, attr: str, what: str, skip: tuple[str, ...] = ("base",)) -> dict[str, Any]:
    """Every entry the modules of ``package`` list in their ``attr`` tuple, by name (modules in name order;
    ``_private`` and ``skip`` modules left out); an ImportError when two entries share a name."""
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in skip:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for entry in getattr(module, attr, ()):
            if entry.name in found:
                raise ImportError(f"{what} {entry.name!r} is defined twice ({module.__name__})")
            found[entry.name] = entry
    return found


def lookup(table: dict[str, Any], name: str, what: str) -> Any:
    """The entry called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r} (expected one of {', '.join(table)})") from None
