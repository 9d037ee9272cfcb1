"""Matrix expansion: a suite's axes become frozen cases with stable, readable ids."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from harness import launchers, sources
from harness.spec import (
    ID_PREFIX,
    DataSpec,
    EvalSpec,
    MetricExpectation,
    ModelSpec,
    NonInferiorityExpectation,
    RatioExpectation,
    Settings,
    SpecError,
    Suite,
    _message,
    resolved_data,
    short,
    validate_settings,
)


class Case(BaseModel):
    """One point of a suite's matrix: its id plus every resolved parameter. Plain, frozen, JSON-able."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    suite: str
    case_id: str
    suite_file: str  # absolute path of the suite file
    tiers: tuple[str, ...]
    stages: tuple[str, ...]
    model: ModelSpec
    data: DataSpec | None  # paths made absolute
    eval: EvalSpec | None
    task_dir: str  # absolute path of the shipped lm-eval tasks next to the suite
    settings: Settings
    axes: dict[str, Any]  # the matrix coordinates of this case (a subset of settings)
    timeout_s: float

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def params(self) -> dict[str, Any]:
        return self.settings.model_dump()


def _token(axis: str, value: Any) -> str:
    prefix = ID_PREFIX.get(axis, axis)
    if isinstance(value, bool):
        return prefix if value else f"no{prefix}"
    if value is None:
        return f"{prefix}none"
    text = str(value).replace(",", "+")
    return f"{prefix}{text}" if prefix else text


def case_id(suite: str, axes: dict[str, Any]) -> str:
    """``train-memory[qlora-nf4-dq-seq512]``: the method first, then the other axes in matrix order."""
    ordered = ([("method", axes["method"])] if "method" in axes else []) + [
        (k, v) for k, v in axes.items() if k != "method"
    ]
    return f"{suite}[{'-'.join(_token(k, v) for k, v in ordered)}]"


def expand(suite: Suite, path: Path | str) -> list[Case]:
    """Every combination of the matrix axes, in file order, each validated as a whole."""
    path = Path(path).resolve()
    base = path.parent
    data = resolved_data(suite, base)
    ev = suite.eval
    if ev is not None:  # every path absolute: lm-eval resolves data_files from the working directory
        tasks = [t.model_copy(update={"data_files": {k: str((base / v).resolve()) for k, v in t.data_files.items()}})
                 if t.data_files else t for t in ev.tasks]
        ev = ev.model_copy(update={
            "tasks": tasks, "heldout": str((base / ev.heldout).resolve()) if ev.heldout else None,
            "answers": str((base / ev.answers).resolve()) if ev.answers else None,
            "task_dir": str((base / ev.task_dir).resolve()) if ev.task_dir else None})
    model = sources.get(suite.model.source).resolve(suite.model, base)  # its paths made absolute
    if model.tokenizer is not None and sources.tokenizer_is_path(model.tokenizer):
        model = model.model_copy(update={"tokenizer": str((base / Path(model.tokenizer).expanduser()).resolve())})
    matrix = dict(suite.matrix)
    if suite.replicates > 1:  # a seed axis, last in the id: smoke[qlora-nf4-seed1]
        first = int(suite.settings.get("seed") or 0)
        matrix["seed"] = list(range(first, first + suite.replicates))
    axes_names = list(matrix)
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for n, combo in enumerate(itertools.product(*(matrix[a] for a in axes_names))):
        axes = dict(zip(axes_names, combo, strict=False))
        fixed = {k: v for k, v in suite.settings.items() if k not in axes}
        settings: Settings = validate_settings(path, {**fixed, **axes}, "matrix")
        cid = case_id(suite.name, axes)
        why = launchers.get(settings.launcher).check(settings, tuple(suite.stages))
        if why:
            raise SpecError(path, "matrix" if "launcher" in axes or "strategy" in axes else "settings", f"{cid}: {why}")
        if cid in seen:
            raise SpecError(path, "matrix", f"duplicate case id {cid} (combinations {seen[cid]} and {n})")
        seen[cid] = n
        cases.append(
            Case(
                suite=suite.name,
                case_id=cid,
                suite_file=str(path),
                tiers=tuple(suite.tiers),
                stages=tuple(suite.stages),
                model=model,
                data=data,
                eval=ev,
                task_dir=str((base / "tasks").resolve()),
                settings=settings,
                axes=axes,
                timeout_s=suite.timeout_s,
            )
        )
    _check_ratios(suite, cases, path)
    _check_selections(suite, cases, path)
    _check_slice(suite, cases, path)
    return cases


