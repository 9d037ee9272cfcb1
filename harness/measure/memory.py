"""Memory seen three ways: torch's allocator, NVML (process, else device) polled from a thread, and RSS.

RSS peaks come from the kernel's own high-water mark where Linux lets a process reset it (``VmHWM`` in
``/proc/self/status``, reset per phase by writing 5 to ``/proc/self/clear_refs``): exact, and free. Polling
would miss a peak shorter than its interval and costs CPU beside the training threads; it stays the fallback.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
GB = 10**9  # claims such as 'about 10 GB' are decimal gigabytes
# NVML's process query takes the driver's lock for milliseconds: ask it at most this often (optimum-benchmark
# polls from a child process); device memory, a cheap query, is read at every sample
PROCESS_INTERVAL_S = 0.1


def nvml_errors(nv) -> tuple[type[BaseException], ...]:
    """What an NVML call may raise: ``NVMLError`` and, in nvidia-ml-py, ``NVMLLibraryMismatchError`` (an
    unversioned function on an older driver), which is not an ``NVMLError``."""
    return tuple(e for e in (getattr(nv, "NVMLError", None), getattr(nv, "NVMLLibraryMismatchError", None))
                 if isinstance(e, type))


@dataclass(frozen=True)
class NvmlDevice:
    """One physical GPU as NVML numbers it (by PCI bus id), with what CUDA's enumeration order needs."""

    index: int  # NVML index: PCI bus order
    uuid: str  # "GPU-8e3c..."
    pci_bus_id: str
    capability: tuple[int, int]
    speed: float  # multiprocessors x max SM clock where NVML says, else the max SM clock
    mig: tuple[str, ...] = ()  # "MIG-..." uuids of its MIG instances, if MIG mode is on


def list_devices(nv) -> list[NvmlDevice]:
    """Every GPU NVML sees, in NVML (PCI bus) order; ``nv`` is the pynvml module."""
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        uuid = _text(nv.nvmlDeviceGetUUID(h))
        bus = _text(nv.nvmlDeviceGetPciInfo(h).busId)
        try:
            cc = tuple(nv.nvmlDeviceGetCudaComputeCapability(h))
        except (nv.NVMLError, AttributeError):
            cc = (0, 0)
        speed = 0.0
        try:
            speed = float(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM))
            speed *= float(nv.nvmlDeviceGetNumGpuCores(h))
        except (nv.NVMLError, AttributeError):  # the clock alone (older drivers lack the core count)
            pass
        mig: list[str] = []
        try:
            if nv.nvmlDeviceGetMigMode(h)[0] == nv.NVML_DEVICE_MIG_ENABLE:
                for j in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
                    try:
                        mig.append(_text(nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j))))
                    except nv.NVMLError:  # an empty MIG slot
                        continue
        except (nv.NVMLError, AttributeError):
            pass
        out.append(NvmlDevice(i, uuid, bus, cc, speed, tuple(mig)))
    return out


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def cuda_order(devices: list[NvmlDevice], order: str | None) -> list[NvmlDevice]:
    """The devices as CUDA numbers them: ``PCI_BUS_ID`` as NVML does; ``FASTEST_FIRST`` (CUDA's default)
    by compute capability, then speed, fastest first, ties by PCI bus id (CUDA's heuristic, approximated)."""
    if (order or "FASTEST_FIRST").upper() == "PCI_BUS_ID":
        return sorted(devices, key=lambda d: d.pci_bus_id.lower())
    return sorted(devices, key=lambda d: (-d.capability[0], -d.capability[1], -d.speed, d.pci_bus_id.lower()))


