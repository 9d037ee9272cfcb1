"""Baseline comparison: directions, tolerances, messages, baseline folders, and the CLI's exit codes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import make_run

from harness.__main__ import main
from harness.compare import compare, compare_runs, load_baseline, tolerance_for
from harness.records import Record, write_record


def rec(case_id: str = "smoke[qlora-nf4]", suite: str = "smoke", **metrics: float) -> Record:
    """A bare record of hand-written metrics (dots in names written as ``__``)."""
    return Record(
        run_id="r", suite=suite, case_id=case_id, method="qlora-nf4", params={"method": "qlora-nf4"},
        status="passed", metrics={k.replace("__", "."): v for k, v in metrics.items()},
    )


def test_memory_growth_past_tolerance_regresses_with_message():
    (ch,) = compare(rec(train__peak_reserved_gib=4.60), rec(train__peak_reserved_gib=4.10))
    assert ch.regressed and not ch.improved
    assert ch.rel_change == pytest.approx(0.122, abs=1e-3)
    assert ch.message == "train.peak_reserved_gib regressed: 4.10 -> 4.60 (+12.2%, tolerance 5%)"


def test_improvement_never_regresses():
    changes = compare(
        rec(train__peak_reserved_gib=3.0, train__tokens_per_s=9000.0, quant__rmse=0.05),
        rec(train__peak_reserved_gib=4.1, train__tokens_per_s=4000.0, quant__rmse=0.09),
    )
    assert len(changes) == 3
    assert all(c.improved and not c.regressed for c in changes)
    assert "improved" in changes[0].message


def test_higher_is_better_drop_regresses():
    (ch,) = compare(rec(train__tokens_per_s=800.0), rec(train__tokens_per_s=1000.0))
    assert ch.regressed
    assert ch.message.endswith("(-20.0%, tolerance 10%)")


def test_within_tolerance_is_not_a_regression():
    (ch,) = compare(rec(train__peak_reserved_gib=4.2), rec(train__peak_reserved_gib=4.1))
    assert not ch.regressed and not ch.improved
    assert "within tolerance" in ch.message


def test_suite_tolerance_pattern_wins_over_default():
    new, old = rec(train__peak_reserved_gib=4.2), rec(train__peak_reserved_gib=4.1)
    assert tolerance_for("train.peak_reserved_gib", {"train.*_gib": 0.01}) == 0.01
    (ch,) = compare(new, old, {"train.*_gib": 0.01})
    assert ch.regressed and "tolerance 1%" in ch.message


def test_only_directed_metrics_present_in_both():
    new = rec(train__peak_reserved_gib=4.0, train__loss_first=9.0, quant__rmse=math.nan, eval__x__acc=0.5)
    old = rec(train__peak_reserved_gib=4.0, train__loss_first=1.0, quant__rmse=0.1)
    ch, nan = compare(new, old)  # loss_first has no direction, acc has no baseline
    assert ch.metric == "train.peak_reserved_gib" and ch.rel_change == 0 and not ch.regressed
    # a finite baseline that became NaN is a regression, shown as nan
    assert nan.metric == "quant.rmse" and nan.regressed and nan.message.startswith("quant.rmse regressed: 0.100 -> nan")


def test_zero_baseline():
    (ch,) = compare(rec(quant__rmse=0.1), rec(quant__rmse=0.0))
    assert ch.regressed and math.isinf(ch.rel_change) and "+inf%" in ch.message


def test_compare_runs_reports_cases_without_baseline():
    cmp = compare_runs(
        [rec(quant__rmse=0.2), rec("smoke[new]", quant__rmse=0.1)],
        {"smoke[qlora-nf4]": rec(quant__rmse=0.1)},
        suite_tolerances={"smoke": {"quant.*": 2.0}},
    )
    assert [c.regressed for c in cmp.changes] == [False] and cmp.no_baseline == ["smoke[new]"]


def test_load_baseline_by_run_id_path_and_tier(tmp_path: Path):
    results = tmp_path / "results"
    run = make_run(results, "20261122T120000Z-gpu01")
    by_id = load_baseline("20261122T120000Z-gpu01", results)
    assert "smoke[qlora-nf4-seq128]" in by_id and len(by_id) == 10
    assert load_baseline(run, results).keys() == by_id.keys()
    tier = results / "baselines" / "gpu-80gb"
    tier.mkdir(parents=True)
    for p in run.glob("smoke__*.json"):
        shutil.copy(p, tier)
    assert len(load_baseline("gpu-80gb", results)) == 5
    assert len(load_baseline(tier, results)) == 5
    with pytest.raises(FileNotFoundError):
        load_baseline("gpu-24gb", results)


def test_cli_compare_exit_codes(tmp_path: Path, capsys):
    results = tmp_path / "results"
    make_run(results, "20261120T120000Z-base")
    make_run(results, "20261122T120000Z-slow", scale=1.25)  # more memory, fewer tokens/s
    common = ["compare"]
    extra = ["--results", str(results), "--suites", str(tmp_path / "none")]
    assert main([*common, "20261122T120000Z-slow", "20261120T120000Z-base", *extra]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED train.peak_reserved_gib regressed:" in out and "(+25.0%, tolerance 5%)" in out
    assert main([*common, "20261120T120000Z-base", "20261122T120000Z-slow", *extra]) == 0
    assert "0 regressed" in capsys.readouterr().out
    assert main([*common, "no-such-run", "20261122T120000Z-slow", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-run" in err and "Traceback" not in err


def test_cli_compare_bad_record_is_one_line(tmp_path: Path, capsys):
    results = tmp_path / "results"
    run = make_run(results, "20261120T120000Z-base")
    (run / "broken.json").write_text("{not json")
    assert main(["compare", str(run), str(run), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.json" in err


def test_write_record_round_trip_is_comparable(tmp_path: Path):
    path = write_record(tmp_path, rec(quant__rmse=0.1))
    assert load_baseline(tmp_path, tmp_path)["smoke[qlora-nf4]"].metrics == {"quant.rmse": 0.1}
    assert path.exists()


SUITE = """\
name: tiny
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama}
stages: [quant]
matrix:
  method: [qlora-nf4, qlora-fp4]
  blocksize: [64, 128]
