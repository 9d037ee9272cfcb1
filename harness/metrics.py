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
    MetricInfo("*.noise.*", "", "none", 1.0, "noise guard figure"),
    MetricInfo("*.world_size", "ranks", "none", 0.0, "ranks of the job"),
    MetricInfo("*.fsdp_modules", "modules", "none", 0.0, "modules FSDP2 shards (read from the wrapped model)"),
    MetricInfo("*.dtensor_param_share", "", "none", 0.0, "share of parameters held as DTensors (FSDP2 shards)"),
    MetricInfo("*.timing_clean", "", "none", 1.0, "timing clean (1) or noisy (0)"),
    MetricInfo("*.stalled_steps", "steps", "none", 1.0, "steps over 3x the median step"),
    MetricInfo("*.step_cv", "", "none", 1.0, "step-time coefficient of variation"),
    MetricInfo("*tokens_per_s_mean", "tokens/s", "none", 0.10, "throughput, sum over sum (stalls included)"),
    MetricInfo("*.mfu_probe", "", "higher", 0.10, "MFU against the matmul probe's peak"),
    MetricInfo("quant.transform.*", "", "none", 1.0, "change the weight transform made to the weights"),
    MetricInfo("quant.weights.*", "levels", "none", 1.0, "distinct values per block of 32 weights (Q4_1: 16)"),
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
    MetricInfo("*.top1_agreement", "", "higher", 0.01, "top-1 agreement with the unmerged adapter"),
    MetricInfo("*.token_agreement", "", "higher", 0.02, "greedy tokens equal to the unmerged adapter's"),
    MetricInfo("*.canary_reproduced", "", "higher", 0.0, "canary answers reproduced word for word"),
    MetricInfo("*.identical_outputs", "", "higher", 0.05, "greedy outputs identical to the unmerged adapter's"),
    MetricInfo("*.kl_mean", "nats", "lower", 0.5, "KL divergence from the unmerged adapter"),
    MetricInfo("*.kl_max", "nats", "lower", 0.5, "KL divergence from the unmerged adapter"),
    MetricInfo("*.max_abs_logprob_diff", "nats", "lower", 0.5, "largest log-prob change"),
    MetricInfo("*acc*", "", "higher", 0.05, "accuracy"),
    MetricInfo("*perplexity*", "", "lower", 0.05, "perplexity"),
    MetricInfo("*bits_per_byte", "bits", "lower", 0.05, "bits per byte"),
    MetricInfo("*.loss_first", "", "none", 1.0, "first loss"),
    MetricInfo("*.eval_loss_first", "nats", "none", 1.0, "held-out loss at the first eval in training"),
    MetricInfo("*.eval_loss_last", "nats", "lower", 0.10, "held-out loss at the last eval in training"),
    MetricInfo("*.uniform_loss", "nats", "none", 1.0, "loss of a uniform predictor, ln(vocab)"),
    MetricInfo("*.adapter_norm_*", "", "none", 1.0, "Frobenius norm of the adapter's weights"),
    MetricInfo("*.loss_drop", "", "higher", 0.25, "loss drop"),
    MetricInfo("*loss*", "", "lower", 0.10, "loss"),
    MetricInfo("*_pct", "%", "lower", 0.25, "percent"),
    MetricInfo("*_gib", "GiB", "lower", 0.05, "memory"),
    MetricInfo("*_gb", "GB", "lower", 0.05, "memory (GB = 1e9 bytes, as hardware claims are stated)"),
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



