"""The contract every launcher implements: a command line for the case's worker and the record it leaves."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the registry is read by the suite schema, which must not import the worker's machinery
    from harness.matrix import Case
    from harness.records import Record

STAGE_MODULES = {"quant": "harness.stages.quant", "train": "harness.stages.train", "eval": "harness.stages.evaluate",
                 "generate": "harness.stages.generate"}


class Launcher:
    """How one case's worker runs: which processes, and how their results become the case's one record.

    The worker (``harness.worker.run_isolated``) starts ``command(...)`` in a process group of its own, ends
    that group and every process under it on a timeout, an interruption or at exit, and asks ``collect`` for
    the record; where ``collect`` finds none, the exit code and the log become one (``oom``/``error``/…).
    """

    name: ClassVar[str]
    label: ClassVar[str]  # for people: "one process", "torchrun, N ranks"

    def check(self, settings, stages: tuple[str, ...] | list[str]) -> str | None:
        """Why this launcher cannot run a case with these settings and stages (one line), or None."""
        return None

    def resolve(self, case: Case) -> Case:
        """The case with what this machine decides filled in (e.g. ``nproc: auto``), before the worker starts."""
        return case

    def command(self, case: Case, case_file: Path, result_file: Path, run_id: str, run_dir: Path) -> list[str]:
        """The worker's command line; it writes the case's record(s) beside ``result_file``."""
        return [sys.executable, "-m", "harness.worker", str(case_file), str(result_file), run_id, str(run_dir)]

    def stage_module(self, stage: str) -> str:
        """The module that runs ``stage`` under this launcher."""
        return STAGE_MODULES[stage]

    def collect(self, case: Case, result_file: Path, log_tail: str) -> Record | None:
        """The case's record from what the worker wrote (None: it wrote nothing usable)."""
        from harness.records import Record

        if not result_file.exists():
            return None
        return Record.model_validate_json(result_file.read_text())

    def explain(self, log_tail: str) -> str | None:
        """What the log says about a worker that left no record (added to the exit's message), or None."""
        return None

    def clear(self, result_file: Path) -> None:
        """Remove what an earlier attempt of the case left where the worker writes its record(s)."""
        result_file.unlink(missing_ok=True)

    def result_path(self, result_file: Path, rank: int) -> Path:
        """Where the worker process of ``rank`` writes its record."""
        return result_file

    def exit_code(self, record: Record) -> int:
        """The worker process's exit code once its record is written."""
        return 0

    @contextmanager
    def rank(self, case: Case):
        """Around one worker process's ``execute``: yields its rank (0 for one process)."""
        yield 0

    def __repr__(self) -> str:
        return f"<launcher {self.name}>"
