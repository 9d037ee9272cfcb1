"""What the harness's own measuring costs and misses: the RSS peak from the kernel's high-water mark (no
polling thread on the CPU, no peak shorter than a poll missed), and the CPU time its threads count for
themselves, checked against the kernel's per-thread accounting."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from harness.measure import memory
from harness.measure.noise import NoiseGuard

HZ = os.sysconf("SC_CLK_TCK")
MB = 2**20


def _rss() -> float:
    """Bytes resident now (psutil and torch imported first: their libraries are not part of any spike)."""
    memory.memory_now()
    return memory.memory_now()["rss_gib"] * 2**30


def _spike(mb: int) -> None:
    """Touch ``mb`` MiB and free it at once: a peak far shorter than any polling interval."""
    a = np.ones(mb * MB // 8)
    del a


needs_hwm = pytest.mark.skipif(not memory.HighWaterMark().usable(), reason="kernel high-water mark not resettable here")


@needs_hwm
def test_a_peak_shorter_than_the_polling_interval_is_measured():
    sampler = memory.Sampler(interval_s=10).start()  # a poll would come far too late for the spike
    try:
        before = _rss()
        with sampler.phase("spike"):
            _spike(300)
        peak = sampler.peaks["spike"]["rss"]
    finally:
        sampler.stop()
    assert peak >= before + 280 * MB, f"peak {peak / MB:.0f} MiB, RSS before {before / MB:.0f} MiB"


@needs_hwm
def test_each_phase_has_its_own_peak():
    sampler = memory.Sampler(interval_s=10).start()
    try:
        with sampler.phase("big"):
            _spike(300)
        with sampler.phase("small"):
            _spike(20)
    finally:
        sampler.stop()
    assert sampler.peaks["big"]["rss"] - sampler.peaks["small"]["rss"] >= 200 * MB  # reset between phases


@needs_hwm
def test_on_the_cpu_no_thread_polls_when_the_kernel_keeps_the_peak():
    sampler = memory.Sampler().start()
    try:
        assert not sampler._thread.is_alive()
        assert sampler.describe()["rss_peak"].startswith("kernel high-water mark")
    finally:
        sampler.stop()


class ResetRefused(memory.HighWaterMark):
    """A kernel (or sandbox) that refuses to reset the high-water mark."""

    def reset(self) -> None:
        raise PermissionError("clear_refs")


def test_without_a_resettable_high_water_mark_the_sampler_polls():
    sampler = memory.Sampler(interval_s=0.01, hwm=ResetRefused()).start()
    try:
        assert sampler._thread.is_alive() and sampler.describe()["rss_peak"] == "polled"
        before = _rss()
        with sampler.phase("held"):
            a = np.ones(200 * MB // 8)
            time.sleep(0.3)  # held across many polls
            del a
    finally:
        sampler.stop()
    assert sampler.peaks["held"]["rss"] >= before + 180 * MB


def _thread_cpu_s(native_id: int) -> float:
    """The kernel's account of one thread's CPU time (utime + stime, in clock ticks)."""
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _counted_and_kernel(watcher, burnt_s: float = 0.3, deadline_s: float = 120.0) -> tuple[float, float]:
    """Once a started sampler or guard has burnt ``burnt_s`` of CPU (by the kernel's count): its own count of its
    thread's CPU, and the kernel's. Waiting for CPU time, not wall time: on a busy machine (two busy loops on two
    cores) the thread gets a fraction of a core, and a fixed second of wall time gave it less than 0.3 s."""
    try:
        end = time.monotonic() + deadline_s
        while (kernel := _thread_cpu_s(watcher._thread.native_id)) < burnt_s and time.monotonic() < end:
            time.sleep(0.1)
        counted = watcher.cpu_s
    finally:
        watcher._stop.set()
        watcher._thread.join()
    assert kernel >= burnt_s, f"the thread burnt only {kernel:.2f} s of CPU in {deadline_s:.0f} s"
    return counted, kernel


def test_the_guard_counts_its_own_thread_cpu_as_the_kernel_does(monkeypatch):
    guard = NoiseGuard(interval_s=0.01)
    monkeypatch.setattr(guard, "_sample", lambda: _burn(0.02))  # an expensive sample: 20 ms of CPU each
    counted, kernel = _counted_and_kernel(guard.start())
    # the thread updates its count after each sample: at most one sample (20 ms) and a clock tick behind
    assert counted == pytest.approx(kernel, abs=0.02 + 2 / HZ)


def test_the_sampler_counts_its_own_thread_cpu_as_the_kernel_does(monkeypatch):
    sampler = memory.Sampler(interval_s=0.01, hwm=ResetRefused())  # polls RSS
    monkeypatch.setattr(sampler, "_record", lambda: _burn(0.02))
    counted, kernel = _counted_and_kernel(sampler.start())
    assert counted == pytest.approx(kernel, abs=0.02 + 2 / HZ)


def test_threads_started_elsewhere_are_not_counted():
    """The count is the thread's own, not the process's: a busy main thread adds nothing to it."""
    guard = NoiseGuard(interval_s=0.05).start()
    try:
        _burn(0.5)
        time.sleep(0.1)
    finally:
        guard.stop()
    assert guard.cpu_s < 0.1
