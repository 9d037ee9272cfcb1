"""End to end through pytest: a small suite runs, writes one record per case and a report; bad suites fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]

QUANT_SUITE = """\
name: q
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 1}
stages: [quant]
matrix:
  method: [qlora-nf4, qlora-fp4]
expectations:
  - {metric: quant.bits_per_param, max: 4.5}
  - {ratio: quant.rmse, numerator: {method: qlora-fp4}, denominator: {method: qlora-nf4}, min: 1.1}
timeout_s: 300
"""


def test_suite_runs_end_to_end(project):
    (project.path / "suites" / "q.yaml").write_text(QUANT_SUITE)
    result = project.runpytest_subprocess("suites/", "-v", "--run-id", "e2e")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*q.yaml::q[[]qlora-nf4[]] PASSED*", "*qlora-harness*"])
    run = project.path / "results" / "e2e"
    records = sorted(p.name for p in run.glob("*.json"))
    assert records == ["q__qlora-fp4.json", "q__qlora-nf4.json", "run.json"]
    rec = json.loads((run / "q__qlora-nf4.json").read_text())
    assert rec["status"] == "passed" and rec["schema_version"] == 1
    assert rec["params"]["method"] == "qlora-nf4" and rec["params"]["blocksize"] == 64
    assert rec["metrics"]["quant.bits_per_param"] == pytest.approx(4.5)
    assert rec["env"]["versions"]["bitsandbytes"] and "git" in rec["env"]
    html = (project.path / "reports" / "e2e.html").read_text()
    assert "q[qlora-nf4]" in html and "q[qlora-fp4]" in html
    assert (project.path / "reports" / "index.html").exists()
    # a second session with the same run id never overwrites a record
    again = project.runpytest_subprocess("suites/", "--run-id", "e2e", "-k", "nf4")
    assert again.ret != 0
    assert json.loads((run / "q__qlora-nf4.json").read_text())["started_at"] == rec["started_at"]


def test_failed_expectation_fails_the_case(project):
    (project.path / "suites" / "q.yaml").write_text(  # one method: the fp4/nf4 ratio has no case, so it goes
        QUANT_SUITE.replace("max: 4.5}", "max: 4.2}").replace("method: [qlora-nf4, qlora-fp4]", "method: [qlora-nf4]")
        .replace("  - {ratio", "  # - {ratio"))
    result = project.runpytest_subprocess("suites/", "--run-id", "bad", "--no-report")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*quant.bits_per_param = 4.5 (expected <= 4.2)*"])
    rec = json.loads((project.path / "results" / "bad" / "q__qlora-nf4.json").read_text())
    assert rec["status"] == "failed" and "expected <= 4.2" in rec["message"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (QUANT_SUITE.replace("[qlora-nf4, qlora-fp4]", "[qlora-nf4, nf5]"),
         "suites/x.yaml: matrix.method[[]1[]]: unknown method 'nf5' (expected one of lora-bf16, *"),
        (QUANT_SUITE.replace("tiers: [cpu]", "tiers: [cpu"), "suites/x.yaml: line *: YAML syntax error: *"),
        (QUANT_SUITE + "colour: red\n", "suites/x.yaml: colour: unknown key"),
    ],
    ids=["unknown-method", "yaml-syntax", "unknown-key"],
)
def test_bad_suite_is_one_line_at_collection(project, text, expected):
    (project.path / "suites" / "x.yaml").write_text(text)
    result = project.runpytest_subprocess("suites/", "--collect-only", "-q")
    assert result.ret != 0
    result.stdout.fnmatch_lines([expected])
    assert "Traceback" not in result.stdout.str() and "harness/spec.py" not in result.stdout.str()


def test_duplicate_ids_across_files(project):
    (project.path / "suites" / "a.yaml").write_text(QUANT_SUITE)
    (project.path / "suites" / "b.yaml").write_text(QUANT_SUITE)
    result = project.runpytest_subprocess("suites/", "--collect-only", "-q")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*suites/b.yaml: name: suite 'q' is also the name of suites/a.yaml*"])


def test_shipped_suites_collect_with_readable_ids():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "suites/", "--collect-only", "-q", "--no-report"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "suites/smoke.yaml::smoke[qlora-nf4-dq-seed0]" in out.stdout  # in smoke's slice
    assert "suites/smoke.yaml::smoke[qlora-nf4-seed0]" not in out.stdout
    assert "suites/speed.yaml::speed[" not in out.stdout  # slice: none
    assert "suites/fidelity.yaml::fidelity[qlora-fp4-normal]" in out.stdout
    assert "suites/fidelity.yaml::fidelity[qlora-fp4-student_t]" not in out.stdout  # outside fidelity's slice:
    assert "suites/smollm2.yaml::smollm2[qlora-nf4-dq-seed0]" in out.stdout  # a one-seed run takes the slice
    assert "suites/smollm2.yaml::smollm2[lora-bf16-seed0]" not in out.stdout


@pytest.mark.parametrize("order", ["blocks", "file"])
def test_replicates_run_seed_by_seed_in_a_shuffled_order(project, order):
    """Method after method, a drift of the machine over the session would land on the methods run last; in blocks
    every seed's cases run together, their order shuffled (the same on every run), so a drift reaches all alike."""
    methods = ["lora-bf16", "qlora-nf4", "qlora-nf4-dq", "qlora-fp4", "qlora-fp4-dq", "lora-int8"]
    text = (QUANT_SUITE.replace("method: [qlora-nf4, qlora-fp4]", f"method: [{', '.join(methods)}]")
            .replace("timeout_s: 300", f"timeout_s: 300\nreplicates: 4\norder: {order}"))
    (project.path / "suites" / "q.yaml").write_text(text)
    runs = [project.runpytest_subprocess("suites/", "--collect-only", "-q", "--no-report", "--seeds", "all")
            for _ in range(2)]
    ids = [[line.split("::", 1)[1] for line in r.stdout.lines if "::q[" in line and "ratio" not in line] for r in runs]
    assert ids[0] == ids[1] and len(ids[0]) == 24  # the same order every time
    matrix_order = [f"q[{m}-seed{s}]" for m in methods for s in range(4)]
    if order == "file":
        assert ids[0] == matrix_order
        return
    seeds = [int(i.rsplit("seed", 1)[1].rstrip("]")) for i in ids[0]]
    assert seeds == sorted(seeds)  # seed by seed: one block's cases all run before the next block's
    blocks = [[i.split("[", 1)[1].rsplit("-seed", 1)[0] for i in ids[0][6 * b: 6 * b + 6]] for b in range(4)]
    assert all(sorted(b) == sorted(methods) for b in blocks)
    assert len({tuple(b) for b in blocks}) > 1 and blocks[0] != methods  # shuffled, not one fixed order
    assert {b[0] for b in blocks} != {"lora-bf16"}  # the reference does not always go first


