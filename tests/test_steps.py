"""Step statistics on synthetic step-time series with known answers, stalls injected."""

from __future__ import annotations

import pytest

from harness.measure.steps import step_stats


def test_stalls_do_not_move_the_headline_but_drag_the_mean():
    # 35 steps of 50 ms holding 150 real tokens (3,000 tokens/s each), then 3 stalls of 3.4 s, as seen on a
    # busy host: sum-based throughput = 38 * 150 / (35 * 0.05 + 3 * 3.4) = 5,700 / 11.95 = 476.99 tokens/s.
    times = [0.05] * 35 + [3.4] * 3
    tokens = [150] * 38
    m = step_stats(times, tokens)
    assert m["train.tokens_per_s"] == pytest.approx(3000.0)
    assert m["train.tokens_per_s_mean"] == pytest.approx(5700 / 11.95)
    assert m["train.stalled_steps"] == 3
    assert m["train.step_median_ms"] == pytest.approx(50.0)
    assert m["train.timed_steps"] == 38


def test_headline_uses_each_steps_own_tokens():
    # steps hold different real-token counts (padding to the longest row); each runs at 2,000 tokens/s
    times = [0.068, 0.084, 0.076, 0.072, 0.080]
    tokens = [136, 168, 152, 144, 160]
    m = step_stats(times, tokens, total_tokens=[512] * 5, samples=[8] * 5)
    assert m["train.tokens_per_s"] == pytest.approx(2000.0)
    # median per-step token count over median step time would say 152 / 0.076 = 2000 too; the total rate
    # is the median of 512 / t: 512 / 0.076
    assert m["train.total_tokens_per_s"] == pytest.approx(512 / 0.076)
    assert m["train.samples_per_s"] == pytest.approx(8 / 0.076)
    assert m["train.padding_pct"] == pytest.approx(100 * (1 - 760 / 2560))
    assert m["train.stalled_steps"] == 0


def test_percentiles_and_cv_by_hand():
    # 1..10 ms: numpy's linear percentiles p10 = 1.9, p50 = 5.5, p90 = 9.1 ms
    times = [i / 1000 for i in range(1, 11)]
    m = step_stats(times, [10] * 10)
    assert m["train.step_p10_ms"] == pytest.approx(1.9)
    assert m["train.step_median_ms"] == pytest.approx(5.5)
    assert m["train.step_p90_ms"] == pytest.approx(9.1)
    # population standard deviation of 1..10 is sqrt(8.25) = 2.8723; mean 5.5
    assert m["train.step_cv"] == pytest.approx(8.25**0.5 / 5.5)
    # a step of 3 x median is not stalled, one just over is
    assert step_stats([1, 1, 1, 3.0], [1] * 4)["train.stalled_steps"] == 0
    assert step_stats([1, 1, 1, 3.01], [1] * 4)["train.stalled_steps"] == 1


def test_bad_input():
    assert step_stats([], []) == {}
    with pytest.raises(ValueError, match="token counts"):
        step_stats([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="positive"):
        step_stats([0.0], [1])
