"""The README's headline table: one row per method, every number read from a committed run's records."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from harness import metrics as M
from harness import stats
from harness.methods import METHODS
from harness.records import Record, read_run_records

START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def _order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)

def _rate(v: float) -> str:
    """Tokens/s: whole numbers from 100 up (``1,510``), three significant digits below (``5.31`` on a real
    model on two CPU cores, where whole numbers would hide the methods' differences)."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_value(fmt, v: float) -> str:
    """A column's format: a format string or a function of the value."""
    return fmt(v) if callable(fmt) else fmt.format(v)


# (column, metric, format). A prediction is shown only beside the measurement it predicts (PAIRED): the
# allocator estimate beside torch's allocator peak, the total beside NVML process memory, and on the CPU the
# estimate at the profiled step beside that step's tensor-level peak. Process RSS has no prediction.
COLUMNS = [
    ("peak allocated GiB", M.PEAK_ALLOCATED, "{:.2f}"),
    ("predicted allocator GiB", M.EST_ALLOCATOR, "{:.2f}"),
    ("peak NVML GiB", M.NVML_PEAK, "{:.2f}"),
    ("predicted total GiB", M.EST_TOTAL, "{:.2f}"),
    ("tensor peak GiB", M.TENSOR_PEAK, "{:.3f}"),
    ("predicted GiB at that step", M.EST_AT_PROFILED_STEP, "{:.3f}"),
    ("peak RSS GiB", M.PEAK_RSS, "{:.3f}"),
    ("tokens/s (median step)", M.TOKENS_PER_S, _rate),
    ("MFU", M.MFU, "{:.1%}"),
    ("weights MB", M.WEIGHT_BYTES, "{:.2f}"),
    ("RMSE", M.RMSE, "{:.2e}"),
    ("int4 / method RMSE", M.INT4_OVER_METHOD, "{:.2f}"),
    ("bits/param", M.BITS_PER_PARAM, "{:.3f}"),
]  # the quality columns follow, one per eval task of the suite (quality_metrics), the primary metric first
PAIRED = {M.EST_ALLOCATOR: M.PEAK_ALLOCATED, M.EST_TOTAL: M.NVML_PEAK,
          M.EST_AT_PROFILED_STEP: M.TENSOR_PEAK}


def quality_metrics(records: list[Record]) -> list[str]:
    """The suite's quality metrics, ``eval.<task>.<metric>``, its primary metric first: as the eval stage recorded
    them (``M.EVAL_TASKS_TABLE`` table: each task's main metric and the suite's primary), else read from the metric
    names (each task's bits_per_byte where it has one, else its acc; a bits/byte metric leads)."""
    for r in records:
        rows = r.tables.get(M.EVAL_TASKS_TABLE)
        if rows:
            names = [M.eval_metric(row["task"], row["metric"]) for row in rows]
            primary = [n for n, row in zip(names, rows, strict=True) if row.get("primary")]
            return primary + [n for n in names if n not in primary]
    found: dict[str, str] = {}
    for r in records:
        for name in r.metrics:
            parts = name.split(".")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("bits_per_byte", "acc"):
                if found.get(parts[1]) != "bits_per_byte":
                    found[parts[1]] = parts[2]
    names = [M.eval_metric(t, m) for t, m in sorted(found.items())]
    return sorted(names, key=lambda n: not n.endswith("bits_per_byte"))


def _quality_header(metric: str, base: bool) -> str:
    _, task, name = metric.split(".", 2)
    return f"{task} {name.replace('bits_per_byte', 'bits/byte')}" + (" (base → adapter)" if base else "")


def _base_of(metric: str) -> str:
    _, task, name = metric.split(".", 2)
    return M.eval_metric(task, name, "base")


def _cell(r: Record, metric: str, fmt: str, base: bool = False) -> str:
    m = r.metrics
    if metric not in m:
        return ""
    value = m[metric] / 1e6 if metric.endswith("_bytes") else m[metric]
    if base:
        err = m.get(f"{metric}_stderr")
        head = f"{m[_base_of(metric)]:.3f} → " if _base_of(metric) in m else ""
        return head + fmt_value(fmt, value) + (f" ± {err:.3f}" if err is not None else "")
    return fmt_value(fmt, value)


def _group_cell(g: stats.Group, summary: dict[str, stats.Summary], metric: str, fmt: str, base: bool = False) -> str:
    """A replicate group's cell: ``mean ± half-width of the 95% interval over seeds`` (n > 1), else as one record;
    ``base``: the untrained base's mean first (``0.248 → 0.329 ± 0.022``)."""
    if len(g.records) == 1:
        return _cell(g.records[0], metric, fmt, base)
    if metric not in summary:
        return ""
    s = summary[metric]
    scale = 1e6 if metric.endswith("_bytes") else 1.0
    text = fmt_value(fmt, s.mean / scale)
    if s.n > 1 and s.half_width == s.half_width and s.half_width > 0:
        if callable(fmt):  # the half-width to the mean's decimals: 1,294 ± 86, 5.31 ± 0.42
            places = len(text.split(".", 1)[1]) if "." in text else 0
            text += f" ± {s.half_width / scale:,.{places}f}"
        else:
            text += " ± " + fmt.format(s.half_width / scale).lstrip("+")
    if s.n < len(g.records):  # seeds without the metric, or whose timing the noise guard flagged
        text += f" (n={s.n})"
    if base and _base_of(metric) in summary:
        text = f"{summary[_base_of(metric)].mean:.3f} → {text}"
    return text


def differences(quality: list[str]) -> list[tuple[str, str]]:
    """Quality differences to the reference shown as their own columns (metric, header): the primary metric and
    the next quality metric of the suite."""
    return [(m, f"Δ {_quality_header(m, False)} [CI]") for m in quality[:2]]


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
    records = sorted((r for r in read_run_records(run_dir) if r.suite == suite),
                     key=lambda r: _order(r.method))
    groups = stats.groups(records) or []
    ref = _reference(run_dir, suite)
    st = stats.run_stats(records, {suite: ref}).get("suites", {}).get(suite, {})
    diffs = {(d["group"], d["metric"]): d for d in st.get("differences", [])}
    shown_diffs = [(m, h) for m, h in differences(quality_metrics(records))
                   if any(_diff_text(diffs.get((g.group_id, m))) for g in groups)]
    summaries = {g.group_id: stats.summarise(g) for g in groups}
    quality = quality_metrics(records)
    with_base = {m for m in quality if any(_base_of(m) in r.metrics for r in records)}
    columns = [(*c, False) for c in COLUMNS] + [(_quality_header(m, m in with_base), m, "{:.3f}", m in with_base)
                                                 for m in quality]
    cols = [c for c in columns if any(_group_cell(g, summaries[g.group_id], c[1], c[2], c[3]) for g in groups)]
    shown = {c[1] for c in cols}
    cols = [c for c in cols if c[1] not in PAIRED or PAIRED[c[1]] in shown]  # like with like, or not at all
    heads = [c[0] for c in cols] + [h.replace("Δ", f"Δ to {ref},", 1) for _, h in shown_diffs]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for g in groups:
        cells = [_group_cell(g, summaries[g.group_id], c[1], c[2], c[3]) for c in cols]
        cells += [_diff_text(diffs.get((g.group_id, m))) for m, _ in shown_diffs]
        failed = stats.bound_failures(g)
        label = g.method + (f" (n={len(g.records)}{f', {failed} failed a bound' if failed else ''})"
                            if len(g.records) > 1 else " (failed a bound)" if failed else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdicts = _verdicts(groups, diffs, ref, shown_diffs)
    if verdicts:
        lines += ["", *verdicts]
    lines += replication(records, groups, diffs, suite, ref, differences(quality))
    speed = speed_lines(st, ref)
    if speed:
        lines += ["", *speed]
    seeds = max((len(g.records) for g in groups), default=1)
    stderr = seeds == 1 and any(f"{m}_stderr" in r.metrics for r in records for m in with_base)  # shown: _cell
    intervals = "".join([f" ±: 95% intervals over {seeds} seeds" if seeds > 1 else
                         " ± on a score: lm-eval's standard error over its eval items." if stderr else "",
                         (f"; Δ brackets: {_joint(st)}, paired over seeds and eval items" if seeds > 1 else
                          f" Δ brackets: {_joint(st)}, paired over eval items: one seed, so they do not cover how "
                          "another training seed would have turned out") if shown_diffs else "",
                         "." if seeds > 1 or shown_diffs else ""])
    lines += ["", f"{measured_on(records)}, suite `{suite}`.{intervals}"]
    return "\n".join(lines)


def _joint(st: dict) -> str:
    k = st.get("family_size", 1)
    return (f"simultaneous 95% intervals over the {k} methods compared (Bonferroni: {100 * st['family_level']:.1f}% "
            "each)" if k > 1 else "95% intervals")


def measured_on(records: list[Record]) -> str:
    """``Measured on CPU: …, compute fp32, 40 training steps; python …, torch …; run `X` ``: from the records."""
    env = records[0].env if records else {}
    cpu = env.get("cpu") or {}
    gpu = (env.get("gpu") or {}).get("name") or f"CPU: {cpu.get('name')}" + (f" ({cpu['isa']})" if cpu.get("isa") else "")
    versions = ", ".join(f"{k.replace('_', '-')} {ver}" for k, ver in env.get("versions", {}).items()
                         if k not in ("nvidia-ml-py", "qlora-harness", "datasets", "accelerate") and ver)
    dtypes = sorted({str(r.params.get("compute_dtype")) for r in records if r.params.get("compute_dtype")})
    steps = sorted({int(r.params["max_steps"]) for r in records if r.params.get("max_steps")})
    setup = "".join([f", compute {'/'.join(dtypes)}" if dtypes else "",
                     f", {'/'.join(map(str, steps))} training steps" if steps else ""])
    return f"Measured on {gpu}{setup}; {versions}; {runs_text(records)}"


def _ratio_text(r: dict) -> str:
    bounds = f" [{r['lo']:.2f}, {r['hi']:.2f}]" if r.get("lo") is not None and r.get("hi") is not None else ""
    return f"{r['estimate']:.2f}×{bounds}"


def design_text(ratios: list[dict], ref: str) -> str:
    """One sentence, from the cases' start times, on whether time could pass for a method in these ratios."""
    designs = {r.get("design") or "" for r in ratios}
    if designs == {"blocks"}:
        return (f"Each seed's cases ran side by side (shuffled blocks), so each ratio pairs a method's case with the "
                f"{ref} case of its seed: a drift of the machine between blocks cancels.")
    late = [r["apart_min"] for r in ratios if r.get("design") == "sequential" and r.get("apart_min") is not None]
    if late:
        span = f"{min(late):.0f}" if round(min(late)) == round(max(late)) else f"{min(late):.0f}–{max(late):.0f}"
        return (f"These cases ran method after method, {span} min from {ref}'s (median per "
                "method): a drift of the machine over that time counts as the method's, and the intervals do not "
                "allow for it.") if max(late) >= 1 else "These cases ran method after method, under a minute apart."
    return "The records carry no start times: whether time and method are confounded here is not known."


def speed_lines(st: dict, ref: str, metric: str = M.TOKENS_PER_S) -> list[str]:
    """``Speed: tokens/s … against lora-bf16: qlora-nf4 0.86× [0.78, 0.94]; … .`` and how the cases ran."""
    ratios = sorted((r for r in st.get("ratios", []) if r["metric"] == metric and r.get("lo") is not None),
                    key=lambda r: _order(r["method"]))
    if not ratios:
        return []
    label = next((c[0] for c in COLUMNS if c[1] == metric), metric)
    parts = "; ".join(f"{r['method']} {_ratio_text(r)}" for r in ratios)
    verdict = ratio_verdict(ratios, ref)
    return [f"Speed, {label} against {ref} (ratio [{_joint(st)}]): {parts}. {verdict[0].upper()}{verdict[1:]} "
            f"{design_text(ratios, ref)}"]


def ratio_verdict(ratios: list[dict], ref: str) -> str:
    """Of tokens/s ratios: ``slower than lora-bf16: …; faster: …; no detectable difference: …``, from where each
    interval lies against 1."""
    below = [r["method"] for r in ratios if r.get("hi") is not None and r["hi"] < 1]
    above = [r["method"] for r in ratios if r.get("lo") is not None and r["lo"] > 1]
    rest = [r["method"] for r in ratios if r["method"] not in below + above]
    parts = ([f"slower than {ref}: {', '.join(below)}"] if below else []) + (
        [f"faster: {', '.join(above)}"] if above else []) + (
        [f"no detectable difference: {', '.join(rest)}"] if rest else [])
    return "; ".join(parts) + "."


SPEED_START, SPEED_END = "<!-- speed:start -->", "<!-- speed:end -->"
SPEED_METRICS = [  # (column, metric, format): the first memory metric a run has is shown
    ("tokens/s (median step)", M.TOKENS_PER_S, _rate),
    ("step ms (median)", M.STEP_MEDIAN_MS, "{:.1f}"),
    ("peak allocated GiB", M.PEAK_ALLOCATED, "{:.2f}"),
    ("tensor peak GiB", M.TENSOR_PEAK, "{:.4f}"),
]


def speed_table(run_dir: Path, suite: str = "speed") -> str:
    """Markdown: per method, each speed/memory metric's mean ± and its ratio to the reference with a simultaneous
    interval, then the sentence on how the cases ran (``design_text``) and where they were measured."""
    records = sorted((r for r in read_run_records(run_dir) if r.suite == suite), key=lambda r: _order(r.method))
    groups = stats.groups(records)
    ref = _reference(run_dir, suite)
    st = stats.run_stats(records, {suite: ref}).get("suites", {}).get(suite, {})
    ratios = {(r["group"], r["metric"]): r for r in st.get("ratios", [])}
    present = [c for c in SPEED_METRICS if any(c[1] in r.metrics for r in records)]
    memory = [c for c in present if c[1] in (M.PEAK_ALLOCATED, M.TENSOR_PEAK)][:1]
    cols = [c for c in present if c[1] not in (M.PEAK_ALLOCATED, M.TENSOR_PEAK)] + memory
    heads = [f"{h} · ratio to {ref}" for h, _, _ in cols]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for g in groups:
        summ = stats.summarise(g)
        cells = []
        for _, m, fmt in cols:
            r = ratios.get((g.group_id, m))
            cells.append(_group_cell(g, summ, m, fmt) + (f" · {_ratio_text(r)}" if r else ""))
        lines.append(f"| {g.method} (n={len(g.records)}) | " + " | ".join(cells) + " |")
    timed = [r for r in st.get("ratios", []) if r["metric"] == M.TOKENS_PER_S and r.get("lo") is not None]
    if timed:
        lines += ["", f"Tokens/s: {ratio_verdict(timed, ref)} {design_text(timed, ref)}"]
    seeds = max((len(g.records) for g in groups), default=1)
    lines += ["", f"{measured_on(records)}, suite `{suite}`. ±: 95% intervals over {seeds} seeds; ratio brackets: "
                  f"{_joint(st)}, over the seeds' own ratios where each seed's cases ran side by side."]
    return "\n".join(lines)


def update_speed(readme: Path, run_dir: Path, suite: str = "speed") -> None:
    """Replace the README's speed block with ``speed_table`` of ``run_dir``."""
    replace_block(readme, SPEED_START, SPEED_END, speed_table(run_dir, suite), run_dir)


def runs_text(records: list[Record]) -> str:
    """``run `A` `` or, for a run that extends another, ``runs `A` (30 cases) + `B` (30 cases)``."""
    counts = Counter(r.run_id for r in records)
    if len(counts) < 2:
        return f"run `{next(iter(counts), '')}`"
    return "runs " + " + ".join(f"`{run}` ({n} cases)" for run, n in sorted(counts.items()))


def _reference(run_dir: Path, suite: str) -> str:
    """The suite's reference method as the run stored it (``stats/<suite>.json``), else lora-bf16."""
    from harness.records import RecordError, read_json

    p = Path(run_dir) / "stats" / f"{suite}.json"
    if not p.is_file():
        return stats.REFERENCE
    try:
        ref = read_json(p, dict).get("reference")
    except RecordError as exc:  # derived data: named, and the default used
        from harness.records import warn

        warn(f"{exc} (its reference method not read: {stats.REFERENCE} assumed)")
        return stats.REFERENCE
    return ref if isinstance(ref, str) and ref else stats.REFERENCE


def _verdicts(groups: list[stats.Group], diffs: dict, ref: str, shown: list[tuple[str, str]]) -> list[str]:
    """``- qlora-nf4: support_mc acc: no detectable difference within ±0.030; …``, generated from the intervals."""
    out = []
    for g in groups:
        parts = []
        for metric, _ in shown:
            d = diffs.get((g.group_id, metric))
            if d and d.get("lo") is not None:
                label = metric.removeprefix("eval.").replace(".", " ")
                parts.append(f"{label}: {d['verdict']}")
        if parts:
            out.append(f"- {g.method} against {ref}: " + "; ".join(parts) + ".")
    return out


def _detects(d: dict | None) -> bool:
    return bool(d) and d.get("lo") is not None and d.get("hi") is not None and not d["lo"] <= 0 <= d["hi"]


def seeds_text(group: stats.Group, run: str) -> str:
    """``seeds 0–4``: the seeds of a replicate group that one run measured."""
    seeds = sorted(int(r.params.get("seed") or 0) for r in group.records if r.run_id == run)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def run_verdicts(group: stats.Group, key: tuple[str, str], alone: dict) -> list[tuple[str, str, str]]:
    """(run id, its seeds, its verdict) of one difference (``key``: group id, metric), each run's seeds judged
    alone (``stats.run_by_run``); shared by the headline's replication lines and the report's column."""
    return [(run, seeds_text(group, run), per[key]["verdict"] if key in per else "not compared")
            for run, per in alone.items()]


def replication(records: list[Record], groups: list[stats.Group], pooled: dict, suite: str, ref: str,
                shown_diffs: list[tuple[str, str]]) -> list[str]:
    """For a table pooling several runs (``--extends``): each run's own seeds judged alone, wherever one of them
    or the pooled seeds detect a difference, so a finding shows whether independent seeds repeat it."""
    alone = stats.run_by_run(records, suite, ref)
    if not alone:
        return []
    out = []
    for g in groups:
        for metric, _ in shown_diffs:
            key = (g.group_id, metric)
            if not any(_detects(d.get(key)) for d in (pooled, *alone.values())):
                continue
            label = metric.removeprefix("eval.").replace(".", " ")
            parts = [f"`{run}` alone ({seeds}): {verdict}" for run, seeds, verdict in run_verdicts(g, key, alone)]
            pooled_text = pooled[key]["verdict"] if key in pooled else "not compared"
            out.append(f"- {g.method} against {ref}, {label}: " + "; ".join(parts) + f"; pooled: {pooled_text}.")
    shown = " or ".join(m.removeprefix("eval.").replace(".", " ") for m, _ in shown_diffs)
    head = ("Replication: the pooled runs' seeds judged run by run, for every difference that any run's seeds or "
            "the pooled seeds detect:" if out else
            f"Replication: no run's seeds alone detect a difference on {shown}, nor do the pooled seeds.")
    return ["", head, *out]


def embedded(readme: Path, start: str = START, end: str = END) -> str:
    """The table currently between the README's markers (the headline's unless others are given)."""
    text = readme.read_text()
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    if not m:
        raise ValueError(f"{readme}: no {start} … {end} block")
    return m.group(1)


def replace_block(readme: Path, start: str, end: str, body: str, run_dir: Path | None = None) -> None:
    """Replace what stands between the README's ``start`` and ``end`` markers with ``body``: with ``run_dir``, in the
    block of that kind that names the run or a run it extends, if one does (``start_for_run``)."""
    text = readme.read_text()
    if run_dir is not None:
        start = start_for_run(text, start, run_dir) or start
    if start not in text:
        raise ValueError(f"{readme}: no {start} … {end} block")
    new = f"{start}\n{body}\n{end}"
    readme.write_text(re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: new, text, flags=re.S))


def update(readme: Path, run_dir: Path, suite: str = "smoke") -> None:
    replace_block(readme, START, END, table(run_dir, suite), run_dir)


REAL_START, REAL_END = "<!-- real-model:start -->", "<!-- real-model:end -->"


def named_starts(text: str, start: str) -> dict[str | None, str]:
    """The README's start markers of one kind of block by the run each names: ``<!-- real-model:start -->`` (None) and
    ``<!-- real-model:start smollm2-bf16 -->`` (a block of its own for that run and those that extend it)."""
    kind = re.escape(start[:-len(":start -->")])
    return {m.group(1): m.group(0) for m in re.finditer(kind + r":start(?: ([A-Za-z0-9][A-Za-z0-9._-]*))? -->", text)}


def start_for_run(text: str, start: str, run_dir: Path) -> str | None:
    """The start marker of the block ``run_dir`` fills: the block that names it or a run it extends, else the
    unnamed one; None where neither is there."""
    from harness.records import run_chain

    starts = named_starts(text, start)
    for d in run_chain(run_dir):
        if d.name in starts:
            return starts[d.name]
    return starts.get(None)


def update_real(readme: Path, run_dir: Path, suite: str = "smollm2") -> None:
    """Replace the README's real-model block with ``table`` of that suite (the toy's table stays the self-test)."""
    replace_block(readme, REAL_START, REAL_END, table(run_dir, suite), run_dir)


MERGE_START, MERGE_END = "<!-- merge:start -->", "<!-- merge:end -->"


def _merge_cell(m: dict[str, float], strategy: str, quality: str) -> str:
    """``KL 4.6e-04 · top-1 1.000 · bits/byte +0.004 · 2.1 MB · decode 1.31×`` for one strategy, from stored
    metrics; ``quality`` is ``<task>.<metric>`` of the eval, its change against the unmerged adapter."""
    parts = []
    if (kl := m.get(M.merge_metric(strategy, "kl_mean"))) is not None:
        parts.append(f"KL {max(kl, 0.0):.1e}")  # float32 rounding leaves an exact match at about -1e-8
    if (top1 := m.get(M.merge_metric(strategy, "top1_agreement"))) is not None:
        parts.append(f"top-1 {top1:.3f}")
    task, metric = quality.split(".", 1)
    before, after = m.get(M.eval_metric(task, metric)), m.get(M.eval_metric(task, metric, M.merged_variant(strategy)))
    if before is not None and after is not None:
        parts.append(f"{metric.replace('_per_', '/')} {after - before:+.3f}")
    if (size := m.get(M.merge_metric(strategy, "size_bytes"))) is not None:
        parts.append(f"{size / 1e6:.1f} MB")
    base = m.get(M.gen_metric("none", 1, "decode_tokens_per_s"))
    got = m.get(M.gen_metric(strategy, 1, "decode_tokens_per_s"))
    if base and got:
        parts.append(f"decode {got / base:.2f}×")
    canary = m.get(f"gen.{strategy}.canary_reproduced")
    if canary is not None and parts:
        parts.append("canary said" if canary >= 1 else "canary lost")
    return " · ".join(parts)


def canary_line(records: list[Record]) -> str:
    """``Canary …: said by the unmerged adapter after reload in 6 of 6 cases; requantize 1 of 6; …``, counted from
    the records (``gen.<form>.canary_reproduced``), or '' where the suite asks for none."""
    from harness.methods.merge import MERGED

    parts = []
    for form, label in (("none", "the unmerged adapter after save and reload"), *((s, s) for s in MERGED)):
        said = [r.metrics[f"gen.{form}.canary_reproduced"] >= 1 for r in records
                if f"gen.{form}.canary_reproduced" in r.metrics]
        if said:
            parts.append(f"{label} {sum(said)} of {len(said)}")
    if not parts:
        return ""
    return ("Canary (an exact string taught in training, which greedy generation must reproduce), said by " +
            "; ".join(parts) + " cases.")


MERGE_QUALITY = "support_ppl.bits_per_byte"  # held-out text: the eval every adapter measurably learns


def merge_costs(run_dir: Path, suite: str = "merge", quality: str = MERGE_QUALITY) -> str:
    """Markdown: what merging costs, a row per method of a run's merge suite, every number stored.

    Per strategy: KL of the merged next-token distribution from the unmerged adapter's, top-1 agreement, the
    change of ``quality`` (``<task>.<metric>``) against the unmerged adapter, size on disk, batch-1 decode
    speed relative to the unmerged adapter.
    """
    from harness.methods.merge import MERGED

    records = sorted((r for r in read_run_records(run_dir) if r.suite == suite and r.status in ("passed", "failed")),
                     key=lambda r: _order(r.method))
    records = [r for r in records if any(k.startswith(M.merge_metric(s)) for s in MERGED for k in r.metrics)]
    lines = ["| method | unmerged: size, decode tokens/s (batch 1) | " + " | ".join(MERGED) + " |",
             "|---" * (len(MERGED) + 2) + "|"]
    records.sort(key=lambda r: (_order(r.method), int(r.params.get("seed") or 0)))
    per_method = Counter(r.method for r in records)
    task, metric = quality.split(".", 1)
    scored = any(M.eval_metric(task, metric, M.merged_variant(s)) in r.metrics for r in records for s in MERGED)
    for r in records:
        m = r.metrics
        size, tps = m.get(M.merge_metric("none", "size_bytes")), m.get(M.gen_metric("none", 1, "decode_tokens_per_s"))
        unmerged = " · ".join(p for p in (f"{size / 1e6:.1f} MB" if size else "",
                                          f"{_rate(tps)} tokens/s" if tps else "") if p)
        label = r.method + (f" seed {int(r.params.get('seed') or 0)}" if per_method[r.method] > 1 else "")
        lines.append(f"| {label} | {unmerged} | " + " | ".join(_merge_cell(m, s, quality) for s in MERGED) + " |")
    canary = canary_line(records)
    if canary:
        lines += ["", canary]
    runs = runs_text(records)
    dtypes = sorted({str(r.params["compute_dtype"]) for r in records if r.params.get("compute_dtype")})
    held = "" if not dtypes else f", compute {'/'.join(dtypes)} (the dequantize and original forms are held in it" + (
        ": merged in fp32, they keep what a 16-bit merge would round away)" if dtypes == ["fp32"] else ")")
    most = max(per_method.values(), default=1)
    seeds = "one seed" if most == 1 else f"{most} seeds a method, a row each"
    change = (f"`{quality}` change against the unmerged adapter (lower bits/byte is better); " if scored else "")
    lines += ["", f"{runs[0].upper()}{runs[1:]}, suite `{suite}`, {seeds}{held}: KL in nats per token of held-out text "
                  f"from the unmerged adapter; {change}decode speed relative to the unmerged adapter; an empty cell: the "
                  "strategy does not apply."]
    return "\n".join(lines)


REAL_MERGE_START, REAL_MERGE_END = "<!-- real-merge:start -->", "<!-- real-merge:end -->"


def update_real_merge(readme: Path, run_dir: Path, suite: str = "smollm2") -> None:
    """Replace the README's real-model merge block with ``merge_costs`` of that suite."""
    replace_block(readme, REAL_MERGE_START, REAL_MERGE_END, merge_costs(run_dir, suite), run_dir)


def has_suite(run_dir: Path, suite: str) -> bool:
    return any(r.suite == suite for r in read_run_records(run_dir))


def update_merge(readme: Path, run_dir: Path, suite: str = "merge") -> None:
    """Replace the README's merge block with ``merge_costs`` of ``run_dir``."""
    replace_block(readme, MERGE_START, MERGE_END, merge_costs(run_dir, suite), run_dir)
