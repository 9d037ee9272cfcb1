"""Plotly figures of a suite's records; each is drawn only when the metrics it needs exist."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from harness import methods, metrics, stats
from harness import metrics as M
from harness.records import Record
from harness.report.data import case_label

ESTIMATE_PARTS = (  # predicted peak memory, stacked bottom to top
    (M.EST_WEIGHTS, "weights", "#9ecae1"),
    (M.EST_LORA, "LoRA adapter", "#6baed6"),
    (M.EST_GRADIENTS, "gradients", "#4292c6"),
    (M.EST_OPTIMIZER, "optimizer state", "#2171b5"),
    (M.EST_ACTIVATIONS, "activations", "#08519c"),
    (M.EST_WORKSPACE, "workspace (transients)", "#0b3d7a"),
    (M.EST_CONTEXT, "CUDA context", "#08306b"),
)
MEASURED_PEAKS = (
    (M.PEAK_ALLOCATED, "measured: allocated", "#fdae6b"),
    (M.PEAK_RESERVED, "measured: reserved", "#e6550d"),
    (M.NVML_PEAK, "measured: NVML", "#a63603"),
    (M.PEAK_RSS, "measured: process RSS", "#756bb1"),
)
PARETO_X = (M.PEAK_RESERVED, M.NVML_PEAK, M.PEAK_ALLOCATED, M.PEAK_RSS)
OTHER_COLOURS = ("#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
HEIGHT = 360  # px of every figure; the chart's title is HTML above it
LAYOUT = dict(
    template="plotly_white",
    height=HEIGHT,
    margin=dict(l=60, r=20, t=30, b=40),
    font=dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size=12),
    legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
    hoverlabel=dict(namelength=-1),
)
CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


@dataclass
class Chart:
    """A named figure; ``name`` goes into the div's ``data-chart`` attribute."""

    name: str
    title: str
    fig: go.Figure
    wide: bool = False

    def html(self, div_id: str) -> str:
        """The figure as a div and its script, without plotly.js (the page embeds it once)."""
        return pio.to_html(
            self.fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG,
            default_height=f"{self.fig.layout.height or HEIGHT}px",
        )


MAX_LINES = 8  # line charts show this many cases at first; the rest are a legend click away
SIDE_LEGEND = dict(orientation="v", x=1.02, y=1, yanchor="top")


def _many_lines(fig: go.Figure) -> None:
    """With many lines: legend on the right, and MAX_LINES drawn (each method's first case first) until clicked."""
    if len(fig.data) <= MAX_LINES:
        return
    fig.update_layout(legend=SIDE_LEGEND)
    methods: dict[str, int] = {}
    for i, trace in enumerate(fig.data):
        methods.setdefault(trace.meta, i)  # the first line of each method
    firsts = list(methods.values())
    shown = set((firsts + [i for i in range(len(fig.data)) if i not in firsts])[:MAX_LINES])
    for i, trace in enumerate(fig.data):
        if i not in shown:
            trace.visible = "legendonly"


def colour(method: str, i: int = 0) -> str:
    """The method's own colour; a method the registry does not know (an old record) takes one by position."""
    known = methods.METHODS.get(method)
    return known.colour if known else OTHER_COLOURS[i % len(OTHER_COLOURS)]


def reference_bits(shown: set[str]) -> list[tuple[float, str]]:
    """Published bits/param of the methods shown (the QLoRA paper's 4.127 and 4.5), once each."""
    refs = {v: label for m in shown if m in methods.METHODS for v, label in methods.get(m).reference_bits}
    return sorted(refs.items())


def _value(rec: Record, name: str) -> float | None:
    v = rec.metrics.get(name)
    return v if v is not None and math.isfinite(v) else None


def _with(records: list[Record], *names: str) -> list[Record]:
    """Records holding at least one of ``names``."""
    return [r for r in records if any(_value(r, n) is not None for n in names)]


@dataclass
class Point:
    """A bar or marker: one case, or the mean of a replicate group with its 95% interval over seeds."""

    label: str
    y: float
    method: str
    minus: float | None = None  # error bar below and above the mean
    plus: float | None = None
    n: int = 1


def replicated(records: list[Record]) -> bool:
    """True when some case of these records was run with several seeds."""
    return any(len(g.records) > 1 for g in stats.groups(records))


