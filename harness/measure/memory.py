"""Memory seen three ways: torch's allocator, NVML (process, else device) polled from a thread, and RSS."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any

GIB = 2**30


class _Nvml:
    """This process's GPU memory from NVML, or the whole device's where the process is not visible."""

    def __init__(self, index: int):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.pid = os.getpid()
        self.process_visible = self.process_bytes() is not None

    def process_bytes(self) -> int | None:
        try:
            procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nv.NVMLError:
            return None
        used = [p.usedGpuMemory for p in procs if p.pid == self.pid and p.usedGpuMemory is not None]
        return sum(used) if used else None

    def device_bytes(self) -> int:
        return self.nv.nvmlDeviceGetMemoryInfo(self.handle).used


def _nvml_index() -> int:
    """NVML numbers devices physically; CUDA_VISIBLE_DEVICES=3 means NVML device 3 is our cuda:0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


class Sampler:
    """Polls RSS (always) and NVML memory (on CUDA) every ``interval_s`` in a background thread.

    Peaks are kept per phase (``with sampler.phase("train"): ...``) so loading and training are reported apart.
    """

    def __init__(self, interval_s: float = 0.005, cuda: bool = False):
        import psutil

        self.interval_s = interval_s  # ≤ 10 ms, as optimum-benchmark does
        self.proc = psutil.Process()
        self.nvml: _Nvml | None = None
        if cuda:
            try:
                self.nvml = _Nvml(_nvml_index())
            except Exception:  # no NVML (driver libs missing): the torch allocator figures remain
                self.nvml = None
        self.peaks: dict[str, dict[str, int]] = {}
        self._current: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="harness-memory-sampler", daemon=True)
        self.samples = 0

    def _read(self) -> dict[str, int]:
        out = {"rss": self.proc.memory_info().rss}
        if self.nvml is not None:
            out["nvml_device"] = self.nvml.device_bytes()
            if self.nvml.process_visible:
                pb = self.nvml.process_bytes()
                if pb is not None:
                    out["nvml_process"] = pb
        return out

    def _record(self) -> None:
        reading = self._read()
        with self._lock:
            self.samples += 1
            if self._current is None:
                return
            peak = self.peaks.setdefault(self._current, {})
            for k, v in reading.items():
                if v > peak.get(k, -1):
                    peak[k] = v

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    @contextmanager
    def phase(self, name: str):
        with self._lock:
            self._current = name
        self._record()
        try:
            yield
        finally:
            self._record()
            with self._lock:
                self._current = None

    def metrics(self, prefix: str, phase: str) -> dict[str, float]:
        """``{prefix}peak_rss_gib`` and, on CUDA, ``{prefix}nvml_peak_gib`` for one phase."""
        peak = self.peaks.get(phase, {})
        out: dict[str, float] = {}
        if "rss" in peak:
            out[f"{prefix}peak_rss_gib"] = peak["rss"] / GIB
        if "nvml_process" in peak:
            out[f"{prefix}nvml_peak_gib"] = peak["nvml_process"] / GIB
        elif "nvml_device" in peak:
            out[f"{prefix}nvml_peak_gib"] = peak["nvml_device"] / GIB
        if "nvml_device" in peak:
            out[f"{prefix}nvml_device_peak_gib"] = peak["nvml_device"] / GIB
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "samples": self.samples,
            "nvml": self.nvml is not None,
            "nvml_process_visible": bool(self.nvml and self.nvml.process_visible),
        }


def torch_peaks(prefix: str) -> dict[str, float]:
    """Peak allocated and reserved by torch's CUDA allocator since the last reset (empty on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    return {
        f"{prefix}peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        f"{prefix}peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def reset_torch_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def managed_bytes(optimizer: Any) -> int:
    """Bytes of CUDA managed (unified) memory held by a paged optimizer's states.

    torch's allocator never sees these: the 8-bit optimizer library allocates them with cudaMallocManaged and marks each such
    tensor ``is_paged``.
    """
    total = 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the real optimizer
    for state in getattr(inner, "state", {}).values():
        for t in state.values() if isinstance(state, dict) else []:
            if getattr(t, "is_paged", False):
                total += t.numel() * t.element_size()
    return total


def memory_now() -> dict[str, float]:
    """Memory at this moment (for the record of a case that ran out of it)."""
    import psutil

    out = {"rss_gib": psutil.Process().memory_info().rss / GIB}
    try:
        import torch

        if torch.cuda.is_available():
            out["allocated_gib"] = torch.cuda.memory_allocated() / GIB
            out["reserved_gib"] = torch.cuda.memory_reserved() / GIB
            free, total = torch.cuda.mem_get_info()
            out["device_used_gib"] = (total - free) / GIB
    except Exception:  # the CUDA context may be unusable after a fault
        pass
    return out
