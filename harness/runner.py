"""One run: a folder of records, and the jobs that fill it, one class each.

- :class:`TierSelection` picks the tier and its memory budget, and says which cases are not for this
  machine (their suite's tiers) or will not fit (the estimator's predicted peak over the budget).
- :class:`Dispatcher` runs one case in a fresh worker process, or writes the record of a budget skip, and
  records a case cut off by Ctrl-C or SIGTERM as ``interrupted``.
- :class:`Expectations` checks a finished case: its suite's metric bounds and its baseline.
- :class:`CrossCase` computes what needs several cases of a suite: the gap to the reference method's adapter and
  the ratio expectations.
- :class:`Run` owns the run folder (made exclusively, through harness.records) and drives the four.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.expect import check_case, check_ratio
from harness.matrix import Case
from harness.records import (
    RERUN,
    WORK,
    ExpectationResult,
    Record,
    case_filename,
    check_name,
    create_run_dir,
    new_run_id,
    read_records,
    utcnow,
    write_json_atomic,
    write_record,
)
from harness.spec import TIERS, RatioExpectation, Suite

TIER_ORDER = list(TIERS)


def detect_tier(gpu_memory_gib: float | None) -> str:
    """The largest tier whose budget the GPU's memory meets; ``cpu`` without a GPU."""
    if gpu_memory_gib is None:
        return "cpu"
    fitting = [t for t, budget in TIERS.items() if budget is not None and gpu_memory_gib >= budget]
    return fitting[-1] if fitting else "cpu"


def resolve_tier(requested: str) -> tuple[str, float | None, str]:
    """(tier, memory budget in GiB, why) for ``--tier``; ``auto`` reads the GPU's memory."""
    from harness.measure.machine import memory_budget_gib

    gpu_mem = memory_budget_gib()
    if requested == "auto":
        tier = detect_tier(gpu_mem)
        why = f"auto: {'no GPU' if gpu_mem is None else f'GPU with {gpu_mem:.1f} GiB'}"
    elif requested in TIERS:
        tier, why = requested, "requested"
    else:
        raise ValueError(f"--tier: unknown tier {requested!r} (expected auto or one of {', '.join(TIERS)})")
    budget = TIERS[tier]
    if budget is None:  # the cpu tier's memory is the host's
        import psutil

        budget = psutil.virtual_memory().total / 2**30
    elif gpu_mem is not None:
        budget = min(budget, gpu_mem)
    return tier, budget, why


def resolve_seeds(requested: str, tier: str) -> int | None:
    """How many seeds of each replicated suite run (None: all) for ``--seeds``: ``all``, a count, or ``auto``
    (one seed on the cpu tier, so that a first ``pytest suites/`` ends in about 20 minutes; all on a GPU tier)."""
    text = str(requested).strip().lower()
    if text == "all":
        return None
    if text == "auto":
        return 1 if tier == "cpu" else None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--seeds {requested!r}: expected all, auto or a number of seeds (1 or more)")


@dataclass
class TierSelection:
    """The run's tier and memory budget: which cases this machine runs, and which the estimator skips."""

    tier: str = "cpu"
    budget_gib: float | None = None
    why: str = ""
    machine_fits: bool = True  # False when a GPU tier was requested on a machine without such a GPU

    def not_selected(self, case: Case) -> str | None:
        """Why a case is not for this machine (its suite's tiers), or None."""
        if self.tier not in case.tiers:
            return f"suite {case.suite} runs on tiers {', '.join(case.tiers)}; this run's tier is {self.tier} ({self.why})"
        if not self.machine_fits:
            return f"tier {self.tier} needs a GPU with {self.budget_gib} GiB; this machine has none that large"
        return None

    def over_budget(self, case: Case) -> tuple[str | None, dict[str, float]]:
        """The estimator's reason to skip a case whose predicted peak exceeds the tier's budget."""
        from harness import estimate

        est = estimate.for_case(case, "cpu" if self.tier == "cpu" else "cuda")
        if est is None:
            return None, {}
        if self.budget_gib is None:
            return None, est.as_metrics()
        fits, reason = estimate.fits(est, self.budget_gib)
        return (None if fits else reason), est.as_metrics()


