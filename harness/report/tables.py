"""Comparison tables from ``records_frame``: column choice and order, units, best values, baseline deltas."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness import metrics
from harness import metrics as M
from harness.compare import compare, fmt, fmt_pct
from harness.measure.noise import is_timing_metric
from harness.records import Record, records_frame
from harness.report.data import case_label, load_run, write_text_atomic

GROUPS = ("quant", "estimate", "train", "eval")  # column order; other prefixes follow
IDENTITY = {"run_id", "suite", "case_id", "method", "status", "message", "gpu"}
# The main table's columns, in this order (fnmatch patterns; eval columns are grouped by task). Every
# other metric is in the page's "all metrics" table and the CSV.
HEADLINE = (
    M.RMSE, M.INT4_RMSE, M.REL_ERROR, M.COSINE, M.BITS_PER_PARAM,
    M.EST_TOTAL,
    M.PEAK_ALLOCATED, M.PEAK_RESERVED, M.NVML_PEAK, M.PEAK_RSS,
    M.MANAGED, M.TOKENS_PER_S, M.MFU, M.STEP_MEDIAN_MS,
    M.LOSS_LAST, M.LOSS_DROP,
    "eval.*.acc", "eval.*.acc_gain", "eval.*.acc_gap", "eval.*.acc_merge_delta", "eval.*.word_perplexity",
)
FALLBACK_PER_GROUP = 6  # one of GROUPS with values but no headline column shows up to this many of its own
# Per-layer, per-block or per-projection details (``quant.layers.3.rmse``, ``quant.q.rmse``) are never headline.
_DETAIL = re.compile(r"(^|\.)(layers?|blocks?|modules?|\d+)(\.|$)|^quant\.(q|k|v|o|gate|up|down)\.")
# Metrics worth a column in the terminal summary, in order (fnmatch patterns).
KEY_METRICS = (
    M.RMSE,
    M.BITS_PER_PARAM,
    M.PEAK_RESERVED,
    M.NVML_PEAK,
    M.PEAK_ALLOCATED,
    M.PEAK_RSS,
    M.TOKENS_PER_S,
    M.MFU,
    M.LOSS_LAST,
    "eval.*.acc",
)


@dataclass(frozen=True)
class Column:
    """A metric column: its name, unit and direction, and how its header reads."""

    name: str

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0] if "." in self.name else "other"

    @property
    def short(self) -> str:
        return self.name.split(".", 1)[1] if "." in self.name else self.name

    @property
    def display(self) -> str:
        """The short name without its unit suffix, for a header: ``peak reserved``, ``tokens/s``."""
        if self.group == "eval" and "." in self.short:
            task, rest = self.short.split(".", 1)  # the task name keeps its underscores
            return f"{task} {rest.replace('_', ' ')}"
        text = re.sub(r"_per_s$", "/s", self.short)
        text = re.sub(r"_(gib|mib|ms|s|pct|bytes)$", "", text)
        return text.replace("_", " ")

    @property
    def unit_note(self) -> str:
        """The unit, unless the display name already says it."""
        return "" if self.unit in self.display else self.unit

    @property
    def unit(self) -> str:
        return metrics.info(self.name).unit

    @property
    def direction(self) -> str:
        return metrics.direction(self.name)

    @property
    def arrow(self) -> str:
        return {"lower": "↓", "higher": "↑"}.get(self.direction, "")

    @property
    def title(self) -> str:
        info = metrics.info(self.name)
        better = {"lower": "lower is better", "higher": "higher is better"}.get(info.direction, "no direction")
        return f"{self.name}: {info.label or 'metric'}" + (f" [{info.unit}]" if info.unit else "") + f", {better}"

    @property
    def header(self) -> str:
        """Plain-text header with its unit, for CSV-like outputs: ``peak_reserved_gib [GiB]``."""
        return f"{self.name} [{self.unit}]" if self.unit else self.name


@dataclass
class Cell:
    text: str = ""
    value: float | None = None
    best: bool = False
    stderr: str = ""
    delta: str = ""
    delta_class: str = ""  # better | worse | regressed | same
    delta_title: str = ""
    noisy: str = ""  # why this timing figure is not to be trusted (the noise guard's reason), else ""


@dataclass
class Row:
    case_id: str
    label: str
    method: str
    status: str
    message: str
    cells: list[Cell] = field(default_factory=list)


@dataclass
class Table:
    """One suite's comparison: metric columns (with their groups) and one row per case."""

    suite: str
    columns: list[Column]
    rows: list[Row]

    @property
    def groups(self) -> list[tuple[str, int]]:
        """Consecutive column groups and their widths, for a two-row header."""
        out: list[tuple[str, int]] = []
        for col in self.columns:
            if out and out[-1][0] == col.group:
                out[-1] = (col.group, out[-1][1] + 1)
            else:
                out.append((col.group, 1))
        return out