def resolve_visible(devices: list[NvmlDevice], visible: str | None, order: str | None = None) -> list[str]:
    """UUIDs (GPU-... or MIG-...) of the devices a process sees, as CUDA resolves CUDA_VISIBLE_DEVICES.

    Entries are CUDA indices (in ``order``), GPU UUIDs or MIG UUIDs (unique prefixes allowed); as in CUDA,
    the first entry that names no device ends the list, and a repeated device empties it. Unset means all
    devices in CUDA order.
    """
    ordered = cuda_order(devices, order)
    if visible is None:
        return [d.uuid for d in ordered]
    known = [d.uuid for d in ordered] + [m for d in ordered for m in d.mig]
    out: list[str] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            uuid = ordered[int(entry)].uuid if int(entry) < len(ordered) else None
        else:
            matches = [u for u in known if u.startswith(entry)] if entry.startswith(("GPU-", "MIG-")) else []
            uuid = matches[0] if len(matches) == 1 else None
        if uuid is None:
            break
        if uuid in out:
            return []
        out.append(uuid)
    return out


class _Nvml:
    """NVML memory of the devices this process uses: its own usage per device where NVML lists the
    process, else the whole device's (the fallback, named in the record). Visibility is decided at every
    sample, so samples taken before the CUDA context exists do not decide it for the run.

    ``devices``: the CUDA indices (among the visible devices) the case uses; default all visible ones.
    ``pids``: the pids NVML lists this process under: its own, plus the host pid a container's NVML may
    show instead, learned when the CUDA context is created (``learn_own_pid``).
    """

    def __init__(self, nv=None, uuids: list[str] | None = None, devices: list[int] | None = None, clock=None):
        if nv is None:
            import pynvml as nv
        self.nv = nv
        self.errors = nvml_errors(nv)
        nv.nvmlInit()
        if uuids is None:
            uuids = resolve_visible(list_devices(nv), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                    os.environ.get("CUDA_DEVICE_ORDER"))
        if devices is not None:
            uuids = [uuids[i] for i in devices if i < len(uuids)]
        self.uuids = uuids
        self.handles = [nv.nvmlDeviceGetHandleByUUID(u) for u in uuids]
        self.pid = os.getpid()
        self.pids = {self.pid}
        self.clock = clock or time.monotonic
        self._procs: dict[int, list] = {}  # per handle index: the last process list
        self._procs_at = -1e18

    def processes(self, i: int) -> list | None:
        """NVML's compute processes on device ``i`` (handle index), asked at most every PROCESS_INTERVAL_S;
        None where NVML cannot say."""
        now = self.clock()
        if now - self._procs_at >= PROCESS_INTERVAL_S:
            self._procs_at = now
            for j, h in enumerate(self.handles):
                try:
                    self._procs[j] = list(self.nv.nvmlDeviceGetComputeRunningProcesses(h))
                except self.errors:
                    self._procs[j] = None
        return self._procs.get(i)

    def all_pids(self) -> list[set[int]]:
        """Per device, the pids NVML lists now (asked afresh)."""
        self._procs_at = -1e18
        return [{p.pid for p in (self.processes(i) or [])} for i in range(len(self.handles))]

    def learn_own_pid(self, before: list[set[int]], after: list[set[int]]) -> int | None:
        """Where NVML does not list this process's own pid after its CUDA context exists, the one pid that
        appeared with the context is this process under its host pid (containers on older drivers)."""
        if any(self.pid in a for a in after):
            return None
        new = set().union(*[a - b for a, b in zip(after, before, strict=True)]) if after else set()
        if len(new) == 1:
            self.pids |= new
            return next(iter(new))
        return None

    def process_bytes(self, handle) -> int | None:
        """This process's bytes on one device, None where NVML does not list it (yet, or ever)."""
        procs = self.processes(self.handles.index(handle))
        if procs is None:
            return None
        used = [p.usedGpuMemory for p in procs if p.pid in self.pids and p.usedGpuMemory is not None]
        return sum(used) if used else None

    def device_bytes(self, handle) -> int | None:
        try:
            return self.nv.nvmlDeviceGetMemoryInfo(handle).used
        except self.errors:
            return None

    def read(self, fresh: bool = False) -> dict[str, int]:
        """Per device ``nvml_device:<i>`` and, where visible, ``nvml_process:<i>``; the sums over devices
        ``nvml_device`` and ``nvml_process`` (the latter only when the process is visible on every device).
        ``fresh``: ask the process list now (at a phase's start and end), not from the last 100 ms."""
        if fresh:
            self._procs_at = -1e18
        out: dict[str, int] = {}
        procs = []
        for i, h in enumerate(self.handles):
            db = self.device_bytes(h)
            if db is not None:
                out[f"nvml_device:{i}"] = db
            pb = self.process_bytes(h)
            procs.append(pb)
            if pb is not None:
                out[f"nvml_process:{i}"] = pb
        if all(f"nvml_device:{i}" in out for i in range(len(self.handles))):
            out["nvml_device"] = sum(out[f"nvml_device:{i}"] for i in range(len(self.handles)))
        if procs and all(p is not None for p in procs):
            out["nvml_process"] = sum(procs)
        return out


