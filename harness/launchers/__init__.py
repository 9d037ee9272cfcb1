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

from harness import registry
from harness.launchers.base import Launcher

__all__ = ["LAUNCHERS", "Launcher", "get", "names"]


def _discover() -> dict[str, Launcher]:
    return registry.discover(__name__, __path__, "LAUNCHERS", "launcher", skip=("base", "agent"))


LAUNCHERS: dict[str, Launcher] = _discover()


def get(name: str) -> Launcher:
    """The registered launcher called ``name``; a ValueError listing the known ones otherwise."""
    return registry.lookup(LAUNCHERS, name, "launcher")


def names() -> list[str]:
    return list(LAUNCHERS)
