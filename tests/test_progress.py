"""The live line per case: a first run of a suite never measured before must not claim "about 0 s left", and
once one of its cases has finished the rest are estimated from it."""

from harness.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def suite_of(cid):
    return cid.split("[", 1)[0]


def test_a_suite_never_run_before_says_so_then_learns_from_its_first_case(tmp_path):
    cases = {f"n{i}": f"s[m{i}]" for i in range(3)}
    progress = Progress.plan(cases, tmp_path, suite_of)  # empty results folder: no earlier records
    clock = progress.clock = Clock()
    assert progress.headline() == "qlora-harness: 3 cases, no earlier records to estimate from"
    first = progress.start("n0")
    assert first == "qlora-harness [1/3] s[m0]: no estimate (never run before); 3 cases left, none measured before"
    assert "0 s left" not in first
    clock.t = 120.0
    progress.finish("n0")
    # the two left take the 120 s the first one took: 4 minutes in all
    assert progress.start("n1") == "qlora-harness [2/3] s[m1]: about 2.0 min; about 4.0 min left"
    clock.t = 180.0  # 60 s into the second
    assert progress.left_s() == (180.0, 0)


def test_another_suites_cases_do_not_lend_their_time(tmp_path):
    cases = {"a": "s[m0]", "b": "t[m0]"}
    progress = Progress.plan(cases, tmp_path, suite_of)
    clock = progress.clock = Clock()
    progress.start("a")
    clock.t = 50.0
    progress.finish("a")
    assert progress.start("b") == "qlora-harness [2/2] t[m0]: no estimate (never run before); 1 case left, none measured before"


def test_a_new_seed_takes_the_time_its_other_seeds_took(tmp_path):
    """``--extends RUN --seeds all`` adds seeds nobody ran before: their estimate is what the same case's other seeds
    took (SmolLM2's seed 1 started with "no earlier records to estimate from" although seed 0 had taken 9-20 min a
    case); another method's seeds do not count."""
    import json

    run = tmp_path / "r0"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"run_id": "r0"}))
    for method, total in (("qlora-fp4", 540.0), ("lora-bf16", 60.0)):
        (run / f"s__{method}-seed0.json").write_text(json.dumps({"status": "passed", "timings_s": {"total": total}}))
    progress = Progress.plan({"a": "s[qlora-fp4-seed1]", "b": "s[qlora-fp4-dq-seed1]"}, tmp_path, suite_of)
    assert progress.estimates["s[qlora-fp4-seed1]"] == 540.0
    assert "s[qlora-fp4-dq-seed1]" not in progress.estimates or progress.estimates["s[qlora-fp4-dq-seed1]"] == 540.0


def test_records_of_this_kind_of_machine_come_first(tmp_path):
    """SmolLM2's extension on an AVX512-bf16 machine was told 'about 1 h 22 min' from the committed AVX2 (fp32)
    records though its own kind's took 25 min: where both are there, the estimate is this kind's; where only
    another kind's are, it still gives one."""
    import json

    def env(isa):
        return {"cpu": {"name": "AMD EPYC", "isa": isa}, "versions": {"torch": "2.13.0+cpu"}}

    for name, isa, total in (("r2-newer", "AVX2", 800.0), ("r1", "AVX512", 240.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"run_id": name}))
        (tmp_path / name / "s__m-seed0.json").write_text(json.dumps(
            {"status": "passed", "timings_s": {"total": total}, "env": env(isa)}))
    (tmp_path / "r2-newer" / "s__other-seed0.json").write_text(json.dumps(
        {"status": "passed", "timings_s": {"total": 500.0}, "env": env("AVX2")}))
    cases = {"a": "s[m-seed0]", "b": "s[other-seed0]"}
    assert Progress.plan(cases, tmp_path, suite_of, here=env("AVX512")).estimates == {
        "s[m-seed0]": 240.0, "s[other-seed0]": 500.0}
    assert Progress.plan(cases, tmp_path, suite_of, here=env("AVX2")).estimates["s[m-seed0]"] == 800.0
