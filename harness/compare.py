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
several run folders (one level down, never their ``work/``) is read run by run and the most recently
finished record of a case wins.

A comparison reports, besides each metric's change: metrics the baseline had and the new record lacks
(vanished), cases that passed in the baseline and now end failed, error, oom, killed or interrupted, and
baseline cases missing from the new run.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import methods, metrics
from harness.records import Record, RecordError, baseline_record_paths, read_record, read_records, resolve_run

BASELINES = "baselines"  # results/baselines/<tier>/
__all__ = ["BASELINES", "BaseCheck", "Change", "Comparison", "RecordError", "build_kind", "compare", "kind_apart",
           "compare_bases", "compare_runs", "load_baseline", "load_records", "vanished"]


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
    inconclusive: str = ""  # why the change cannot be judged (a timing of a noisy record), else ""

    @property
    def verdict(self) -> str:
        if self.inconclusive:
            return "inconclusive"
        if self.regressed:
            return "regressed"
        if self.improved:
            return "improved"
        return "unchanged" if self.rel_change == 0 else "within tolerance"

    @property
    def message(self) -> str:
        """``train.peak_reserved_gib regressed: 4.10 -> 4.60 (+12.2%, tolerance 5%)``."""
        why = f"; {self.inconclusive}" if self.inconclusive else ""
        return (
            f"{self.metric} {self.verdict}: {fmt(self.old)} -> {fmt(self.new)} "
            f"({fmt_pct(self.rel_change)}, tolerance {self.tolerance * 100:g}%{why})"
        )


def fmt(value: float, digits: int = 3) -> str:
    """``digits`` significant digits, trailing zeros kept (``4.10``, ``0.0921``, ``12,345``)."""
    if value is None:
        return "–"
    if not math.isfinite(value):  # shown as what it is, never as a number or a blank
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:#.{digits}g}".rstrip(".")


def fmt_pct(rel: float) -> str:
    """A signed percentage, ``+12.2%``; ``+inf%`` from a zero baseline."""
    if math.isnan(rel):
        return "nan%"
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
    """Every metric with a direction present in both records (finite in the baseline), in ``new``'s order."""
    changes = []
    for name, value in new.metrics.items():
        direction = metrics.direction(name)
        old = base.metrics.get(name)
        if direction == "none" or old is None or not math.isfinite(old):
            continue
        if not math.isfinite(value):  # a finite baseline became NaN or infinite: always a regression
            changes.append(Change(name, old, value, math.nan, tolerance_for(name, tolerances), regressed=True,
                                  improved=False, case_id=new.case_id))
            continue
        rel = relative_change(old, value)
        tol = tolerance_for(name, tolerances)
        worse = rel if direction == "lower" else -rel  # > 0 means worse
        noisy = _noisy_timing(name, new, base)
        changes.append(
            Change(name, old, value, rel, tol, regressed=worse > tol and not noisy, improved=worse < 0 and not noisy,
                   case_id=new.case_id, inconclusive=noisy)
        )
    return changes


def vanished(new: Record, base: Record) -> list[str]:
    """Metrics with a direction that a baseline record which ran had and a new record which ran lacks."""
    ran = ("passed", "failed")  # failed: every stage ran, an expectation did not hold
    if new.status not in ran or base.status not in ran:
        return []
    return [m for m in base.metrics if m not in new.metrics and metrics.direction(m) != "none"]


def status_regressed(new: Record, base: Record) -> bool:
    """A case that passed in the baseline and now ends in anything but passed or skipped."""
    return base.status == "passed" and new.status not in ("passed", "skipped")


def _noisy_timing(name: str, new: Record, base: Record) -> str:
    """Why a timing metric cannot be judged: either record's timing was flagged noisy (the noise guard)."""
    from harness.measure.noise import is_timing_metric, timing_noisy

    if not is_timing_metric(name):
        return ""
    which = [w for w, r in (("new", new), ("baseline", base)) if timing_noisy(r.metrics)]
    return f"timing of the {' and '.join(which)} record flagged noisy" if which else ""


def load_records(folder: Path) -> list[Record]:
    """Every record of a run folder; a bad file raises RecordError naming it in one line."""
    return read_records(folder)


def load_baseline(ref: str | Path, results_dir: Path = Path("results")) -> dict[str, Record]:
    """Records of a baseline by case id; ``ref`` is a run id, a run folder or a tier (see module doc)."""
    results_dir = Path(results_dir)
    tier_dir = results_dir / BASELINES / str(ref)
    if not Path(ref).is_dir() and tier_dir.is_dir():
        folder = tier_dir
    else:
        folder = resolve_run(ref, results_dir)  # FileNotFoundError with a one-line message
    records = [read_record(p) for p in baseline_record_paths(folder)]
    if not records:
        raise FileNotFoundError(f"{folder}: no records in this baseline folder")
    by_case: dict[str, Record] = {}
    for rec in sorted(records, key=lambda r: r.finished_at or r.started_at):
        by_case[rec.case_id] = rec
    return by_case


