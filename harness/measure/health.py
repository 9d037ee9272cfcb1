"""Training health: a run whose loss is not finite, collapses to zero, ends at the uniform level after starting
below it, does not fall, or whose adapter's norm explodes, failed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# A causal LM's mean token cross-entropy on real text does not reach this in a short fine-tune; a loss this low is
# what fp16 overflow, a masked-out batch or a diverged optimizer report (lr 1e6 in fp16 logged 0.0 from step 2).
COLLAPSED_LOSS = 1e-4
WINDOW = 5  # steps averaged at each end of the curve (fewer on a short curve, never fewer than 2)
MIN_STEPS = 4  # a shorter curve cannot say whether the loss falls
# The loss of a predictor that spreads its probability evenly over the vocabulary is ln(vocab); a run within this
# share of it learned nothing (lr 1e6 sat at exactly ln(2048) = 7.6246 from step 2 on the tiny model)
UNIFORM_SHARE = 0.01
# How much the adapter's Frobenius norm may grow over training: LoRA starts from B = 0 and a random A, and a short
# fine-tune moves it little (about 1.0-1.5x here); lr 1e6 took it from about 60 to 3.8e6
EXPLODED_GROWTH = 100.0


def check(losses: Sequence[float] | Sequence[Sequence[float]], collapsed: float = COLLAPSED_LOSS, *,
          vocab_size: int | None = None, adapter_norms: tuple[float, float] | None = None) -> str | None:
    """The reason a training run is unhealthy, or None when it is healthy (or too short to tell).

    ``losses`` are the logged losses in step order, or ``[step, loss]`` pairs as records keep them.
    ``vocab_size``: a curve that started below the uniform level ln(vocab) and ends at it (or above) unlearned
    everything; a base that is itself uniform (random synthetic weights, the memory suites) starts there and is
    judged by the other rules. ``adapter_norms``: the adapter's norm (start, end) of training.
    """
    if adapter_norms is not None:
        start, end = adapter_norms
        if not math.isfinite(end) or (start > 0 and end / start > EXPLODED_GROWTH):
            return (f"adapter norm exploded from {start:.3g} to {end:.3g} (more than {EXPLODED_GROWTH:g}x: the learning "
                    "rate is too high for this run)")
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
    if vocab_size and vocab_size > 1:
        uniform = math.log(vocab_size)
        level = uniform * (1 - UNIFORM_SHARE)
        if pairs[0][1] < level and last >= level:
            return (f"loss rose to the uniform level ln({vocab_size}) = {uniform:.4g} (mean of the last {n} steps "
                    f"{last:.4g}, first step {pairs[0][1]:.4g}): the model predicts no better than chance")
    if not last < first:
        return f"loss did not fall: mean of the first {n} steps {first:.4g}, of the last {n} {last:.4g}"
    return None