def points(records: list[Record], name: str) -> list[Point]:
    """Per replicate group (mean and interval) when the records hold replicates, else one point per record."""
    if not replicated(records):
        return [Point(case_label(r.case_id), _value(r, name), r.method) for r in _with(records, name)]
    out = []
    for g in stats.groups(records):
        s = stats.t_interval(g.values(name))
        if s.n == 0:
            continue
        ok = s.n > 1 and math.isfinite(s.lo)
        out.append(Point(case_label(g.group_id), s.mean, g.method, s.mean - s.lo if ok else None,
                         s.hi - s.mean if ok else None, s.n))
    return out


def _error_y(pts: list[Point]) -> dict | None:
    """plotly error bars for these points (None when none has an interval)."""
    if not any(p.plus is not None for p in pts):
        return None
    return dict(type="data", symmetric=False, array=[p.plus or 0 for p in pts],
                arrayminus=[p.minus or 0 for p in pts], color="#333", thickness=1.2, width=4)


def _hover_n(pts: list[Point]) -> list[str]:
    return [f" (mean of {p.n} seeds, 95% interval {p.y - p.minus:.4g} to {p.y + p.plus:.4g})" if p.plus is not None
            else "" for p in pts]


def _fig(**layout) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(**{**LAYOUT, **layout})
    return fig


