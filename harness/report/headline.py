"""The README's headline table: one row per method, every number read from a committed run's records."""

from __future__ import annotations

import re
from pathlib import Path

from harness.methods import METHODS
from harness.records import Record, iter_records

START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def _order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)

# (column, metric, format); "peak" picks the best memory figure the run has (allocator on a GPU, RSS on the CPU)
COLUMNS = [
    ("peak allocated GiB", "train.peak_allocated_gib", "{:.2f}"),
    ("peak NVML GiB", "train.nvml_peak_gib", "{:.2f}"),
    ("peak RSS GiB", "train.peak_rss_gib", "{:.3f}"),
    ("RSS over start GiB", "train.peak_rss_over_start_gib", "{:.3f}"),
    ("predicted GiB", "estimate.total_gib", "{:.3f}"),
    ("tokens/s", "train.tokens_per_s", "{:,.0f}"),
    ("MFU", "train.mfu", "{:.1%}"),
    ("weights MB", "train.weight_bytes", "{:.2f}"),
    ("RMSE", "quant.rmse", "{:.2e}"),
    ("int4 / method RMSE", "quant.int4_over_method_rmse_ratio", "{:.2f}"),
    ("bits/param", "quant.bits_per_param", "{:.3f}"),
    ("support_mc acc (base → adapter)", None, ""),
    ("gap to lora-bf16", "eval.support_mc.acc_gap", "{:+.3f}"),
    ("merged acc", "eval.support_mc.merged_acc", "{:.3f}"),
]


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


def table(run_dir: Path, suite: str = "smoke") -> str:
    """Markdown: the methods of one suite of a run, in the usual order, only columns the run measured."""
    records = sorted((r for r in iter_records(run_dir) if r.suite == suite),
                     key=lambda r: _order(r.method))
    cols = [c for c in COLUMNS if any(_cell(r, c[1], c[2]) for r in records)]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in records:
        lines.append(f"| {r.method} | " + " | ".join(_cell(r, c[1], c[2]) for c in cols) + " |")
    env = records[0].env if records else {}
    gpu = (env.get("gpu") or {}).get("name") or f"CPU: {(env.get('cpu') or {}).get('name')}"
    v = env.get("versions", {})
    lines.append("")
    versions = ", ".join(f"{k.replace('_', '-')} {ver}" for k, ver in v.items()
                         if k not in ("nvidia-ml-py", "qlora-harness", "datasets", "accelerate") and ver)
    lines.append(f"Measured on {gpu}; {versions}; run `{records[0].run_id if records else ''}`, suite `{suite}`.")
    return "\n".join(lines)


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