# -- names other modules refer to ---------------------------------------------------------------------------
# The report, the headline and the README tables name metrics through these, so that a metric is renamed in
# one place; a test refuses metric-name literals in harness/report/ and checks each of these is emitted.
# training: memory (units in the name), throughput, loss
PEAK_ALLOCATED = "train.peak_allocated_gib"  # torch allocator
PEAK_RESERVED = "train.peak_reserved_gib"
NVML_PEAK = "train.nvml_peak_gib"  # this process on the GPU, as NVML sees it
PEAK_RSS = "train.peak_rss_gib"  # the whole process (interpreter and libraries included)
TENSOR_PEAK = "train.tensor_peak_gib"  # live tensors on the CPU (what the estimator predicts)
MANAGED = "train.managed_gib"
TOKENS_PER_S = "train.tokens_per_s"  # real tokens over the median step
MFU = "train.mfu"
STEP_MEDIAN_MS = "train.step_median_ms"
WEIGHT_BYTES = "train.weight_bytes"
LOSS_LAST = "train.loss_last"
LOSS_DROP = "train.loss_drop"
LOSS_SERIES = "train.loss"  # a series, not a metric
TIMING_TABLE = "train.timing"  # a table: the noise guard's verdict
GEN_TIMING_TABLE = "gen.timing"  # a table: the noise guard's verdict per generated form
GEN_ANSWERS_TABLE = "gen.answers"  # a table: every form's (and the base's) greedy answer to each eval.answers prompt
# quantization
RMSE = "quant.rmse"
INT4_RMSE = "quant.int4_ref.rmse"
INT4_OVER_METHOD = "quant.int4_over_method_rmse_ratio"
REL_ERROR = "quant.rel_error"
COSINE = "quant.cosine"
BITS_PER_PARAM = "quant.bits_per_param"
LAYERS_TABLE = "quant.layers"  # a table: one row a quantized layer
# the estimator's prediction, by component and in total
EST_WEIGHTS = "estimate.weights_gib"
EST_LORA = "estimate.lora_gib"
EST_GRADIENTS = "estimate.gradients_gib"
EST_OPTIMIZER = "estimate.optimizer_gib"
EST_ACTIVATIONS = "estimate.activations_gib"
EST_WORKSPACE = "estimate.workspace_gib"
EST_CONTEXT = "estimate.context_gib"
EST_TOTAL = "estimate.total_gib"
EST_ALLOCATOR = "estimate.allocator_gib"
EST_AT_PROFILED_STEP = "estimate.at_profiled_step_gib"
# cases over ranks: one rank's figure is f"{RANK_PREFIX}{r}.{name}", the max and sum over ranks RANKS_MAX/SUM + name
RANK_PREFIX, RANKS_MAX, RANKS_SUM = "train.rank", "train.ranks_max.", "train.ranks_sum."
WORLD_SIZE = "train.world_size"
STRATEGY_TABLE = "train.strategy"  # a table: the strategy set and the one read back from the wrapped model
RANKS_TABLE = "train.ranks"  # a table: one row a rank


def eval_metric(task: str, metric: str, variant: str = "adapter") -> str:
    """``eval.<task>.<metric>`` of the adapter, or of another variant: ``base`` -> ``eval.<task>.base_<metric>``."""
    return f"eval.{task}.{metric}" if variant == "adapter" else f"eval.{task}.{variant}_{metric}"


def merged_variant(strategy: str) -> str:
    """The score variant of a merge strategy: ``adapter`` (unmerged), ``merged`` (PEFT's own merge, the name it
    always had), else ``merged_<strategy>``: ``eval_metric(task, metric, merged_variant(s))``."""
    return {"none": "adapter", "requantize": "merged"}.get(strategy, f"merged_{strategy}")


def merge_metric(strategy: str, metric: str = "") -> str:
    """``eval.merge.<strategy>.<metric>``: a merged form's fidelity, size and timings (prefix when no metric)."""
    return f"eval.merge.{strategy}.{metric}"


def gen_metric(form: str, batch: int, metric: str) -> str:
    """``gen.<form>.bs<batch>.<metric>``: greedy generation of the unmerged adapter (``none``) or a merged form."""
    return f"gen.{form}.bs{batch}.{metric}"


EVAL_TASKS_TABLE = "eval.tasks"  # a table: each eval task's main metric, and which is the suite's primary quality metric

# the shipped eval's metrics that headline and README tables quote
MC_ACC = eval_metric("support_mc", "acc")  # multiple choice in wordings no training row uses
MC_BASE_ACC = eval_metric("support_mc", "acc", "base")  # the same, of the untrained base
HELDOUT_BPB = eval_metric("support_ppl", "bits_per_byte")  # held-out text: the primary quality metric
RECALL_ACC = eval_metric("support_recall", "acc")  # the trained wording


