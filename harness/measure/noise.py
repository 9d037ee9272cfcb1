"""The noise guard: was the host (and the GPU) quiet while a case was timed? A verdict with its reasons.

What is watched, at the start, every ``interval_s`` during, and at the end of the timed phase:

* host load: the 1-minute load average and the runnable tasks (``procs_running``) against the cores;
* CPU used by *other* processes: the host's busy time from ``/proc/stat`` deltas less this process's own
  CPU time, as a share of all cores (a direct measure; the load average lags bursts by a minute);
* CPU steal from ``/proc/stat`` deltas (a virtual machine whose host gives its cores to others);
* on a GPU, through NVML: other processes on each device the case uses, the SM clock against its maximum,
  and the clock-throttle reasons that mean a slowed chip (thermal, hardware slowdown, power brake);
* the step times themselves: dispersion (CV) or a share of stalled steps past a threshold.

Any of them past its threshold makes the timing *noisy*: ``train.timing_clean`` is 0 and the record's
``env.timing`` says why. Compare and report then treat the timing figures as inconclusive.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Thresholds (each named in the reason it produces)
OTHER_CPU_MEAN_MAX = 0.10  # other processes' mean share of all cores over the timed phase
OTHER_CPU_BURST_MAX = 0.50  # ... or their share in any one sampling window
STEAL_MAX = 0.05  # share of CPU time stolen by the hypervisor
LOAD_PER_CORE_MAX = 2.0  # runnable tasks (procs_running, this process's threads included) per core, median
STEP_CV_MAX = 0.5  # standard deviation over mean of the step times
STALLED_SHARE_MAX = 0.05  # share of steps over 3x the median step
SM_CLOCK_MIN_SHARE = 0.80  # median SM clock against the device's maximum
INTERVAL_S = 0.5  # sampling period of the host counters (cheap: two small /proc reads)

# NVML clock-throttle reasons that slow a busy chip (nvml.h: nvmlClocksThrottleReason*); the power cap
# (0x4) and idle (0x1) are normal operation and only recorded.
THROTTLE_SLOWING = {0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}
GPU_IDLE, SW_POWER_CAP = 0x1, 0x4  # a sample with either bit judges nothing by its clock: normal operation
# Metric names whose value is a timing (judged inconclusive on a noisy record): throughput, rates, times
TIMING_PATTERNS = ("*tokens_per_s*", "*samples_per_s*", "*.mfu*", "*_tflops", "*_ms", "*_s")


def is_timing_metric(name: str) -> bool:
    """True for a metric a busy host distorts: tokens/s, samples/s, MFU, TFLOP/s, anything in ms or s."""
    return any(fnmatch.fnmatchcase(name, p) for p in TIMING_PATTERNS)


def timing_noisy(metrics: Mapping[str, float]) -> bool:
    """True when a record's metrics flag its timing noisy (any ``*.timing_clean`` equal to 0)."""
    return any(fnmatch.fnmatchcase(k, "*.timing_clean") and v == 0 for k, v in metrics.items())


@dataclass(frozen=True)
class CpuTimes:
    """Jiffies of the host's ``cpu`` line in /proc/stat, and this process's CPU seconds, at one instant."""

    busy: float  # user + nice + system + irq + softirq (guest time is inside user)
    steal: float
    total: float  # every field but guest, guest_nice
    own_s: float  # this process's user + system seconds (all threads, children that were waited for)
    wall: float
    procs_running: int


def _read_proc_stat(text: str) -> tuple[float, float, float, int]:
    busy = steal = total = 0.0
    running = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [float(x) for x in line.split()[1:]]
            f += [0.0] * (10 - len(f))
            user, nice, system, idle, iowait, irq, softirq, st = f[:8]
            busy = user + nice + system + irq + softirq
            steal = st
            total = busy + idle + iowait + st
        elif line.startswith("procs_running"):
            running = int(line.split()[1])
    return busy, steal, total, running