def _check_slice(suite: Suite, cases: list[Case], path: Path) -> None:
    """``slice:`` must name valid settings and select cases (a slice of nothing would run nothing of the suite)."""
    if not suite.slice or suite.slice == "none":
        return
    _check_values(suite.slice, path, "slice")
    if not any(matches(c, suite.slice, collecting=True) for c in cases):
        raise SpecError(path, "slice", f"{short(suite.slice)} selects no case of the matrix")


def _check_values(selector: dict[str, Any], path: Path, where: str) -> None:
    """Every value a selector names (``where:``, ``slice:``) must be valid for its setting: one line if not."""
    for key, want in selector.items():
        for value in want if isinstance(want, list) else [want]:
            try:
                Settings.model_validate({key: value})
            except ValidationError as exc:
                errs = [e for e in exc.errors() if e["loc"][:1] == (key,)]
                if errs:
                    raise SpecError(path, f"{where}.{key}", _message(errs[0])) from None


def in_slice(case: Case, suite: Suite) -> bool:
    """True when a run of fewer seeds takes this case (the suite has no slice, or the slice selects it; ``none``
    selects nothing)."""
    if suite.slice == "none":
        return False
    return not suite.slice or matches(case, suite.slice, collecting=True)


def _check_selections(suite: Suite, cases: list[Case], path: Path) -> None:
    """Each ``where:`` of a bound or a non-inferiority check must name valid values and select cases of this
    matrix: a bound that selects nothing would never be checked, and pass as if it held."""
    for i, exp in enumerate(suite.expectations):
        if not isinstance(exp, MetricExpectation | NonInferiorityExpectation) or not exp.where:
            continue
        _check_values(exp.where, path, f"expectations[{i}].where")
        chosen = [c for c in cases if matches(c, exp.where, collecting=True)]
        if isinstance(exp, NonInferiorityExpectation):
            against = exp.against or suite.reference
            lacking = [m for m in (exp.method, against) if not any(c.method == m for c in chosen)]
            if lacking:
                raise SpecError(path, f"expectations[{i}].where", f"{short(exp.where)} selects no {lacking[0]} case "
                                                                  "of the matrix: the check would never run")
        elif not chosen:
            raise SpecError(path, f"expectations[{i}].where", f"{short(exp.where)} selects no case of the matrix: "
                                                              "the bound would never be checked")


def _check_ratios(suite: Suite, cases: list[Case], path: Path) -> None:
    """Each ratio expectation must pair at least one numerator case with a denominator case of this matrix."""
    for i, exp in enumerate(suite.expectations):
        if not isinstance(exp, RatioExpectation):
            continue
        nums = [c for c in cases if matches(c, exp.numerator)]
        dens = [c for c in cases if matches(c, exp.denominator)]
        for side, chosen, selector in (("numerator", nums, exp.numerator), ("denominator", dens, exp.denominator)):
            if not chosen:
                raise SpecError(path, f"expectations[{i}].{side}", f"{short(selector)} selects no case of the matrix")
        keys = set(exp.numerator) | set(exp.denominator)

        def others(c: Case, keys: set = keys) -> tuple:
            return tuple(sorted((k, repr(v)) for k, v in c.axes.items() if k not in keys))

        if not {others(c) for c in nums} & {others(c) for c in dens}:
            raise SpecError(path, f"expectations[{i}]", "no numerator case has a denominator case equal on the "
                                                        "other axes: the ratio would never be checked")


def matches(case: Case, selector: dict[str, Any], params: dict[str, Any] | None = None, *,
            collecting: bool = False) -> bool:
    """True when the case's settings (or ``params``: a record's, where an ``auto`` setting holds what it resolved
    to) equal the selector (a list value means any of them). ``collecting``: before the worker resolved them, an
    ``auto`` setting may become any value."""
    params = case.params if params is None else {**case.params, **params}
    for key, want in selector.items():
        have = params.get(key)
        if collecting and have == "auto":
            continue
        if isinstance(want, list) and not isinstance(have, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def run_order(suite: Suite, cases: list[Case]) -> list[Case]:
    """The order the cases run in (``suite.order``): with a seed axis and ``blocks``, seed by seed, each block's
    cases shuffled by a generator seeded from the suite's name and the seed (the same order on every machine and
    every run, none of it chosen by hand); otherwise the matrix's order."""
    seeds = [c.axes["seed"] for c in cases if "seed" in c.axes]
    if suite.order != "blocks" or len(set(seeds)) < 2:
        return list(cases)
    import hashlib

    import numpy as np

    blocks: dict[Any, list[Case]] = {}
    for c in cases:
        blocks.setdefault(c.axes.get("seed"), []).append(c)
    out: list[Case] = []
    for seed, block in blocks.items():
        key = int.from_bytes(hashlib.sha256(f"{suite.name}:{seed}".encode()).digest()[:8], "little")
        out += [block[i] for i in np.random.default_rng(key).permutation(len(block))]
    return out