@dataclass
class Dispatcher:
    """Runs one case (a worker process per case) or skips it over budget; never raises for a case's failure."""

    run_id: str
    run_dir: Path
    selection: TierSelection
    interrupted: Record | None = None  # the record of the case a Ctrl-C or SIGTERM cut off

    def work_dir(self, case: Case) -> Path:
        """The case's scratch folder, inside the run folder (``work/<case>``)."""
        return self.run_dir / WORK / case_filename(case.case_id).removesuffix(".json")

    def _record(self, case: Case, status: str, message: str, **fields: Any) -> Record:
        from harness.measure.machine import environment

        return Record(run_id=self.run_id, suite=case.suite, case_id=case.case_id, method=case.method,
                      params=case.params, status=status, message=message, env=environment(),
                      started_at=fields.pop("started_at", utcnow()), finished_at=utcnow(), **fields)

    def dispatch(self, case: Case) -> Record:
        """The case's record: a budget skip, the worker's record, or ``interrupted`` (then re-raised)."""
        from harness.worker import run_isolated

        reason, est = self.selection.over_budget(case)
        if reason:
            return self._record(case, "skipped", reason, metrics=est)
        started, t = utcnow(), time.perf_counter()
        try:
            record = run_isolated(case, self.run_id, self.run_dir, self.work_dir(case))
        except (KeyboardInterrupt, SystemExit) as exc:  # the worker is gone (run_isolated ends it): say so
            why = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) and not str(exc) else str(exc) or type(exc).__name__
            self.interrupted = self._record(
                case, "interrupted", f"run interrupted ({why}) while the case ran; its worker was stopped",
                started_at=started, timings_s={"total": time.perf_counter() - t})
            raise
        record.timings_s["total"] = time.perf_counter() - t
        return record


@dataclass
class Expectations:
    """Turns a passed record failed when a bound of its suite or its baseline says so."""

    baseline: dict[str, Record] | None = None

    def check(self, case: Case, suite: Suite, record: Record) -> None:
        if record.status != "passed":
            return
        record.expectations = check_case(case, list(suite.expectations), record)
        failed = [e.message for e in record.expectations if not e.ok]
        if self.baseline is not None and case.case_id in self.baseline and suite.replicates == 1:  # else by group
            from harness.compare import compare, vanished

            old = self.baseline[case.case_id]
            failed += [c.message for c in compare(record, old, suite.tolerances) if c.regressed]
            gone = vanished(record, old)
            if gone:
                failed.append(f"metrics in the baseline but not measured now: {', '.join(gone)}")
        if failed:
            record.status = "failed"
            record.message = "; ".join(failed)


@dataclass
class CrossCase:
    """What needs several cases of a suite: gaps to the reference method and ratio expectations."""

    run_dir: Path
    reference: str = ""  # the method others are compared with; default: harness.methods.REFERENCE
    extended: dict[str, Record] = field(default_factory=dict)  # the records of the run this one extends

    def records(self, suite: str | None = None) -> dict[str, Record]:
        """The records written so far in this run (all workers'), by case id, over those of the run it extends."""
        out = {k: r for k, r in self.extended.items() if suite is None or r.suite == suite}
        if self.run_dir.exists():
            out.update({r.case_id: r for r in read_records(self.run_dir, suite, skip_bad=True)})
        return out

    def gap_to_reference(self, case: Case, record: Record) -> None:
        """Accuracy gap of this adapter to the reference adapter of the same other settings, when that ran first."""
        from harness.methods import REFERENCE

        reference = self.reference or REFERENCE
        if case.method == reference or record.status != "passed":
            return
        others = {k: v for k, v in case.axes.items() if k != "method"}
        for ref in self.records(case.suite).values():
            if ref.method == reference and all(ref.params.get(k) == v for k, v in others.items()):
                for name, value in list(record.metrics.items()):
                    if name.startswith("eval.") and name.endswith((".acc", ".acc_norm")) and name in ref.metrics:
                        record.metrics[f"{name}_gap"] = value - ref.metrics[name]
                return

    def check_ratio(self, exp: RatioExpectation, cases: list[Case], wait_s: float = 0.0) -> list[ExpectationResult]:
        """Ratio expectations over this run's records, waiting (xdist) for the cases still running."""
        wanted = {c.case_id for c in cases}
        deadline = time.monotonic() + wait_s
        while True:
            records = self.records(cases[0].suite) if cases else {}
            if wanted <= set(records) or time.monotonic() > deadline:
                break
            time.sleep(2)
        results = check_ratio(exp, [c for c in cases if c.case_id in records], records)
        if results:
            write_json_atomic(self.run_dir / "suites" / f"{cases[0].suite}.{_slug(exp.label)}.json",
                              [r.model_dump() for r in results], overwrite=True)
        return results