def cpu_times() -> CpuTimes | None:
    """The host's CPU counters now, or None where /proc/stat is not there (not Linux)."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None
    busy, steal, total, running = _read_proc_stat(text)
    t = os.times()
    return CpuTimes(busy, steal, total, t.user + t.system + t.children_user + t.children_system,
                    time.monotonic(), running)


def window(a: CpuTimes, b: CpuTimes, cores: int) -> dict[str, float]:
    """Between two readings: other processes' share of all cores, the steal share, and the wall time."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    d_total = b.total - a.total
    if d_total <= 0:
        return {"other": 0.0, "steal": 0.0, "wall": b.wall - a.wall}
    host_busy_s = (b.busy - a.busy) / hz
    own = b.own_s - a.own_s
    capacity_s = d_total / hz  # core-seconds that elapsed (all cores)
    return {"other": max(0.0, host_busy_s - own) / capacity_s, "steal": (b.steal - a.steal) / d_total,
            "wall": b.wall - a.wall}


@dataclass
class Verdict:
    """Whether timing was clean, why not, and the figures behind it (flat metrics, prefix ``train.noise.``)."""

    clean: bool
    reasons: list[str]
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def as_metrics(self, prefix: str = "train.") -> dict[str, float]:
        out = {f"{prefix}timing_clean": 1.0 if self.clean else 0.0}
        out.update({f"{prefix}noise.{k}": float(v) for k, v in self.figures.items()})
        return out

    def as_env(self) -> dict[str, Any]:
        return {"clean": self.clean, "reason": self.reason, "thresholds": {
            "other_cpu_mean": OTHER_CPU_MEAN_MAX, "other_cpu_burst": OTHER_CPU_BURST_MAX, "steal": STEAL_MAX,
            "load_per_core": LOAD_PER_CORE_MAX, "step_cv": STEP_CV_MAX, "stalled_share": STALLED_SHARE_MAX,
            "sm_clock_share": SM_CLOCK_MIN_SHARE}}


def judge(*, cores: int, other_mean: float | None = None, other_max: float | None = None,
          steal: float | None = None, load_per_core: float | None = None, loadavg_max: float | None = None,
          step_cv: float | None = None, stalled: float | None = None, steps: float | None = None,
          gpu_other_pids: Sequence[int] = (), sm_clock_share: float | None = None,
          throttle: Sequence[str] = (), power_capped: int = 0) -> Verdict:
    """The verdict from summary figures; each figure past its threshold adds one reason."""
    reasons: list[str] = []
    figures: dict[str, float] = {"cores": float(cores)}
    if other_mean is not None:
        figures["other_cpu_pct"] = 100 * other_mean
        if other_mean > OTHER_CPU_MEAN_MAX:
            reasons.append(f"other processes used {100 * other_mean:.0f}% of {cores} cores "
                           f"(> {100 * OTHER_CPU_MEAN_MAX:.0f}%)")
    if other_max is not None:
        figures["other_cpu_max_pct"] = 100 * other_max
        if other_max > OTHER_CPU_BURST_MAX and not (other_mean and other_mean > OTHER_CPU_MEAN_MAX):
            reasons.append(f"a burst of other processes took {100 * other_max:.0f}% of {cores} cores "
                           f"(> {100 * OTHER_CPU_BURST_MAX:.0f}%)")
    if steal is not None:
        figures["steal_pct"] = 100 * steal
        if steal > STEAL_MAX:
            reasons.append(f"CPU steal {100 * steal:.1f}% (> {100 * STEAL_MAX:.0f}%)")
    if load_per_core is not None:
        figures["runnable_per_core"] = load_per_core
        if load_per_core > LOAD_PER_CORE_MAX:
            reasons.append(f"{load_per_core:.1f} runnable tasks per core (> {LOAD_PER_CORE_MAX:g})")
    if loadavg_max is not None:
        figures["loadavg_max"] = loadavg_max  # recorded: it lags a minute behind, so it judges nothing alone
    if step_cv is not None:
        figures["step_cv"] = step_cv
        if step_cv > STEP_CV_MAX:
            reasons.append(f"step-time CV {step_cv:.2f} (> {STEP_CV_MAX:g})")
    if stalled is not None and steps:
        figures["stalled_share_pct"] = 100 * stalled / steps
        if stalled / steps > STALLED_SHARE_MAX:
            reasons.append(f"{stalled:.0f} of {steps:.0f} steps stalled (> 3x median)")
    if gpu_other_pids:
        figures["gpu_other_processes"] = float(len(set(gpu_other_pids)))
        reasons.append(f"other processes on the GPU: pids {sorted(set(gpu_other_pids))}")
    if sm_clock_share is not None:
        figures["sm_clock_share"] = sm_clock_share
        if sm_clock_share < SM_CLOCK_MIN_SHARE:
            reasons.append(f"SM clock at {100 * sm_clock_share:.0f}% of its maximum (< {100 * SM_CLOCK_MIN_SHARE:.0f}%)")
    if power_capped:  # recorded: the power cap lowering the clock on heavy steps is normal operation
        figures["gpu_power_capped_samples"] = float(power_capped)
    if throttle:
        reasons.append("GPU clocks throttled: " + ", ".join(sorted(set(throttle))))
    return Verdict(clean=not reasons, reasons=reasons, figures=figures)


