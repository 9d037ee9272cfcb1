"""HTML pages: one per run, an index of runs, and a side-by-side comparison of several runs."""

from __future__ import annotations

import functools
import hashlib
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from harness import metrics as M
from harness.compare import load_baseline
from harness.records import SAFE_NAME, RecordError, list_runs, read_stats_checks, warn
from harness.report import charts as ch
from harness.report import distributed, tables
from harness.report import summary as sm
from harness.report.data import (
    Run,
    differing_bases,
    env_items,
    git_text,
    load_run,
    machine,
    write_text_atomic,
)

TEMPLATES = Path(__file__).parent / "templates"
MANY_METRICS = (  # metrics charted across runs by render_many, when present
    M.PEAK_RESERVED, M.NVML_PEAK, M.PEAK_RSS, M.TOKENS_PER_S, M.MFU,
    M.RMSE, M.BITS_PER_PARAM,
)


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = when
    env.filters["href"] = safe_href
    return env


def safe_href(target: str) -> str:
    """A link target that stays inside the reports folder: a relative path of safe names, else ``""``.

    Run ids are checked when read; this is the last guard before an ``href`` (no scheme such as
    ``javascript:``, no absolute path, no ``..``).
    """
    parts = str(target).split("/")
    ok = all(re.fullmatch(SAFE_NAME, p) for p in parts) and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", str(target))
    return str(target) if ok else ""


@functools.cache
def plotly_js() -> str:
    """The plotly.js bundle shipped with the plotly package, embedded once per page (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def when(iso: str) -> str:
    """``2026-11-22T13:35:22+00:00`` -> ``2026-11-22 13:35 UTC``; other text as it is."""
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return iso or "–"
    return t.strftime("%Y-%m-%d %H:%M") + (" UTC" if t.utcoffset() is not None and not t.utcoffset() else "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _chart_views(suite: str, charts: list[ch.Chart]) -> list[dict[str, Any]]:
    """Charts as template values: name, title, width and their HTML (div id unique in the page)."""
    return [
        {"name": c.name, "title": c.title, "wide": c.wide, "html": c.html(f"chart-{_slug(suite)}-{_slug(c.name)}")}
        for c in charts
    ]


def _page(template: str, out: Path, **values: Any) -> Path:
    has_charts = any(s.get("charts") for s in values.get("suites", []))
    html = _env().get_template(template).render(plotly_js=plotly_js() if has_charts else "", **values)
    return write_text_atomic(out, html)


def _run_summary(run: Run) -> dict[str, Any]:
    """What the index and page headers show about a run."""
    env = run.env
    return {
        "run_id": run.run_id,
        "started_at": run.started_at,
        "machine": machine(env, run.run_id),
        "git": git_text(env),
        "dirty": bool((env.get("git") or {}).get("dirty")),
        "counts": run.counts(),
        "total": len(run.records),
        "suites": run.suites,
        "tier": run.meta.get("tier") or "",
        "tier_why": run.meta.get("tier_why") or "",
        "pooled": _pooled(run),
    }


def _pooled(run: Run) -> list[dict[str, Any]]:
    """The earlier runs a run extends (``--extends``) whose records its tables and statistics pool: run id,
    cases and commit of each; [] for a run that stands alone."""
    out: dict[str, dict[str, Any]] = {}
    for rec in run.records:
        if rec.run_id != run.run_id:
            entry = out.setdefault(rec.run_id, {"run_id": rec.run_id, "cases": 0, "git": git_text(rec.env or {})})
            entry["cases"] += 1
    return sorted(out.values(), key=lambda e: e["run_id"])


def _model_text(model: dict[str, Any]) -> str:
    """``synthetic preset llama-tiny · 12.3M parameters · hash 1a2b3c``."""
    if not model:
        return ""
    parts = [str(model.get("source", ""))]
    name = (model.get("preset") or model.get("hub_id") or model.get("model_id") or model.get("path")
            or model.get("name"))
    if name:
        parts.append(str(name))
    params = model.get("parameters") or model.get("param_count") or model.get("params")
    if isinstance(params, dict):  # {"linear": ..., "total": ...}
        params = params.get("total")
    if isinstance(params, int | float):
        parts.append(f"{params / 1e6:,.1f}M parameters" if params < 1e9 else f"{params / 1e9:,.2f}B parameters")
    if model.get("num_layers"):
        parts.append(f"{model['num_layers']} layers")
    digest = model.get("fingerprint") or model.get("hash")
    if digest:
        parts.append(f"fingerprint {str(digest)[:12]}")
    return " · ".join(p for p in parts if p)


def render_run(run_dir: Path, reports_dir: Path, *, baseline: Path | str | None = None) -> Path:
    """Write ``reports/<run-id>.html`` (plus its CSV/Markdown tables) and return the page's path.

    ``baseline`` (a run folder, or a run id or tier resolved next to ``run_dir``, see harness.compare)
    adds each metric's change against the baseline's record of the same case.
    """
    run = load_run(run_dir)
    base = load_baseline(baseline, Path(run_dir).parent) if baseline is not None else None
    base_id = next(iter(base.values())).run_id if base else ""
    csv_links = {p.stem: p for p in tables.export_tables(run_dir, reports_dir) if p.suffix == ".csv"}
    suites, decisions = [], []
    for suite in run.suites:
        records = run.by_suite(suite)
        st = _suite_stats(run_dir, suite, records)
        if (dec := sm.decision(records, st, st.get("reference") or _reference(run_dir, suite))) is not None:
            decisions.append(dec)
        forest = [c for c in (ch.forest_chart(st), ch.forest_chart(st, "base")) if c is not None]
        table = tables.suite_table(records, base)
        suites.append({
            "name": suite,
            "anchor": f"suite-{_slug(suite)}",
            "model": _model_text(records[0].model),
            "table": table,
            "collapse": len(table.rows) > COLLAPSE_ROWS,
            "forest": _chart_views(suite, [c for c in forest if c.name == "differences"]),
            "base_forest": _chart_views(suite, [c for c in forest if c.name == "base_differences"]),
            "merge": tables.merge_table(records),
            "compat": distributed.compat_table(records),  # cases over ranks: method x strategy, from records
            "ranks": distributed.ranks_table(records),
            "answers": tables.answers_table(records),
            "bases": differing_bases(records, base),  # comparisons made across different base models
            "all": tables.all_metrics(records),
            "charts": _chart_views(suite, ch.suite_charts(records)),
            "stats": _stats_view(run_dir, suite, records, st),
            "csv": f"{run.run_id}/{csv_links[suite].name}" if suite in csv_links else "",
            "md": f"{run.run_id}/{suite}.md" if suite in csv_links else "",
        })
    env = run.env
    return _page(
        "run.html", Path(reports_dir) / f"{run.run_id}.html",
        run=_run_summary(run), suites=suites, decisions=sm.ordered(decisions), tiers=sm.tier_names(), env=env_items(env), versions=env.get("versions") or {},
        baseline=str(baseline) if baseline is not None else "", baseline_id=base_id,
        title=f"{run.run_id} · qlora-harness",
    )


COLLAPSE_ROWS = 12  # a table longer than this opens collapsed (the summary above it answers first)


def _reference(run_dir: Path, suite: str) -> str:
    from harness.report.headline import _reference as stored

    return stored(run_dir, suite)


def _suite_stats(run_dir: Path, suite: str, records: list) -> dict[str, Any]:
    """The suite's statistics, stored with the run where they are (``summary.suite_stats``), computed otherwise."""
    return sm.suite_stats(run_dir, suite, records, _reference(run_dir, suite))


