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
PARETO_X = (M.PEAK_ALLOCATED, M.PEAK_RESERVED, M.NVML_PEAK, M.TENSOR_PEAK, M.PEAK_RSS)
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


MEMORY_PAIRS = (  # (measured, its prediction, what both are): like with like only
    (M.PEAK_ALLOCATED, M.EST_ALLOCATOR, "torch allocator peak"),
    (M.NVML_PEAK, M.EST_TOTAL, "NVML process peak (CUDA context included)"),
    (M.TENSOR_PEAK, M.EST_AT_PROFILED_STEP, "live-tensor peak at the profiled step"),
)


def memory_chart(records: list[Record]) -> Chart | None:
    """Each measured peak beside the estimator's prediction of that same quantity, per case or replicate group."""
    pairs = [p for p in MEMORY_PAIRS if _with(records, p[0]) and _with(records, p[1])]
    if not pairs:
        return None
    fig = _fig(barmode="group", yaxis_title="GiB", yaxis_rangemode="tozero")
    for measured, predicted, what in pairs:
        for name, kind, col in ((predicted, "predicted", "#6baed6"), (measured, "measured", "#e6550d")):
            pts = points(records, name)
            fig.add_bar(x=[p.label for p in pts], y=[p.y for p in pts], name=f"{kind}: {what}",
                        marker_color=col if len(pairs) == 1 else None, error_y=_error_y(pts),
                        customdata=_hover_n(pts), hovertemplate="%{x}<br>" + kind + ": %{y:.4f} GiB%{customdata}"
                                                                "<extra></extra>")
    what = pairs[0][2] if len(pairs) == 1 else "each measurement beside its own prediction"
    n = len(points(records, pairs[0][0]))
    return Chart("memory", f"Peak memory, predicted against measured: {what}", fig, wide=n > 8)


def estimate_chart(records: list[Record]) -> Chart | None:
    """The estimator's peak by component (stacked), per case or replicate group: a prediction, nothing measured."""
    parts = [p for p in ESTIMATE_PARTS if _with(records, p[0])]
    if not parts:
        return None
    fig = _fig(barmode="stack", yaxis_title="GiB", legend=SIDE_LEGEND, margin={**LAYOUT["margin"], "r": 10})
    for name, label, col in parts:
        pts = points(records, name)
        fig.add_bar(x=[p.label for p in pts], y=[p.y for p in pts], name=label, marker_color=col,
                    hovertemplate="%{x}<br>" + label + ": %{y:.4f} GiB<extra></extra>")
    oom = {case_label(r.case_id) for r in records if r.status == "oom"}
    for label in sorted(oom):
        fig.add_annotation(x=label, y=0, text="OOM", showarrow=False, yshift=12, font=dict(color="#8250df"))
    n = len(points(records, parts[0][0]))
    return Chart("estimate", "Predicted peak memory by component, for a full batch (batch size x sequence length "
                 "tokens; no measurement here)", fig, wide=n > 8)


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
    fig = _fig(yaxis_title="RMSE", hovermode="x unified", yaxis_rangemode="tozero")
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
    fig = _fig(xaxis_title="step", yaxis_title="loss", hovermode="x unified", yaxis_rangemode="tozero")
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
        fig.update_xaxes(title_text=f"{xname.split('.', 1)[1]} (GiB)", rangemode="tozero", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02], tickvals=[0.2, 0.4, 0.6, 0.8, 1.0])  # no "0" over the x axis's
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    what = {M.PEAK_RSS: "process RSS, interpreter included", M.TENSOR_PEAK: "live tensors"}.get(xname, "GPU")
    return Chart("pareto", f"Accuracy against peak memory ({what}; up and to the left is better; dotted: best so "
                 "far; both axes from zero)", fig,
                 wide=len(tasks) > 1)


FAMILIES = {  # metric kind -> the panel it is drawn in (one x scale each); other kinds stay in the table
    "acc": "accuracy", "exact_match": "exact match", "bits_per_byte": "bits per byte",
}


def family(metric: str) -> tuple[str, str] | None:
    """(variant, family) of an item-level eval metric in FAMILIES (``base`` / ``adapter`` ...), else None."""
    im = stats.item_metric(metric)
    return (im.variant, FAMILIES[im.metric]) if im is not None and im.metric in FAMILIES else None


def _method_of(group: str) -> str:
    return case_label(group)


