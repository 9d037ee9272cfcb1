"""The estimator against an independent measurement: the CPU tensor-level peak of a real training step.

Each method's train case (suites/train.yaml, random weights instead of the pretrained base: memory does not
depend on the weights' values) runs through the train stage; the stage profiles one warm-up step's
allocations (torch's profiler) on top of the bytes live when it starts, and the estimate is computed with
the tokens that step held and the adapters' dtype the trainer held.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora-bf16", "qlora-nf4", "qlora-nf4-dq", "qlora-fp4", "qlora-fp4-dq")


def train_case(method: str, steps: int = 2, warmup: int = 1):
    from harness.matrix import expand
    from harness.spec import load_suite

    path = ROOT / "suites" / "train.yaml"
    case = next(c for c in expand(load_suite(path), path) if c.method == method)
    model = case.model.model_copy(update={"pretrain": None, "pretrain_steps": 0})
    settings = case.settings.model_copy(update={"max_steps": steps, "warmup_steps": warmup})
    return case.model_copy(update={"model": model, "settings": settings})


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_estimate_within_15_percent_of_the_cpu_tensor_peak(method, monkeypatch, tmp_path):
    from harness.worker import execute

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run_dir = tmp_path  # pytest's own temporary folder, pruned by pytest: nothing left in /tmp
    rec = execute(train_case(method), "t", run_dir, run_dir / "work")
    assert rec.status == "passed", rec.message
    m = rec.metrics
    # the tokens the profiled step held: 8 rows padded to the longest, far fewer than batch x seq_len = 512
    assert 8 <= m["estimate.profiled_step_tokens"] < 512
    ratio = m["train.estimate_over_tensor_peak_ratio"]
    assert 0.85 <= ratio <= 1.15, (
        f"{method}: estimate {m['estimate.at_profiled_step_gib'] * 1024:.2f} MiB vs measured "
        f"{m['train.tensor_peak_gib'] * 1024:.2f} MiB ({rec.tables.get('train.tensor_peak_by_op')})")