def throttle_names(mask: int) -> list[str]:
    """The slowing throttle reasons in an NVML reason bit mask."""
    return [name for bit, name in THROTTLE_SLOWING.items() if mask & bit]


def _reasons(nv, h) -> int | None:
    """The clock event (throttle) reason mask: ``nvmlDeviceGetCurrentClocksEventReasons`` in nvidia-ml-py 12.535+,
    ``...ThrottleReasons`` before; None where neither answers."""
    from harness.measure.memory import nvml_errors

    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        fn = getattr(nv, name, None)
        if fn is not None:
            try:
                return int(fn(h))
            except nvml_errors(nv):
                return None
    return None


def gpu_sample(nv, handles: Sequence[Any], pid: int | set[int] | frozenset[int]) -> dict[str, Any]:
    """Other compute processes, SM clock share (lowest device) and slowing throttle reasons, via NVML.

    ``pid``: this process's pid, or every pid NVML lists it under (a container's NVML may show the host
    pid). Only the devices in ``handles`` (those the case uses) are asked. A device whose clock is held down
    by the power cap or idles (normal operation) gives no clock share; ``power_capped`` counts them."""
    from harness.measure.memory import nvml_errors

    errors = nvml_errors(nv)
    own = {pid} if isinstance(pid, int) else set(pid)
    others: list[int] = []
    shares: list[float] = []
    throttle: list[str] = []
    capped = 0
    for h in handles:
        try:
            others += [p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(h) if p.pid not in own]
        except errors:
            pass
        mask = _reasons(nv, h)
        if mask is not None:
            throttle += throttle_names(mask)
        normal = mask is not None and bool(mask & (SW_POWER_CAP | GPU_IDLE))
        capped += bool(mask is not None and mask & SW_POWER_CAP)
        try:
            sm, top = nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM), nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
            if top and not normal:
                shares.append(sm / top)
        except errors:
            pass
    return {"others": others, "sm_share": min(shares) if shares else None, "throttle": throttle,
            "power_capped": capped}


