"""The faults found in the CUDA paths before the first GPU run (issue 23), each checked on the CPU.

Where only a fake can show the logic (a fake pynvml, fake torch.cuda devices), the test says so: it checks
the harness's handling of that answer, not the GPU's behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_gpu_paths import FakeNvml

from harness.measure import memory, noise
from harness.measure.memory import GIB, _Nvml

ROOT = Path(__file__).resolve().parents[1]
PID = os.getpid()


def h200(uuid="GPU-h200-0", bus="00000000:1A:00.0", **kw):
    return {"uuid": uuid, "bus": bus, "cc": (9, 0), "cores": 16896, "used": 0, **kw}


# -- 1. the report's import at the end of the session -------------------------------------------------------
def test_missing_report_packages_end_the_session_in_one_line_not_an_internalerror(monkeypatch, tmp_path):
    """plotly is not on the GPU image: the report's import fails, the run's records stand, one line says how."""
    import sys

    from harness import plugin

    monkeypatch.setitem(sys.modules, "harness.report", None)  # any import of it raises ImportError
    monkeypatch.setattr(plugin, "_write_stats", lambda session, run: None)
    run = SimpleNamespace(claimed=True, dir=tmp_path / "run", results_dir=tmp_path)
    run.dir.mkdir()
    opts = {"no_report": False, "reports_dir": str(tmp_path / "reports"), "baseline": None}
    config = SimpleNamespace(getoption=opts.get, stash={plugin.RUN_KEY: run})
    plugin.pytest_sessionfinish(SimpleNamespace(config=config), 0)
    (line,) = config._harness_report_errors
    assert "--no-report" in line and "python -m harness report" in line and "\n" not in line


# -- 3. managed memory in the claims ------------------------------------------------------------------------
def test_claims_are_judged_on_process_plus_managed_memory():
    """Fake NVML figures: the harness's handling of a process figure that leaves out managed memory."""
    m = {"train.nvml_process_peak_gib": 9.5, "train.nvml_device_peak_gib": 10.4, "train.nvml_peak_gib": 9.5}
    value, basis = memory.claim_peak(m, "train.", managed_gib=1.5)
    assert value == pytest.approx(11.0)  # 9.5 GiB NVML sees plus the 1.5 GiB of paged optimizer states
    assert "managed" in basis
    value, basis = memory.claim_peak({"train.nvml_device_peak_gib": 10.4}, "train.", managed_gib=1.5)
    assert value == pytest.approx(10.4) and "device" in basis  # device memory holds the managed pages
    for suite in ("memory-7b", "memory-13b", "memory-34b", "memory-70b"):
        text = (ROOT / "suites" / f"{suite}.yaml").read_text()
        assert "metric: train.claim_peak_gb" in text and "metric: train.nvml_peak_gb" not in text, suite


# -- 4. the noise guard on a GPU -----------------------------------------------------------------------------
def test_own_process_under_its_host_pid_is_not_another_process():
    """Fake NVML that lists this worker under a host pid (containers on older drivers): the harness learns
    that pid when its context appears, counts its memory as the process's and not as another process."""
    gpu = h200(procs=[(777, GIB)])  # someone else's process, there before us
    nv = FakeNvml([gpu])
    nvml = _Nvml(nv, ["GPU-h200-0"])
    before = nvml.all_pids()
    gpu["procs"] = [(777, GIB), (43210, 2 * GIB)]  # our context appears, under a pid that is not os.getpid()
    assert nvml.learn_own_pid(before, nvml.all_pids()) == 43210
    assert nvml.read()["nvml_process"] == 2 * GIB
    s = noise.gpu_sample(nv, nvml.handles, nvml.pids)
    assert s["others"] == [777]
    # with our own pid listed, nothing is guessed
    nvml2 = _Nvml(nv, ["GPU-h200-0"])
    gpu["procs"] = [(PID, GIB)]
    assert nvml2.learn_own_pid([set()], nvml2.all_pids()) is None and nvml2.pids == {PID}


