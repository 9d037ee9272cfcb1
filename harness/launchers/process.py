"""One process per case: the worker runs every stage itself (the default)."""

from __future__ import annotations

from harness.launchers.base import Launcher


class Process(Launcher):
    name = "process"
    label = "one process"

    def check(self, settings, stages):
        if settings.nproc not in (1, "auto") or settings.nnodes != 1:
            return (f"launcher 'process' runs one process (nproc {settings.nproc}, nnodes {settings.nnodes}): "
                    "set launcher: torchrun")
        if settings.strategy != "none":
            return f"strategy {settings.strategy!r} needs several ranks: set launcher: torchrun"
        return None


LAUNCHERS = (Process(),)
