"""Hardware tiers: auto detection, selection by the suite's tiers, the estimator's budget skip, xdist runs."""

from __future__ import annotations

import json

import pytest

from harness.runner import detect_tier

pytest_plugins = ["pytester"]

BIG = """\
name: big
tiers: [cpu, gpu-80gb]
model: {source: synthetic, preset: llama-2-70b}
stages: [quant]
settings: {seq_len: 2048, batch_size: 4}
matrix:
  method: [lora-bf16]
"""
GPU_ONLY = BIG.replace("name: big", "name: gpuonly").replace("tiers: [cpu, gpu-80gb]", "tiers: [gpu-24gb]")
SMALL = """\
name: small
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 1}
stages: [quant]
matrix:
  method: [qlora-nf4, qlora-nf4-dq, qlora-fp4, qlora-fp4-dq]
expectations:
  - {ratio: quant.rmse, numerator: {method: qlora-fp4}, denominator: {method: qlora-nf4}, min: 1.1}
"""


@pytest.mark.parametrize("gib, tier", [(None, "cpu"), (15.7, "cpu"), (23.6, "gpu-24gb"), (44.0, "gpu-24gb"),
                                       (47.5, "gpu-48gb"), (79.2, "gpu-80gb"), (139.8, "gpu-80gb")])
def test_detect_tier(gib, tier):
    assert detect_tier(gib) == tier


def test_auto_tier_selects_and_the_budget_skips_with_its_reason(project):
    (project.path / "suites" / "big.yaml").write_text(BIG)
    (project.path / "suites" / "gpuonly.yaml").write_text(GPU_ONLY)
    result = project.runpytest_subprocess("suites/", "-rs", "--run-id", "tiers", "--no-report")  # --tier auto
    result.assert_outcomes(skipped=2)
    # not this machine's tier: skipped, not run, no record
    result.stdout.fnmatch_lines(["*suite gpuonly runs on tiers gpu-24gb; this run's tier is cpu (auto: no GPU)*"])
    # this tier, but the estimator predicts more than the machine's memory: skipped with a record saying why
    result.stdout.fnmatch_lines(["*estimated peak * GiB exceeds the * GiB budget*"])
    rec = json.loads((project.path / "results" / "tiers" / "big__lora-bf16.json").read_text())
    assert rec["status"] == "skipped" and "exceeds" in rec["message"]
    assert rec["metrics"]["estimate.total_gib"] > 130  # 70B parameters at 2 bytes each, at least
    assert not (project.path / "results" / "tiers" / "gpuonly__lora-bf16.json").exists()


def test_unknown_tier_is_a_usage_error(project):
    (project.path / "suites" / "small.yaml").write_text(SMALL)
    result = project.runpytest_subprocess("suites/", "--tier", "gpu-12gb")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--tier: unknown tier 'gpu-12gb' (expected auto or one of cpu, gpu-24gb*"])


def test_xdist_workers_write_one_run(project):
    (project.path / "suites" / "small.yaml").write_text(SMALL)
    result = project.runpytest_subprocess("suites/", "-n", "2", "--run-id", "xd")
    result.assert_outcomes(passed=5)
    run = project.path / "results" / "xd"
    records = [json.loads(p.read_text()) for p in run.glob("small__*.json")]
    assert len(records) == 4 and {r["run_id"] for r in records} == {"xd"}
    assert (project.path / "reports" / "xd.html").exists()
    assert not [d for d in (project.path / "results").iterdir() if d.name != "xd"]  # no stray run folders


@pytest.mark.parametrize("workerid, count, env, pinned", [
    ("gw0", 4, {}, "0"), ("gw5", 4, {}, "1"), ("gw1", 1, {}, None),
    # within the devices the user listed (issue 23: pinning did nothing with CUDA_VISIBLE_DEVICES set)
    ("gw1", 4, {"CUDA_VISIBLE_DEVICES": "2,3"}, "3"), ("gw2", 4, {"CUDA_VISIBLE_DEVICES": "2,3"}, "2"),
    ("gw1", 4, {"CUDA_VISIBLE_DEVICES": "3"}, None),
])
def test_xdist_workers_are_pinned_round_robin(workerid, count, env, pinned):
    from harness.plugin import pin_worker_gpu

    assert pin_worker_gpu(workerid, count, env) == pinned
    if pinned is not None:
        assert env["CUDA_VISIBLE_DEVICES"] == pinned


def test_auto_compute_dtype_is_what_the_device_computes_natively(monkeypatch):
    from harness.estimate import for_case
    from harness.measure import machine
    from harness.spec import Settings

    auto = Settings(compute_dtype="auto")
    monkeypatch.setattr(machine, "native_bf16", lambda device: False)  # an AVX2 CPU: bf16 is emulated
    assert machine.resolve_compute_dtype(auto, "cpu").compute_dtype == "fp32"
    monkeypatch.setattr(machine, "native_bf16", lambda device: True)
    assert machine.resolve_compute_dtype(auto, "cpu").compute_dtype == "bf16"
    assert machine.resolve_compute_dtype(Settings(compute_dtype="fp16"), "cpu").compute_dtype == "fp16"

    class Case:  # the estimator resolves before it counts bytes
        model = type("M", (), {"source": "synthetic", "preset": "tiny-llama", "num_layers": 2})()
        settings = auto

    assert for_case(Case(), "cpu").weights_gib > 0


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    from harness.measure import machine

    real = machine.Path.read_text
    for flags, want in (("fpu avx2 fma", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        monkeypatch.setattr(machine.Path, "read_text",
                            lambda self, *a, _f=flags, **k: _f if str(self) == "/proc/cpuinfo" else real(self, *a, **k))
        assert machine.native_bf16("cpu") is want
