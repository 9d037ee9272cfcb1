"""Shared test fixtures: a pytester project with a suites/ folder, and fake run folders of hand-made records."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.records import Record, write_json_atomic, write_record

METHODS = ("lora-bf16", "qlora-nf4", "qlora-nf4-dq", "qlora-fp4", "qlora-fp4-dq")
BITS = {"lora-bf16": 16.0, "qlora-nf4": 4.5, "qlora-nf4-dq": 4.127, "qlora-fp4": 4.5, "qlora-fp4-dq": 4.127}
RMSE = {"qlora-nf4": 0.0921, "qlora-nf4-dq": 0.0922, "qlora-fp4": 0.1221, "qlora-fp4-dq": 0.1223}
LAYERS = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]


def _env(gpu: str | None) -> dict:
    return {
        "gpu": {"name": gpu, "count": 1, "memory_gib": 79.2 if "H100" in gpu else 23.6} if gpu else None,
        "cpu": "AMD EPYC 7R13 (2 cores)",
        "python": "3.11.7",
        "versions": {"torch": "2.13.0", "bitsandbytes": "0.50.2", "peft": "0.17.1", "transformers": "4.57.0"},
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
    }


def _smoke(method: str, i: int, scale: float) -> dict:
    """A quant + train + eval record of the ``smoke`` suite; fp4 fails an expectation, fp4-dq runs out of memory."""
    status, message = "passed", ""
    m: dict[str, float] = {"quant.bits_per_param": BITS[method]}
    if method in RMSE:
        m |= {"quant.rmse": RMSE[method], "quant.int4_ref.rmse": 0.1312, "quant.cosine": 0.995 - RMSE[method] / 10}
        m |= {f"quant.{p}.rmse": RMSE[method] * (1 + 0.01 * j) for j, p in enumerate("qkvo")}  # per projection
        m |= {"quant.packed_bytes": 4.2e6, "quant.absmax_bytes": 2.6e5}
    weights = 0.9 if method == "lora-bf16" else 0.9 * BITS[method] / 16
    parts = {
        "estimate.weights_gib": weights, "estimate.lora_gib": 0.02, "estimate.gradients_gib": 0.02,
        "estimate.optimizer_gib": 0.08, "estimate.activations_gib": 0.6, "estimate.workspace_gib": 0.05,
        "estimate.context_gib": 0.5,
    }
    m |= parts | {"estimate.total_gib": sum(parts.values()),
                  "estimate.allocator_gib": sum(parts.values()) - parts["estimate.context_gib"]}
    if method == "qlora-fp4":
        status, message = "failed", "expectation rmse-max: quant.rmse = 0.122 is above max 0.11"
    series: dict = {}
    if method == "qlora-fp4-dq":
        status, message = "oom", "CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 79.2 GiB total)"
    else:
        peak = (weights + 1.3) * scale
        m |= {
            "train.peak_allocated_gib": peak * 0.92, "train.peak_reserved_gib": peak, "train.peak_rss_gib": 3.1,
            "train.tokens_per_s": (5200 if method == "lora-bf16" else 4100 - 300 * i) / scale,
            "train.mfu": 0.31 / scale - 0.02 * i, "train.loss_first": 6.1 + 0.01 * i, "train.loss_last": 1.9 + 0.05 * i,
            "train.step_median_ms": 120.0 * scale + 10 * i,
            "eval.support_mc.acc": 0.78 - 0.02 * i, "eval.support_mc.acc_stderr": 0.021,
            "eval.support_mc.base_acc": 0.31, "eval.support_mc.acc_gain": 0.47 - 0.02 * i,
            "eval.support_mc.acc_gap": -0.02 * i, "eval.recall.acc": 0.64 - 0.03 * i,
        }
        series["train.loss"] = [[s, 4.2 * math.exp(-s / 12) + 1.9 + 0.05 * i] for s in range(0, 31, 2)]
    return dict(status=status, message=message, metrics=m, series=series)


def _fidelity(method: str, i: int) -> dict:
    """A quant-only record with a per-layer table; lora-bf16 is skipped, fp4-dq errors."""
    if method == "lora-bf16":
        return dict(status="skipped", message="no quantization for a 16-bit base")
    if method == "qlora-fp4-dq":
        return dict(status="error", message="RuntimeError: worker exited with code -9")
    rows = [
        {"layer": n, "type": n.rsplit(".", 1)[1], "name": n, "rmse": RMSE[method] * (1 + 0.03 * j),
         "bits_per_param": BITS[method]}
        for j, n in enumerate(LAYERS)
    ]
    metrics = {"quant.rmse": RMSE[method], "quant.bits_per_param": BITS[method], "quant.layers.0.rmse": RMSE[method]}
    return dict(status="passed", metrics=metrics, tables={"quant.layers": rows})


def make_run(root: Path, run_id: str, *, gpu: str | None = "NVIDIA H100 80GB HBM3", scale: float = 1.0) -> Path:
    """Write ``root/<run_id>/`` with run.json and one record per case of two suites."""
    run_dir = Path(root) / run_id
    env = _env(gpu)
    day = run_id[:8]
    stamp = f"{day[:4]}-{day[4:6]}-{day[6:]}T12:00:00+00:00"
    write_json_atomic(run_dir / "run.json", {"run_id": run_id, "started_at": stamp, "env": env,
                                             "suites": ["smoke", "quant-fidelity"]})
    n = 0
    for suite, make in (("smoke", lambda m, i: _smoke(m, i, scale)), ("quant-fidelity", _fidelity)):
        for i, method in enumerate(METHODS):
            n += 1
            fields = make(method, i)
            write_record(run_dir, Record(
                run_id=run_id, suite=suite, case_id=f"{suite}[{method}-seq128]", method=method,
                params={"method": method, "seq_len": 128}, model={"source": "synthetic", "preset": "tiny-llama",
                                                                  "parameters": 12_345_678},
                env=env, started_at=f"{stamp[:17]}{n:02d}+00:00", finished_at=f"{stamp[:17]}{n:02d}+00:00", **fields,
            ))
    return run_dir


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    """A fake run folder under ``tmp_path/results``."""
    return make_run(tmp_path / "results", "20261122T120000Z-gpu01")


@pytest.fixture
def project(request, tmp_path_factory, monkeypatch):
    """A pytester folder with an empty suites/, sharing one synthetic-model cache across the session's tests."""
    pytester = request.getfixturevalue("pytester")
    monkeypatch.setenv("QLORA_HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    (pytester.path / "suites").mkdir()
    return pytester