def _stats_view(run_dir: Path, suite: str, records: list, st: dict[str, Any]) -> dict[str, Any]:
    """Differences to the reference with intervals and generated verdicts (the trained adapters', then the
    untrained bases'), speed/memory ratios, expectations."""

    from harness import stats
    from harness.report.headline import run_verdicts

    ref = st.get("reference") or _reference(run_dir, suite)

    def interval(d: dict[str, Any], k: int | None = None) -> str:
        if d.get("estimate") is None:  # the metric is missing on one side
            return "–"
        if d.get("lo") is None:
            return f"{d['estimate']:+.4g} (no interval)"
        k = k if k is not None else stats.digits_for((d["hi"] - d["lo"]) / 2)
        return f"{d['estimate']:+.{k}f} [{d['lo']:+.{k}f}, {d['hi']:+.{k}f}]"

    alone = stats.run_by_run(records, suite, ref)  # several runs pooled: each run's seeds judged alone too
    by_group = {g.group_id: g for g in stats.groups(records)}
    diffs = [{"method": d["method"], "metric": d["metric"], "text": interval(d), "verdict": d["verdict"],
              "basis": (f"{d['n_seeds'][0]}+{d['n_seeds'][1]} seeds" + (" paired" if d["paired_seeds"] else "")
                        + (f" × {d['n_items']} items" if d["n_items"] else "")),
              "alone": [f"{run} ({seeds}): {verdict}" for run, seeds, verdict
                        in run_verdicts(by_group[d["group"]], (d["group"], d["metric"]), alone)]}
             for d in st.get("differences", [])]
    ratios = [{"method": r["method"], "metric": r["metric"],
               "text": f"{r['estimate']:.3f}×" + (f" [{r['lo']:.3f}, {r['hi']:.3f}]" if r.get("lo") is not None else ""),
               "basis": stats.ratio_basis(r)} for r in st.get("ratios", [])]
    files, bad = read_stats_checks(run_dir)  # a file that cannot be read is named on stderr and left out
    for line in bad:
        warn(f"{line} (left out of the report)")
    checks = [{"name": f.name, **r.model_dump()} for f in files if f.suite == suite for r in f.results]
    replicated = any(len(g.records) > 1 for g in by_group.values())
    def untrained(d: dict[str, Any]) -> bool:
        im = stats.item_metric(d["metric"])
        return im is not None and im.variant == "base"

    return {"reference": ref, "differences": [d for d in diffs if not untrained(d)],
            "base_differences": [d for d in diffs if untrained(d)], "ratios": ratios if replicated else [],
            "checks": checks, "family_size": st.get("family_size", 1), "runs": list(alone)}