"""


def test_cli_list(tmp_path: Path, capsys):
    suites = tmp_path / "suites"
    (suites / "tasks").mkdir(parents=True)
    (suites / "tasks" / "task.yaml").write_text("task: x\n")  # not a suite: left out
    (suites / "tiny.yaml").write_text(SUITE)
    assert main(["list", "--suites", str(suites)]) == 0
    out = capsys.readouterr().out
    assert "tiny[qlora-nf4-block64]" in out and "tiny[qlora-fp4-block128]" in out and "task" not in out.split()
    (suites / "bad.yaml").write_text(SUITE.replace("tiers: [cpu]", "tiers: [tpu]"))
    assert main(["list", "--suites", str(suites)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "bad.yaml" in captured.err and "tiers" in captured.err
    assert "tiny[qlora-nf4-block64]" in captured.out
    assert main(["list", "--suites", str(tmp_path / "missing")]) == 2


# -- bases: a run's cases on the reference's bases, bit for bit ------------------------------------------------------
# the newest committed reference run of the smoke suite that stands alone (a run that extends it holds only the
# seeds it added; a run of the speed suite alone has no smoke case)
REFERENCE_RUN = max(p for p in (Path(__file__).resolve().parents[1] / "results" / "reference" / "cpu-amd-epyc-2core")
                    .glob("*-ref") if "extends" not in json.loads((p / "run.json").read_text())
                    and (p / "smoke__qlora-nf4-seed0.json").exists())


def _copy_run(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a run folder's records, each passed through ``edit(dict)`` (which may change it in place)."""
    import json

    dst.mkdir(parents=True)
    for p in src.glob("*.json"):
        data = json.loads(p.read_text())
        if edit is not None and p.name != "run.json":
            edit(data)
        (dst / p.name).write_text(json.dumps(data))
    return dst


def test_bases_of_the_committed_reference_match_themselves_and_a_changed_byte_is_found(tmp_path: Path, capsys):
    same = _copy_run(REFERENCE_RUN, tmp_path / "same")
    assert main(["bases", str(same), str(REFERENCE_RUN)]) == 0
    out = capsys.readouterr().out
    assert " 0 on different bases" in out and not out.startswith("0 cases")

    def tamper(d):
        if d["case_id"] == "smoke[qlora-nf4-seed0]":
            d["model"]["fingerprint"] = "0" * 16

    changed = _copy_run(REFERENCE_RUN, tmp_path / "changed", tamper)
    assert main(["bases", str(changed), str(REFERENCE_RUN)]) == 1
    out = capsys.readouterr().out
    assert "smoke[qlora-nf4-seed0]: base 0000000000000000 differs from the reference's 3e17b00c1dd2ff47" in out
    assert "1 on different bases" in out


def test_bases_built_on_another_instruction_set_or_torch_are_not_judged(tmp_path: Path, capsys):
    from harness.compare import compare_bases, load_baseline, load_records

    def elsewhere(d):
        d["model"]["fingerprint"] = "f" * 16
        d["env"]["cpu"]["isa"] = "AVX512"
        d["env"]["versions"]["torch"] = "2.99.0+cpu"

    run = _copy_run(REFERENCE_RUN, tmp_path / "avx512", elsewhere)
    check = compare_bases(load_records(run), load_baseline(REFERENCE_RUN))
    assert check.different == [] and check.same == []
    assert check.not_comparable and all("torch 2.99.0+cpu vs 2.13.0+cpu" in why for _, why in check.not_comparable)
    assert main(["bases", str(run), str(REFERENCE_RUN)]) == 0

    def isa_only(d):  # a newer record names its instruction set
        d["model"]["fingerprint"] = "f" * 16
        d["env"]["cpu"]["isa"] = "AVX2"

    def older(d):  # records from before the instruction set was recorded
        d["env"]["cpu"].pop("isa", None)

    old_reference = _copy_run(REFERENCE_RUN, tmp_path / "older", older)
    check = compare_bases(load_records(_copy_run(REFERENCE_RUN, tmp_path / "isa", isa_only)), load_baseline(old_reference))
    assert check.different == [] and all("only one record names its isa" in w for _, w in check.not_comparable)


def test_the_machine_record_names_the_instruction_set_torch_dispatches_to():
    import torch

    from harness.measure.machine import cpu_info

    assert cpu_info()["isa"] == torch.backends.cpu.get_cpu_capability()
