"""Regressions against a baseline: each metric judged by its direction and a relative tolerance.

Baselines
---------
A baseline is any folder of records (one ``<case>.json`` per case, as written by a run). ``load_baseline``
accepts:

* a run id under ``results/`` (``20261122T133522Z-gpu01``) or ``latest``;
* a path to a run folder (``results/20261122T133522Z-gpu01``);
* a tier name (``gpu-24gb``), meaning ``results/baselines/<tier>/``, or a path to such a folder.

The convention for checked-in baselines is ``results/baselines/<tier>/``: copy the records of a trusted
run on that tier's machine into it (``cp results/<run-id>/*.json results/baselines/gpu-24gb/``, the
``run.json`` optional) and commit them. Records are matched to new ones by ``case_id``; a folder holding
several runs (sub-folders) is searched recursively and the most recently finished record of a case wins.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness import metrics
from harness.records import Record, read_record, resolve_run

BASELINES = "baselines"  # results/baselines/<tier>/


class RecordError(ValueError):
    """A record or run file that cannot be read; ``str()`` names the file in one line."""


@dataclass(frozen=True)
class Change:
    """One metric of one case, old against new, judged by the metric's direction and tolerance."""

    metric: str
    old: float
    new: float
    rel_change: float  # (new - old) / |old|; +inf/-inf when old is 0
    tolerance: float
    regressed: bool
    improved: bool  # better than the baseline (never a regression)
    case_id: str = ""

    @property
    def verdict(self) -> str:
        if self.regressed:
            return "regressed"
        if self.improved:
            return "improved"
        return "unchanged" if self.rel_change == 0 else "within tolerance"

    @property
    def message(self) -> str:
        """``train.peak_reserved_gib regressed: 4.10 -> 4.60 (+12.2%, tolerance 5%)``."""
        return (
            f"{self.metric} {self.verdict}: {fmt(self.old)} -> {fmt(self.new)} "
            f"({fmt_pct(self.rel_change)}, tolerance {self.tolerance * 100:g}%)"
        )


def fmt(value: float, digits: int = 3) -> str:
    """``digits`` significant digits, trailing zeros kept (``4.10``, ``0.0921``, ``12,345``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:#.{digits}g}".rstrip(".")


def fmt_pct(rel: float) -> str:
    """A signed percentage, ``+12.2%``; ``+inf%`` from a zero baseline."""
    return f"{rel * 100:+.1f}%" if math.isfinite(rel) else ("+inf%" if rel > 0 else "-inf%")


def tolerance_for(name: str, tolerances: Mapping[str, float] | None = None) -> float:
    """The first suite tolerance whose fnmatch pattern matches ``name``, else the registry's default."""
    for pattern, tol in (tolerances or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(tol)
    return metrics.info(name).tolerance


def relative_change(old: float, new: float) -> float:
    """``(new - old) / |old|``, with ±inf when a zero baseline moved."""
    if new == old:
        return 0.0
    if old == 0:
        return math.copysign(math.inf, new - old)
    return (new - old) / abs(old)


def compare(new: Record, base: Record, tolerances: Mapping[str, float] | None = None) -> list[Change]:
    """Every metric with a direction present (and finite) in both records, in ``new``'s order."""
    changes = []
    for name, value in new.metrics.items():
        direction = metrics.direction(name)
        old = base.metrics.get(name)
        if direction == "none" or old is None or not (math.isfinite(value) and math.isfinite(old)):
            continue
        rel = relative_change(old, value)
        tol = tolerance_for(name, tolerances)
        worse = rel if direction == "lower" else -rel  # > 0 means worse
        changes.append(
            Change(name, old, value, rel, tol, regressed=worse > tol, improved=worse < 0, case_id=new.case_id)
        )
    return changes


def _records_in(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.glob("*.json")) if p.name != "run.json"]
    return files or [p for p in sorted(folder.rglob("*.json")) if p.name != "run.json"]


def load_records(folder: Path) -> list[Record]:
    """Read every record of a folder; a bad file raises RecordError naming it in one line."""
    out = []
    for path in _records_in(Path(folder)):
        try:
            out.append(read_record(path))
        except ValueError as exc:  # JSON and pydantic errors are ValueErrors
            first = str(exc).strip().splitlines()
            raise RecordError(f"{path}: not a readable record ({' '.join(first[:2])})") from None
    return out


def load_baseline(ref: str | Path, results_dir: Path = Path("results")) -> dict[str, Record]:
    """Records of a baseline by case id; ``ref`` is a run id, a run folder or a tier (see module doc)."""
    results_dir = Path(results_dir)
    tier_dir = results_dir / BASELINES / str(ref)
    if not Path(ref).is_dir() and tier_dir.is_dir():
        folder = tier_dir
    else:
        folder = resolve_run(ref, results_dir)  # FileNotFoundError with a one-line message
    records = load_records(folder)
    if not records:
        raise FileNotFoundError(f"{folder}: no records in this baseline folder")
    by_case: dict[str, Record] = {}
    for rec in sorted(records, key=lambda r: r.finished_at or r.started_at):
        by_case[rec.case_id] = rec
    return by_case


def compare_runs(
    new: list[Record],
    base: Mapping[str, Record],
    tolerances: Mapping[str, float] | None = None,
    suite_tolerances: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[Change], list[str]]:
    """All changes of the new records that have a baseline, and the case ids that have none.

    ``tolerances`` apply to every suite and come first; ``suite_tolerances[suite]`` (a suite file's
    ``tolerances:``) follow, then the registry's defaults.
    """
    changes: list[Change] = []
    missing: list[str] = []
    for rec in new:
        if rec.case_id in base:
            tols = dict(tolerances or {})  # first match wins: these patterns before the suite's
            for pattern, tol in (suite_tolerances or {}).get(rec.suite, {}).items():
                tols.setdefault(pattern, tol)
            changes.extend(compare(rec, base[rec.case_id], tols))
        else:
            missing.append(rec.case_id)
    return changes, missing
