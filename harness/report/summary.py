"""The decision summary that opens a run page and the index: per method, memory (measured and predicted, and
whether the estimator says the suite's model fits each GPU tier), speed against the reference, the primary
quality difference with its verdict, storage bits/param, then generated verdict lines. Records and stored
statistics only (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import metrics as M
from harness import stats
from harness.methods import METHODS
from harness.records import Record, RecordError, read_json, warn
from harness.spec import TIERS

# (measured, its prediction, what both measure): the first pair a suite has is its memory column; a prediction
# is shown only beside the measurement it predicts
MEMORY_PAIRS = (
    (M.PEAK_ALLOCATED, M.EST_ALLOCATOR, "torch allocator peak"),
    (M.NVML_PEAK, M.EST_TOTAL, "NVML process peak"),
    (M.TENSOR_PEAK, M.EST_AT_PROFILED_STEP, "live-tensor peak"),
)
GPU_TIERS = {t: b for t, b in TIERS.items() if b is not None}
SPEED = M.TOKENS_PER_S


def primary_metric(records: list[Record]) -> str:
    """The suite's primary quality metric: the one its eval stage recorded as primary (the suite's
    ``eval.primary``, by default its first task's main metric, as the headline's columns take it), else held-out
    bits per byte where measured, else the first item-level eval metric of the adapter."""
    from harness.report.headline import quality_metrics

    names = dict.fromkeys(k for r in records for k in r.metrics)
    declared = [q for q in quality_metrics(records) if q in names]
    if declared:
        return declared[0]
    if M.HELDOUT_BPB in names:
        return M.HELDOUT_BPB
    return next((n for n in names if (im := stats.item_metric(n)) is not None and im.variant == "adapter"), M.HELDOUT_BPB)


def suite_stats(run_dir: Path | None, suite: str, records: list[Record], reference: str) -> dict[str, Any]:
    """The suite's statistics as the run stored them (``stats/<suite>.json``, written at the end of the session or
    by ``python -m harness stats``), else computed from the records."""
    if run_dir is not None:
        path = Path(run_dir) / "stats" / f"{suite}.json"
        if path.exists():
            try:  # an untrusted file: one line naming it, and the statistics computed from the records instead
                data = read_json(path, dict)
                if not all(isinstance(data.get(k), list) for k in ("differences", "ratios")):
                    raise RecordError(f"{path}: expected 'differences' and 'ratios' lists")
                if all(isinstance(d, dict) for k in ("differences", "ratios") for d in data[k]):
                    return data
                raise RecordError(f"{path}: 'differences' and 'ratios' must hold objects")
            except RecordError as exc:
                warn(f"{exc} (recomputed from the records)")
    return stats.run_stats(records, {suite: reference}).get("suites", {}).get(suite, {})


def _order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


def label(metric: str) -> str:
    """``eval.support_ppl.bits_per_byte`` -> ``support_ppl bits/byte``."""
    return metric.removeprefix("eval.").replace(".", " ").replace("_per_", "/").replace("_", " ")


def interval_text(d: dict[str, Any] | None, ratio: bool = False) -> str:
    if not d or d.get("estimate") is None:
        return ""
    if ratio:
        bounds = f" [{d['lo']:.2f}, {d['hi']:.2f}]" if d.get("lo") is not None and d.get("hi") is not None else \
            " (no interval)"
        return f"{d['estimate']:.2f}×{bounds}"
    if d.get("lo") is None or d.get("hi") is None:
        return f"{d['estimate']:+.3g} (no interval)"
    k = stats.digits_for((d["hi"] - d["lo"]) / 2)
    return f"{d['estimate']:+.{k}f} [{d['lo']:+.{k}f}, {d['hi']:+.{k}f}]"


def gpu_prediction(rec: Record) -> float | None:
    """The estimator's peak for this case's settings and model on a GPU (compute bf16, CUDA context included), in
    GiB; None where the model's shape is not a known preset."""
    from harness import estimate, presets
    from harness.spec import Settings

    model = rec.model or {}
    preset = presets.PRESETS.get(str(model.get("preset"))) if model.get("source") == "synthetic" else None
    if preset is None:
        return None
    try:
        settings = Settings(**{**{k: v for k, v in rec.params.items() if k in Settings.model_fields},
                               "compute_dtype": "bf16"})
        return estimate.estimate(preset, settings, num_layers=model.get("num_layers"), device="cuda").total_gib
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Row:
    method: str
    n: int
    memory: str = ""
    gpu: str = ""  # predicted GiB on a GPU
    fits: dict[str, bool] = field(default_factory=dict)  # tier -> fits its budget
    speed: str = ""
    quality: str = ""
    verdict: str = ""
    bits: str = ""


@dataclass
class Decision:
    """One suite's summary: a row per method, its column notes and the generated verdict lines."""

    suite: str
    reference: str
    primary: str
    memory_label: str
    rows: list[Row]
    lines: list[str]
    notes: list[str]

    @property
    def primary_label(self) -> str:
        return label(self.primary)

    @property
    def has(self) -> dict[str, bool]:
        return {k: any(getattr(r, k) for r in self.rows) for k in ("memory", "gpu", "speed", "quality", "bits")}


