"""The HTML reports, CSV/Markdown exports and terminal summary, on fake runs (no model involved)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
from conftest import make_run

from harness.__main__ import main
from harness.records import iter_records
from harness.report import export_tables, render_index, render_many, render_run, summary_table


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], ""

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        """Descendants by tag, class and attribute values (``data_chart="memory"`` for data-chart)."""
        return [
            n for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.attrs.get("class", "").split())
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class Tree(HTMLParser):
    """A tiny DOM built with the standard library (void elements closed at once)."""

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def __init__(self, html: str):
        super().__init__()
        self.root = self.cur = Node("#root", {}, None)
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(Node("#text", {}, self.cur))
        self.cur.children[-1].text = data


def parse(path: Path) -> Node:
    return Tree(Path(path).read_text()).root


def test_run_page_tables_charts_and_markers(fake_run: Path, tmp_path: Path):
    page = render_run(fake_run, tmp_path / "reports")
    assert page == tmp_path / "reports" / "20261122T120000Z-gpu01.html"
    html = page.read_text()
    doc = parse(page)
    tables = {t.attrs["data-suite"]: t for t in doc.find_all("table", "comparison")}
    assert set(tables) == {"smoke", "quant-fidelity"}

    smoke = tables["smoke"]
    headers = [th.attrs["data-metric"] for th in smoke.find_all("th", "metric")]
    assert headers.index("quant.rmse") < headers.index("estimate.total_gib") < headers.index(
        "train.peak_reserved_gib") < headers.index("eval.recall.acc") < headers.index("eval.support_mc.acc")
    assert headers.index("eval.support_mc.acc") < headers.index("eval.support_mc.acc_gain")  # by task
    assert "eval.support_mc.acc_stderr" not in headers  # folded into the acc cell as ±
    assert "±0.0210" in smoke.all_text()
    details = ["quant.q.rmse", "quant.packed_bytes", "estimate.weights_gib", "train.loss_first"]
    assert not set(details) & {th.attrs["data-metric"] for th in doc.find_all("th", "metric")}
    everything = {t.attrs["data-suite"]: t for t in doc.find_all("table", "all")}
    in_all = {tr.attrs["data-metric"]: tr for tr in everything["smoke"].find_all("tr") if "data-metric" in tr.attrs}
    assert set(details) <= set(in_all) and "quant.layers.0.rmse" in {
        tr.attrs.get("data-metric") for tr in everything["quant-fidelity"].find_all("tr")}
    assert not in_all["train.loss_first"].find_all("td", "best")  # no direction: never marked
    assert in_all["quant.q.rmse"].find_all("td", "best")
    reserved = smoke.find_all("th", data_metric="train.peak_reserved_gib")[0]
    assert "GiB" in reserved.all_text() and "↓" in reserved.all_text()

    col = headers.index("train.peak_reserved_gib")
    rows = {tr.attrs["data-case"]: tr for tr in smoke.find_all("tr") if "data-case" in tr.attrs
            and "message" not in tr.attrs.get("class", "")}
    cells = {cid: tr.find_all("td", "num")[col] for cid, tr in rows.items()}
    best = [cid for cid, td in cells.items() if "best" in td.attrs.get("class", "")]
    assert best == ["smoke[qlora-nf4-dq-seq128]"]  # lowest peak memory
    assert cells["smoke[qlora-nf4-dq-seq128]"].find_all("strong")
    tokens = headers.index("train.tokens_per_s")  # higher is better
    assert "best" in rows["smoke[lora-bf16-seq128]"].find_all("td", "num")[tokens].attrs["class"]

    classes = {tr.attrs["class"].split()[0] for tr in doc.find_all("tr") if "data-case" in tr.attrs}
    assert {"status-passed", "status-failed", "status-oom", "status-skipped", "status-error"} <= classes
    messages = [tr.all_text() for tr in smoke.find_all("tr", "message")]
    assert any("rmse-max" in m for m in messages) and any("out of memory" in m for m in messages)

    charts = {(d.attrs["data-suite"], d.attrs["data-chart"]) for d in doc.find_all("div", "chart")}
    expected = {"memory", "estimate", "throughput", "rmse", "bits_per_param", "loss", "pareto"}
    assert {c for s, c in charts if s == "smoke"} == expected
    assert {c for s, c in charts if s == "quant-fidelity"} == {"rmse", "bits_per_param", "rmse_layers"}
    for div in doc.find_all("div", "chart"):
        assert div.find_all("div", "plotly-graph-div"), div.attrs["data-chart"]

    assert html.count("plotly.js v") == 1  # the bundle is inlined once
    for node in doc.find_all("script") + doc.find_all("link") + doc.find_all("img"):
        assert not re.match(r"(https?:)?//", node.attrs.get("src", "") + node.attrs.get("href", ""))
    env = doc.find_all("section", "environment")[0].all_text()
    assert "NVIDIA H100" in env and "0123456789" in env and "dirty" in env and "bitsandbytes" in env


def test_baseline_deltas(fake_run: Path, tmp_path: Path):
    base = make_run(tmp_path / "results", "20261120T120000Z-base", scale=0.8)  # used less memory
    doc = parse(render_run(fake_run, tmp_path / "reports", baseline=base))
    deltas = doc.find_all("span", "delta")
    assert deltas and any("regressed" in d.attrs["class"] for d in deltas)
    reg = [d for d in deltas if "regressed" in d.attrs["class"]][0]
    assert reg.all_text().startswith("+") and "regressed" in reg.attrs["title"]
    assert "20261120T120000Z-base" in doc.find_all("section", "card")[0].all_text()
    by_id = parse(render_run(fake_run, tmp_path / "reports", baseline="20261120T120000Z-base"))  # beside the run
    assert len(by_id.find_all("span", "delta")) == len(deltas)


def test_exports_csv_and_markdown(fake_run: Path, tmp_path: Path):
    written = export_tables(fake_run, tmp_path / "reports")
    folder = tmp_path / "reports" / "20261122T120000Z-gpu01"
    assert sorted(p.name for p in written) == ["quant-fidelity.csv", "quant-fidelity.md", "smoke.csv", "smoke.md"]
    frame = pd.read_csv(folder / "smoke.csv")
    assert len(frame) == 5 and "train.peak_reserved_gib [GiB]" in frame.columns and "status" in frame.columns
    assert "quant.layers.0.rmse" in pd.read_csv(folder / "quant-fidelity.csv").columns  # details kept in CSV
    md = (folder / "smoke.md").read_text()
    assert md.startswith("### smoke") and "| case | status |" in md and "**" in md and "out of memory" in md


def test_summary_table(fake_run: Path):
    text = summary_table(iter_records(fake_run))
    lines = text.splitlines()
    assert "smoke[qlora-nf4-seq128]" in text and "rmse" in lines[0] and "GiB" in lines[1]
    assert max(map(len, lines)) < 200
    assert summary_table([]) == "(no records)"


def test_index_lists_runs_newest_first(tmp_path: Path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    make_run(results, "20261120T120000Z-old", gpu=None)
    make_run(results, "20261122T120000Z-new")
    doc = parse(render_index(results, reports))
    rows = [tr for tr in doc.find_all("tr") if "data-run" in tr.attrs]
    assert [tr.attrs["data-run"] for tr in rows] == ["20261122T120000Z-new", "20261120T120000Z-old"]
    assert "NVIDIA H100" in rows[0].all_text() and "CPU" in rows[1].all_text()
    assert "1 failed" in rows[0].all_text() and "1 oom" in rows[0].all_text()
    assert rows[0].find_all("a")[0].attrs["href"] == "20261122T120000Z-new.html"
    assert (reports / "20261122T120000Z-new.html").exists() and (reports / "20261120T120000Z-old.html").exists()


def test_render_many_side_by_side(tmp_path: Path):
    a = make_run(tmp_path / "results", "20261122T120000Z-h100")
    b = make_run(tmp_path / "results", "20261121T120000Z-4090", gpu="NVIDIA GeForce RTX 4090", scale=1.3)
    out = render_many([a, b], tmp_path / "reports" / "many.html")
    doc = parse(out)
    smoke = [t for t in doc.find_all("table", "comparison") if t.attrs["data-suite"] == "smoke"][0]
    groups = [th.attrs["data-run"] for th in smoke.find_all("th", "run")]
    assert groups == ["20261122T120000Z-h100", "20261121T120000Z-4090"]
    assert "RTX 4090" in smoke.all_text()
    row = smoke.find_all("tr", data_case="smoke[qlora-nf4-seq128]")[0]
    assert len(row.find_all("span", "badge")) == 2 and row.find_all("td", "best")
    assert {d.attrs["data-chart"] for d in doc.find_all("div", "chart")} >= {"runs-train.peak_reserved_gib"}
    assert out.read_text().count("plotly.js v") == 1


def test_cli_report(tmp_path: Path, capsys):
    results, reports = tmp_path / "results", tmp_path / "reports"
    make_run(results, "20261120T120000Z-a")
    make_run(results, "20261122T120000Z-b")
    base = ["report", "--results", str(results), "--reports", str(reports)]
    assert main(base) == 0
    assert (reports / "index.html").exists() and (reports / "20261122T120000Z-b.html").exists()
    assert main([*base, "20261120T120000Z-a", "--baseline", "20261122T120000Z-b"]) == 0
    assert main([*base, "20261120T120000Z-a", "20261122T120000Z-b"]) == 0
    assert (reports / "compare-20261120T120000Z-a_20261122T120000Z-b.html").exists()
    capsys.readouterr()
    assert main([*base, "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    assert main(["report", "--results", str(tmp_path / "empty")]) == 2


_NAME = re.compile(r"(train|eval|quant|gen|estimate)\.[a-z0-9_]+(\.[a-z0-9_]+)*")


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module, f-strings' literal parts included, with its line."""
    import ast

    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_report_names_metrics_only_through_the_registry():
    """A renamed metric is renamed in harness/metrics.py alone: the report spells no metric name itself."""
    report = Path(__file__).resolve().parent.parent / "harness" / "report"
    found = [f"{p.name}:{line}: {text!r}" for p in sorted(report.glob("*.py"))
             for line, text in _string_literals(p) if _NAME.fullmatch(text)]
    assert not found, "metric names spelled in the report (use harness.metrics):\n" + "\n".join(found)


