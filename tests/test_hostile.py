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


# -- suite files ----------------------------------------------------------------------------------------------
QUANT = """\
name: q
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 1}
stages: [quant]
matrix:
  method: [qlora-nf4, qlora-fp4]
  blocksize: [64]
expectations:
  - {metric: quant.bits_per_param, max: 4.5}
timeout_s: 300
"""


def _exp(text: str) -> str:
    return QUANT.replace("timeout_s", f"  - {text}\ntimeout_s")


# name -> (suite text, the line it must get after "<file>: ")
SUITES = {
    "duplicate-key": (QUANT + "stages: [quant]\n", "line 11: duplicate key 'stages' (first given on line 4): keep one"),
    "duplicate-nested-key": (QUANT.replace("num_layers: 1}", "num_layers: 1, preset: tiny-llama}"),
                             "line 3: duplicate key 'preset' (first given on line 3): keep one"),
    "duplicate-axis": (QUANT.replace("  blocksize: [64]\n", "  blocksize: [64]\n  method: [lora-bf16]\n"),
                       "line 8: duplicate key 'method' (first given on line 6): keep one"),
    "where-unknown-method": (_exp("{metric: quant.rmse, max: 1, where: {method: qlora-nf5}}"),
                             "expectations[1].where.method: unknown method 'qlora-nf5' (expected one of"),
    "where-method-not-in-matrix": (_exp("{metric: quant.rmse, max: 1, where: {method: [lora-int8]}}"),
                                   "expectations[1].where: {'method': ['lora-int8']} selects no case of the matrix: "
                                   "the bound would never be checked"),
    "where-bad-value": (_exp("{metric: quant.rmse, max: 1, where: {blocksize: big}}"),
                        "expectations[1].where.blocksize: Input should be a valid integer"),
    "where-value-not-in-matrix": (_exp("{metric: quant.rmse, max: 1, where: {blocksize: 128}}"),
                                  "expectations[1].where: {'blocksize': 128} selects no case of the matrix"),
    "where-combination-not-in-matrix": (_exp("{metric: quant.rmse, max: 1, where: {method: qlora-nf4, seed: 3}}"),
                                        "expectations[1].where: {'method': 'qlora-nf4', 'seed': 3} selects no case"),
    "where-unknown-setting": (_exp("{metric: quant.rmse, max: 1, where: {colour: red}}"),
                              "expectations[1]: selects on unknown setting 'colour'"),
    "tab-in-a-value": (QUANT.replace("[qlora-nf4, qlora-fp4]", '[qlora-nf4, "qlora\\tfp4"]'),
                       "matrix.method[1]: unknown method 'qlora\\tfp4' (expected one of"),
    "tab-in-a-key": (QUANT + '"col\\tour": 1\n', "col\\tour: unknown key"),
    "not-utf8": (b"name: q\xff\n", "not UTF-8 text (byte 7)"),
    "nested-deep": ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply to be a suite"),
}


@pytest.mark.parametrize("name", list(SUITES))
def test_hostile_suite_file_is_one_line(tmp_path: Path, name: str):
    """What a user wrote comes back once, as written: a tab shows as ``\\t`` (one backslash), never ``\\\\t``."""
    from harness.matrix import expand
    from harness.spec import SpecError, load_suite

    text, expected = SUITES[name]
    path = tmp_path / "x.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpecError) as info:
        expand(load_suite(path), path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {expected}"), msg
    assert "\n" not in msg and "\\\\" not in msg


def test_where_on_an_auto_setting_selects_what_it_may_resolve_to(tmp_path: Path):
    """``compute_dtype: auto`` resolves in the worker: a bound on ``compute_dtype: fp32`` is kept (merge suite)."""
    from harness.matrix import expand
    from harness.spec import load_suite

    path = tmp_path / "x.yaml"
    path.write_text(_exp("{metric: quant.rmse, max: 1, where: {compute_dtype: fp32}}")
                    .replace("timeout_s", "settings: {compute_dtype: auto}\ntimeout_s"))
    assert len(expand(load_suite(path), path)) == 2


def test_shipped_suites_select_cases_with_every_bound():
    from harness.__main__ import suite_files
    from harness.matrix import expand
    from harness.spec import load_suite

    root = Path(__file__).resolve().parents[1] / "suites"
    for path in suite_files(root):
        expand(load_suite(path), path)


pytest_plugins = ["pytester"]


def test_two_suite_files_of_one_name_are_refused_at_collection(project):
    (project.path / "suites" / "a.yaml").write_text(QUANT)
    (project.path / "suites" / "b.yaml").write_text(QUANT.replace("[qlora-nf4, qlora-fp4]", "[lora-int8]"))
    result = project.runpytest_subprocess("suites/", "--collect-only", "-q")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*suites/b.yaml: name: suite 'q' is also the name of suites/a.yaml: give each "
                                 "suite file its own name*"])
    assert "Traceback" not in result.stdout.str()


