"""Every metric's unit, direction and default tolerance, declared once (used by compare and report)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

Direction = Literal["lower", "higher", "none"]


@dataclass(frozen=True)
class MetricInfo:
    pattern: str  # fnmatch pattern over the flat metric name, e.g. "*.rmse"
    unit: str
    direction: Direction
    tolerance: float  # default relative tolerance before a change counts as a regression
    label: str


# First match wins: put specific patterns before general ones.
REGISTRY: tuple[MetricInfo, ...] = (
    MetricInfo("*.bits_per_param", "bits", "lower", 0.001, "bits per parameter"),
    MetricInfo("*.cosine", "", "higher", 0.001, "cosine similarity"),
    MetricInfo("*.rmse", "", "lower", 0.02, "RMSE"),
    MetricInfo("*.rel_error", "", "lower", 0.02, "relative Frobenius error"),
    MetricInfo("*.mae", "", "lower", 0.02, "mean absolute error"),
    MetricInfo("*.max_abs_error", "", "lower", 0.05, "max absolute error"),
    MetricInfo("*_ratio", "x", "none", 0.05, "ratio"),
    MetricInfo("*tokens_per_s", "tokens/s", "higher", 0.10, "throughput"),
    MetricInfo("*samples_per_s", "samples/s", "higher", 0.10, "throughput"),
    MetricInfo("*.mfu", "", "higher", 0.10, "model FLOPs utilisation"),
    MetricInfo("*_tflops", "TFLOP/s", "higher", 0.10, "achieved FLOP rate"),
    MetricInfo("*_stderr", "", "none", 1.0, "standard error"),
    MetricInfo("*_gain", "", "higher", 0.05, "gain of the adapter over its untrained base"),
    MetricInfo("*_gap", "", "higher", 0.05, "gap to the lora-bf16 adapter"),
    MetricInfo("*_merge_delta", "", "higher", 0.05, "change when the adapter is merged into its base"),
    MetricInfo("*acc*", "", "higher", 0.05, "accuracy"),
    MetricInfo("*perplexity*", "", "lower", 0.05, "perplexity"),
    MetricInfo("*bits_per_byte", "bits", "lower", 0.05, "bits per byte"),
    MetricInfo("*.loss_first", "", "none", 1.0, "first loss"),
    MetricInfo("*.loss_drop", "", "higher", 0.25, "loss drop"),
    MetricInfo("*loss*", "", "lower", 0.10, "loss"),
    MetricInfo("*_pct", "%", "lower", 0.25, "percent"),
    MetricInfo("*_gib", "GiB", "lower", 0.05, "memory"),
    MetricInfo("*_mib", "MiB", "lower", 0.05, "memory"),
    MetricInfo("*_bytes", "B", "lower", 0.01, "size"),
    MetricInfo("*_ms", "ms", "lower", 0.15, "time"),
    MetricInfo("*_s", "s", "lower", 0.25, "time"),
    MetricInfo("*", "", "none", 0.10, ""),
)


def info(name: str) -> MetricInfo:
    """The registry entry for a flat metric name such as ``train.peak_reserved_gib``."""
    for entry in REGISTRY:
        if fnmatch.fnmatchcase(name, entry.pattern):
            return entry
    raise AssertionError("the catch-all pattern always matches")


def direction(name: str) -> Direction:
    return info(name).direction