def test_extends_measures_a_noisy_timing_again_with_its_whole_block(project):
    """The noise guard flagged one case's timing (the machine was busy): an extension measures it again and, in a
    suite run in blocks, its seed's other cases with it, so that each seed's cases still ran side by side; in a suite
    run in file order the case alone; in a suite that keeps noisy timings (long cases whose product is not speed)
    none. One first run serves all three (the order is not a setting of the cases)."""
    suite = QUANT_SUITE.split("expectations:")[0] + "timeout_s: 300\nreplicates: 2\norder: blocks\n"
    (project.path / "suites" / "q.yaml").write_text(suite)
    project.runpytest_subprocess("suites/", "--run-id", "first", "--no-report", "--seeds", "all").assert_outcomes(passed=4)
    path = project.path / "results" / "first" / "q__qlora-nf4-seed1.json"
    rec = json.loads(path.read_text())
    rec["metrics"]["train.timing_clean"] = 0.0  # what the noise guard writes when another process took the cores
    path.write_text(json.dumps(rec))
    for extra, want in (("", ["q[qlora-fp4-seed1]", "q[qlora-nf4-seed1]"]),
                        ("order: file\n", ["q[qlora-nf4-seed1]"]),
                        ("noisy_timing: keep\n", [])):
        (project.path / "suites" / "q.yaml").write_text(suite.replace("order: blocks\n", extra or "order: blocks\n")
                                                        if extra.startswith("order") else suite + extra)
        again = project.runpytest_subprocess("suites/", "--collect-only", "-q", "--run-id", "more", "--extends",
                                             "first", "--seeds", "all")
        kept = sorted(line.split("::", 1)[1] for line in again.stdout.lines if "::q[" in line)
        assert kept == want, (extra, again.stdout.str()[-1500:])


def test_tasks_and_data_are_not_suites():
    from harness.plugin import is_suite_file

    assert is_suite_file(ROOT / "suites" / "smoke.yaml")
    assert not is_suite_file(ROOT / "suites" / "tasks" / "support_mc.yaml")
    assert not is_suite_file(ROOT / "tests" / "x.yaml")


def _edit_metric(path, name, factor):
    rec = json.loads(path.read_text())
    rec["metrics"][name] *= factor
    path.write_text(json.dumps(rec))