def _stale(page: Path, run_dir: Path) -> bool:
    """True when the page is missing or older than a file of its run."""
    if not page.exists():
        return True
    newest = max((p.stat().st_mtime for p in run_dir.iterdir() if p.is_file()), default=0)
    return page.stat().st_mtime < newest


def render_index(results_dir: Path, reports_dir: Path) -> Path:
    """Write ``reports/index.html`` listing every run, newest first; render missing or stale run pages."""
    reports_dir = Path(reports_dir)
    runs = []
    for run_dir in list_runs(results_dir):
        try:
            run = load_run(run_dir)
            page = reports_dir / f"{run.run_id}.html"
            if _stale(page, run_dir):
                render_run(run_dir, reports_dir)
        except RecordError as exc:  # one unreadable run must not hide every other run
            warn(f"{exc} (run left out of the index)")
            continue
        except Exception as exc:  # noqa: BLE001 - a bug rendering an older run must not cost this one its index
            warn(f"{run_dir}: page not rendered ({type(exc).__name__}: {exc}; a bug of the harness, please report "
                 "it) (run left out of the index)")
            continue
        runs.append({**_run_summary(run), "href": page.name, "dir": run_dir, "run": run})
    runs.sort(key=lambda r: (r["started_at"], r["run_id"]), reverse=True)
    latest = {}
    for r in runs:  # the newest run that compares methods opens the index with its summary
        decisions = [d for suite in r["suites"] if (d := sm.decision(
            r["run"].by_suite(suite), st := _suite_stats(r["dir"], suite, r["run"].by_suite(suite)),
            st.get("reference") or _reference(r["dir"], suite))) is not None]
        if decisions:
            latest = {"run_id": r["run_id"], "href": r["href"], "decisions": sm.ordered(decisions)}
            break
    for r in runs:
        del r["dir"], r["run"]
    return _page("index.html", reports_dir / "index.html", runs=runs, latest=latest, tiers=sm.tier_names(),
                 title="Runs · qlora-harness")


def render_many(run_dirs: list[Path], out: Path) -> Path:
    """One page comparing several runs (other machines, other tiers) side by side, suite by suite."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    headers = []
    for run in runs:
        page = out.parent / f"{run.run_id}.html"
        headers.append({**_run_summary(run), "href": page.name if page.exists() else ""})
    suite_names = list(dict.fromkeys(s for run in runs for s in run.suites))
    suites = []
    for suite in suite_names:
        per_run = [run.by_suite(suite) for run in runs]
        pairs = [(run.run_id, recs) for run, recs in zip(runs, per_run, strict=True)]
        made = [ch.across_runs_chart(m, pairs) for m in MANY_METRICS]
        suites.append({
            "name": suite,
            "anchor": f"suite-{_slug(suite)}",
            "table": tables.many_table(suite, per_run, [r.run_id for r in runs]),
            "charts": _chart_views(suite, [c for c in made if c is not None]),
        })
    return _page(
        "many.html", out, runs=headers, suites=suites, title=f"{len(runs)} runs compared · qlora-harness"
    )


def many_name(run_ids: list[str]) -> str:
    """``compare-<id1>_<id2>.html``, shortened with a hash when the ids are long."""
    joined = "_".join(run_ids)
    if len(joined) > 120:
        joined = f"{run_ids[0]}_and_{len(run_ids) - 1}_more-{hashlib.sha1(joined.encode()).hexdigest()[:8]}"
    return f"compare-{joined}.html"