def is_detail(name: str) -> bool:
    """True for per-layer/per-block metrics and stderr columns, kept out of the main table."""
    return bool(_DETAIL.search(name)) or name.endswith("_stderr")


def _group_rank(name: str) -> int:
    return GROUPS.index(name.split(".", 1)[0]) if name.split(".", 1)[0] in GROUPS else len(GROUPS)


def metric_columns(frame: pd.DataFrame, *, details: bool = True) -> list[str]:
    """Metric columns with at least one value: quant, estimate, train, eval, then the rest, each in record order."""
    names = [
        c
        for c in frame.columns
        if c not in IDENTITY and not c.startswith("param.") and (details or not is_detail(c))
        and (frame[c].notna().any() or c in frame.attrs.get("metrics", ()))  # a measured NaN is shown as nan
    ]
    return sorted(names, key=lambda c: (_group_rank(c), names.index(c)))


def headline_columns(frame: pd.DataFrame) -> list[str]:
    """The main table's columns: HEADLINE metrics present, plus a few of any group that has none of them."""
    names = metric_columns(frame, details=False)

    def rank(c: str) -> int | None:
        return next((i for i, p in enumerate(HEADLINE) if fnmatch.fnmatchcase(c, p)), None)

    chosen = [c for c in names if rank(c) is not None]
    for group in GROUPS:  # other prefixes (env.*, ...) stay in the all-metrics table
        if not any(c.split(".", 1)[0] == group for c in chosen):
            chosen += [c for c in names if c.split(".", 1)[0] == group][:FALLBACK_PER_GROUP]

    def key(c: str):
        task = c.split(".")[1] if c.startswith("eval.") and c.count(".") >= 2 else ""
        r = rank(c)
        return (_group_rank(c), task, r if r is not None else len(HEADLINE), names.index(c))

    return sorted(chosen, key=key)


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def best_marks(name: str, values: list[float | None]) -> list[bool]:
    """Which values are the best by the metric's direction, compared as displayed (ties all marked).

    Nothing is marked for a metric without a direction, with fewer than two values, or when every
    value reads the same.
    """
    d = metrics.direction(name)
    shown = [fmt(v, digits(name)) if v is not None else None for v in values]
    present = [v for v in values if v is not None]
    if d == "none" or len(present) < 2 or len({t for t in shown if t is not None}) < 2:
        return [False] * len(values)
    best = fmt(min(present) if d == "lower" else max(present), digits(name))
    return [t == best for t in shown]


def digits(name: str) -> int:
    """Significant digits shown for a metric: four for bits/param (4.127 against 4.5 matters), else three."""
    return 4 if name.endswith("bits_per_param") else 3


def _record_message(rec: Record) -> str:
    """The record's message plus the messages of its failed expectations."""
    parts = [rec.message] if rec.message else []
    parts += [e.message for e in rec.expectations if not e.ok and e.message and e.message not in rec.message]
    return "; ".join(parts)


def noisy_reason(rec: Record) -> str:
    """The noise guard's reason when a record's timing was flagged noisy, else ""."""
    from harness.measure.noise import timing_noisy

    if not timing_noisy(rec.metrics):
        return ""
    reasons = [(f"{row['form']}: " if row.get("form") else "") + row["reason"]
               for table in (M.TIMING_TABLE, M.GEN_TIMING_TABLE) for row in rec.tables.get(table) or []
               if row.get("reason")]
    return "timing flagged noisy: " + ("; ".join(reasons) or "no reason recorded")


def suite_table(records: list[Record], baseline: Mapping[str, Record] | None = None) -> Table:
    """The comparison table of one suite's records (rows in record order)."""
    frame = records_frame(records)
    names = headline_columns(frame)
    marks = {name: best_marks(name, [_finite(v) for v in frame[name]]) for name in names}
    rows = []
    for i, (rec, (_, fr)) in enumerate(zip(records, frame.iterrows(), strict=True)):
        changes = {}
        if baseline and rec.case_id in baseline:
            changes = {c.metric: c for c in compare(rec, baseline[rec.case_id])}
        cells = []
        for name in names:
            v = _finite(fr[name])
            raw = rec.metrics.get(name)  # non-finite values are shown as nan / inf, absent ones as blanks
            cell = Cell(text=fmt(raw, digits(name)) if raw is not None else "", value=v, best=marks[name][i])
            if v is not None and is_timing_metric(name):
                cell.noisy = noisy_reason(rec)
            err = _finite(rec.metrics.get(f"{name}_stderr"))
            if v is not None and err is not None:
                cell.stderr = f"±{fmt(err)}"
            if name in changes and changes[name].rel_change != 0:  # an unchanged value needs no delta
                ch = changes[name]
                cell.delta = fmt_pct(ch.rel_change)
                cell.delta_class = "regressed" if ch.regressed else "better" if ch.improved else (
                    "same" if ch.rel_change == 0 else "worse"
                )
                cell.delta_title = f"baseline {fmt(ch.old)}: {ch.message}"
            cells.append(cell)
        rows.append(Row(rec.case_id, case_label(rec.case_id), rec.method, rec.status, _record_message(rec), cells))
    return Table(records[0].suite if records else "", [Column(n) for n in names], rows)