class HighWaterMark:
    """The kernel's peak RSS of this process since the last ``reset()`` (Linux 4.0+; ``usable()`` says)."""

    STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def usable(self) -> bool:
        try:
            self.reset()
            return self.read() > 0
        except (OSError, ValueError):
            return False

    def reset(self) -> None:
        with self.CLEAR.open("w") as f:
            f.write("5")

    def read(self) -> int:
        """Bytes."""
        for line in self.STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
        raise ValueError("no VmHWM in /proc/self/status")


class Sampler:
    """Polls RSS (always) and NVML memory of every device the case uses (on CUDA) in a background thread.

    Peaks are kept per phase (``with sampler.phase("train"): ...``) so loading and training are reported
    apart; per device and summed over devices (the peak of the per-sample sum, not a sum of peaks). The RSS
    peak of a phase is the kernel's high-water mark where it can be reset (no thread at all on the CPU then),
    else the highest polled RSS.
    """

    def __init__(self, interval_s: float | None = None, cuda: bool = False, nvml: _Nvml | None = None,
                 hwm: HighWaterMark | None = None, devices: list[int] | None = None):
        import psutil

        # device memory every 10 ms on a GPU, as optimum-benchmark does (the process list at most every
        # PROCESS_INTERVAL_S: it takes the driver's lock); on the CPU the thread competes with the training
        # threads for the same cores, and RSS moves slowly: 50 ms keeps its cost under 1%
        self.interval_s = interval_s if interval_s is not None else (0.01 if cuda else 0.05)
        self.proc = psutil.Process()
        self.nvml: _Nvml | None = nvml
        self.devices = devices
        if cuda and nvml is None:
            try:
                self.nvml = _Nvml(devices=devices)
            except Exception:  # no NVML (driver libs missing): the torch allocator figures remain
                self.nvml = None
        self.peaks: dict[str, dict[str, int]] = {}
        self.seen: dict[str, dict[str, int]] = {}  # per phase: samples with and without a process figure
        self._current: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="harness-memory-sampler", daemon=True)
        self.samples = 0
        self.cpu_s = 0.0
        hwm = hwm or HighWaterMark()
        self.hwm: HighWaterMark | None = hwm if hwm.usable() else None

    @property
    def polls(self) -> bool:
        """Whether a thread polls: for NVML, or for RSS where the kernel's high-water mark is not available."""
        return self.nvml is not None or self.hwm is None

    def _read(self, fresh: bool = False) -> dict[str, int]:
        out = {"rss": self.proc.memory_info().rss}
        if self.nvml is not None:
            out.update(self.nvml.read(fresh))
        return out

    def _record(self, fresh: bool = False) -> None:
        reading = self._read(fresh)
        with self._lock:
            self.samples += 1
            if self._current is None:
                return
            peak = self.peaks.setdefault(self._current, {})
            for k, v in reading.items():
                if v > peak.get(k, -1):
                    peak[k] = v
            if self.nvml is not None:
                seen = self.seen.setdefault(self._current, {"process": 0, "device_only": 0})
                seen["process" if "nvml_process" in reading else "device_only"] += 1

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self._record()
            self.cpu_s = time.thread_time() - start  # this thread's CPU time so far: what sampling costs

    def start(self) -> Sampler:
        if self.polls:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1)

    @contextmanager
    def phase(self, name: str):
        with self._lock:
            self._current = name
        if self.hwm is not None:
            self.hwm.reset()
        self._record(fresh=True)
        try:
            yield
        finally:
            self._record(fresh=True)
            with self._lock:
                if self.hwm is not None:
                    peak = self.peaks.setdefault(name, {})
                    peak["rss"] = max(peak.get("rss", -1), self.hwm.read())
                self._current = None

    def source(self, phase: str) -> str | None:
        """Where ``nvml_peak_gib`` of a phase comes from: ``nvml_process``, or ``nvml_device`` (fallback:
        NVML never listed this process during the phase, as inside many containers); None without NVML."""
        peak = self.peaks.get(phase, {})
        if "nvml_process" in peak:
            return "nvml_process"
        return "nvml_device" if "nvml_device" in peak else None

    def metrics(self, prefix: str, phase: str) -> dict[str, float]:
        """``{prefix}peak_rss_gib`` and, on CUDA, ``{prefix}nvml_peak_gib`` (and ``_gb``, 1e9 bytes) from the
        process figure or the named device fallback, ``nvml_process_peak_gib``, ``nvml_device_peak_gib``,
        and per device ``{prefix}gpu<i>.nvml_*_peak_gib`` when the case uses several."""
        peak = self.peaks.get(phase, {})
        out: dict[str, float] = {}
        if "rss" in peak:
            out[f"{prefix}peak_rss_gib"] = peak["rss"] / GIB
        src = self.source(phase)
        if src is not None:
            out[f"{prefix}nvml_peak_gib"] = peak[src] / GIB
            out[f"{prefix}nvml_peak_gb"] = peak[src] / GB
            if "nvml_device" in peak:
                out[f"{prefix}nvml_device_peak_gib"] = peak["nvml_device"] / GIB
            if "nvml_process" in peak:
                out[f"{prefix}nvml_process_peak_gib"] = peak["nvml_process"] / GIB
            n = len(self.nvml.handles) if self.nvml else 0
            for i in range(n if n > 1 else 0):
                for kind in ("process", "device"):
                    if f"nvml_{kind}:{i}" in peak:
                        out[f"{prefix}gpu{i}.nvml_{kind}_peak_gib"] = peak[f"nvml_{kind}:{i}"] / GIB
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "rss_peak": "kernel high-water mark (VmHWM)" if self.hwm is not None else "polled",
            "interval_s": self.interval_s if self.polls else None,
            "samples": self.samples,
            "nvml": self.nvml is not None,
            "nvml_devices": list(self.nvml.uuids) if self.nvml else [],
            "nvml_pids": sorted(self.nvml.pids) if self.nvml else [],
            "nvml_process_interval_s": PROCESS_INTERVAL_S if self.nvml else None,
            "nvml_source": {phase: self.source(phase) for phase in self.peaks if self.source(phase)},
            "nvml_samples": self.seen,
        }


