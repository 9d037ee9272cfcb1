"""The README's headline table: one row per method, every number read from a committed run's records."""

from __future__ import annotations

import re
from pathlib import Path

from harness import stats
from harness.methods import METHODS
from harness.records import Record, iter_records

START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def _order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)

# (column, metric, format). A prediction is shown only beside the measurement it predicts (PAIRED): the
# allocator estimate beside torch's allocator peak, the total beside NVML process memory, and on the CPU the
# estimate at the profiled step beside that step's tensor-level peak. Process RSS has no prediction.
COLUMNS = [
    ("peak allocated GiB", "train.peak_allocated_gib", "{:.2f}"),
    ("predicted allocator GiB", "estimate.allocator_gib", "{:.2f}"),
    ("peak NVML GiB", "train.nvml_peak_gib", "{:.2f}"),
    ("predicted total GiB", "estimate.total_gib", "{:.2f}"),
    ("tensor peak GiB", "train.tensor_peak_gib", "{:.3f}"),
    ("predicted GiB at that step", "estimate.at_profiled_step_gib", "{:.3f}"),
    ("peak RSS GiB", "train.peak_rss_gib", "{:.3f}"),
    ("tokens/s (median step)", "train.tokens_per_s", "{:,.0f}"),
    ("MFU", "train.mfu", "{:.1%}"),
    ("weights MB", "train.weight_bytes", "{:.2f}"),
    ("RMSE", "quant.rmse", "{:.2e}"),
    ("int4 / method RMSE", "quant.int4_over_method_rmse_ratio", "{:.2f}"),
    ("bits/param", "quant.bits_per_param", "{:.3f}"),
    ("held-out bits/byte", "eval.support_ppl.bits_per_byte", "{:.3f}"),
    ("recall acc", "eval.support_recall.acc", "{:.3f}"),
    ("support_mc acc (base → adapter)", None, ""),
    ("gap to lora-bf16", "eval.support_mc.acc_gap", "{:+.3f}"),
    ("merged acc", "eval.support_mc.merged_acc", "{:.3f}"),
]
PAIRED = {"estimate.allocator_gib": "train.peak_allocated_gib", "estimate.total_gib": "train.nvml_peak_gib",
          "estimate.at_profiled_step_gib": "train.tensor_peak_gib"}


def _cell(r: Record, metric: str | None, fmt: str) -> str:
    m = r.metrics
    if metric is None:
        if "eval.support_mc.acc" not in m:
            return ""
        err = m.get("eval.support_mc.acc_stderr")
        return (f"{m['eval.support_mc.base_acc']:.3f} → {m['eval.support_mc.acc']:.3f}"
                + (f" ± {err:.3f}" if err is not None else ""))
    if metric not in m:
        return ""
    value = m[metric] / 1e6 if metric.endswith("_bytes") else m[metric]
    return fmt.format(value)


def _group_cell(g: stats.Group, summary: dict[str, stats.Summary], metric: str | None, fmt: str) -> str:
    """A replicate group's cell: ``mean ± half-width of the 95% interval over seeds`` (n > 1), else as one record."""
    if len(g.records) == 1:
        return _cell(g.records[0], metric, fmt)
    name = "eval.support_mc.acc" if metric is None else metric
    if name not in summary or (metric is not None and metric.endswith("_gap")):
        return ""
    s = summary[name]
    scale = 1e6 if name.endswith("_bytes") else 1.0
    fmt = fmt if metric is not None else "{:.3f}"
    text = fmt.format(s.mean / scale)
    if s.n > 1 and s.half_width == s.half_width and s.half_width > 0:
        text += " ± " + fmt.format(s.half_width / scale).lstrip("+")
    if metric is None and "eval.support_mc.base_acc" in summary:
        text = f"{summary['eval.support_mc.base_acc'].mean:.3f} → {text}"
    return text


# Quality differences to the reference shown as their own columns (metric, header).
DIFFERENCES = (("eval.support_mc.acc", "Δ support_mc acc [95% CI]"),
               ("eval.support_ppl.bits_per_byte", "Δ held-out bits/byte [95% CI]"))