def short_layer(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj`` (the full name stays in the hover)."""
    return re.sub(r"(?<![A-Za-z0-9_])(model|layers|self_attn|mlp)\.", "", name)


def memory_chart(records: list[Record]) -> Chart | None:
    """Predicted peak (stacked by component) beside each measured peak, per case."""
    parts = [p for p in ESTIMATE_PARTS if _with(records, p[0])]
    peaks = [p for p in MEASURED_PEAKS if _with(records, p[0])]
    recs = _with(records, *(p[0] for p in parts + peaks))
    if not recs:
        return None
    x = [case_label(r.case_id) for r in recs]
    fig = _fig(barmode="group", yaxis_title="GiB", legend=SIDE_LEGEND, margin={**LAYOUT["margin"], "r": 10})
    base = [0.0] * len(recs)
    for name, label, col in parts:
        y = [_value(r, name) or 0.0 for r in recs]
        fig.add_bar(
            x=x, y=y, base=list(base), name=f"predicted: {label}", marker_color=col, offsetgroup="predicted",
            legendgroup="predicted", hovertemplate="%{x}<br>" + label + ": %{y:.3f} GiB<extra></extra>",
        )
        base = [b + v for b, v in zip(base, y, strict=True)]
    for r, label, top in zip(recs, x, base, strict=True):
        if r.status == "oom":  # predicted, then out of memory: say so where the measured bars would be
            fig.add_annotation(x=label, y=top, text="OOM", showarrow=False, yshift=12, font=dict(color="#8250df"))
    for name, label, col in peaks:
        fig.add_bar(
            x=x, y=[_value(r, name) for r in recs], name=label, marker_color=col, offsetgroup=name,
            hovertemplate="%{x}<br>" + label + ": %{y:.3f} GiB<extra></extra>",
        )
    return Chart("memory", "Peak memory: predicted by component (stacked, blue) against measured", fig, wide=True)


def throughput_chart(records: list[Record]) -> Chart | None:
    """Training throughput (real tokens/s) and model FLOPs utilisation, per case."""
    shown = [(n, t) for n, t in ((M.TOKENS_PER_S, "tokens/s"), (M.MFU, "MFU")) if _with(records, n)]
    if not shown:
        return None
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[t for _, t in shown], horizontal_spacing=0.12)
    fig.update_layout(**{**LAYOUT, "showlegend": False, "margin": {**LAYOUT["margin"], "t": 40}})
    for col, (name, label) in enumerate(shown, start=1):
        pts = points(records, name)
        fig.add_bar(
            x=[p.label for p in pts], y=[p.y for p in pts], name=label, error_y=_error_y(pts),
            marker_color=[colour(p.method) for p in pts], row=1, col=col, customdata=_hover_n(pts),
            hovertemplate="%{x}<br>" + label + ": %{y:.4g}%{customdata}<extra></extra>",
        )
    if shown[-1][0] == M.MFU:
        fig.update_yaxes(tickformat=".1%", row=1, col=len(shown))
    many = max(len(_with(records, n)) for n, _ in shown) > 8
    return Chart("throughput", "Training throughput (real tokens/s) and model FLOPs utilisation", fig, wide=many)


def rmse_chart(records: list[Record]) -> Chart | None:
    """Quantization RMSE per case, against the int4 absmax reference when measured."""
    recs = _with(records, M.RMSE, M.INT4_RMSE)
    if not recs:
        return None
    fig = _fig(barmode="group", yaxis_title="RMSE")
    pts = points(recs, M.RMSE)
    fig.add_bar(
        x=[p.label for p in pts], y=[p.y for p in pts], name="RMSE", marker_color=[colour(p.method) for p in pts],
        error_y=_error_y(pts), customdata=_hover_n(pts), hovertemplate="%{x}<br>RMSE %{y:.4f}%{customdata}<extra></extra>",
    )
    ref = points(recs, M.INT4_RMSE)
    if ref:
        fig.add_bar(
            x=[p.label for p in ref], y=[p.y for p in ref], name="int4 absmax reference", error_y=_error_y(ref),
            marker_color="#bbbbbb", marker_pattern_shape="/", hovertemplate="%{x}<br>int4 ref %{y:.4f}<extra></extra>",
        )
    return Chart("rmse", "Quantization error per method (RMSE, lower is better)", fig, wide=len(recs) > 8)


def layer_rmse_chart(records: list[Record]) -> Chart | None:
    """RMSE of every quantized layer (``tables[M.LAYERS_TABLE]``), one line per case."""
    recs = [r for r in records if r.tables.get(M.LAYERS_TABLE)]
    if not recs:
        return None
    fig = _fig(yaxis_title="RMSE", hovermode="x unified")
    seen: dict[str, int] = {}
    for r in recs:
        rows = [row for row in r.tables[M.LAYERS_TABLE] if row.get("rmse") is not None]
        n = seen[r.method] = seen.get(r.method, -1) + 1
        fig.add_scatter(
            x=[short_layer(str(row.get("name") or row.get("layer"))) for row in rows], y=[row["rmse"] for row in rows],
            mode="lines+markers", name=case_label(r.case_id), marker_size=5, meta=r.method,
            line=dict(color=colour(r.method, len(seen)), dash=DASHES[n % len(DASHES)], width=1.5),
            customdata=[str(row.get("name") or row.get("layer")) for row in rows],
            hovertemplate="%{y:.4f} (%{customdata})",
        )
    fig.update_xaxes(showticklabels=max(len(r.tables[M.LAYERS_TABLE]) for r in recs) <= 40, tickangle=-45)
    _many_lines(fig)
    return Chart("rmse_layers", "Quantization error per layer (RMSE)", fig, wide=True)


def bits_chart(records: list[Record]) -> Chart | None:
    """Storage cost in bits per parameter, with the QLoRA paper's reference points."""
    recs = _with(records, M.BITS_PER_PARAM)
    if not recs:
        return None
    fig = _fig(yaxis_title="bits / parameter")
    y = [_value(r, M.BITS_PER_PARAM) for r in recs]
    fig.add_bar(
        x=[case_label(r.case_id) for r in recs], y=y, marker_color=[colour(r.method) for r in recs], showlegend=False,
        text=[f"{v:.3f}" for v in y] if len(y) <= 10 else None, textposition="outside", hovertemplate="%{x}<br>%{y:.4f} bits<extra></extra>",
    )
    for (value, label), dash in zip(reference_bits({r.method for r in recs}), ("dot", "dash", "dashdot"), strict=False):
        fig.add_hline(y=value, line_dash=dash, line_color="#888", line_width=1)
        fig.add_scatter(x=[None], y=[None], mode="lines", name=label, line=dict(color="#888", dash=dash, width=1))
    fig.update_yaxes(range=[0, max(y + [4.5]) * 1.15])
    return Chart("bits_per_param", "Storage per parameter, quantization constants included (bits)", fig,
                 wide=len(recs) > 8)


def loss_chart(records: list[Record]) -> Chart | None:
    """Training loss curves (``series[M.LOSS_SERIES]``), one line per case."""
    recs = [r for r in records if r.series.get(M.LOSS_SERIES)]
    if not recs:
        return None
    fig = _fig(xaxis_title="step", yaxis_title="loss", hovermode="x unified")
    seen: dict[str, int] = {}
    for r in recs:
        points = r.series[M.LOSS_SERIES]
        n = seen[r.method] = seen.get(r.method, -1) + 1
        fig.add_scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines", name=case_label(r.case_id), meta=r.method,
            line=dict(color=colour(r.method, len(seen)), dash=DASHES[n % len(DASHES)], width=2),
            hovertemplate="%{y:.4f}",
        )
    _many_lines(fig)
    return Chart("loss", "Training loss", fig)


