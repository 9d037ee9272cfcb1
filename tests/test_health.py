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


def test_a_loss_that_rises_to_the_uniform_level_fails():
    """lr 1e6 on the tiny model: the pretrained base's first loss, then exactly ln(2048) = 7.6246 at every step
    (a uniform predictor); noise could make such a curve 'fall' by a hair and pass the trend rule."""
    plateau = [[1, 5.86]] + [[s, math.log(2048) - 1e-4 * (s % 3)] for s in range(2, 13)]
    reason = check(plateau, vocab_size=2048)
    assert reason is not None and reason.startswith("loss rose to the uniform level ln(2048) = 7.625")
    assert check([[1, 7.7], [2, 7.6], [3, 7.62], [4, 7.5]], vocab_size=2048) is None  # a random base starts there
    assert check([5.9, 5.7, 5.5, 5.2, 5.0], vocab_size=2048) is None  # well below: learning


def test_an_exploding_adapter_fails():
    falling = [3.0, 2.5, 2.0, 1.5]
    assert check(falling, adapter_norms=(60.0, 3.8e6)).startswith("adapter norm exploded from 60 to 3.8e+06")
    assert check(falling, adapter_norms=(60.0, math.inf)).startswith("adapter norm exploded")
    assert check(falling, adapter_norms=(60.0, 75.0)) is None


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
    assert rec["message"].startswith("training unhealthy: "), rec["message"]
    # the known value, measured apart from the harness's arithmetic: a uniform predictor's cross-entropy is
    # ln(vocab), with the vocabulary read from the base's own config; the trainer's logged loss sits on it
    from harness.presets import PRESETS

    vocab = rec["model"]["params"]["embed"] // PRESETS["tiny-llama"].hidden_size  # embedding rows: 2048 here
    losses = [v for _, v in rec["series"]["train.loss"]]
    assert losses[-1] == pytest.approx(math.log(vocab), abs=1e-3)
    assert rec["metrics"]["train.uniform_loss"] == pytest.approx(math.log(vocab))
    assert rec["metrics"]["train.adapter_norm_end"] > 100 * rec["metrics"]["train.adapter_norm_start"]
    assert ("adapter norm exploded" in rec["message"]) or ("uniform level" in rec["message"])
