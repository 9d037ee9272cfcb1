"""A run: one folder of records. Picks the tier, skips what will not fit, runs cases, checks, reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.expect import check_case, check_ratio
from harness.matrix import Case
from harness.records import (
    Record,
    case_filename,
    new_run_id,
    read_record,
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


@dataclass
class Run:
    results_dir: Path
    run_id: str = ""
    tier: str = "cpu"
    budget_gib: float | None = None
    tier_why: str = ""
    machine_fits: bool = True  # False when a GPU tier was requested on a machine without such a GPU
    started: bool = False
    executed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_id = self.run_id or new_run_id()

    @property
    def dir(self) -> Path:
        return self.results_dir / self.run_id

    def start(self, meta: dict[str, Any] | None = None) -> None:
        """Create the run folder once (never reusing an earlier run's) and describe the run in run.json."""
        if self.started:
            return
        from harness.measure.machine import environment

        self.dir.mkdir(parents=True, exist_ok=True)
        info = {"run_id": self.run_id, "started_at": utcnow(), "tier": self.tier, "budget_gib": self.budget_gib,
                "tier_why": self.tier_why, "env": environment(), **(meta or {})}
        try:
            write_json_atomic(self.dir / "run.json", info)
        except FileExistsError:
            pass  # another xdist worker of the same run wrote it
        self.started = True

    # -- selection ---------------------------------------------------------------------------------
    def not_selected(self, case: Case) -> str | None:
        """Why a case is not for this machine (its suite's tiers), or None."""
        if self.tier not in case.tiers:
            return f"suite {case.suite} runs on tiers {', '.join(case.tiers)}; this run's tier is {self.tier} ({self.tier_why})"
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

    # -- running -----------------------------------------------------------------------------------
    def work_dir(self, case: Case) -> Path:
        return self.dir / "work" / case_filename(case.case_id).removesuffix(".json")

    def run_case(self, case: Case, suite: Suite, baseline: dict[str, Record] | None = None) -> Record:
        """Run (or budget-skip) one case in a fresh process, check it, write its record."""
        from harness.worker import run_isolated

        self.start()
        reason, est = self.over_budget(case)
        if reason:
            from harness.measure.machine import environment

            record = Record(run_id=self.run_id, suite=case.suite, case_id=case.case_id, method=case.method,
                            params=case.params, status="skipped", message=reason, metrics=est,
                            env=environment(), started_at=utcnow(), finished_at=utcnow())
        else:
            t = time.perf_counter()
            record = run_isolated(case, self.run_id, self.dir, self.work_dir(case))
            record.timings_s["total"] = time.perf_counter() - t
        self._finish(case, suite, record, baseline)
        write_record(self.dir, record)
        self.executed.append(case.case_id)
        return record

    def _finish(self, case: Case, suite: Suite, record: Record, baseline: dict[str, Record] | None) -> None:
        if record.status != "passed":
            return
        _gap_to_reference(case, record, self.records(case.suite))
        record.expectations = check_case(case, list(suite.expectations), record)
        failed = [e.message for e in record.expectations if not e.ok]
        if baseline is not None and case.case_id in baseline:
            from harness.compare import compare

            changes = compare(record, baseline[case.case_id], suite.tolerances)
            failed += [c.message for c in changes if c.regressed]
        if failed:
            record.status = "failed"
            record.message = "; ".join(failed)

    def records(self, suite: str | None = None) -> dict[str, Record]:
        """The records written so far in this run (all workers'), by case id."""
        out = {}
        for p in sorted(self.dir.glob("*.json")):
            if p.name == "run.json":
                continue
            r = read_record(p)
            if suite is None or r.suite == suite:
                out[r.case_id] = r
        return out

    def check_ratio(self, exp: RatioExpectation, cases: list[Case], wait_s: float = 0.0):
        """Ratio expectations over this run's records, waiting (xdist) for the cases still running."""
        wanted = {c.case_id for c in cases}
        deadline = time.monotonic() + wait_s
        while True:
            records = self.records(cases[0].suite) if cases and self.dir.exists() else {}
            if wanted <= set(records) or time.monotonic() > deadline:
                break
            time.sleep(2)
        results = check_ratio(exp, [c for c in cases if c.case_id in records], records)
        if results:
            write_json_atomic(self.dir / "suites" / f"{cases[0].suite}.{_slug(exp.label)}.json",
                              [r.model_dump() for r in results], overwrite=True)
        return results


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def _gap_to_reference(case: Case, record: Record, earlier: dict[str, Record]) -> None:
    """Accuracy gap of this adapter to the reference method's adapter of the same other settings, when that ran
    first."""
    from harness.methods import REFERENCE

    if case.method == REFERENCE:
        return
    others = {k: v for k, v in case.axes.items() if k != "method"}
    for ref in earlier.values():
        if ref.method == REFERENCE and all(ref.params.get(k) == v for k, v in others.items()):
            for name, value in list(record.metrics.items()):
                if name.startswith("eval.") and name.endswith((".acc", ".acc_norm")) and name in ref.metrics:
                    record.metrics[f"{name}_gap"] = value - ref.metrics[name]
            return

