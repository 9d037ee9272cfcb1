"""Expectations turn metrics into pass/fail: bounds on one case, and ratios between cases of a suite."""

from __future__ import annotations

import math
from typing import Any

from harness.matrix import Case, matches
from harness.records import ExpectationResult, Record
from harness.spec import MetricExpectation, RatioExpectation


def _bound_message(what: str, value: float, lo: float | None, hi: float | None) -> tuple[bool, str]:
    ok = not math.isnan(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    want = " and ".join(s for s in (f">= {lo:g}" if lo is not None else "", f"<= {hi:g}" if hi is not None else "") if s)
    return ok, f"{what} = {value:.6g} ({'ok' if ok else 'expected ' + want})"


def check_case(case: Case, expectations: list[Any], record: Record) -> list[ExpectationResult]:
    """Every metric bound that applies to this case; a missing metric fails (a stage silently skipped). ``where``
    selects on the record's settings: ``compute_dtype: fp32`` picks the cases whose ``auto`` resolved to fp32."""
    results = []
    for exp in expectations:
        if not isinstance(exp, MetricExpectation) or not matches(case, exp.where, record.params or None):
            continue
        name = exp.name or exp.metric
        value = record.metrics.get(exp.metric)
        if value is None:
            results.append(ExpectationResult(name=name, metric=exp.metric, value=None, ok=False,
                                             message=f"{exp.metric} was not measured"))
            continue
        ok, msg = _bound_message(exp.metric, value, exp.min, exp.max)
        results.append(ExpectationResult(name=name, metric=exp.metric, value=value, ok=ok, message=msg))
    return results


def _others(case: Case, keys: set[str]) -> tuple:
    return tuple(sorted((k, v) for k, v in case.axes.items() if k not in keys))


def check_ratio(exp: RatioExpectation, cases: list[Case], records: dict[str, Record]) -> list[ExpectationResult]:
    """metric(numerator) / metric(denominator) for each pair of cases equal on the other axes."""
    keys = set(exp.numerator) | set(exp.denominator)
    nums = [c for c in cases if matches(c, exp.numerator)]
    dens = {_others(c, keys): c for c in cases if matches(c, exp.denominator)}
    results = []
    for num in nums:
        den = dens.get(_others(num, keys))
        if den is None:
            continue
        label = f"{exp.label} @ {num.case_id} / {den.case_id}"
        rn, rd = records.get(num.case_id), records.get(den.case_id)
        a = rn.metrics.get(exp.ratio) if rn else None
        b = rd.metrics.get(exp.ratio) if rd else None
        if a is None or b is None or b == 0:
            missing = num.case_id if a is None else den.case_id
            results.append(ExpectationResult(name=label, metric=exp.ratio, value=None, ok=False,
                                             message=f"{exp.ratio} missing or zero for {missing}"))
            continue
        ok, msg = _bound_message(f"{exp.ratio} ratio {num.case_id} / {den.case_id}", a / b, exp.min, exp.max)
        results.append(ExpectationResult(name=label, metric=exp.ratio, value=a / b, ok=ok, message=msg))
    return results