def torch_peaks(prefix: str) -> dict[str, float]:
    """Peak allocated and reserved by torch's CUDA allocator since the last reset, summed over the devices
    this process initialised (a ``device_map`` over several GPUs), per device too when there are several;
    empty on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    used = used_devices()
    n = len(used)
    out: dict[str, float] = {f"{prefix}peak_allocated_gib": 0.0, f"{prefix}peak_reserved_gib": 0.0}
    for i in used:
        torch.cuda.synchronize(i)
        alloc, res = torch.cuda.max_memory_allocated(i) / GIB, torch.cuda.max_memory_reserved(i) / GIB
        out[f"{prefix}peak_allocated_gib"] += alloc
        out[f"{prefix}peak_reserved_gib"] += res
        if n > 1:
            out[f"{prefix}gpu{i}.peak_allocated_gib"] = alloc
            out[f"{prefix}gpu{i}.peak_reserved_gib"] = res
    return out


def used_devices() -> list[int]:
    """CUDA indices of the visible devices this process has initialised (a context on), in order; device 0
    where none is yet. Touching no other device: each context costs about 0.5 GiB on it."""
    import torch

    n = torch.cuda.device_count()
    is_init = getattr(torch.cuda, "is_initialized", lambda: True)()
    out = []
    for i in range(n):
        try:
            # reserved now, or since the last reset (a stage's empty_cache may have returned it all)
            if is_init and (torch.cuda.memory_reserved(i) > 0 or torch.cuda.max_memory_reserved(i) > 0):
                out.append(i)
        except (RuntimeError, AssertionError):
            continue
    return out or ([0] if n else [])


def synchronize_all() -> None:
    """Wait for every device this process uses (a model spread over several GPUs queues work on each)."""
    import torch

    for i in used_devices():
        torch.cuda.synchronize(i)


def reset_torch_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        for i in used_devices():
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)


def context_cost_gib(used_before: int, used_after: int) -> float:
    """What creating the CUDA context cost: device memory in use after it less before it (NVML bytes)."""
    return (used_after - used_before) / GIB


def case_devices(case, device_count: int) -> list[int]:
    """CUDA indices a case uses: all visible devices for a checkpoint placed with ``device_map="auto"`` over
    several GPUs, else device 0 (a synthetic preset is built on one device)."""
    if device_count > 1 and case.model.source != "synthetic":
        return list(range(device_count))
    return [0] if device_count else []


def create_cuda_context(sampler: Sampler, metrics: dict[str, float], devices: list[int] | None = None) -> str:
    """Create the CUDA context on the devices the case uses (``devices``, default the sampler's, else all
    visible) and put its cost in ``metrics["env.cuda_context_gib"]``: NVML device memory used after less used
    before, summed over those devices. The pid NVML lists this process under is learned on the way (a
    container's NVML may show the host pid). Returns how it was measured."""
    import torch

    nv = sampler.nvml
    devices = devices if devices is not None else sampler.devices
    before = nv.read().get("nvml_device") if nv else None
    pids_before = nv.all_pids() if nv else []
    torch.cuda.init()
    for i in devices if devices is not None else range(torch.cuda.device_count()):
        torch.zeros(1, device=f"cuda:{i}")  # the context and allocator of each device the case uses
        torch.cuda.synchronize(i)
    if nv is not None:
        nv.learn_own_pid(pids_before, nv.all_pids())
    after = nv.read().get("nvml_device") if nv else None
    if before is not None and after is not None:
        metrics["env.cuda_context_gib"] = context_cost_gib(before, after)
        return "nvml device used after less before, summed over devices"
    # without NVML: torch's view, which counts other processes' memory too (named as such)
    metrics["env.cuda_context_gib"] = sum(
        (lambda free_total: free_total[1] - free_total[0])(torch.cuda.mem_get_info(i))
        for i in (devices if devices is not None else range(torch.cuda.device_count()))) / GIB
    return "device memory in use after initialisation (no NVML: other processes included)"


def claim_peak(metrics: dict[str, float], prefix: str, managed_gib: float) -> tuple[float, str] | None:
    """The figure a tutorial's 'needs about N GB' is judged on, in GiB, and what it is.

    NVML's per-process figure leaves out CUDA managed memory (paged optimizers, ``cudaMallocManaged``): the
    process peak plus the managed bytes (an upper bound: the two peaks may not coincide). Where NVML never
    listed the process (the device fallback), device memory, which holds managed pages resident on it."""
    if f"{prefix}nvml_process_peak_gib" in metrics:
        return (metrics[f"{prefix}nvml_process_peak_gib"] + managed_gib,
                "nvml process peak + managed (paged optimizer) memory")
    if f"{prefix}nvml_device_peak_gib" in metrics:
        return metrics[f"{prefix}nvml_device_peak_gib"], "nvml device peak (process not listed; managed included)"
    return None


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