@dataclass
class Comparison:
    """A new run against a baseline: metric changes and everything else that got worse or went missing."""

    changes: list[Change] = field(default_factory=list)
    no_baseline: list[str] = field(default_factory=list)  # new cases the baseline lacks
    missing: list[str] = field(default_factory=list)  # baseline cases of the new run's suites it lacks
    vanished: list[tuple[str, str]] = field(default_factory=list)  # (case id, metric) gone from a passed case
    status: list[tuple[str, str, str]] = field(default_factory=list)  # (case id, old, new): passed -> not passed

    @property
    def regressed(self) -> int:
        """Everything that counts against the new run."""
        return sum(c.regressed for c in self.changes) + len(self.vanished) + len(self.status) + len(self.missing)


def compare_runs(
    new: list[Record],
    base: Mapping[str, Record],
    tolerances: Mapping[str, float] | None = None,
    suite_tolerances: Mapping[str, Mapping[str, float]] | None = None,
) -> Comparison:
    """The new records against their baseline records, matched by case id.

    ``tolerances`` apply to every suite and come first; ``suite_tolerances[suite]`` (a suite file's
    ``tolerances:``) follow, then the registry's defaults.
    """
    out = Comparison()
    seen = set()
    for rec in new:
        old = base.get(rec.case_id)
        if old is None:
            out.no_baseline.append(rec.case_id)
            continue
        seen.add(rec.case_id)
        tols = dict(tolerances or {})  # first match wins: these patterns before the suite's
        for pattern, tol in (suite_tolerances or {}).get(rec.suite, {}).items():
            tols.setdefault(pattern, tol)
        out.changes.extend(compare(rec, old, tols))
        out.vanished.extend((rec.case_id, m) for m in vanished(rec, old))
        if status_regressed(rec, old):
            out.status.append((rec.case_id, old.status, rec.status))
    suites = {r.suite for r in new}  # a run of some suites is not missing the others' cases
    out.missing = [cid for cid, r in base.items() if cid not in seen and r.suite in suites]
    return out


def build_kind(rec: Record | Mapping[str, Any]) -> dict[str, Any]:
    """What a bit-for-bit rebuild of a base depends on: the processor (and its vector instruction set, where
    the record names it), the accelerator and the numeric libraries' versions; of a record or an environment."""
    env = (rec if isinstance(rec, Mapping) else rec.env) or {}
    cpu, gpu, versions = env.get("cpu") or {}, env.get("gpu") or {}, env.get("versions") or {}
    kind = {"cpu": cpu.get("name"), "isa": cpu.get("isa"), "gpu": gpu.get("name"), "device": env.get("device")}
    kind.update({lib: versions.get(lib) for lib in ("torch", "transformers", *methods.packages())})
    return kind


def kind_apart(a: Record | Mapping[str, Any], b: Record | Mapping[str, Any]) -> list[str]:
    """How two records or environments differ in ``build_kind``, where both name the field: ``torch 2.13 vs 2.12``."""
    x, y = build_kind(a), build_kind(b)
    return [f"{k} {x[k]} vs {y[k]}" for k in x if x[k] is not None and y[k] is not None and x[k] != y[k]]


@dataclass
class BaseCheck:
    """Which cases of a run stand on the same base, bit for bit, as a reference run's cases of the same id."""

    same: list[str] = field(default_factory=list)
    different: list[tuple[str, str, str]] = field(default_factory=list)  # (case id, this run's, reference's)
    not_comparable: list[tuple[str, str]] = field(default_factory=list)  # (case id, why)


def compare_bases(new: list[Record], reference: Mapping[str, Record]) -> BaseCheck:
    """Each new case's base fingerprint against the reference's record of the same case id.

    A pair is judged only when both were built on the same kind of machine with the same library versions
    (``build_kind``): other kernels give other floats, so a differing fingerprint there says nothing about the
    code. Equal fingerprints need no such proof; differing ones where only one record names a field (older
    records lack the instruction set) are not comparable rather than different.
    """
    out = BaseCheck()
    for rec in new:
        old = reference.get(rec.case_id)
        fp, old_fp = rec.model.get("fingerprint"), (old.model.get("fingerprint") if old else None)
        if fp is None or old_fp is None:
            continue
        a, b = build_kind(rec), build_kind(old)
        apart = kind_apart(rec, old)
        unknown = [k for k in a if (a[k] is None) != (b[k] is None)]
        if apart:
            out.not_comparable.append((rec.case_id, "built on another kind of machine: " + ", ".join(apart)))
        elif fp == old_fp:
            out.same.append(rec.case_id)
        elif unknown:  # the same bytes need no proof of a like machine; different ones do
            out.not_comparable.append((rec.case_id, f"base {str(fp)[:16]} differs from {str(old_fp)[:16]}, but only "
                                       f"one record names its {', '.join(unknown)}"))
        else:
            out.different.append((rec.case_id, str(fp), str(old_fp)))
    return out