def test_noise_judges_only_the_devices_the_case_uses():
    """Fake NVML with a second, idle GPU at 345 MHz (an idle H200): the harness samples only device 0."""
    nv = FakeNvml([h200(clock=1980), h200("GPU-h200-1", "00000000:2B:00.0", clock=345, throttle=0x1)])
    nvml = _Nvml(nv, ["GPU-h200-0", "GPU-h200-1"], devices=[0])
    assert nvml.uuids == ["GPU-h200-0"]
    guard = noise.NoiseGuard(nvml=nv, handles=nvml.handles, pids=nvml.pids)
    guard._sample()
    guard._sample()
    v = guard.verdict()  # the host's own figures may flag this shared test machine: only the GPU's are read
    assert v.figures["sm_clock_share"] == 1.0 and not any("SM clock" in r for r in v.reasons), v.reason


def test_power_capping_is_not_noise_but_a_thermal_slowdown_is():
    """Fake NVML clocks and reason masks: the harness's reading of them."""
    gpu = h200(clock=1300, throttle=0x4)  # 66% of 1980 MHz, held by the power cap on a heavy step
    nv = FakeNvml([gpu])
    s = noise.gpu_sample(nv, [gpu], PID)
    v = noise.judge(cores=16, sm_clock_share=s["sm_share"], throttle=s["throttle"], power_capped=s["power_capped"])
    assert v.clean, v.reason
    assert v.figures["gpu_power_capped_samples"] == 1
    gpu["throttle"] = 0x0  # the same clock with no reason given: slowed
    s = noise.gpu_sample(nv, [gpu], PID)
    assert not noise.judge(cores=16, sm_clock_share=s["sm_share"], throttle=s["throttle"]).clean
    gpu["throttle"] = 0x40  # hardware thermal slowdown
    s = noise.gpu_sample(nv, [gpu], PID)
    assert "hw_thermal" in noise.judge(cores=16, sm_clock_share=s["sm_share"], throttle=s["throttle"]).reason


def test_clock_event_reasons_of_newer_nvml_are_read():
    """nvidia-ml-py 12.535+ names the call ...ClocksEventReasons; a fake with only that name."""
    gpu = h200(clock=1980)
    nv = FakeNvml([gpu])
    nv.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x40
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = None
    assert noise.gpu_sample(nv, [gpu], PID)["throttle"] == ["hw_thermal"]


# -- 5. the sampler's process queries ------------------------------------------------------------------------
def test_process_list_is_asked_at_most_every_100_ms():
    """A fake NVML that counts process queries and a fake clock: samples every 10 ms for one second ask the
    process list about 10 times (the driver's lock), device memory at every sample."""
    gpu = h200(procs=[(PID, GIB)], used=GIB)
    nv = FakeNvml([gpu])
    calls = {"procs": 0, "mem": 0}
    procs, mem = nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetMemoryInfo

    def count(kind, fn):
        def wrapped(h):
            calls[kind] += 1
            return fn(h)
        return wrapped

    nv.nvmlDeviceGetComputeRunningProcesses = count("procs", procs)
    nv.nvmlDeviceGetMemoryInfo = count("mem", mem)
    now = [0.0]
    nvml = _Nvml(nv, ["GPU-h200-0"], clock=lambda: now[0])
    for _ in range(100):
        assert nvml.read()["nvml_process"] == GIB
        now[0] += 0.01
    assert calls["mem"] == 100
    assert calls["procs"] <= 11
    assert memory.Sampler(cuda=True, nvml=nvml).interval_s >= 0.01


# -- 6. several GPUs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("listed", "worker", "expected"), [("2,3", "gw0", "2"), ("2,3", "gw1", "3"),
                                                           ("2,3", "gw2", "2"), ("5", "gw1", None),
                                                           (None, "gw3", "1")])
def test_xdist_workers_round_robin_within_the_listed_devices(listed, worker, expected):
    from harness.plugin import pin_worker_gpu

    env = {} if listed is None else {"CUDA_VISIBLE_DEVICES": listed}
    assert pin_worker_gpu(worker, 2, env) == expected
    assert env.get("CUDA_VISIBLE_DEVICES") == (expected or listed)