def markdown_table(table: Table, title: str = "") -> str:
    """A GitHub-flavoured Markdown table (best values in bold), then the messages of failed cases."""
    cols = [f"{c.display} ({c.unit_note}) {c.arrow}".replace(" ()", "").strip() for c in table.columns]
    lines = [f"### {title or table.suite}", ""] if (title or table.suite) else []
    lines.append("| case | status | " + " | ".join(cols) + " |")
    lines.append("|---|---|" + "---:|" * len(cols))
    for row in table.rows:
        cells = []
        for cell in row.cells:
            text = cell.text + (f" {cell.stderr}" if cell.stderr else "")
            text = f"**{text}**" if cell.best else text
            text = f"{text} (noisy)" if cell.noisy else text
            cells.append(text + (f" ({cell.delta})" if cell.delta else ""))
        status = row.status if row.status == "passed" else f"**{row.status}**"
        lines.append(f"| `{row.label}` | {status} | " + " | ".join(cells) + " |")
    notes = [f"- `{r.label}` ({r.status}): {r.message.replace(chr(10), ' ')}" for r in table.rows if r.message]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def export_tables(run_dir: Path, reports_dir: Path) -> list[Path]:
    """Write ``reports/<run-id>/<suite>.csv`` (every value) and ``.md`` (for PR comments) per suite."""
    run = load_run(run_dir)
    out_dir = Path(reports_dir) / run.run_id
    written = []
    for suite in run.suites:
        records = run.by_suite(suite)
        frame = records_frame(records)
        keep = ["case_id", "method", "status", "message"]
        keep += [c for c in frame.columns if c.startswith("param.")] + metric_columns(frame)
        csv = frame[keep].rename(columns={c: Column(c).header for c in keep if c not in IDENTITY})
        written.append(write_text_atomic(out_dir / f"{suite}.csv", csv.to_csv(index=False)))
        md = markdown_table(suite_table(records), f"{suite} — {run.run_id}")
        written.append(write_text_atomic(out_dir / f"{suite}.md", md))
    return written


def key_columns(frame: pd.DataFrame, limit: int = 8) -> list[str]:
    """The summary's metric columns: KEY_METRICS present in the frame, at most two memory peaks."""
    cols: list[str] = []
    for pattern in KEY_METRICS:
        for c in frame.columns:
            if fnmatch.fnmatchcase(c, pattern) and c not in cols and frame[c].notna().any():
                if c.endswith("_gib") and sum(x.endswith("_gib") for x in cols) >= 2:
                    continue
                cols.append(c)
    return cols[:limit]


def summary_table(records: list[Record]) -> str:
    """A compact plain-text table (case × key metrics) for the pytest terminal summary."""
    from tabulate import tabulate

    if not records:
        return "(no records)"
    frame = records_frame(records)
    cols = key_columns(frame)
    headers = ["case", "status"] + [f"{Column(c).display}\n{Column(c).unit_note}".rstrip() for c in cols]
    rows = []
    for rec, (_, fr) in zip(records, frame.iterrows(), strict=True):
        values = [fmt(v, digits(c)) if (v := rec.metrics.get(c)) is not None else "" for c in cols]
        rows.append([fr["case_id"], fr["status"], *values])
    align = ("left", "left") + ("right",) * len(cols)
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True, colalign=align)


@dataclass
class ManyRow:
    case_id: str
    label: str
    statuses: list[str | None]  # one per run; None where the run lacks the case
    cells: list[list[Cell]]  # [run][column]


@dataclass
class ManyTable:
    """One suite across several runs: a column group per run, rows matched by case id."""

    suite: str
    run_ids: list[str]
    columns: list[Column]
    rows: list[ManyRow]