class NoiseGuard:
    """Samples host (and GPU) counters in a thread from ``start()`` to ``stop()``; ``verdict()`` judges them.

    ``nvml`` is the pynvml module and ``handles`` the NVML handles of the devices the case uses (the memory
    sampler resolves them); this process's own pid is never counted as another process. In a container
    NVML may report host pids: a process seen there that is not ours still means a shared GPU.
    """

    def __init__(self, interval_s: float = INTERVAL_S, nvml=None, handles: Sequence[Any] = (), pid: int | None = None,
                 pids: set[int] | None = None):
        self.interval_s = interval_s
        self.cores = os.cpu_count() or 1
        self.nvml, self.handles = nvml, list(handles)
        self.pid = set(pids) if pids else {pid or os.getpid()}
        self.windows: list[dict[str, float]] = []
        self.running: list[int] = []
        self.loadavg: list[float] = []
        self.gpu: list[dict[str, Any]] = []
        self._first: CpuTimes | None = None
        self._last: CpuTimes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-noise-guard", daemon=True)
        self.cpu_s = 0.0

    def _sample(self) -> None:
        now = cpu_times()
        if now is not None:
            if self._last is not None:
                self.windows.append(window(self._last, now, self.cores))
            self._first = self._first or now
            self._last = now
            self.running.append(now.procs_running)
        try:
            self.loadavg.append(os.getloadavg()[0])
        except OSError:
            pass
        if self.nvml is not None and self.handles:
            self.gpu.append(gpu_sample(self.nvml, self.handles, self.pid))

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self._sample()
            self.cpu_s = time.thread_time() - start  # this thread's CPU time so far: what watching costs

    def start(self) -> NoiseGuard:
        self._sample()  # at the start
        self._thread.start()
        return self

    def stop(self) -> NoiseGuard:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sample()  # at the end
        return self

    def verdict(self, step_stats: Mapping[str, float] | None = None, prefix: str = "train.") -> Verdict:
        """Judge what was sampled, with the step statistics of ``harness.measure.steps`` if given."""
        import numpy as np

        s = step_stats or {}
        whole = window(self._first, self._last, self.cores) if self._first and self._last else None
        long = [w["other"] for w in self.windows if w["wall"] >= 0.5 * self.interval_s]
        others = [p for g in self.gpu for p in g["others"]]
        shares = [g["sm_share"] for g in self.gpu if g["sm_share"] is not None]
        return judge(
            cores=self.cores,
            other_mean=whole["other"] if whole else None,
            other_max=max(long) if long else None,
            steal=whole["steal"] if whole else None,
            load_per_core=float(np.median(self.running)) / self.cores if self.running else None,
            loadavg_max=max(self.loadavg) if self.loadavg else None,
            step_cv=s.get(f"{prefix}step_cv"), stalled=s.get(f"{prefix}stalled_steps"),
            steps=s.get(f"{prefix}timed_steps"),
            gpu_other_pids=others,
            sm_clock_share=float(np.median(shares)) if shares else None,
            throttle=[t for g in self.gpu for t in g["throttle"]],
            power_capped=sum(g.get("power_capped", 0) for g in self.gpu),
        )


def gpu_in_use_by_others(nv, handles: Sequence[Any], pid: int | set[int] | None = None) -> list[int]:
    """Pids of other compute processes on the given NVML devices (for refusing to start on a busy GPU)."""
    return sorted(set(gpu_sample(nv, handles, pid or os.getpid())["others"]))


def busy_gpu_message(nv=None) -> str:
    """A one-line refusal when another process computes on a GPU this process would use, else "".

    Behind ``--require-idle-gpu`` (as PEFT's method comparison refuses a shared GPU); no NVML, no GPU: ""."""
    from harness.measure.memory import _Nvml

    try:
        nvml = _Nvml(nv)
    except Exception:  # no NVML library or driver: nothing to check
        return ""
    busy = []
    for uuid, handle in zip(nvml.uuids, nvml.handles, strict=True):
        pids = gpu_in_use_by_others(nvml.nv, [handle], nvml.pids)
        if pids:
            busy.append(f"{uuid} (pids {', '.join(map(str, pids))})")
    return f"--require-idle-gpu: other processes are using {'; '.join(busy)}: not starting" if busy else ""