def test_context_and_sampling_on_the_case_devices_only(monkeypatch):
    """Fake torch.cuda with four devices and a fake NVML: a synthetic case touches device 0 only, and NVML
    sums only that device (each idle GPU's context would add 0.5 GiB)."""
    import torch

    touched = []
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: None)
    real_zeros = torch.zeros

    def zeros(*a, device=None, **kw):
        touched.append(device)
        gpus[int(str(device).split(":")[1])]["used"] += GIB // 2
        return real_zeros(*a, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    gpus = [h200(f"GPU-h200-{i}", f"00000000:{i}A:00.0") for i in range(4)]
    nv = FakeNvml(gpus)
    synthetic = SimpleNamespace(model=SimpleNamespace(source="synthetic"))
    devices = memory.case_devices(synthetic, 4)
    assert devices == [0]
    assert memory.case_devices(SimpleNamespace(model=SimpleNamespace(source="hub")), 4) == [0, 1, 2, 3]
    sampler = memory.Sampler(interval_s=10, nvml=_Nvml(nv, [g["uuid"] for g in gpus], devices=devices),
                             devices=devices)
    metrics: dict[str, float] = {}
    memory.create_cuda_context(sampler, metrics)
    assert touched == ["cuda:0"]
    assert metrics["env.cuda_context_gib"] == pytest.approx(0.5)


# -- 8. the quant stage's cache out of the train stage's peaks -----------------------------------------------
def test_worker_frees_and_resets_peaks_between_stages(monkeypatch, tmp_path):
    """Fake stages and a fake device: the worker frees the cache and resets the allocator's peaks before
    each stage (the harness's order of calls; what CUDA's allocator then does is not shown here)."""
    import types

    from harness import stages, worker
    from harness.matrix import expand
    from harness.spec import load_suite

    calls: list[str] = []
    path = ROOT / "suites" / "memory-7b.yaml"
    case = expand(load_suite(path), path)[0]
    monkeypatch.setattr(stages, "between_stages", lambda device: calls.append("free+reset"), raising=False)
    for name in case.stages:
        mod = types.ModuleType(f"fake_{name}")
        mod.run = (lambda n: lambda ctx, inputs: (calls.append(n), stages.StageOutput())[1])(name)
        monkeypatch.setitem(__import__("sys").modules, f"fake_{name}", mod)
        monkeypatch.setitem(worker.STAGE_MODULES, name, f"fake_{name}")
    import harness.models

    monkeypatch.setattr(harness.models, "prepare", lambda c: SimpleNamespace(info={}))
    monkeypatch.setattr(worker, "_estimate", lambda ctx, record: None)
    record = worker.execute(case, "t", tmp_path, tmp_path / "work")
    assert record.status == "passed", record.message
    assert calls == ["free+reset", "quant", "free+reset", "train"]


def test_between_stages_empties_the_cache_then_resets_the_peaks(monkeypatch):
    """Fake torch.cuda: the order of the harness's calls on a GPU."""
    import torch

    from harness import stages

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(memory, "reset_torch_peaks", lambda: calls.append("reset"))
    stages.between_stages("cuda")
    assert calls == ["empty_cache", "reset"]


# -- 9. attention FLOPs per packed document ------------------------------------------------------------------
def test_padding_free_packing_counts_attention_per_document():
    """trl's own padding-free collator: one row with position_ids; attention runs within each document."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from harness.stages.train import count_tokens

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": list(range(1, 11))}, {"input_ids": list(range(1, 21))},
                     {"input_ids": list(range(1, 6))}])
    assert "position_ids" in batch and batch["input_ids"].shape == (1, 35)
    real, total, samples, sum_sq = count_tokens(batch)
    assert (real, total, samples, sum_sq) == (35, 35, 3, 10**2 + 20**2 + 5**2)  # not 35**2 = 1225
    padded = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert count_tokens(padded) == (4, 6, 2, 9 + 1)


# -- 10. smaller ---------------------------------------------------------------------------------------------
def test_built_4bit_shapes_take_quant_storage_and_blocksize():
    import torch

    from harness import methods

    method = methods.get("qlora-nf4-dq")
    lin = torch.nn.Linear(256, 128, bias=False)
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    layer = method.build_linear(lin, w, "bf16", torch.device("cpu"), quant_storage="bf16", blocksize=128)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.weight.quant_state.blocksize == 128
    assert layer.weight.quant_storage == torch.bfloat16


def test_step_timing_waits_for_every_device_the_case_uses(monkeypatch):
    """Fake torch.cuda with two devices holding memory: the step timer synchronizes both."""
    import torch

    from harness.stages import sync

    seen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=None: 2**21)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: seen.append(i))
    sync("cuda")
    assert seen == [0, 1]


def test_cublas_alloc_failure_is_out_of_memory():
    from harness.worker import classify_exit, is_oom

    err = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert is_oom(err)
    assert classify_exit(1, "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling", False, 0)[0] == "oom"


def test_nvml_library_mismatch_does_not_crash_the_sampler():
    """A fake NVML raising nvidia-ml-py's NVMLLibraryMismatchError (not an NVMLError) on an old driver."""
    import pynvml

    class Mismatch(FakeNvml):
        NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError

        def nvmlDeviceGetComputeRunningProcesses(self, h):
            raise self.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")

    gpu = h200(used=3 * GIB)
    nv = Mismatch([gpu])
    nvml = _Nvml(nv, ["GPU-h200-0"])
    assert nvml.read() == {"nvml_device:0": 3 * GIB, "nvml_device": 3 * GIB}  # the device fallback
    assert noise.gpu_sample(nv, nvml.handles, PID)["others"] == []


# -- 7. the estimator's bf16 branches, against the dtypes a bf16 step holds on the CPU ----------------------
@pytest.mark.parametrize("method", ["lora-bf16", "qlora-nf4"])
def test_estimator_dtypes_match_a_bf16_autocast_forward(method):
    """Under the default policy (recipe) a bf16 step's residual stream is fp32 for every method (fp32
    embeddings; adding a bf16 output keeps it fp32), so checkpointed layer inputs are fp32; a 4-bit base's
    MLP outputs (and their gradients) are fp32. Read from hooks on a real autocast forward in bf16."""
    import torch
    from peft import get_peft_model

    from harness import estimate, methods, precision, presets
    from harness.matrix import expand
    from harness.models import Source, build_on_device
    from harness.spec import load_suite
    from harness.stages.train import lora_config

    path = ROOT / "suites" / "train.yaml"
    case = next(c for c in expand(load_suite(path), path) if c.method == method)
    s = case.settings.model_copy(update={"compute_dtype": "bf16", "gradient_checkpointing": True})
    preset = presets.PRESETS["tiny-llama"]
    model = build_on_device(Source(None, None, preset, {"num_layers": 2}), method, "bf16", "cpu")
    model = get_peft_model(methods.get(method).prepare_for_training(model, s), lora_config(s))
    precision.apply(model, s.precision, "bf16")
    model.train()  # before any forward (bitsandbytes repacks a 4-bit weight on an eval-mode forward here)
    seen: dict[str, torch.dtype] = {}
    layers = model.base_model.model.model.layers

    def layer_input(module, args, kwargs):
        seen.setdefault("layer_input", (args or (kwargs["hidden_states"],))[0].dtype)

    def mlp_output(module, args, out):
        seen.setdefault("mlp", out.dtype)

    layers[1].register_forward_pre_hook(layer_input, with_kwargs=True)
    layers[1].mlp.gate_proj.register_forward_hook(mlp_output)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(0, 500, (2, 16))).logits.float().sum().backward()
    per = estimate.activation_bytes_per_token(preset, s, device="cpu")
    size = {torch.float32: 4, torch.bfloat16: 2}
    assert per["layer_input"] == size[seen["layer_input"]] * preset.hidden_size, seen
    assert per["backward"] == 3 * size[seen["mlp"]] * preset.intermediate_size, seen