def _diff_text(d: dict | None) -> str:
    if not d or d.get("lo") is None:
        return ""
    k = stats.digits_for((d["hi"] - d["lo"]) / 2)
    return f"{d['estimate']:+.{k}f} [{d['lo']:+.{k}f}, {d['hi']:+.{k}f}]"


def table(run_dir: Path, suite: str = "smoke") -> str:
    """Markdown: the methods of one suite of a run, in the usual order, only columns the run measured.

    Replicate groups show mean ± the half-width of the 95% interval over seeds; differences to the reference
    method come with their paired interval, and a verdict line per method follows the table.
    """
    records = sorted((r for r in iter_records(run_dir) if r.suite == suite),
                     key=lambda r: _order(r.method))
    groups = stats.groups(records) or []
    ref = _reference(run_dir, suite)
    st = stats.run_stats(records, {suite: ref}).get("suites", {}).get(suite, {})
    diffs = {(d["group"], d["metric"]): d for d in st.get("differences", [])}
    shown_diffs = [(m, h) for m, h in DIFFERENCES
                   if any(_diff_text(diffs.get((g.group_id, m))) for g in groups)]
    summaries = {g.group_id: stats.summarise(g) for g in groups}
    columns = [c for c in COLUMNS if not (shown_diffs and c[1] == "eval.support_mc.acc_gap")]
    cols = [c for c in columns if any(_group_cell(g, summaries[g.group_id], c[1], c[2]) for g in groups)]
    shown = {c[1] for c in cols}
    cols = [c for c in cols if c[1] not in PAIRED or PAIRED[c[1]] in shown]  # like with like, or not at all
    heads = [c[0] for c in cols] + [h.replace("Δ", f"Δ to {ref},", 1) for _, h in shown_diffs]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for g in groups:
        cells = [_group_cell(g, summaries[g.group_id], c[1], c[2]) for c in cols]
        cells += [_diff_text(diffs.get((g.group_id, m))) for m, _ in shown_diffs]
        label = g.method + (f" (n={len(g.records)})" if len(g.records) > 1 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdicts = _verdicts(groups, diffs, ref)
    if verdicts:
        lines += ["", *verdicts]
    env = records[0].env if records else {}
    gpu = (env.get("gpu") or {}).get("name") or f"CPU: {(env.get('cpu') or {}).get('name')}"
    v = env.get("versions", {})
    lines.append("")
    versions = ", ".join(f"{k.replace('_', '-')} {ver}" for k, ver in v.items()
                         if k not in ("nvidia-ml-py", "qlora-harness", "datasets", "accelerate") and ver)
    seeds = max((len(g.records) for g in groups), default=1)
    intervals = (f" ± and brackets: 95% intervals over {seeds} seeds (and eval items, paired, for Δ)."
                 if seeds > 1 else "")
    lines.append(f"Measured on {gpu}; {versions}; run `{records[0].run_id if records else ''}`, suite `{suite}`."
                 f"{intervals}")
    return "\n".join(lines)


def _reference(run_dir: Path, suite: str) -> str:
    """The suite's reference method as the run stored it (``stats/<suite>.json``), else lora-bf16."""
    import json

    p = Path(run_dir) / "stats" / f"{suite}.json"
    try:
        return json.loads(p.read_text()).get("reference") or stats.REFERENCE
    except (OSError, ValueError):
        return stats.REFERENCE


def _verdicts(groups: list[stats.Group], diffs: dict, ref: str) -> list[str]:
    """``- qlora-nf4: support_mc acc: no detectable difference within ±0.030; …``, generated from the intervals."""
    out = []
    for g in groups:
        parts = []
        for metric, _ in DIFFERENCES:
            d = diffs.get((g.group_id, metric))
            if d and d.get("lo") is not None:
                label = metric.removeprefix("eval.").replace(".", " ")
                parts.append(f"{label}: {d['verdict']}")
        if parts:
            out.append(f"- {g.method} against {ref}: " + "; ".join(parts) + ".")
    return out


def embedded(readme: Path) -> str:
    """The table currently between the README's markers."""
    text = readme.read_text()
    m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    if not m:
        raise ValueError(f"{readme}: no {START} … {END} block")
    return m.group(1)


def update(readme: Path, run_dir: Path, suite: str = "smoke") -> None:
    text = readme.read_text()
    new = f"{START}\n{table(run_dir, suite)}\n{END}"
    readme.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: new, text, flags=re.S))


