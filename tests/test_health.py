"""Training health: a diverged, collapsed or flat loss curve fails its case with the reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.measure.health import check

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"


def test_a_falling_loss_is_healthy():
    assert check([3.2, 2.9, 2.5, 2.1, 1.8, 1.6, 1.5, 1.4]) is None
    assert check([[1, 3.0], [2, 3.1], [3, 2.4], [4, 2.6], [5, 1.9], [6, 2.0], [7, 1.2], [8, 1.3]]) is None  # noisy


def test_nan_and_infinite_losses_fail_at_their_step():
    assert check([[1, 3.0], [2, math.nan], [3, 2.0]]) == "loss is NaN at step 2"
    assert check([3.0, 2.5, math.inf, 2.0]) == "loss is infinite at step 3"
    assert check([3.0, -math.inf]) == "loss is infinite at step 2"


def test_a_loss_that_collapses_to_zero_fails():
    # lr 1e6 in fp16: the logged loss was 0.0 from step 2 and the run had been recorded passed
    reason = check([[1, 2.58], [2, 0.0], [3, 0.0], [4, 0.0]])
    assert reason is not None and reason.startswith("loss collapsed to 0 at step 2")
    assert check([2.0, 1.0, 0.5, 0.3, 0.2]) is None  # low, but a loss


def test_a_loss_that_does_not_fall_fails():
    assert check([2.0, 2.1, 2.0, 2.05, 2.1, 2.0, 2.02, 2.08]).startswith("loss did not fall")
    assert check([2.0, 5.0, 40.0, 900.0]).startswith("loss did not fall")  # blowing up without overflow
    assert check([2.0, 2.0, 2.0, 2.0]).startswith("loss did not fall")


def test_too_short_a_curve_says_nothing():
    assert check([]) is None
    assert check([2.0]) is None
    assert check([2.0, 2.1, 2.2]) is None  # three noisy steps say nothing about a trend


SUITE = """\
name: hl
tiers: [cpu]
model: {{source: synthetic, preset: tiny-llama, num_layers: 1, pretrain: data/support_pretrain.jsonl, pretrain_steps: 2}}
data: {{train: data/support_train.jsonl}}
stages: [train]
settings: {{seq_len: 32, batch_size: 4, max_steps: 6, warmup_steps: 1, learning_rate: {lr}}}
matrix:
  method: [lora-bf16]
timeout_s: 600
"""


@pytest.mark.slow
def test_a_diverging_run_fails_with_the_reason(pytester, tmp_path_factory, monkeypatch):
    import shutil

    monkeypatch.setenv("QLORA_HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    suites = pytester.path / "suites"
    suites.mkdir()
    shutil.copytree(SUITES / "data", suites / "data")
    (suites / "hl.yaml").write_text(SUITE.format(lr=1e6))
    result = pytester.runpytest_subprocess("suites/", "--run-id", "hl", "--no-report", "-p", "no:randomly")
    result.assert_outcomes(failed=1)
    rec = json.loads((pytester.path / "results" / "hl" / "hl__lora-bf16.json").read_text())
    assert rec["status"] == "failed"
    assert rec["metrics"]["train.healthy"] == 0.0
    assert rec["message"].startswith("training unhealthy: loss"), rec["message"]
    assert check(rec["series"]["train.loss"]) in rec["message"]