def forest_chart(st: dict, variant: str = "adapter") -> Chart | None:
    """A forest plot of the differences to the reference (``stats.run_stats``' dicts): a row per method, a panel
    per metric family with one x scale, a marker per metric with its simultaneous interval, zero marked. The
    untrained base's differences (``variant="base"``) make their own, smaller chart."""
    diffs = [d for d in st.get("differences", []) if d.get("lo") is not None and d.get("hi") is not None
             and (f := family(d["metric"])) is not None and f[0] == variant]
    if not diffs:
        return None
    ref = st.get("reference", stats.REFERENCE)
    fams = list(dict.fromkeys(family(d["metric"])[1] for d in sorted(diffs, key=lambda d: d["metric"])))
    rows = sorted(dict.fromkeys(_method_of(d["group"]) for d in diffs),
                  key=lambda m: list(methods.METHODS).index(m) if m in methods.METHODS else 99, reverse=True)
    fig = make_subplots(rows=1, cols=len(fams), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"{f} ({_better(f, diffs)})" for f in fams])
    height = max(160, 60 + 34 * len(rows)) if variant == "base" else max(220, 90 + 44 * len(rows))
    fig.update_layout(**{**LAYOUT, "height": height, "scattermode": "group", "scattergap": 0.5,
                         "margin": {**LAYOUT["margin"], "t": 50, "l": 110},
                         "legend": dict(orientation="h", yanchor="top", y=-0.22 if variant == "adapter" else -0.35,
                                        x=0)})
    symbols = ("circle", "diamond", "square", "triangle-up", "x", "star")
    for col, fam in enumerate(fams, start=1):
        names = list(dict.fromkeys(d["metric"] for d in diffs if family(d["metric"])[1] == fam))
        for i, name in enumerate(names):
            mine = sorted((d for d in diffs if d["metric"] == name), key=lambda d: rows.index(_method_of(d["group"])))
            task = name.removeprefix("eval.").split(".")[0]
            fig.add_scatter(
                x=[d["estimate"] for d in mine], y=[_method_of(d["group"]) for d in mine], mode="markers",
                orientation="h", name=f"{task} {fam}", row=1, col=col, legendgroup=name,
                marker=dict(size=10, symbol=symbols[i % len(symbols)], color=[colour(d["method"]) for d in mine],
                            line=dict(width=1, color="#333")),
                error_x=dict(type="data", symmetric=False, array=[d["hi"] - d["estimate"] for d in mine],
                             arrayminus=[d["estimate"] - d["lo"] for d in mine], color="#333", thickness=1.2, width=4),
                customdata=[[d["lo"], d["hi"], d["verdict"]] for d in mine],
                hovertemplate="%{y} · " + task + ": %{x:+.4f} [%{customdata[0]:+.4f}, %{customdata[1]:+.4f}]"
                              "<br>%{customdata[2]}<extra></extra>",
            )
        fig.add_vline(x=0, line_dash="solid", line_color="#888", line_width=1, row=1, col=col)
        span = max(abs(v) for d in diffs if family(d["metric"])[1] == fam for v in (d["lo"], d["hi"])) or 1.0
        fig.update_xaxes(range=[-1.1 * span, 1.1 * span], zeroline=False, row=1, col=col)  # zero in the middle
    fig.update_yaxes(categoryorder="array", categoryarray=rows)
    fig.update_xaxes(title_text=f"difference to {ref}", title_standoff=4)
    k = st.get("family_size", 1)
    joint = f"simultaneous 95% intervals over {k} methods" if k > 1 else "95% intervals"
    if variant == "base":
        return Chart("base_differences", f"What quantizing the base does before training: each untrained base "
                     f"against {ref}'s, with {joint}", fig, wide=True)
    one_seed = all(max(d.get("n_seeds") or (1, 1)) <= 1 for d in diffs)
    paired = "paired over eval items; one seed, not over seeds" if one_seed else "paired over seeds and eval items"
    return Chart("differences", f"Difference to {ref} after training, with {joint} ({paired}; other metrics in "
                 "the table)", fig, wide=True)


def _better(fam: str, diffs: list[dict]) -> str:
    d = next(d for d in diffs if family(d["metric"])[1] == fam)
    return {"higher": "→ better", "lower": "← better"}.get(metrics.direction(d["metric"]), "no direction")


def difference_chart(records: list[Record], st: dict | None = None) -> Chart | None:
    """The forest plot of a suite's differences after training (``forest_chart``), from ``st`` where given."""
    if st is None:
        suites = stats.run_stats(records).get("suites", {})
        st = next(iter(suites.values()), {})
    return forest_chart(st)


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
    fig.update_layout(**{**LAYOUT, "barmode": "group", "margin": {**LAYOUT["margin"], "t": 40},
                         "legend": SIDE_LEGEND})  # a legend on top would cover the subplot titles
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
    memory_chart, estimate_chart, throughput_chart, rmse_chart, bits_chart, layer_rmse_chart, loss_chart,
    pareto_chart, inference_chart,
)


def suite_charts(records: list[Record]) -> list[Chart]:
    """Every chart whose metrics exist in these records, in reading order (the forest plots are drawn apart,
    from the suite's statistics: ``forest_chart``)."""
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
