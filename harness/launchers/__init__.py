"""Launchers: how a case's worker runs. One process (``process``, the default) or N ranks (``torchrun``).

Adding a launcher (``mpirun``, a SLURM ``srun``, …) is one file in this folder:

1. Write ``harness/launchers/<name>.py`` with a subclass of :class:`harness.launchers.base.Launcher` that sets
   ``name`` and implements ``command`` (the worker's command line) and, where its ranks write more than one
   record, ``collect`` (the case's one record from what its processes wrote); ``check`` refuses, at collection,
   settings it cannot run; ``stage_module`` swaps a stage's implementation (the distributed training loop).
2. End the file with ``LAUNCHERS = (YourLauncher(),)``: the registry and the suite schema know it.
3. Name it in a suite's ``settings.launcher`` (or as a matrix axis).

optimum-benchmark's ``launchers/`` (inline, process, torchrun) is the model.
"""

from __future__ import annotations

import importlib
import pkgutil

from harness.launchers.base import Launcher

__all__ = ["LAUNCHERS", "Launcher", "get", "names"]


def _discover() -> dict[str, Launcher]:
    found: dict[str, Launcher] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("base", "agent"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for launcher in getattr(module, "LAUNCHERS", ()):
            if launcher.name in found:
                raise ImportError(f"launcher {launcher.name!r} is defined twice ({module.__name__})")
            found[launcher.name] = launcher
    return found


LAUNCHERS: dict[str, Launcher] = _discover()


def get(name: str) -> Launcher:
    """The registered launcher called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise ValueError(f"unknown launcher {name!r} (expected one of {', '.join(LAUNCHERS)})") from None


def names() -> list[str]:
    return list(LAUNCHERS)