@pytest.mark.parametrize("factor, fails", [(0.8, True), (1.25, False)], ids=["regressed", "improved"])
def test_baseline_regression_fails_the_case(project, factor, fails):
    # timings are not under test here: a loaded test machine must not turn them into regressions
    suite = QUANT_SUITE.replace("  - {ratio", "  # - {ratio") + 'tolerances: {"*_s": 100.0}\n'
    (project.path / "suites" / "q.yaml").write_text(suite)
    project.runpytest_subprocess("suites/", "--run-id", "base", "--no-report").assert_outcomes(passed=2)
    # pretend the baseline's NF4 error was 20% lower (so today's is a regression) or 25% higher (an improvement)
    _edit_metric(project.path / "results" / "base" / "q__qlora-nf4.json", "quant.rmse", factor)
    result = project.runpytest_subprocess("suites/", "--run-id", "new", "--baseline", "results/base")
    if fails:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*quant.rmse regressed: * -> * (+25.0%, tolerance 2%)*"])
        rec = json.loads((project.path / "results" / "new" / "q__qlora-nf4.json").read_text())
        assert rec["status"] == "failed" and "quant.rmse regressed" in rec["message"]
    else:
        result.assert_outcomes(passed=2)


def test_extends_runs_only_the_missing_seeds_and_pools_them(project):
    """``--extends`` adds seeds to an earlier run: only the new cases run, a case lost to an error runs again,
    and stats, report and headline pool both runs; a bad or foreign earlier run is a one-line usage error."""
    # compute_dtype auto: the records keep what it resolved to, which must still count as the same setting
    # order: file: in blocks the lost case would take its seed's other case with it (the test after this one)
    suite = (QUANT_SUITE.replace("  - {ratio", "  # - {ratio")
             + "replicates: 3\nsettings: {compute_dtype: auto}\norder: file\n")
    (project.path / "suites" / "q.yaml").write_text(suite)
    project.runpytest_subprocess("suites/", "--run-id", "first", "--no-report").assert_outcomes(
        passed=2, deselected=4)  # the cpu tier's default: the first seed only
    first = project.path / "results" / "first"
    lost = json.loads((first / "q__qlora-nf4-seed0.json").read_text())  # pretend a crash lost this case
    (first / "q__qlora-nf4-seed0.json").write_text(json.dumps({**lost, "status": "error", "metrics": {}}))

    result = project.runpytest_subprocess("suites/", "-v", "--run-id", "more", "--extends", "first", "--seeds", "all")
    result.assert_outcomes(passed=5, deselected=1)  # seeds 1 and 2 of both methods, and the lost case again
    result.stdout.fnmatch_lines(["*q[[]qlora-nf4-seed0[]] PASSED*"])
    assert "q[qlora-fp4-seed0] PASSED" not in result.stdout.str()
    more = project.path / "results" / "more"
    assert json.loads((more / "run.json").read_text())["extends"] == "first"
    assert sorted(p.name for p in more.glob("q__*.json")) == [
        "q__qlora-fp4-seed1.json", "q__qlora-fp4-seed2.json",
        "q__qlora-nf4-seed0.json", "q__qlora-nf4-seed1.json", "q__qlora-nf4-seed2.json"]
    groups = json.loads((more / "stats" / "q.json").read_text())["groups"]
    assert groups["q[qlora-fp4]"]["seeds"] == [0, 1, 2] and groups["q[qlora-nf4]"]["seeds"] == [0, 1, 2]
    from harness.records import read_run_records

    pooled = {r.case_id: r.run_id for r in read_run_records(more)}
    assert pooled["q[qlora-fp4-seed0]"] == "first" and pooled["q[qlora-nf4-seed0]"] == "more"
    html = (project.path / "reports" / "more.html").read_text()
    assert "q[qlora-fp4-seed0]" in html and "<code>first</code>: 1 of these cases were measured there" in html

    # an earlier run that is not there, or was measured on another kind of machine, is refused in one line
    bad = project.runpytest_subprocess("suites/", "--run-id", "x", "--extends", "nosuch")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["ERROR: --extends nosuch: no run folder */nosuch"])
    # the same case ids with other settings are other measurements: refused rather than pooled
    (project.path / "suites" / "q.yaml").write_text(suite.replace("{compute_dtype: auto}", "{compute_dtype: auto, blocksize: 128}"))
    bad = project.runpytest_subprocess("suites/", "--run-id", "z", "--extends", "first")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["ERROR: --extends first: q[[]qlora-fp4-seed0[]] ran there with other settings (blocksize)*"])
    (project.path / "suites" / "q.yaml").write_text(suite)
    rec = json.loads((first / "q__qlora-fp4-seed0.json").read_text())
    rec["env"]["versions"]["torch"] = "1.0.0"
    (first / "q__qlora-fp4-seed0.json").write_text(json.dumps(rec))
    bad = project.runpytest_subprocess("suites/", "--run-id", "y", "--extends", "first")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["ERROR: --extends first: q[[]qlora-fp4-seed0[]] was measured on another kind of "
                              "machine (torch * vs 1.0.0): seeds from both cannot be pooled"])
    assert not any((project.path / "results" / name).exists() for name in "xyz")


