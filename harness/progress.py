"""A live line per case while a session runs: which case of how many, how long it took before, how long is left.

Estimates come from earlier records of the same case id (or, for a seed never run, of its other seeds) under the
results folder (any run folder up to three
levels down, so a fresh clone's committed ``results/reference/<machine>/<run>/`` counts; those of this kind of
machine first, since an AVX2 machine's fp32 records took 2-3x as long as an AVX512-bf16 one's), else from the median
of the session's other cases of the same suite that have one; a case with neither is counted as unknown. The
time left is scaled by how the finished cases' durations compared with their estimates (a slower machine than
the earlier one's; a median, so that a first case that also built its base does not count for all) and divided
among the xdist workers.
"""

from __future__ import annotations

import glob
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.records import RUN_FILE, case_filename

NEWEST = 3  # earlier records read per case (the newest run folders that hold it)
PACE_AFTER = 3  # finished cases before the time left follows how this machine compares with the earlier records


def run_folders(results_dir: Path) -> list[Path]:
    """Run folders (with a run.json) up to three levels under ``results_dir``, newest name first."""
    root = Path(results_dir)
    found = [p.parent for depth in ("*", "*/*", "*/*/*") for p in root.glob(f"{depth}/{RUN_FILE}")]
    return sorted(set(found), key=lambda p: p.name, reverse=True)


def earlier_seconds(results_dir: Path, case_ids: list[str], here: dict | None = None) -> dict[str, float]:
    """Median wall seconds of each case in earlier runs (``timings_s.total`` of the newest NEWEST records; of
    those measured on the kind of machine of the environment ``here``, where it is given and any are)."""
    folders = run_folders(results_dir)
    out = {}
    for cid in case_ids:
        seen = _seconds(folders, [case_filename(cid)], here)
        if not seen and (m := re.fullmatch(r"(.*-seed)\d+\]", cid)):  # a new seed: the same case's other seeds
            seen = _seconds(folders, sorted({p.name for f in folders for p in f.glob(
                glob.escape(case_filename(m.group(1) + "]").removesuffix(".json")) + "[0-9]*.json")}), here)
        if seen:
            out[cid] = statistics.median(seen)
    return out


def _seconds(folders: list[Path], names: list[str], here: dict | None = None) -> list[float]:
    """``timings_s.total`` of the records of these file names in the newest folders that hold one: the newest
    NEWEST of this kind of machine (``compare.kind_apart`` with ``here``), else the newest NEWEST of any."""
    from harness.compare import kind_apart

    same, other = [], []
    for folder in folders:
        for name in names:
            path = folder / name
            if len(same) >= NEWEST or not path.is_file():
                continue
            try:
                rec = json.loads(path.read_text())
                total = float((rec.get("timings_s") or {})["total"])
                env = rec.get("env") if isinstance(rec.get("env"), dict) else {}
                apart = bool(here is not None and kind_apart(here, env))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if rec.get("status") in ("passed", "failed") and total > 0:
                (other if apart else same).append(total)
    return same[:NEWEST] or other[:NEWEST]


def minutes(seconds: float) -> str:
    """``45 s``, ``3.2 min``, ``1 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class Progress:
    """The session's cases (by node id) and their estimates; ``start`` and ``finish`` as the cases run."""

    cases: dict[str, str]  # node id -> case id, in run order
    estimates: dict[str, float]  # case id -> seconds
    workers: int = 1
    started: dict[str, float] = field(default_factory=dict)  # node id -> monotonic start
    took: dict[str, float] = field(default_factory=dict)  # node id -> seconds
    clock: object = time.monotonic
    suite_of: object = None  # case id -> suite name: a case never measured before takes its suite's finished ones

    @classmethod
    def plan(cls, cases: dict[str, str], results_dir: Path, suite_of, workers: int = 1,
             here: dict | None = None) -> Progress:
        """Estimates for ``cases`` from earlier records (this kind of machine's first, ``here`` its environment); a
        case without one takes its suite's median, if any."""
        est = earlier_seconds(results_dir, list(dict.fromkeys(cases.values())), here)
        by_suite: dict[str, list[float]] = {}
        for cid, s in est.items():
            by_suite.setdefault(suite_of(cid), []).append(s)
        for cid in cases.values():
            if cid not in est and by_suite.get(suite_of(cid)):
                est[cid] = statistics.median(by_suite[suite_of(cid)])
        return cls(cases, est, max(1, workers), suite_of=suite_of)

    def _pace(self) -> float:
        """The median of the finished cases' seconds over their estimates, from PACE_AFTER finished cases on (1
        before: a session's first case also builds its base), kept within 0.5 to 3."""
        ratios = [s / self.estimates[self.cases[n]] for n, s in self.took.items() if self.cases[n] in self.estimates]
        if len(ratios) < PACE_AFTER:
            return 1.0
        return min(3.0, max(0.5, statistics.median(ratios)))

    def _session_estimate(self, cid: str) -> float | None:
        """For a case no earlier record knows: the median of this session's finished cases of its suite that no
        earlier record knew either (their own pace, so not scaled again)."""
        if self.suite_of is None:
            return None
        suite = self.suite_of(cid)
        done = [s for n, s in self.took.items()
                if self.cases[n] not in self.estimates and self.suite_of(self.cases[n]) == suite]
        return statistics.median(done) if done else None

    def estimate_s(self, cid: str) -> float | None:
        """Seconds this case should take: earlier records at this machine's pace, else this session's own."""
        if cid in self.estimates:
            return self.estimates[cid] * self._pace()
        return self._session_estimate(cid)

    def left_s(self) -> tuple[float, int]:
        """(seconds left over every unfinished case, cases without an estimate)."""
        now, left, unknown = self.clock(), 0.0, 0
        for node, cid in self.cases.items():
            if node in self.took:
                continue
            est = self.estimate_s(cid)
            if est is None:
                unknown += 1
                continue
            spent = now - self.started[node] if node in self.started else 0.0
            left += max(0.0, est - spent)
        return left / self.workers, unknown

    def headline(self) -> str:
        """The line before the first case: how many cases, and about how long."""
        left, unknown = self.left_s()
        n = len(self.cases)
        known = f"about {minutes(left)}" + (f" for {n - unknown} of them (earlier records)" if unknown else
                                            " (from earlier records of these cases)")
        return f"qlora-harness: {n} case{'s' if n != 1 else ''}, {known if n > unknown else 'no earlier records to estimate from'}" + (
            f", over {self.workers} workers" if self.workers > 1 else "")

    def start(self, node: str) -> str | None:
        """The line for a case that starts now (None for an item that is not a case)."""
        if node not in self.cases:
            return None
        self.started[node] = self.clock()
        cid = self.cases[node]
        n = list(self.cases).index(node) + 1 if self.workers == 1 else len(self.started)
        est = self.estimate_s(cid)
        this = f"about {minutes(est)}" if est is not None else "no estimate (never run before)"
        left, unknown = self.left_s()
        if unknown == len(self.cases) - len(self.took):  # nothing left can be estimated: no "about 0 s left"
            rest = f"{unknown} case{'s' if unknown > 1 else ''} left, none measured before"
        else:
            rest = f"about {minutes(left)} left" + (f" (+{unknown} without an estimate)" if unknown else "")
        return f"qlora-harness [{n}/{len(self.cases)}] {cid}: {this}; {rest}"

    def finish(self, node: str) -> None:
        if node in self.started and node not in self.took:
            self.took[node] = self.clock() - self.started[node]
