"""Cases over ranks: the compatibility table (method x strategy) and per-rank memory beside the estimate.

Both come from records only: a cell says "works" where the case passed and the strategy read back from the
wrapped model (``train.strategy`` table) is the one set, else what failed, in the record's own words.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness import metrics as M
from harness.compare import fmt
from harness.records import Record
from harness.report.data import case_label

# per-rank figures shown, in order: (key in train.rank<R>.*, header, digits)
RANK_COLUMNS = (("tensor_peak_gib", "tensor peak GiB", 4), ("estimate_gib", "estimate GiB", 4),
                ("tensor_start_gib", "held at step start GiB", 4),
                ("estimate_held_gib", "estimate of it GiB", 4), ("peak_allocated_gib", "allocator peak GiB", 3),
                ("nvml_peak_gib", "NVML peak GiB", 3), ("peak_rss_gib", "peak RSS GiB", 3),
                ("tokens_per_s", "tokens/s", 3))


def _strategy(rec: Record) -> tuple[str, str]:
    """(strategy set, strategy read back from the wrapped model) of a record; ``""`` where unknown."""
    rows = rec.tables.get(M.STRATEGY_TABLE) or [{}]
    return str(rec.params.get("strategy") or rows[0].get("setting") or ""), str(rows[0].get("in_force") or "")


def cell(rec: Record) -> str:
    """What one case says about its method under its strategy: works, or how it failed."""
    want, got = _strategy(rec)
    if rec.status == "passed" and got == want:
        return "works"
    if rec.status == "skipped":
        return f"skipped: {rec.message}"
    if got and got != want:
        return f"fails: wrapped as {got}, not {want}"
    return f"fails ({rec.status}): {rec.message}" if rec.message else f"fails ({rec.status})"


@dataclass
class CompatTable:
    strategies: list[str]
    rows: list[dict]  # {"method": str, "cells": [str]}; several cases of one cell are joined with " / "

    def markdown(self) -> str:
        lines = ["| method | " + " | ".join(self.strategies) + " |", "|---" * (len(self.strategies) + 1) + "|"]
        lines += ["| " + r["method"] + " | " + " | ".join(c.replace("|", "\\|") for c in r["cells"]) + " |"
                  for r in self.rows]
        return "\n".join(lines)


def compat_table(records: list[Record]) -> CompatTable | None:
    """Method x strategy of the records of cases over ranks; None where a suite has none."""
    ranked = [r for r in records if r.params.get("strategy") not in (None, "none")]
    if not ranked:
        return None
    strategies = list(dict.fromkeys(str(r.params["strategy"]) for r in ranked))
    methods = list(dict.fromkeys(r.method for r in ranked))
    rows = []
    for m in methods:
        cells = []
        for s in strategies:
            found = sorted({cell(r) for r in ranked if r.method == m and r.params.get("strategy") == s})
            cells.append(" / ".join(found) if found else "")
        rows.append({"method": m, "cells": cells})
    return CompatTable(strategies, rows)


@dataclass
class RanksTable:
    columns: list[str]
    rows: list[dict]  # {"case", "rank" ("0", "1", …, "max", "sum"), "cells": [str]}


def ranks_table(records: list[Record]) -> RanksTable | None:
    """Each rank's measured peaks beside the estimator's per-rank prediction at the same step, then the max and
    the sum over ranks; None where no record has per-rank figures."""
    rows = []
    for rec in records:
        world = int(rec.metrics.get(M.WORLD_SIZE, 0))
        if world < 1:
            continue
        for label, prefix in [(str(r), f"{M.RANK_PREFIX}{r}.") for r in range(world)] + [
                ("max", M.RANKS_MAX), ("sum", M.RANKS_SUM)]:
            cells = []
            for key, _, d in RANK_COLUMNS:
                v = rec.metrics.get(prefix + key)
                cells.append("" if v is None else fmt(v, d))
            if any(cells):
                rows.append({"case": case_label(rec.case_id), "rank": label, "cells": cells})
    return RanksTable([h for _, h, _ in RANK_COLUMNS], rows) if rows else None
