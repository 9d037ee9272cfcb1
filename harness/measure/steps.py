"""Throughput from robust step statistics: medians, dispersion and stalled steps instead of a mean.

On a shared host a few steps stall for seconds while the rest run at full speed; total tokens over total
time then describes the stalls, not the training loop. The headline here is the **median over steps of
each step's real tokens divided by its own time**: every step is one rate sample, so a step that held more
tokens (padding to the longest row varies the real count from step to step) is not judged by another
step's time, and a stalled step is one outlier among many instead of a weight on the sum. The sum-based
figure stays in the record as ``*_mean`` so the two can be compared: a large gap between them is itself a
sign of stalls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STALL_FACTOR = 3.0  # a step longer than this many median steps counts as stalled


def step_stats(step_s: Sequence[float], real_tokens: Sequence[float], total_tokens: Sequence[float] | None = None,
               samples: Sequence[float] | None = None, prefix: str = "train.") -> dict[str, float]:
    """Throughput and dispersion of timed steps (seconds, real tokens per step): flat record metrics.

    Keys (with ``prefix``): ``tokens_per_s`` (median of per-step rates, the headline), ``tokens_per_s_mean``
    (sum over sum), ``total_tokens_per_s`` and ``samples_per_s`` (medians likewise), ``step_p10_ms``,
    ``step_median_ms``, ``step_p90_ms``, ``step_cv`` (standard deviation over mean of step times),
    ``stalled_steps`` (steps over ``STALL_FACTOR`` x the median), ``timed_steps`` and ``padding_pct``.
    """
    t = np.asarray(step_s, dtype=float)
    real = np.asarray(real_tokens, dtype=float)
    if t.size == 0:
        return {}
    if real.shape != t.shape:
        raise ValueError(f"{t.size} step times but {real.size} token counts")
    if np.any(t <= 0) or not np.all(np.isfinite(t)):
        raise ValueError("step times must be positive and finite")
    p10, p50, p90 = np.percentile(t, [10, 50, 90])
    out = {
        "tokens_per_s": float(np.median(real / t)),
        "tokens_per_s_mean": float(real.sum() / t.sum()),
        "step_p10_ms": float(p10 * 1e3),
        "step_median_ms": float(p50 * 1e3),
        "step_p90_ms": float(p90 * 1e3),
        "step_cv": float(t.std() / t.mean()),
        "stalled_steps": float(np.sum(t > STALL_FACTOR * p50)),
        "timed_steps": float(t.size),
    }
    if total_tokens is not None:
        total = np.asarray(total_tokens, dtype=float)
        out["total_tokens_per_s"] = float(np.median(total / t))
        out["padding_pct"] = float(100.0 * (1 - real.sum() / total.sum())) if total.sum() else 0.0
    if samples is not None:
        out["samples_per_s"] = float(np.median(np.asarray(samples, dtype=float) / t))
    return {f"{prefix}{k}": v for k, v in out.items()}
