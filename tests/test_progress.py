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