def test_extends_refuses_a_run_of_another_suite(project):
    """``--extends`` with a run of suite ``other``: refused in one line before anything runs."""
    results = project.path / "results"
    make_run(results, "20261120T120000Z-other")
    for p in (results / "20261120T120000Z-other").glob("*.json"):  # make_run's records are of a GPU machine
        data = json.loads(p.read_text())
        if p.name != "run.json":
            data["env"] = {}
            p.write_text(json.dumps(data))
    (project.path / "suites" / "q.yaml").write_text(QUANT)
    result = project.runpytest_subprocess("suites/", "--extends", "20261120T120000Z-other", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert ("--extends 20261120T120000Z-other: a run of suite quant-fidelity, smoke, not of q: a run extends only a "
            "run of the same suites") in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


# -- nothing written outside results/, reports/ and the harness cache ------------------------------------------
def test_the_datasets_cache_goes_into_the_harness_cache(tmp_path: Path):
    """The worker's environment points the datasets library's cache into the harness cache, and the library (run
    apart, as a worker runs it) writes there and nothing under the user's home."""
    import os
    import subprocess
    import sys

    from harness.worker import worker_env

    cache, home = tmp_path / "cache", tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env |= {"HOME": str(home), "QLORA_HARNESS_CACHE": str(cache)}
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')

    class _Case:  # worker_env reads only the model's source
        model = type("M", (), {"source": "synthetic", "tokenizer": None})

    run_env = worker_env(_Case, env)
    assert run_env["HF_DATASETS_CACHE"] == str(cache / "datasets")
    assert worker_env(_Case, env | {"HF_DATASETS_CACHE": "/mine"})["HF_DATASETS_CACHE"] == "/mine"  # the user's
    code = ("import sys; from datasets import load_dataset; "
            "print(len(load_dataset('json', data_files=sys.argv[1], split='train')))")
    out = subprocess.run([sys.executable, "-c", code, str(data)], env=run_env, capture_output=True, text=True,
                         timeout=600)
    assert out.stdout.strip() == "2", out.stderr[-2000:]
    assert any((cache / "datasets").rglob("*.arrow"))
    assert not (home / ".cache" / "huggingface" / "datasets").exists()


def test_reading_the_harness_commit_does_not_rewrite_the_index(tmp_path: Path):
    """``git status`` refreshes a stale index under ``.git/index.lock`` (clashing with the user's own git); the
    harness reads the commit and the dirty flag without touching the index."""
    import os
    import subprocess
    import time

    from harness.measure.machine import git_info

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("x\n")
    git("add", "f.txt")
    git("commit", "-qm", "c")
    later = time.time() + 5
    os.utime(tmp_path / "f.txt", (later, later))  # same content, new stat: the index entry is stale
    index = tmp_path / ".git" / "index"
    before = index.stat()
    info = git_info(tmp_path)
    after = index.stat()
    assert info["commit"] and info["dirty"] is False
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "the index was rewritten"
    subprocess.run(["git", "status", "--porcelain"], cwd=tmp_path, check=True, capture_output=True)
    assert index.stat().st_mtime_ns != before.st_mtime_ns  # plain git status does rewrite it: the check can fail


def test_a_suites_session_keeps_pytest_caches_out_of_the_users_folder(project, tmp_path_factory):
    """``pytest suites/`` in a folder without pytest settings: no ``.pytest_cache/`` or ``.benchmarks/`` beside the
    user's files; both in the harness cache. The user's own choice still wins."""
    import os

    cache = Path(os.environ["QLORA_HARNESS_CACHE"])
    (project.path / "suites" / "q.yaml").write_text(QUANT.replace("tiers: [cpu]", "tiers: [gpu-24gb]"))
    result = project.runpytest_subprocess("suites/", "--tier", "cpu", "--no-report", "-p", "cacheprovider")
    assert result.ret == 0, result.stdout.str()[-2000:]  # every case skipped: not for this tier
    assert not (project.path / ".pytest_cache").exists() and not (project.path / ".benchmarks").exists()
    assert any((cache / "pytest").rglob("nodeids")) and (cache / "benchmarks").is_dir()
    mine = project.path / "mine"
    project.runpytest_subprocess("suites/", "--tier", "cpu", "--no-report", "-p", "cacheprovider",
                                 "-o", f"cache_dir={mine}", "--benchmark-storage", f"file://{mine}-bench")
    assert (mine / "v" / "cache" / "nodeids").is_file() and Path(f"{mine}-bench").is_dir()


# -- reasons that name the cause --------------------------------------------------------------------------------
def test_failure_reasons_name_the_cause():
    import signal

    from harness.worker import classify_exit, is_oom, reason

    try:
        try:
            raise MemoryError("tried to allocate 2 GiB")
        except MemoryError as inner:
            raise RuntimeError("An error occurred while generating the dataset") from inner
    except RuntimeError as wrapped:
        assert reason(wrapped, " (in stage train)") == ("RuntimeError (in stage train): An error occurred while "
                                                        "generating the dataset (caused by MemoryError: tried to "
                                                        "allocate 2 GiB)")
    # a MemoryError of a datasets/dataloader worker process comes back only as text in another exception
    assert is_oom(RuntimeError("DataLoader worker (pid 7) raised MemoryError"))
    assert classify_exit(-signal.SIGTERM, "", False, 0) == ("killed", "worker killed with SIGTERM from outside")
    status, message = classify_exit(-signal.SIGSEGV, "step 3\nFatal Python error: Segmentation fault\n", False, 0)
    assert status == "error" and message == ("worker crashed with signal SIGSEGV (its log ends: Fatal Python error: "
                                             "Segmentation fault)")
    status, message = classify_exit(1, "Traceback ...\nModuleNotFoundError: No module named 'peft'\n", False, 0)
    assert (status, message) == ("error", "worker exited with code 1 and no record (its log ends: "
                                          "ModuleNotFoundError: No module named 'peft')")


TRAIN_FP16 = """\
name: t16
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 1}
data: {train: DATA}
stages: [train]
settings: {max_steps: 4, warmup_steps: 1}
matrix:
  method: [lora-bf16]
  compute_dtype: [bf16, fp16]
timeout_s: 300
"""


def test_fp16_training_on_the_cpu_is_refused_at_collection(project):
    """Measured here (bitsandbytes 0.50, torch 2.13 on the CPU): fp16 compute trained lora-bf16 into 'expected m1
    and m2 to have the same dtype, but got: float != c10::Half' and qlora-nf4 into loss 0.0 with a NaN adapter.
    The machine is the test's: without a GPU the suite is refused in one line before anything runs."""
    from harness.measure.machine import memory_budget_gib

    if memory_budget_gib() is not None:
        pytest.skip("this machine has a GPU: fp16 trains there")
    data = Path(__file__).resolve().parents[1] / "suites" / "data" / "support_train.jsonl"
    (project.path / "suites" / "t16.yaml").write_text(TRAIN_FP16.replace("DATA", str(data)))
    result = project.runpytest_subprocess("suites/", "--collect-only", "-q")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*suites/t16.yaml: matrix.compute_dtype[[]1[]]: fp16 cannot train on the CPU (a "
                                 "16-bit base fails in its first matmul, a 4-bit base's loss collapses to 0): use "
                                 "bf16, fp32 or auto here, fp16 on a GPU*"])
    assert "Traceback" not in result.stdout.str()


def test_a_session_beside_every_hostile_run_ends_with_its_summary_and_index(project):
    """Every corrupt run folder of the corpus beside a good one: a ``pytest suites/`` session still passes, prints
    its summary with one warning line per bad folder, and writes its page and the index."""
    results = project.path / "results"
    make_run(results, GOOD)
    for i, (name, (edit, _, _)) in enumerate(RUNS.items()):
        edit(make_run(results, f"20261121T{i:06d}Z-{name}"))
    (project.path / "suites" / "q.yaml").write_text(QUANT.replace("[qlora-nf4, qlora-fp4]", "[qlora-nf4]"))
    result = project.runpytest_subprocess("suites/", "--run-id", "after")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "Traceback" not in out and "qlora-harness" in out and "report:" in out
    for name, (_, fragment, _) in RUNS.items():
        assert any(name in line and fragment.split(": ", 1)[-1][:40] in line
                   for line in out.splitlines() if line.startswith("warning: ")), name
    index = (project.path / "reports" / "index.html").read_text()
    assert GOOD in index and "after" in index and (project.path / "reports" / "after.html").is_file()