def test_every_named_metric_is_one_a_stage_emits():
    from harness import metrics

    names = {k: v for k, v in vars(metrics).items()
             if k.isupper() and isinstance(v, str) and _NAME.fullmatch(v) and not k.endswith(("_TABLE", "_SERIES"))}
    assert len(names) > 30
    for key, name in names.items():
        why = metrics.unknown_metric(name, ("quant", "train", "eval", "generate"),
                                     ("support_mc", "support_ppl", "support_recall"))
        assert why is None, f"metrics.{key}: {why}"


def test_run_page_opens_on_a_summary_per_method(fake_run: Path, tmp_path: Path):
    """The first section answers per method: allocator peak beside the estimator's allocator prediction (the fake
    run's 0.92 x (weights + 1.3) GiB against weights + 0.77), the GPU-tier fits of the suite's model from the
    estimator, speed as a ratio, storage; a suite of storage alone gets no summary; the index opens on it too."""
    doc = parse(render_run(fake_run, tmp_path / "reports"))
    summary = doc.find_all("section", "answer")[0]
    tables = {t.attrs["data-suite"]: t for t in summary.find_all("table", "summary")}
    assert set(tables) == {"smoke"}  # quant-fidelity measures storage only
    rows = {tr.attrs["data-method"]: tr for tr in tables["smoke"].find_all("tr") if "data-method" in tr.attrs}
    # fp4 failed an expectation, fp4-dq ran out of memory: passed cases only, as in the statistics
    assert list(rows) == ["lora-bf16-seq128", "qlora-nf4-seq128", "qlora-nf4-dq-seq128"]
    cells = [td.all_text().strip() for td in rows["qlora-nf4-seq128"].find_all("td")]
    weights = 0.9 * 4.5 / 16
    assert cells[1] == f"{0.92 * (weights + 1.3):.2f} · predicted {weights + 0.77:.2f}"
    assert cells[2].endswith("yes/yes/yes") and cells[-1] == "4.500"
    assert "(reference)" in rows["lora-bf16-seq128"].all_text() and "× (no interval)" in cells[3]  # one seed each
    text = summary.all_text()
    assert "One seed per method" in text
    sections = [n.attrs.get("id", "") for n in doc.find_all("section")]
    assert sections.index("summary") < min(i for i, n in enumerate(doc.find_all("section"))
                                           if "suite" in n.attrs.get("class", "").split())
    index = parse(render_index(tmp_path / "results", tmp_path / "reports"))
    assert index.find_all("section", "answer")[0].find_all("table", "summary", data_suite="smoke")
