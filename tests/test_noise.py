"""The noise guard's host figures from constructed /proc/stat readings, its verdicts, and a real busy loop."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from harness.measure import noise
from harness.measure.noise import CpuTimes, NoiseGuard, judge, window

HZ = os.sysconf("SC_CLK_TCK")

STAT = """cpu  13347 7 2975 44645 648 0 107 51 0 0
cpu0 6000 0 1500 22000 300 0 50 25 0 0
intr 1 2 3
procs_running 5
procs_blocked 0
"""


def test_proc_stat_parsing():
    busy, steal, total, running = noise._read_proc_stat(STAT)
    assert busy == 13347 + 7 + 2975 + 0 + 107
    assert steal == 51
    assert total == busy + 44645 + 648 + 51
    assert running == 5


def test_window_subtracts_our_own_cpu_time():
    # 2 cores, 1 s: 2 * HZ jiffies elapsed; the host was busy 1.5 core-seconds of which 1.0 was ours
    a = CpuTimes(busy=0, steal=0, total=0, own_s=10.0, wall=0.0, procs_running=2)
    b = CpuTimes(busy=1.5 * HZ, steal=0.1 * HZ, total=2 * HZ, own_s=11.0, wall=1.0, procs_running=2)
    w = window(a, b, cores=2)
    assert w["other"] == pytest.approx(0.5 / 2)  # others used 0.5 of the 2 core-seconds
    assert w["steal"] == pytest.approx(0.05)
    assert w["wall"] == 1.0


def test_verdicts_name_each_reason():
    assert judge(cores=2, other_mean=0.02, other_max=0.2, steal=0.0, load_per_core=1.0, step_cv=0.1,
                 stalled=0, steps=35).clean
    v = judge(cores=2, other_mean=0.35, steal=0.0, step_cv=0.1, stalled=0, steps=35)
    assert not v.clean and v.reason == "other processes used 35% of 2 cores (> 10%)"
    v = judge(cores=2, other_mean=0.05, other_max=0.9)
    assert v.reason == "a burst of other processes took 90% of 2 cores (> 50%)"
    assert "CPU steal 8.0%" in judge(cores=2, steal=0.08).reason
    assert "2.5 runnable tasks per core" in judge(cores=2, load_per_core=2.5).reason
    v = judge(cores=2, step_cv=1.6, stalled=3, steps=35)
    assert v.reasons == ["step-time CV 1.60 (> 0.5)", "3 of 35 steps stalled (> 3x median)"]
    m = v.as_metrics()
    assert m["train.timing_clean"] == 0.0 and m["train.noise.stalled_share_pct"] == pytest.approx(300 / 35)
    assert noise.timing_noisy(m) and not noise.timing_noisy({"train.timing_clean": 1.0})


def test_timing_metric_names():
    for name in ("train.tokens_per_s", "train.tokens_per_s_mean", "train.samples_per_s", "train.mfu",
                 "train.mfu_probe", "train.achieved_tflops", "train.step_median_ms", "train.wall_s"):
        assert noise.is_timing_metric(name), name
    for name in ("train.peak_rss_gib", "train.loss_drop", "quant.rmse", "train.weight_bytes"):
        assert not noise.is_timing_metric(name), name


def _spin(seconds: float, ready=None, go=None) -> None:
    if ready is not None:
        ready.put(os.getpid())
        go.wait()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_guard_sees_other_processes_busy_on_every_core():
    """Independent check: busy-loop processes on every core, while this process sleeps, are measured.

    The spinners are started first and the guard's window opens only once every one of them is up, so a
    slow interpreter start-up (CI spent most of a 1.5 s window spawning) cannot dilute the measurement.
    The guard stops while they still spin: once joined, their CPU time is ours (``os.times`` children).
    """
    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_spin, args=(3.0, ready, go)) for _ in range(cores)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    guard = NoiseGuard(interval_s=0.2).start()
    go.set()
    time.sleep(2.0)
    v = guard.stop().verdict()  # before join: a reaped child's CPU time counts as this process's own
    for p in procs:
        p.join()
    assert not v.clean
    assert v.figures["other_cpu_pct"] > 60
    assert "other processes" in v.reason


def _rec(**metrics):
    from harness.records import Record

    return Record(run_id="r", suite="train", case_id="train[qlora-nf4]", method="qlora-nf4", params={},
                  status="passed", metrics={k.replace("__", "."): v for k, v in metrics.items()})


def test_a_noisy_record_makes_timing_changes_inconclusive_not_regressions():
    from harness.compare import compare

    quiet = _rec(train__tokens_per_s=2200.0, train__step_median_ms=53.0, train__peak_rss_gib=0.5,
                 train__timing_clean=1.0)
    noisy = _rec(train__tokens_per_s=1100.0, train__step_median_ms=106.0, train__peak_rss_gib=0.7,
                 train__timing_clean=0.0)
    by = {c.metric: c for c in compare(noisy, quiet)}
    assert not by["train.tokens_per_s"].regressed and by["train.tokens_per_s"].verdict == "inconclusive"
    assert "new record flagged noisy" in by["train.tokens_per_s"].message
    assert not by["train.step_median_ms"].regressed
    assert by["train.peak_rss_gib"].regressed  # memory is judged as ever
    # a noisy baseline too; and between two clean records the drop is a regression
    assert compare(quiet.model_copy(update={"metrics": {**quiet.metrics, "train.tokens_per_s": 1100.0}}),
                   noisy)[0].verdict == "inconclusive"
    clean_drop = _rec(train__tokens_per_s=1100.0, train__timing_clean=1.0)
    assert {c.metric: c for c in compare(clean_drop, quiet)}["train.tokens_per_s"].regressed


def test_report_greys_a_noisy_throughput_with_its_reason(tmp_path):
    from html import escape

    from harness.records import write_json_atomic, write_record
    from harness.report import render_run
    from harness.report.tables import markdown_table, suite_table

    reason = "other processes used 84% of 2 cores (> 10%)"
    quiet = _rec(train__tokens_per_s=2200.0, train__peak_rss_gib=0.5, train__timing_clean=1.0)
    noisy = _rec(train__tokens_per_s=1362.0, train__peak_rss_gib=0.5, train__timing_clean=0.0)
    noisy = noisy.model_copy(update={"case_id": "train[qlora-fp4]", "method": "qlora-fp4",
                                     "tables": {"train.timing": [{"clean": False, "reason": reason}]}})
    table = suite_table([quiet, noisy])
    col = [c.name for c in table.columns].index("train.tokens_per_s")
    mem = [c.name for c in table.columns].index("train.peak_rss_gib")
    assert table.rows[0].cells[col].noisy == ""
    assert table.rows[1].cells[col].noisy == f"timing flagged noisy: {reason}"
    assert table.rows[1].cells[mem].noisy == ""  # memory is not a timing
    assert "1,362 (noisy)" in markdown_table(table)
    run = tmp_path / "results" / "r"
    write_json_atomic(run / "run.json", {"run_id": "r", "started_at": "2026-11-23T12:00:00+00:00", "env": {},
                                         "suites": ["train"]})
    for r in (quiet, noisy):
        write_record(run, r)
    html = render_run(run, tmp_path / "reports").read_text()
    assert f'title="{escape("timing flagged noisy: " + reason)}"' in html
    assert html.count(" noisy") >= 1 and '<span class="noisy-note">noisy</span>' in html