def pareto_chart(records: list[Record]) -> Chart | None:
    """Adapter accuracy against peak memory, a panel per eval task: up and to the left is better."""
    xname = next((n for n in PARETO_X if _with(records, n)), None)
    tasks = sorted({m.group(1) for r in records for k in r.metrics if (m := re.fullmatch(r"eval\.([^.]+)\.acc", k))})
    if xname is None or not tasks:
        return None
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, horizontal_spacing=0.08)
    fig.update_layout(**{**LAYOUT, "hovermode": "closest", "margin": {**LAYOUT["margin"], "t": 40},
                         "legend": SIDE_LEGEND})
    shown: set[str] = set()
    for col, task in enumerate(tasks, start=1):
        name = M.eval_metric(task, "acc")
        xs = {p.label: p for p in points(records, xname)}
        ys = {p.label: p for p in points(records, name)}
        pts = sorted((xs[k].y, ys[k].y, ys[k].method, k, xs[k], ys[k]) for k in ys if k in xs)
        for method in dict.fromkeys(p[2] for p in pts):
            mine = [p for p in pts if p[2] == method]
            fig.add_scatter(
                x=[p[0] for p in mine], y=[p[1] for p in mine], mode="markers", name=method, legendgroup=method,
                showlegend=method not in shown, text=[p[3] for p in mine], row=1, col=col,
                error_x=_error_y([p[4] for p in mine]), error_y=_error_y([p[5] for p in mine]),
                marker=dict(size=12, color=colour(method), line=dict(width=1, color="#333")),
                hovertemplate="%{text}<br>%{x:.3f} GiB · acc %{y:.3f}<extra>" + task + "</extra>",
            )
            shown.add(method)
        frontier, top = [], -math.inf
        for x, y, *_ in pts:  # the best accuracy reachable within each memory budget
            if y > top:
                frontier.append((x, y))
                top = y
        if len(frontier) > 1:
            fig.add_scatter(
                x=[p[0] for p in frontier], y=[p[1] for p in frontier], mode="lines", line_shape="hv",
                line=dict(color="#999", dash="dot", width=1), showlegend=False, hoverinfo="skip", row=1, col=col,
            )
        fig.update_xaxes(title_text=f"{xname.split('.', 1)[1]} (GiB)", row=1, col=col)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    return Chart("pareto", "Accuracy against peak memory (up and to the left is better; dotted: best so far)", fig,
                 wide=len(tasks) > 1)


def difference_chart(records: list[Record]) -> Chart | None:
    """Each method minus the reference on every quality metric, with the paired interval (seeds × items),
    simultaneous over the methods compared (``stats.run_stats``)."""
    suites = stats.run_stats(records).get("suites", {})
    diffs = [d for st in suites.values() for d in st["differences"] if d.get("lo") is not None]
    if not diffs:
        return None
    names = list(dict.fromkeys(d["metric"] for d in diffs))
    ref = next(iter(suites.values()))["reference"]
    # plotly refuses a spacing above 1 / (cols - 1): many metrics get narrower gaps
    spacing = min(0.12, 0.8 / (len(names) - 1)) if len(names) > 1 else 0.12
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[n.removeprefix("eval.") for n in names],
                        horizontal_spacing=spacing)
    fig.update_layout(**{**LAYOUT, "showlegend": False, "margin": {**LAYOUT["margin"], "t": 40, "l": 110}})
    for col, name in enumerate(names, start=1):
        mine = [d for d in diffs if d["metric"] == name]
        fig.add_scatter(
            x=[d["estimate"] for d in mine], y=[case_label(d["group"]) for d in mine], mode="markers", row=1, col=col,
            marker=dict(size=10, color=[colour(d["method"]) for d in mine], line=dict(width=1, color="#333")),
            error_x=dict(type="data", symmetric=False, array=[d["hi"] - d["estimate"] for d in mine],
                         arrayminus=[d["estimate"] - d["lo"] for d in mine], color="#333", thickness=1.2, width=4),
            customdata=[[d["lo"], d["hi"], d["verdict"]] for d in mine],
            hovertemplate="%{y}: %{x:+.4f} [%{customdata[0]:+.4f}, %{customdata[1]:+.4f}]<br>%{customdata[2]}"
                          "<extra></extra>",
        )
        fig.add_vline(x=0, line_dash="dot", line_color="#888", line_width=1, row=1, col=col)
        better = {"higher": "→ better", "lower": "← better"}.get(metrics.direction(name), "")
        fig.update_xaxes(title_text=f"difference to {ref} {better}", row=1, col=col)
    k = next(iter(suites.values())).get("family_size", 1)
    joint = f"simultaneous 95% interval over {k} methods" if k > 1 else "95% interval"
    return Chart("differences", f"Difference to {ref} with its {joint} (paired over seeds and eval items)",
                 fig, wide=len(names) > 1)