def many_table(suite: str, runs: list[list[Record]], run_ids: list[str]) -> ManyTable:
    """Rows are the union of the runs' cases; in each row the best value across runs is marked."""
    frames = [records_frame(recs) for recs in runs]
    names: list[str] = []
    for frame in frames:
        names += [c for c in headline_columns(frame) if c not in names]
    names = headline_columns(pd.DataFrame({n: [1.0] for n in names}))  # the usual order
    by_case = [{r.case_id: r for r in recs} for recs in runs]
    case_ids = list(dict.fromkeys(r.case_id for recs in runs for r in recs))
    rows = []
    for cid in case_ids:
        recs = [m.get(cid) for m in by_case]
        grid = [[Cell() for _ in names] for _ in recs]
        for j, name in enumerate(names):
            values = [_finite(r.metrics.get(name)) if r else None for r in recs]
            for i, (v, best) in enumerate(zip(values, best_marks(name, values), strict=True)):
                if v is not None:
                    grid[i][j] = Cell(text=fmt(v, digits(name)), value=v, best=best)
        rows.append(ManyRow(cid, case_label(cid), [r.status if r else None for r in recs], grid))
    return ManyTable(suite, run_ids, [Column(n) for n in names], rows)


@dataclass
class AllMetrics:
    """Every metric of a suite, transposed: a row per metric, a column per case (for the page's details)."""

    cases: list[str]
    statuses: list[str]
    rows: list[tuple[Column, list[Cell]]]


def all_metrics(records: list[Record]) -> AllMetrics:
    """The transposed table of every metric with a value; the best case per row is marked."""
    frame = records_frame(records)
    rows = []
    for name in metric_columns(frame):
        values = [_finite(v) for v in frame[name]]
        marks = best_marks(name, values)
        raws = [r.metrics.get(name) for r in records]
        cells = [Cell(fmt(raw, digits(name)), v, best) if raw is not None else Cell()
                 for raw, v, best in zip(raws, values, marks, strict=True)]
        rows.append((Column(name), cells))
    return AllMetrics([case_label(r.case_id) for r in records], [r.status for r in records], rows)


# --- merge strategies ----------------------------------------------------------------------------------------

MERGE_COLUMNS = (  # (header, metric under eval.merge.<strategy>., digits)
    ("KL to unmerged (nats/token)", "kl_mean", 3),
    ("top-1 agreement", "top1_agreement", 4),
    ("max |Δ log p|", "max_abs_logprob_diff", 3),
    ("4-bit codes changed %", "codes_changed_pct", 3),
    ("size on disk MB", "size_bytes", 4),
    ("load s", "load_s", 3),
)


@dataclass
class MergeTable:
    """Merge fidelity per case and strategy: divergence from the unmerged adapter, scores, size, load time."""

    columns: list[str]
    rows: list[dict]  # {"case", "strategy", "label", "cells": [str]}


def merge_table(records: list[Record]) -> MergeTable | None:
    """A row per case and merge strategy found in the records (``eval.merge.<strategy>.*``); None if none."""
    from harness.methods.merge import LABELS, STRATEGIES

    scores = sorted({k.split(".", 2)[1] + "." + k.rsplit(".", 1)[1].removeprefix("merged_")
                     for r in records for k in r.metrics
                     if re.fullmatch(r"eval\.[^.]+\.merged_(acc|bits_per_byte)", k)})
    columns = [c[0] for c in MERGE_COLUMNS] + [s.replace(".", " ") for s in scores]
    rows = []
    for rec in records:
        for strategy in STRATEGIES:
            key = M.merge_metric(strategy)
            if not any(k.startswith(key) for k in rec.metrics):
                continue
            cells = []
            for _, name, d in MERGE_COLUMNS:
                v = _finite(rec.metrics.get(key + name))
                cells.append("" if v is None else fmt(v / 1e6 if name == "size_bytes" else v, d))
            for s in scores:
                task, metric = s.split(".")
                v = _finite(rec.metrics.get(M.eval_metric(task, metric, M.merged_variant(strategy))))
                cells.append("" if v is None else fmt(v, 3))
            rows.append({"case": case_label(rec.case_id), "strategy": strategy, "label": LABELS[strategy],
                         "cells": cells})
    return MergeTable(columns, rows) if rows else None


def answers_table(records: list[Record]) -> list[dict[str, Any]]:
    """Greedy answers the generate stage kept (``gen.answers``): a row per case and prompt, a cell per form, the
    untrained base's first; a canary row says whether each form reproduced it."""
    rows = []
    for rec in records:
        by_prompt: dict[int, dict[str, Any]] = {}
        for r in rec.tables.get(M.GEN_ANSWERS_TABLE, []):
            row = by_prompt.setdefault(r["prompt"], {"case": case_label(rec.case_id), "question": r["question"],
                                                     "expect": r.get("expect"), "forms": {}})
            row["forms"][r["form"]] = {"answer": r["answer"], "reproduced": r.get("reproduced")}
        rows += [by_prompt[k] for k in sorted(by_prompt)]
    return rows
