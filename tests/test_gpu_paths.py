"""The GPU measurement paths on the CPU, through a fake pynvml: device resolution, per-sample process
visibility with a named fallback, sums over devices, the context's cost, and the GPU noise checks."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from harness.measure import memory, noise
from harness.measure.memory import GB, GIB, _Nvml, list_devices, resolve_visible

PID = os.getpid()


class FakeNvml:
    """Just enough of pynvml: GPUs in NVML (PCI bus) order, each with MIG instances, memory and processes."""

    class NVMLError(Exception):
        pass

    NVML_CLOCK_SM = 1
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, gpus):
        self.gpus = gpus
        self.by_uuid = {g["uuid"]: g for g in gpus}
        for g in gpus:
            for m in g.get("mig", []):
                self.by_uuid[m["uuid"]] = m

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self.by_uuid[uuid]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"].encode()

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h["bus"].encode())

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h["cc"]

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return h.get("max_clock", 1980)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return h.get("clock", 1980)

    def nvmlDeviceGetNumGpuCores(self, h):
        return h["cores"]

    def nvmlDeviceGetMigMode(self, h):
        return (1 if h.get("mig") else 0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return len(h.get("mig", [])) + 1  # one empty slot

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, j):
        if j >= len(h["mig"]):
            raise self.NVMLError("not found")
        return h["mig"][j]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in h.get("procs", [])]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=h["used"])

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return h.get("throttle", 0)


def two_gpus():
    # NVML (PCI bus) order: an A100 at bus 1A, then an H100 at bus 3B with two MIG instances
    a100 = {"uuid": "GPU-aaaa1111-0000", "bus": "00000000:1A:00.0", "cc": (8, 0), "cores": 6912, "used": 0}
    h100 = {"uuid": "GPU-bbbb2222-0000", "bus": "00000000:3B:00.0", "cc": (9, 0), "cores": 16896, "used": 0,
            "mig": [{"uuid": "MIG-cccc3333-0000", "used": 0}, {"uuid": "MIG-dddd4444-0000", "used": 0}]}
    return FakeNvml([a100, h100])


def test_indices_follow_cuda_device_order():
    devs = list_devices(two_gpus())
    assert [d.uuid for d in devs] == ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"]
    assert devs[1].mig == ("MIG-cccc3333-0000", "MIG-dddd4444-0000")
    # CUDA's default, FASTEST_FIRST, puts the H100 (compute capability 9.0) first: cuda:0 is NVML's 1
    assert resolve_visible(devs, "0", None) == ["GPU-bbbb2222-0000"]
    assert resolve_visible(devs, "0", "FASTEST_FIRST") == ["GPU-bbbb2222-0000"]
    assert resolve_visible(devs, "1", None) == ["GPU-aaaa1111-0000"]
    # PCI_BUS_ID numbers as NVML does
    assert resolve_visible(devs, "0", "PCI_BUS_ID") == ["GPU-aaaa1111-0000"]
    assert resolve_visible(devs, "1,0", "PCI_BUS_ID") == ["GPU-bbbb2222-0000", "GPU-aaaa1111-0000"]
    # unset: every device, in CUDA order
    assert resolve_visible(devs, None, "PCI_BUS_ID") == ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"]


def test_uuids_mig_ids_prefixes_and_invalid_entries():
    devs = list_devices(two_gpus())
    assert resolve_visible(devs, "GPU-bbbb2222-0000") == ["GPU-bbbb2222-0000"]
    assert resolve_visible(devs, "GPU-aaaa") == ["GPU-aaaa1111-0000"]  # a unique prefix, as CUDA accepts
    assert resolve_visible(devs, "MIG-dddd4444-0000") == ["MIG-dddd4444-0000"]  # not index 0
    assert resolve_visible(devs, "GPU-") == []  # ambiguous prefix: nothing from there on
    assert resolve_visible(devs, "1, 7, 0", "PCI_BUS_ID") == ["GPU-bbbb2222-0000"]  # 7 ends the list
    assert resolve_visible(devs, "0,0") == []  # a repeated device hides all, as in CUDA
    assert resolve_visible(devs, "") == []


def test_nvml_uses_the_resolved_devices(monkeypatch):
    nv = two_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-cccc3333-0000")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    n = _Nvml(nv)
    assert n.uuids == ["MIG-cccc3333-0000"]
    assert n.handles == [nv.gpus[1]["mig"][0]]


def test_visibility_decided_per_sample_and_the_fallback_named():
    nv = two_gpus()
    gpu = nv.gpus[1]
    sampler = memory.Sampler(interval_s=10, nvml=_Nvml(nv, ["GPU-bbbb2222-0000"]))
    with sampler.phase("load"):  # before the context exists NVML does not list this process
        gpu["used"] = 1 * GIB
    assert sampler.source("load") == "nvml_device"
    load = sampler.metrics("train.load_", "load")
    assert load["train.load_nvml_peak_gib"] == pytest.approx(1.0)
    assert "train.load_nvml_process_peak_gib" not in load
    gpu["procs"] = [(PID, 3 * GIB), (PID + 1, 5 * GIB)]  # now it does (another process too)
    gpu["used"] = 9 * GIB
    with sampler.phase("train"):
        pass
    m = sampler.metrics("train.", "train")
    assert sampler.source("train") == "nvml_process"
    assert m["train.nvml_peak_gib"] == pytest.approx(3.0)  # ours, not the device's 9
    assert m["train.nvml_peak_gb"] == pytest.approx(3 * GIB / GB)  # 3.221 GB
    assert m["train.nvml_device_peak_gib"] == pytest.approx(9.0)
    d = sampler.describe()
    assert d["nvml_source"] == {"load": "nvml_device", "train": "nvml_process"}
    assert d["nvml_samples"]["load"] == {"process": 0, "device_only": 2}


def test_every_device_sampled_and_summed():
    nv = two_gpus()
    a, h = nv.gpus
    sampler = memory.Sampler(interval_s=10, nvml=_Nvml(nv, ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"]))
    with sampler.phase("train"):
        a["procs"], a["used"] = [(PID, 4 * GIB)], 5 * GIB
        h["procs"], h["used"] = [(PID, 1 * GIB)], 2 * GIB
        sampler._record(fresh=True)  # the process list now, not the one of the last 100 ms
        a["procs"] = [(PID, 2 * GIB)]  # GPU 0 falls, GPU 1 rises: peaks of the sum, not sums of peaks
        h["procs"] = [(PID, 6 * GIB)]
    m = sampler.metrics("train.", "train")
    assert m["train.nvml_peak_gib"] == pytest.approx(8.0)  # max(4 + 1, 2 + 6)
    assert m["train.gpu0.nvml_process_peak_gib"] == pytest.approx(4.0)
    assert m["train.gpu1.nvml_process_peak_gib"] == pytest.approx(6.0)
    # a device where NVML does not list us makes the sum a device-memory fallback, named as such
    h["procs"] = []
    sampler2 = memory.Sampler(interval_s=10, nvml=_Nvml(nv, ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"]))
    with sampler2.phase("train"):
        pass
    assert sampler2.source("train") == "nvml_device"
    assert sampler2.metrics("t.", "train")["t.nvml_peak_gib"] == pytest.approx(7.0)  # 5 + 2


def test_context_cost_is_used_after_minus_used_before(monkeypatch):
    import torch

    nv = two_gpus()
    a, h = nv.gpus
    a["used"], h["used"] = 30 * GIB, 2 * GIB  # another process holds 30 GiB of GPU 0 before we start

    def fake_zeros(*args, device=None, **kw):  # creating a context costs 0.5 GiB on the device it touches
        nv.gpus[int(str(device).split(":")[1])]["used"] += GIB // 2

    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: None)
    monkeypatch.setattr(torch, "zeros", fake_zeros)
    sampler = memory.Sampler(interval_s=10, nvml=_Nvml(nv, ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"]))
    metrics: dict[str, float] = {}
    how = memory.create_cuda_context(sampler, metrics)
    assert metrics["env.cuda_context_gib"] == pytest.approx(1.0)  # 0.5 per device, not the 33 GiB in use
    assert how.startswith("nvml device used after less before")


def test_gpu_noise_other_processes_clock_and_throttle():
    nv = two_gpus()
    h = nv.gpus[1]
    h["procs"] = [(PID, GIB), (4242, GIB)]
    h["clock"], h["max_clock"] = 1200, 1980
    h["throttle"] = 0x4 | 0x40  # power cap (normal) and hardware thermal slowdown
    s = noise.gpu_sample(nv, [h], PID)
    assert s["others"] == [4242]
    assert s["throttle"] == ["hw_thermal"]
    v = noise.judge(cores=16, gpu_other_pids=s["others"], sm_clock_share=s["sm_share"], throttle=s["throttle"])
    assert not v.clean
    assert "pids [4242]" in v.reason and "hw_thermal" in v.reason
    assert "SM clock" not in v.reason  # the power cap holds the clock down: normal operation, not judged
    h["throttle"] = 0x40
    s = noise.gpu_sample(nv, [h], PID)
    assert "SM clock at 61%" in noise.judge(cores=16, sm_clock_share=s["sm_share"]).reason
    assert noise.gpu_in_use_by_others(nv, [h], PID) == [4242]
    h["procs"], h["clock"], h["throttle"] = [(PID, GIB)], 1980, 0x4
    s = noise.gpu_sample(nv, [h], PID)
    assert noise.judge(cores=16, gpu_other_pids=s["others"], sm_clock_share=s["sm_share"],
                       throttle=s["throttle"]).clean


def test_require_idle_gpu_names_the_busy_device(monkeypatch):
    nv = two_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb2222")
    assert noise.busy_gpu_message(nv) == ""
    nv.gpus[0]["procs"] = [(999, GIB)]  # a device we do not use
    assert noise.busy_gpu_message(nv) == ""
    nv.gpus[1]["procs"] = [(4242, GIB), (PID, GIB)]
    assert noise.busy_gpu_message(nv) == (
        "--require-idle-gpu: other processes are using GPU-bbbb2222-0000 (pids 4242): not starting")


def test_require_idle_gpu_option_without_a_gpu_starts(pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("--require-idle-gpu", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