def test_the_cpu_tier_runs_one_seed_by_default_and_every_case_says_how_long_is_left(project):
    """A first ``pytest suites/`` on a CPU must end in minutes: a replicated suite runs its first seed unless
    ``--seeds`` says otherwise, and each case prints ``[n/N]`` with the time left, estimated from earlier records
    of the same cases (here a run whose records say 600 s each), under ``-q`` too."""
    suite = QUANT_SUITE.split("expectations:")[0] + "timeout_s: 300\nreplicates: 3\norder: file\n"
    (project.path / "suites" / "q.yaml").write_text(suite)
    first = project.runpytest_subprocess("suites/", "-q", "--run-id", "first", "--no-report")
    first.assert_outcomes(passed=2, deselected=4)
    out = first.stdout.str()
    assert ("1 seed of each replicated suite, the slice: of a suite that has one (the cpu tier's default; --seeds all "
            "runs every seed and case)") in out
    assert "qlora-harness [1/2] q[qlora-nf4-seed0]: no estimate" in out  # nothing measured before
    assert "qlora-harness [2/2] q[qlora-fp4-seed0]" in out
    for path in (project.path / "results" / "first").glob("q__*.json"):  # pretend each case took ten minutes
        rec = json.loads(path.read_text())
        path.write_text(json.dumps({**rec, "timings_s": {**rec["timings_s"], "total": 600.0}}))
    again = project.runpytest_subprocess("suites/", "-q", "--run-id", "again", "--no-report", "--seeds", "2")
    again.assert_outcomes(passed=4, deselected=2)
    out = again.stdout.str()
    # seed0's cases from their own records, seed1's from their suite's median; 4 x 10 min before any ran
    assert "qlora-harness: 4 cases, about 40.0 min (from earlier records of these cases)" in out
    assert "qlora-harness [1/4] q[qlora-nf4-seed0]: about 10.0 min; about 40.0 min left" in out
    assert "[4/4] q[qlora-fp4-seed1]" in out
    bad = project.runpytest_subprocess("suites/", "--seeds", "none", "--collect-only")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["ERROR: --seeds 'none': expected all, auto or a number of seeds (1 or more)"])


def test_a_suite_slice_is_what_a_one_seed_run_takes_and_seeds_all_runs_the_rest(project):
    """``slice:`` names the cases a run of fewer seeds takes (the cpu tier's default, CI); ``--seeds all`` runs the
    whole matrix. A slice that selects nothing is refused at collection with one line."""
    suite = QUANT_SUITE.split("expectations:")[0] + "timeout_s: 300\nslice: {method: qlora-nf4}\n"
    (project.path / "suites" / "q.yaml").write_text(suite)
    ids = project.runpytest_subprocess("suites/", "--collect-only", "-q", "--no-report")
    ids.stdout.fnmatch_lines(["*q[[]qlora-nf4[]]*"])
    assert "q[qlora-fp4]" not in ids.stdout.str() and "1 deselected" in ids.stdout.str()
    every = project.runpytest_subprocess("suites/", "--collect-only", "-q", "--no-report", "--seeds", "all")
    assert "q[qlora-fp4]" in every.stdout.str() and "q[qlora-nf4]" in every.stdout.str()
    # slice: none: a one-seed run leaves the whole suite out (a suite that says nothing on one seed: speed)
    (project.path / "suites" / "q.yaml").write_text(suite.replace("{method: qlora-nf4}", "none"))
    none = project.runpytest_subprocess("suites/", "--collect-only", "-q", "--no-report")
    assert none.ret in (0, 5) and "q[" not in none.stdout.str() and "2 deselected" in none.stdout.str()
    every = project.runpytest_subprocess("suites/", "--collect-only", "-q", "--no-report", "--seeds", "all")
    assert "q[qlora-fp4]" in every.stdout.str() and "q[qlora-nf4]" in every.stdout.str()
    for slice_, says in (("{method: nf5}", "slice.method: unknown method 'nf5'"),
                         ("nothing", "slice: expected a selector such as {method: qlora-nf4-dq}, or none"),
                         ("{method: lora-int8}", "slice: {'method': 'lora-int8'} selects no case of the matrix")):
        (project.path / "suites" / "q.yaml").write_text(suite.replace("{method: qlora-nf4}", slice_))
        bad = project.runpytest_subprocess("suites/", "--collect-only", "-q", "--no-report")
        assert bad.ret != 0
        bad.stdout.fnmatch_lines([f"suites/q.yaml: {says}*"])