MERGE_START, MERGE_END = "<!-- merge:start -->", "<!-- merge:end -->"


def _merge_cell(m: dict[str, float], strategy: str, task: str) -> str:
    """``KL 4.6e-04 · top-1 1.000 · acc −0.017 · 2.1 MB · decode 1.31×`` for one strategy, from stored metrics."""
    parts = []
    if (kl := m.get(f"eval.merge.{strategy}.kl_mean")) is not None:
        parts.append(f"KL {kl:.1e}")
    if (top1 := m.get(f"eval.merge.{strategy}.top1_agreement")) is not None:
        parts.append(f"top-1 {top1:.3f}")
    prefix = "merged" if strategy == "requantize" else f"merged_{strategy}"
    acc, merged_acc = m.get(f"eval.{task}.acc"), m.get(f"eval.{task}.{prefix}_acc")
    if acc is not None and merged_acc is not None:
        parts.append(f"acc {merged_acc - acc:+.3f}")
    if (size := m.get(f"eval.merge.{strategy}.size_bytes")) is not None:
        parts.append(f"{size / 1e6:.1f} MB")
    base, got = m.get("gen.none.bs1.decode_tokens_per_s"), m.get(f"gen.{strategy}.bs1.decode_tokens_per_s")
    if base and got:
        parts.append(f"decode {got / base:.2f}×")
    return " · ".join(parts)


def merge_costs(run_dir: Path, suite: str = "merge", task: str = "support_mc") -> str:
    """Markdown: what merging costs, a row per quantized method of a run's merge suite, every number stored.

    Per strategy: KL of the merged next-token distribution from the unmerged adapter's, top-1 agreement, the
    change of ``task`` accuracy, size on disk, batch-1 decode speed relative to the unmerged adapter.
    """
    from harness.methods.merge import MERGED

    records = sorted((r for r in iter_records(run_dir) if r.suite == suite and r.status in ("passed", "failed")),
                     key=lambda r: _order(r.method))
    records = [r for r in records if any(k.startswith("eval.merge.dequantize.") for k in r.metrics)]
    lines = ["| method | unmerged: size, decode tokens/s (batch 1) | " + " | ".join(MERGED) + " |",
             "|---" * (len(MERGED) + 2) + "|"]
    for r in records:
        m = r.metrics
        size, tps = m.get("eval.merge.none.size_bytes"), m.get("gen.none.bs1.decode_tokens_per_s")
        unmerged = " · ".join(p for p in (f"{size / 1e6:.1f} MB" if size else "",
                                          f"{tps:,.0f} tokens/s" if tps else "") if p)
        lines.append(f"| {r.method} | {unmerged} | " + " | ".join(_merge_cell(m, s, task) for s in MERGED) + " |")
    run_id = records[0].run_id if records else ""
    lines += ["", f"Run `{run_id}`, suite `{suite}`: KL in nats per token on held-out text; acc change on `{task}` "
                  "against the unmerged adapter; decode speed relative to the unmerged adapter."]
    return "\n".join(lines)


def update_merge(readme: Path, run_dir: Path, suite: str = "merge") -> None:
    """Replace the README's merge block with ``merge_costs`` of ``run_dir``."""
    text = readme.read_text()
    if MERGE_START not in text:
        raise ValueError(f"{readme}: no {MERGE_START} … {MERGE_END} block")
    new = f"{MERGE_START}\n{merge_costs(run_dir, suite)}\n{MERGE_END}"
    readme.write_text(re.sub(re.escape(MERGE_START) + r".*?" + re.escape(MERGE_END), lambda _: new, text, flags=re.S))