@dataclass
class Run:
    """A run folder under ``results_dir`` and the jobs that fill it (see the module's docstring)."""

    results_dir: Path
    run_id: str = ""
    tier: str = "cpu"
    budget_gib: float | None = None
    tier_why: str = ""
    machine_fits: bool = True
    on_cpu: bool = False  # no GPU: the workers compute on the CPU
    joined: bool = False  # an xdist worker: the controller made the folder, this process adds to it
    baseline: dict[str, Record] | None = None
    extends: str = ""  # the earlier run (a sibling folder) whose records this run pools, measuring only what it lacks
    extended: dict[str, Record] = field(default_factory=dict)  # its records (and its own extended runs'), by case id
    started: bool = False
    executed: list[str] = field(default_factory=list)
    seeds: int | None = None  # --seeds: the first N seeds of each replicated suite run (None: all)

    def __post_init__(self) -> None:
        self.fixed_id = bool(self.run_id)  # a given id is used as it is or refused; a made one gets a suffix
        self.run_id = check_name(self.run_id, "--run-id") if self.run_id else new_run_id()
        self.claimed = self.joined

    @property
    def dir(self) -> Path:
        return self.results_dir / self.run_id

    @property
    def selection(self) -> TierSelection:
        return TierSelection(self.tier, self.budget_gib, self.tier_why, self.machine_fits)

    def claim(self) -> Path:
        """Make the run folder exclusively, once: never an earlier (or a concurrent) run's folder."""
        if not self.claimed:
            self.run_id = create_run_dir(self.results_dir, self.run_id, retry=not self.fixed_id).name
            self.claimed = True
        return self.dir

    def start(self, meta: dict[str, Any] | None = None) -> None:
        """Claim the run folder and describe the run in run.json (the first process of the run writes it)."""
        if self.started:
            return
        from harness.measure.machine import environment

        self.claim()
        info = {"run_id": self.run_id, "started_at": utcnow(), "tier": self.tier, "budget_gib": self.budget_gib,
                "tier_why": self.tier_why, "env": environment(), **(meta or {})}
        if self.extends:
            info["extends"] = self.extends
        try:
            write_json_atomic(self.dir / "run.json", info)
        except FileExistsError:
            pass  # another xdist worker of the same run wrote it
        self.started = True

    def not_selected(self, case: Case) -> str | None:
        return self.selection.not_selected(case)

    def over_budget(self, case: Case) -> tuple[str | None, dict[str, float]]:
        return self.selection.over_budget(case)

    def work_dir(self, case: Case) -> Path:
        return self._dispatcher().work_dir(case)

    def _dispatcher(self) -> Dispatcher:
        return Dispatcher(self.run_id, self.dir, self.selection)

    def run_case(self, case: Case, suite: Suite, baseline: dict[str, Record] | None = None) -> Record:
        """Run (or budget-skip) one case, check it, write its record; an interrupted case is written, then re-raised."""
        self.start()
        dispatcher = self._dispatcher()
        try:
            record = dispatcher.dispatch(case)
        except (KeyboardInterrupt, SystemExit):
            if dispatcher.interrupted is not None:
                write_record(self.dir, dispatcher.interrupted)
            raise
        cross = CrossCase(self.dir, extended=self.extended)
        cross.gap_to_reference(case, record)
        Expectations(baseline if baseline is not None else self.baseline).check(case, suite, record)
        write_record(self.dir, record)
        self.executed.append(case.case_id)
        return record

    def records(self, suite: str | None = None) -> dict[str, Record]:
        return CrossCase(self.dir, extended=self.extended).records(suite)

    def already_measured(self, case: Case, keep_noisy: bool = False) -> Record | None:
        """The extended run's record of this case, unless it must be measured again (``remeasure``)."""
        rec = self.extended.get(case.case_id)
        return rec if rec is not None and not remeasure(rec, keep_noisy) else None

    def check_ratio(self, exp: RatioExpectation, cases: list[Case], wait_s: float = 0.0):
        return CrossCase(self.dir, extended=self.extended).check_ratio(exp, cases, wait_s)


def remeasure(rec: Record, keep_noisy: bool = False) -> bool:
    """Does an extension measure this case again: its status (``RERUN``: error, interrupted, killed), or a timing
    the noise guard flagged (the machine was busy: its speed says nothing about the method), unless its suite
    keeps such cases (``noisy_timing: keep``: their timings stay out of the speed ratios instead)?"""
    from harness.measure.noise import timing_noisy

    return rec.status in RERUN or (not keep_noisy and timing_noisy(rec.metrics))


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]