def _mean(g: stats.Group, name: str) -> float | None:
    """The mean of a metric over the seeds the tables count for it (a timing the noise guard flagged is out)."""
    v = stats.counted(g, name).values(name)
    return float(v.mean()) if len(v) else None


def decision(records: list[Record], st: dict[str, Any], reference: str) -> Decision | None:
    """The summary of one suite's records with its statistics ``st`` (``suite_stats``); None when the suite does
    not compare methods (fewer than two) or measures none of memory, speed or quality (a suite of storage alone,
    such as fidelity, says it in its own section)."""
    groups = sorted(stats.groups(records), key=lambda g: _order(g.method))
    if len({g.method for g in groups}) < 2:
        return None
    suite = groups[0].suite
    primary = primary_metric(records)
    diffs = {(d["group"], d["metric"]): d for d in st.get("differences", [])}
    ratios = {(r["group"], r["metric"]): r for r in st.get("ratios", [])}
    pair = next((p for p in MEMORY_PAIRS if any(_mean(g, p[0]) is not None for g in groups)), None)
    rows, lines = [], []
    from harness.report.data import case_label

    for g in groups:
        row = Row(case_label(g.group_id), len(g.records))
        if pair:
            measured, predicted = _mean(g, pair[0]), _mean(g, pair[1])
            if measured is not None:
                k = 3 if measured < 1 else 2
                row.memory = f"{measured:.{k}f}" + (f" · predicted {predicted:.{k}f}" if predicted is not None else "")
        gpu = [v for r in g.records if (v := gpu_prediction(r)) is not None]
        if gpu:
            peak = max(gpu)
            row.gpu = f"{peak:.2f}" if peak < 10 else f"{peak:.1f}"
            row.fits = {t: peak <= b for t, b in GPU_TIERS.items()}
        r = ratios.get((g.group_id, SPEED))
        if g.method == reference and _mean(g, SPEED) is not None:
            row.speed = f"{_mean(g, SPEED):,.0f} tokens/s (reference)"
        elif r:
            row.speed = interval_text(r, ratio=True)
        d = diffs.get((g.group_id, primary))
        if g.method == reference and _mean(g, primary) is not None:
            row.quality = f"{_mean(g, primary):.3f} (reference)"
        elif d:
            row.quality, row.verdict = interval_text(d), short_verdict(d.get("verdict", ""))
        bits = _mean(g, M.BITS_PER_PARAM)
        row.bits = f"{bits:.3f}" if bits is not None else ""
        rows.append(row)
        if g.method != reference:
            parts = []
            name = case_label(g.group_id)
            if d:
                parts.append(f"{label(primary)}: {d.get('verdict', '')}")
            if r and r.get("lo") is not None:
                where = "slower" if r["hi"] < 1 else "faster" if r["lo"] > 1 else "no detectable difference"
                parts.append(f"tokens/s {interval_text(r, ratio=True)}: {where}")
            if parts:
                lines.append(f"{name} against {reference}: " + "; ".join(parts) + ".")
    timed = [r for r in st.get("ratios", []) if r["metric"] == SPEED and r.get("lo") is not None]
    from harness.report.headline import design_text

    notes = [design_text(timed, reference)] if timed else []
    k = st.get("family_size", 1)
    if any(r.quality and r.method != reference for r in rows) or timed:
        notes.append(f"Brackets: 95% intervals simultaneous over the {k} methods compared (Bonferroni)." if k > 1
                     else "Brackets: 95% intervals.")
    for g in groups:
        if stats.bound_failures(g):
            names = sorted({e.name for r in g.records if r.status == "failed" for e in r.expectations if not e.ok})
            notes.append(f"{case_label(g.group_id)}: {stats.bound_failures(g)} of {len(g.records)} seeds failed a "
                         f"bound ({', '.join(names)}); they count in every figure here, as the seeds that held do.")
    seeds = max(len(g.records) for g in groups)
    if seeds == 1:
        notes.append("One seed per method: the intervals cover eval items only, not how another training seed "
                     "would have turned out (run every seed with --seeds all).")
    out = Decision(suite, reference, primary, pair[2] if pair else "", rows, lines, notes)
    return out if any(out.has[k] for k in ("memory", "speed", "quality")) else None  # not storage alone


def short_verdict(text: str) -> str:
    """The verdict's first words (``no detectable difference``, ``worse``, ``better``, ``uninformative``); the
    whole sentence is in the lines under the table."""
    for word in ("uninformative", "no detectable difference", "worse", "better"):
        if text.startswith(word):
            return word
    return text.split(" (", 1)[0]


def ordered(decisions: list[Decision]) -> list[Decision]:
    """Suites that answer the quality question first, the most replicated first, then those with speed."""
    return sorted(decisions, key=lambda d: (not d.has["quality"], -max(r.n for r in d.rows), not d.has["speed"]))


def tier_names() -> list[str]:
    """``24 GB``, ``48 GB``, ``80 GB``: the GPU tiers' column heads."""
    return [t.removeprefix("gpu-").replace("gb", " GB") for t in GPU_TIERS]


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