# -- names the stages emit ----------------------------------------------------------------------------------
# fnmatch patterns of every metric a stage writes, so that an expectation on a name no stage emits is refused
# when its suite is collected (instead of failing "not measured" after the run). A stage that adds a metric
# adds its name here. eval.<task>.<metric> names come from the lm-eval task and are checked by task only.
_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
_ERRORS = ("rmse", "mae", "max_abs_error", "rel_error", "cosine")
EMITTED: dict[str, tuple[str, ...]] = {
    "quant": (
        *(f"quant.{e}" for e in _ERRORS),
        *(f"quant.{k}.{e}" for k in _KINDS for e in _ERRORS),
        *(f"quant.{ref}.{e}" for ref in ("int4_ref", "bf16_floor") for e in _ERRORS),
        "quant.int4_over_method_rmse_ratio", "quant.int4_ref.bits_per_param", "quant.bits_per_param",
        "quant.serialized.bits_per_param", "quant.packed_bytes", "quant.absmax_bytes", "quant.code_bytes",
        "quant.nested_absmax_bytes", "quant.nested_bytes", "quant.linear_params", "quant.unquantized_params",
        "quant.linear_bytes", "quant.model_bytes", "quant.model_16bit_bytes", "quant.quantize_s",
        "quant.dequantize_s", "quant.transform.rmse", "quant.transform.rel_error",
        "quant.weights.block32_levels_mean", "quant.weights.block32_levels_max",
    ),
    "train": (
        "train.weight_bytes", "train.lora_bytes", "train.memory_footprint_bytes", "train.adapter_bytes",
        "train.load_s", "train.wall_s", "train.trainable_params",
        "train.load_peak_rss_gib", "train.load_nvml_peak_gib", "train.load_nvml_device_peak_gib",
        "train.load_peak_allocated_gib", "train.load_peak_reserved_gib",
        "train.peak_rss_gib", "train.nvml_peak_gib", "train.nvml_device_peak_gib", "train.peak_allocated_gib",
        "train.peak_reserved_gib", "train.rss_start_gib", "train.peak_rss_over_start_gib", "train.managed_gib",
        "train.tokens_per_s", "train.total_tokens_per_s", "train.samples_per_s", "train.step_median_ms",
        "train.step_p90_ms", "train.timed_steps", "train.padding_pct", "train.loss_first", "train.loss_last",
        "train.loss_drop", "train.flops_per_token", "train.achieved_tflops", "train.peak_measured_tflops",
        "train.mfu", "train.peak_datasheet_tflops", "train.mfu_datasheet",
        # memory per device and in GB (claims), throughput statistics, the noise guard, estimate ratios
        "train.*_gib", "train.*_gb", "train.gpu*", "train.*tokens_per_s*", "train.step_*", "train.stalled_steps",
        "train.timing_clean", "train.noise.*", "train.instrumentation_*",
        "train.*_ratio", "train.mfu*", "train.*_tflops", "train.healthy", "train.uniform_loss",
        "train.adapter_norm_start", "train.adapter_norm_end",
        # cases over ranks (harness/stages/train_distributed.py): per rank, max and sum over ranks, the wrapping
        "train.world_size", "train.fsdp_modules", "train.dtensor_param_share", "train.rank*", "train.ranks_*",
        "train.eval_loss_first", "train.eval_loss_last",  # eval on the held-out split during training
    ),
    "estimate": ("estimate.*_gib", "estimate.bits_per_param", "estimate.trainable_params",
                 "estimate.tokens_per_batch", "estimate.profiled_step_tokens"),
    # scoring times of every variant (merged forms included) and merge fidelity
    "eval": ("eval.base_s", "eval.adapter_s", "eval.merge_s", "eval.merged_s", "eval.merged_*_s", "eval.merge.*"),
    # generate: gen.<form>.{build_s, bs<b>.ttft_ms|prefill_tokens_per_s|decode_tokens_per_s|tpot_ms|total_ms,
    # peak memory, identical_outputs, token_agreement}, the form being none or a merge strategy
    "gen": ("gen.*.build_s", "gen.*.bs*_ms", "gen.*.bs*_tokens_per_s", "gen.*_gib", "gen.*.identical_outputs",
            "gen.*.token_agreement", "gen.*.canary_reproduced", "gen.prompt_tokens", "gen.new_tokens", "gen.*.timing_clean", "gen.*.noise.*"),
    "env": ("env.*",),
}


def unknown_metric(name: str, stages: tuple[str, ...] | list[str], tasks: tuple[str, ...] | list[str] = ()) -> str | None:
    """Why no stage of a suite (with these stages and eval tasks) emits ``name``; None when one does."""
    prefix = name.split(".", 1)[0]
    if prefix not in EMITTED:
        return f"unknown metric {name!r}: names start with one of {', '.join(p + '.' for p in EMITTED)}"
    stage = {"gen": "generate"}.get(prefix, prefix)
    if stage in ("quant", "train", "eval", "generate") and stage not in stages:
        return f"metric {name!r} needs stage {stage!r}, which this suite does not run"
    if any(fnmatch.fnmatchcase(name, p) for p in EMITTED[prefix]):
        return None
    if prefix == "eval":
        task = name.split(".")[1] if name.count(".") >= 2 else ""
        if task in tasks:
            return None
        return f"metric {name!r}: expected eval.<task>.<metric> with a task of this suite ({', '.join(tasks)})"
    return f"unknown metric {name!r}: stage {prefix!r} emits no such name (known names: harness/metrics.py EMITTED)"
