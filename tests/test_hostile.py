"""Hostile run folders and suite files (issue 29): each gets one line naming the file and what is wrong, and nothing
else breaks: the other runs are rendered, the index is written, ``stats`` and ``report`` refuse with one line.

The corpus is data: ``RUNS`` edits a good run folder (conftest.make_run) into a bad one, ``SUITES`` a good suite
file. Every entry says which line it must get.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_run

from harness.__main__ import main

GOOD = "20261120T120000Z-good"
RECORD = "smoke__qlora-nf4-seq128.json"  # one record of make_run's smoke suite
DEEP = 100_000  # Python's json parser raises RecursionError far below this


def _edit_record(change):
    def edit(run: Path) -> None:
        data = json.loads((run / RECORD).read_text())
        change(data)
        (run / RECORD).write_text(json.dumps(data))
    return edit


def _write(rel: str, text: str | bytes):
    def edit(run: Path) -> None:
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return edit


def _deep_record(run: Path) -> None:
    text = (run / RECORD).read_text()
    data = json.loads(text)
    data["env"] = "@DEEP@"
    (run / RECORD).write_text(json.dumps(data).replace('"@DEEP@"', "[" * DEEP + "]" * DEEP))


# name -> (edit of a good run folder, the line's fragment, True when the run still renders (marked, not left out))
RUNS = {
    "expectations-list": (_write("stats/expectations/smoke.x.json", "[1, 2]"),
                          "stats/expectations/smoke.x.json: expected a JSON object, found an array", True),
    "expectations-bad-outcome": (_write("stats/expectations/smoke.y.json", json.dumps(
        {"suite": "smoke", "name": "n", "results": [{"outcome": "maybe", "message": "m", "margin": 0.1}]})),
        "smoke.y.json: results.0.outcome: Input should be 'pass', 'fail' or 'inconclusive'", True),
    "expectations-deep": (_write("stats/expectations/smoke.z.json", "[" * DEEP + "]" * DEEP),
                          "smoke.z.json: nested too deeply to be read as JSON", True),
    "stats-truncated": (_write("stats/smoke.json", '{"reference": "lora-'), "stats/smoke.json: not valid JSON", True),
    "record-truncated": (lambda run: (run / RECORD).write_text((run / RECORD).read_text()[:300]),
                         f"{RECORD}: not valid JSON", False),
    "record-deep": (_deep_record, f"{RECORD}: nested too deeply to be read as JSON", False),
    "record-deep-file": (_write(RECORD, "[" * DEEP + "]" * DEEP), f"{RECORD}: nested too deeply", False),
    "record-not-utf8": (_write(RECORD, b"\xff\xfe{\x00"), f"{RECORD}: not valid JSON", False),
    "record-a-string": (_write(RECORD, '"hello"'), f"{RECORD}: not a record of schema_version 1 (found None)", False),
    "record-a-folder": (lambda run: (run / "zz.json").mkdir(), "zz.json: cannot be read (Is a directory)", False),
    "loss-series-short-points": (_edit_record(lambda d: d["series"].update({"train.loss": [[0, 4.0], [1]]})),
                                 f"{RECORD}: series: train.loss[1]: expected a [step, value] "
                                 "pair, got 1 numbers", False),
    "loss-series-words": (_edit_record(lambda d: d["series"].update({"train.loss": [["a", "b"]]})),
                          f"{RECORD}: series.train.loss.0.0: Input should be a valid number", False),
    "loss-series-object": (_edit_record(lambda d: d.update({"series": {"train.loss": {"0": 1}}})),
                           f"{RECORD}: series.train.loss: Input should be a valid list", False),
    "metrics-a-list": (_edit_record(lambda d: d.update({"metrics": [1, 2]})),
                       f"{RECORD}: metrics: Input should be a valid dictionary", False),
    "run-json-a-list": (_write("run.json", "[]"), "run.json: expected a JSON object, found an array", False),
    "run-json-no-id": (_write("run.json", "{}"), "run.json: run_id: Field required", False),
    "run-json-truncated": (_write("run.json", '{"run_id": "x'), "run.json: not valid JSON", False),
    "run-json-deep": (_write("run.json", '{"run_id": "r", "env": ' + "[" * DEEP + "]" * DEEP + "}"),
                      "run.json: nested too deeply", False),
    "run-json-bad-extends": (lambda run: (run / "run.json").write_text(json.dumps(
        json.loads((run / "run.json").read_text()) | {"extends": "nowhere"})),
        "run.json: extends nowhere, which is not a run folder beside it", False),
}


# files only ``stats`` reads: named, left out, and the statistics written from the records
STATS_ONLY = {
    "references-truncated": (_write("stats/references.main.json", '{"smoke": "lo'),
                             "stats/references.main.json: not valid JSON", True),
    "references-not-names": (_write("stats/references.main.json", '{"smoke": [1]}'),
                             "references.main.json: expected suite names mapped to method names", True),
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    make_run(out, GOOD)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_hostile_run_folder_is_one_line_and_the_rest_renders(results: Path, tmp_path: Path, capsys, name: str):
    """``python -m harness report`` with a bad run folder beside a good one: the bad one gets its one line (left out
    of the index, or rendered without the bad file), the good one is rendered, the index is written."""
    edit, fragment, renders = RUNS[name]
    bad = make_run(results, "20261121T120000Z-bad")
    edit(bad)
    reports = tmp_path / "reports"
    main(["report", "--results", str(results), "--reports", str(reports), GOOD])
    capsys.readouterr()
    code = main(["report", "--results", str(results), "--reports", str(reports)])  # latest (the bad one) + index
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert all(line.startswith(("warning: ", "error: ")) for line in err.splitlines()), err
    index = (reports / "index.html").read_text()
    assert GOOD in index
    assert (bad.name in index) == renders and code == (0 if renders else 2)
    assert (reports / f"{bad.name}.html").exists() == renders


@pytest.mark.parametrize("name", [n for n, (_, _, renders) in RUNS.items() if not renders] + list(STATS_ONLY))
def test_stats_of_a_hostile_run_is_one_line(results: Path, capsys, name: str):
    """``python -m harness stats``: a run whose records or run.json cannot be read is refused in one line (exit 2);
    a bad derived file is named and the statistics are written from the records."""
    edit, fragment, usable = {**RUNS, **STATS_ONLY}[name]
    bad = make_run(results, "20261121T120000Z-bad")
    edit(bad)
    assert main(["stats", str(bad)]) == (0 if usable else 2)
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (bad / "stats" / "smoke.json").is_file() == usable


def test_stats_rewrites_a_truncated_stats_file(results: Path, capsys):
    """The stats files are derived: ``stats`` names the truncated one it cannot use and writes it anew."""
    STATS_ONLY["references-truncated"][0](results / GOOD)
    RUNS["stats-truncated"][0](results / GOOD)
    assert main(["stats", str(results / GOOD)]) == 0
    captured = capsys.readouterr()
    assert "references.main.json: not valid JSON" in captured.err
    assert json.loads((results / GOOD / "stats" / "smoke.json").read_text())["reference"] == "lora-bf16"


@pytest.mark.parametrize("command", ["report", "stats", "headline"])
@pytest.mark.parametrize("folder", ["etc", "records-only"])
def test_report_and_stats_refuse_a_folder_that_is_not_a_run(results: Path, tmp_path: Path, capsys, command, folder):
    """``/etc`` became a run called "etc": a folder without the harness's run.json is refused in one line."""
    target = tmp_path / folder
    target.mkdir()
    (target / "passwd.json").write_text("{}")
    if folder == "records-only":  # records, but no run.json: not a run the harness wrote
        for p in (results / GOOD).glob("smoke__*.json"):
            (target / p.name).write_text(p.read_text())
    args = [command, str(target)] + (["--reports", str(tmp_path / "reports")] if command == "report" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {target}: not a run folder (no run.json; runs are written by 'pytest suites/' " \
                          "under results/)"
    assert not (tmp_path / "reports").exists() and not (target / "stats").exists()
