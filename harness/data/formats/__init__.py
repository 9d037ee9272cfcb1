"""Data formats as a registry: one file per format, a subclass of ``base.Format``; ``get(name)`` finds it."""

from __future__ import annotations

import importlib
import pkgutil

from harness.data.formats.base import Format

FORMATS: dict[str, Format] = {}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        _m = importlib.import_module(f"{__name__}.{_mod.name}")
        for _obj in vars(_m).values():
            if isinstance(_obj, type) and issubclass(_obj, Format) and _obj is not Format and _obj.name:
                FORMATS[_obj.name] = _obj()


def get(name: str) -> Format:
    if name not in FORMATS:
        raise KeyError(f"unknown data format {name!r} (expected auto or one of {', '.join(FORMATS)})")
    return FORMATS[name]


def detect(columns: list[str] | set[str]) -> Format | None:
    """The format whose fields the columns hold, most specific first (qa and prompt-completion before text)."""
    for fmt in sorted(FORMATS.values(), key=lambda f: -len(f.fields)):
        if set(fmt.fields) <= set(columns):
            return fmt
    return None
