"""Training health from a loss curve: a run whose loss is not finite, collapses to zero, or does not fall failed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# A causal LM's mean token cross-entropy on real text does not reach this in a short fine-tune; a loss this low is
# what fp16 overflow, a masked-out batch or a diverged optimizer report (lr 1e6 in fp16 logged 0.0 from step 2).
COLLAPSED_LOSS = 1e-4
WINDOW = 5  # steps averaged at each end of the curve (fewer on a short curve, never fewer than 2)
MIN_STEPS = 4  # a shorter curve cannot say whether the loss falls


def check(losses: Sequence[float] | Sequence[Sequence[float]], collapsed: float = COLLAPSED_LOSS) -> str | None:
    """The reason a training run is unhealthy, or None when it is healthy (or too short to tell).

    ``losses`` are the logged losses in step order, or ``[step, loss]`` pairs as records keep them.
    """
    pairs = [(float(x[0]), float(x[1])) if isinstance(x, Sequence) else (float(i + 1), float(x))
             for i, x in enumerate(losses)]
    for step, loss in pairs:
        if math.isnan(loss):
            return f"loss is NaN at step {step:g}"
        if math.isinf(loss):
            return f"loss is infinite at step {step:g}"
    for step, loss in pairs:
        if loss <= collapsed:
            return f"loss collapsed to {loss:.3g} at step {step:g} (at most {collapsed:g}: a diverged run)"
    if len(pairs) < MIN_STEPS:
        return None
    n = max(2, min(WINDOW, len(pairs) // 4))
    first = statistics.fmean(v for _, v in pairs[:n])
    last = statistics.fmean(v for _, v in pairs[-n:])
    if not last < first:
        return f"loss did not fall: mean of the first {n} steps {first:.4g}, of the last {n} {last:.4g}"
    return None