_GEN = re.compile(r"gen\.([a-z]+)\.bs(\d+)\.(decode_tokens_per_s|ttft_ms)$")


def inference_chart(records: list[Record]) -> Chart | None:
    """Greedy generation per case and form (unmerged, each merge): decode tokens/s and time to first token."""
    from harness.methods.merge import STRATEGIES

    found = {(r.case_id, m.group(1), int(m.group(2))) for r in records for k in r.metrics if (m := _GEN.match(k))}
    if not found:
        return None
    sizes = sorted({b for _, _, b in found})
    fig = make_subplots(rows=1, cols=2, subplot_titles=["decode tokens/s (higher is better)",
                                                        "time to first token, ms (lower is better)"],
                        horizontal_spacing=0.1)
    fig.update_layout(**{**LAYOUT, "barmode": "group", "margin": {**LAYOUT["margin"], "t": 40}})
    for i, b in enumerate(sizes):
        for col, metric in ((1, "decode_tokens_per_s"), (2, "ttft_ms")):
            x, y, colours = [], [], []
            for r in records:
                for form in STRATEGIES:
                    v = _value(r, M.gen_metric(form, b, metric))
                    if v is not None:
                        x.append(f"{case_label(r.case_id)} · {form}")
                        y.append(v)
                        colours.append(colour(r.method))
            fig.add_bar(x=x, y=y, name=f"batch {b}", legendgroup=f"bs{b}", showlegend=col == 1, row=1, col=col,
                        marker=dict(color=colours, pattern_shape=DASH_PATTERNS[i % len(DASH_PATTERNS)]),
                        hovertemplate="%{x}<br>batch " + str(b) + ": %{y:.4g}<extra></extra>")
    return Chart("inference", "Greedy generation: unmerged adapter against each merged form (medians of the "
                 "timed repeats; bar fill: batch size)", fig, wide=True)


DASH_PATTERNS = ("", "/", ".", "x")

CHARTS: tuple[Callable[[list[Record]], Chart | None], ...] = (
    memory_chart, throughput_chart, rmse_chart, bits_chart, layer_rmse_chart, loss_chart, pareto_chart,
    difference_chart, inference_chart,
)


def suite_charts(records: list[Record]) -> list[Chart]:
    """Every chart whose metrics exist in these records, in reading order."""
    return [c for c in (make(records) for make in CHARTS) if c is not None]


def across_runs_chart(metric: str, runs: list[tuple[str, list[Record]]]) -> Chart | None:
    """One metric per case, a bar per run (for ``render_many``)."""
    traces = [(rid, _with(recs, metric)) for rid, recs in runs]
    if not any(recs for _, recs in traces):
        return None
    unit = metrics.info(metric).unit
    fig = _fig(barmode="group", yaxis_title=unit or metric)
    for i, (rid, recs) in enumerate(traces):
        fig.add_bar(
            x=[case_label(r.case_id) for r in recs], y=[_value(r, metric) for r in recs], name=rid,
            marker_color=OTHER_COLOURS[i % len(OTHER_COLOURS)] if i else "#4c72b0",
            hovertemplate="%{x}<br>%{y:.4g}<extra>" + rid + "</extra>",
        )
    return Chart(f"runs-{metric}", f"{metric}" + (f" [{unit}]" if unit else "") + ", per run", fig)
