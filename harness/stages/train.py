"""The train stage: the QLoRA recipe with trl's SFTTrainer for a fixed step budget, measured honestly."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from harness import methods, models, precision
from harness.measure import health, memory, noise, steps, tensors
from harness.stages import (  # noqa: F401 - lora_config and load_for_training are shared with the distributed loop
    PROJECTION_NAMES,
    Context,
    Inputs,
    StageOutput,
    TrainedAdapter,
    free,
    load_for_training,
    lora_config,
    sync,
)


class TokenCounter:
    """Wraps the trainer's collator to count real (non-padding) and total tokens of every batch."""

    def __init__(self, collator):
        self.collator = collator
        # (real tokens, total tokens, samples, sum over rows of the squared real length)
        self.batches: list[tuple[int, int, int, int]] = []
        self.own_s = 0.0  # seconds spent counting (the instrumentation's cost, not the collator's)

    def __call__(self, features):
        batch = self.collator(features)
        t = time.perf_counter()
        self.batches.append(count_tokens(batch))
        self.own_s += time.perf_counter() - t
        return batch


def count_tokens(batch) -> tuple[int, int, int, int]:
    """(real tokens, total tokens, samples, sum of squared document lengths) of one collated batch.

    Padding-free packing (trl's ``padding_free``) gives one row with ``position_ids`` and no attention mask:
    each document starts where its position is 0, and attention runs within a document, so the squared
    lengths are summed per document, not over the row. Otherwise a row is one document of its real length."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    pos = batch.get("position_ids")
    if mask is None and pos is not None:
        docs = []
        for row in pos.reshape(ids.shape[0], -1):
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            docs += [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
        return sum(docs), ids.numel(), len(docs), sum(d * d for d in docs)
    if mask is None:
        mask = batch.get("labels", ids) != -100
    lengths = mask.reshape(ids.shape[0], -1).sum(dim=1)
    return int(lengths.sum()), ids.numel(), ids.shape[0], int((lengths**2).sum())


def _callback(ctx: Context, counter: TokenCounter, sampler: memory.Sampler, warmup: int):
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        """Times each optimizer step (device synchronized) and keeps the loss curve."""

        def __init__(self):
            self.step_s: list[float] = []
            self.step_tokens: list[tuple[int, ...]] = []  # per timed step: TokenCounter's sums
            self.loss: list[list[float]] = []
            self.eval_loss: list[list[float]] = []
            self.t0 = 0.0
            self.seen = 0
            self.managed = 0
            self.measured = None
            self.dtypes: dict[str, str] = {}
            self.guard = None
            # the CPU's tensor-level peak, taken on the last warm-up step (untimed): bytes, that step's
            # largest micro-batch in tokens (padded), and the adapters' dtype as the trainer holds them
            self.tensor_peak: tensors.TensorPeak | None = None
            self.profiled_tokens = 0
            self.adapter_dtype: str | None = None
            self.vocab_size: int | None = None
            self.max_batch_tokens = 0  # the largest micro-batch of the timed steps, padding included
            # what the instrumentation itself costs in the timed phase (from the first timed step to the end):
            # seconds of this callback's and the token counter's code, and the sampler's and guard's thread CPU
            self.phase_t0: float | None = None
            self.phase_wall_s = 0.0
            self.inline_s = 0.0
            self.counter_s0 = 0.0
            self.sampler_cpu_s0 = 0.0
            self.threads_cpu_s = 0.0
            self.adapter_norms: list[float] = []  # the adapter's Frobenius norm at the start and end of training

        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                self.adapter_norms = [adapter_norm(model)]

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            entered = time.perf_counter()
            if self.adapter_dtype is None and model is not None:
                self.adapter_dtype = _adapter_dtype(model)
                self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
            if ctx.device == "cpu" and state.global_step == max(warmup - 1, 0) and model is not None:
                self.tensor_peak = tensors.TensorPeak()
                self.tensor_peak.start(model, optimizer)
            if state.global_step == warmup:  # the measured phase starts after the warm-up steps
                memory.reset_torch_peaks()
                self.measured = sampler.phase("train")
                self.measured.__enter__()
                nv = sampler.nvml
                self.guard = noise.NoiseGuard(nvml=nv.nv if nv else None, handles=nv.handles if nv else (),
                                              pids=nv.pids if nv else None).start()
                self.phase_t0, self.counter_s0 = entered, counter.own_s
                self.sampler_cpu_s0 = sampler.cpu_s
            sync(ctx.device)
            self.t0 = time.perf_counter()
            if self.phase_t0 is not None:
                self.inline_s += self.t0 - entered

        def on_step_end(self, args, state, control, optimizer=None, model=None, **kw):
            sync(ctx.device)
            dt = time.perf_counter() - self.t0
            entered = time.perf_counter()
            batches = counter.batches[self.seen:]
            self.seen = len(counter.batches)
            if state.global_step > warmup:
                self.step_s.append(dt)
                self.step_tokens.append(tuple(sum(b[i] for b in batches) for i in range(4)))
                self.max_batch_tokens = max([self.max_batch_tokens] + [b[1] for b in batches])
            if self.tensor_peak is not None and self.tensor_peak.peak_bytes is None:
                self.tensor_peak.stop()
                self.profiled_tokens = max((b[1] for b in batches), default=0)
            if optimizer is not None:
                self.managed = max(self.managed, memory.managed_bytes(optimizer))
            if not self.dtypes and model is not None:  # what the first step actually held, optimizer included
                self.dtypes = precision.held(model, optimizer)
            if self.phase_t0 is not None:
                self.inline_s += time.perf_counter() - entered

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append([float(state.global_step), float(logs["loss"])])
            if logs and "eval_loss" in logs:  # eval during training, on the held-out split
                self.eval_loss.append([float(state.global_step), float(logs["eval_loss"])])

        def on_train_end(self, args, state, control, model=None, **kw):
            if model is not None and self.adapter_norms:
                self.adapter_norms.append(adapter_norm(model))
            if self.phase_t0 is not None:
                self.phase_wall_s = time.perf_counter() - self.phase_t0
                self.inline_s += counter.own_s - self.counter_s0
                self.threads_cpu_s = sampler.cpu_s - self.sampler_cpu_s0
            if self.measured is not None:
                self.measured.__exit__(None, None, None)
            if self.guard is not None:
                self.guard.stop()
                self.threads_cpu_s += self.guard.cpu_s

    return Measure()


def weight_bytes(model, method) -> dict[str, float]:
    """Bytes of the base's weights as held (quantized data plus every statistic, asked of the method) and of
    the adapters, read after every cast. ``get_memory_footprint`` misses double-quantization statistics."""
    base = lora = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            lora += methods.nbytes(p)
        else:
            base += method.param_storage(p).total_bytes
    return {"train.weight_bytes": float(base), "train.lora_bytes": float(lora),
            "train.memory_footprint_bytes": float(model.get_memory_footprint())}


def run(ctx: Context, inputs: Inputs) -> StageOutput:
    import torch
    from trl import SFTConfig, SFTTrainer

    from harness import data, models

    s = ctx.case.settings
    out = StageOutput()
    torch.manual_seed(s.seed)
    sampler = ctx.sampler
    method = methods.get(s.method)
    tokenizer = models.load_tokenizer(ctx.source)
    memory.reset_torch_peaks()
    rss_start = memory.memory_now()["rss_gib"]  # the interpreter and libraries, before any weight
    t = time.perf_counter()
    with sampler.phase("load"):
        model = load_for_training(ctx)
    sync(ctx.device)
    out.metrics["train.load_s"] = time.perf_counter() - t
    out.metrics.update(sampler.metrics("train.load_", "load"))
    out.metrics.update(memory.torch_peaks("train.load_"))
    trainable, total = model.get_nb_trainable_parameters()
    out.metrics["train.trainable_params"] = float(trainable)

    spec = ctx.case.data
    dataset, heldout, fmt = data.load(spec)
    data.apply_template(spec, tokenizer, fmt)
    trainer_dir = ctx.work_dir / "trainer"
    evaluating = s.eval_steps is not None and heldout is not None
    if s.eval_steps is not None and heldout is None:
        out.failures.append("settings.eval_steps needs a held-out split: give data.test_size or data.eval_split")
    config = SFTConfig(
        output_dir=str(trainer_dir),
        max_steps=s.max_steps if s.num_train_epochs is None else -1,
        num_train_epochs=s.num_train_epochs or 1.0,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.eval_batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.lr_warmup_steps or s.lr_warmup_ratio,  # transformers: a float below 1 is a ratio
        max_grad_norm=s.max_grad_norm,
        weight_decay=s.weight_decay,
        train_sampling_strategy="group_by_length" if s.group_by_length else "random",
        eval_strategy="steps" if evaluating else "no",
        eval_steps=s.eval_steps if evaluating else None,
        **fmt.trainer_options(spec.loss, data.uses_chat(spec, fmt)),
        optim=s.optimizer,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=s.compute_dtype == "bf16",
        fp16=s.compute_dtype == "fp16",
        max_length=s.seq_len,
        packing=s.packing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=ctx.device == "cpu",
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         eval_dataset=heldout if evaluating else None)
    # after the trainer's own casting (bf16 adapters for a quantized base), one policy for every method
    precision.apply(trainer.model, s.precision, s.compute_dtype)
    out.metrics.update(weight_bytes(trainer.model, method))
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    if evaluating and getattr(model, "harness_repack_guarded", 0):
        # the trap the user's settings would fall into elsewhere: say so, once, in the record and the log
        note = (f"eval_steps on an avx512-bf16 CPU: the 4-bit kernels would repack {model.harness_repack_guarded} "
                "weights in place on the first eval forward (training then runs without autograd, 10x slower, "
                "loss flat); the harness kept their layout (the method's keep_layout)")
        out.tables["train.notes"] = [{"note": note}]
        print(note, flush=True)
    measure = _callback(ctx, counter, sampler, s.warmup_steps)
    trainer.add_callback(measure)
    t = time.perf_counter()
    trainer.train()
    sync(ctx.device)
    out.metrics["train.wall_s"] = time.perf_counter() - t

    out.metrics.update(sampler.metrics("train.", "train"))
    if "train.peak_rss_gib" in out.metrics:  # what the model and training added (comparable with the estimate)
        out.metrics["train.rss_start_gib"] = rss_start
        out.metrics["train.peak_rss_over_start_gib"] = out.metrics["train.peak_rss_gib"] - rss_start
    out.metrics.update(memory.torch_peaks("train."))
    if measure.managed:
        out.metrics["train.managed_gib"] = measure.managed / memory.GIB
    claim = memory.claim_peak(out.metrics, "train.", measure.managed / memory.GIB)
    if claim is not None:  # what a tutorial's 'needs about N GB' is judged on (managed memory included)
        out.metrics["train.claim_peak_gib"] = claim[0]
        out.metrics["train.claim_peak_gb"] = claim[0] * memory.GIB / memory.GB
        out.tables["train.claim_basis"] = [{"figure": "train.claim_peak_gb", "basis": claim[1]}]
    out.metrics.update(_timing(ctx, measure, out))
    out.metrics.update(_estimate_as_held(ctx, measure, out.metrics))
    if getattr(measure, "peak_by_op", None):
        out.tables["train.tensor_peak_by_op"] = measure.peak_by_op
    if measure.loss:
        out.series["train.loss"] = measure.loss
        first, last = _mean_head(measure.loss), _mean_tail(measure.loss)
        out.metrics["train.loss_first"] = first
        out.metrics["train.loss_last"] = last
        out.metrics["train.loss_drop"] = first - last
    if measure.eval_loss:
        out.series["train.eval_loss"] = measure.eval_loss
        out.metrics["train.eval_loss_first"] = measure.eval_loss[0][1]
        out.metrics["train.eval_loss_last"] = measure.eval_loss[-1][1]
    norms = tuple(measure.adapter_norms) if len(measure.adapter_norms) == 2 else None
    if norms is not None:
        out.metrics["train.adapter_norm_start"], out.metrics["train.adapter_norm_end"] = norms
    if measure.vocab_size:
        out.metrics["train.uniform_loss"] = math.log(measure.vocab_size)
    # NaN, collapsed to zero, risen to the uniform level, not falling, or an exploded adapter: the case fails
    unhealthy = health.check(measure.loss, vocab_size=measure.vocab_size, adapter_norms=norms)
    out.metrics["train.healthy"] = 0.0 if unhealthy else 1.0
    if unhealthy:
        out.failures.append(f"training unhealthy: {unhealthy}")

    adapter = ctx.work_dir / "adapter"
    trainer.model.save_pretrained(adapter, safe_serialization=True)
    out.metrics["train.adapter_bytes"] = float(sum(f.stat().st_size for f in Path(adapter).glob("*.safetensors")))
    out.artifacts["adapter"] = str(adapter.relative_to(ctx.run_dir))
    out.tables["train.dtypes"] = [{"part": k, "dtype": v} for k, v in measure.dtypes.items()]
    out.adapter = TrainedAdapter(path=adapter, tokenizer=tokenizer, dtypes=dict(measure.dtypes))
    del trainer, model
    free(ctx.device)
    return out


def peak_tflops(ctx: Context) -> tuple[float | None, float | None]:
    """(measured bf16 matmul peak, datasheet peak) of this GPU; the probe runs once per machine and run."""
    from filelock import FileLock

    from harness.measure import flops
    from harness.measure.machine import gpu_info

    gpu = gpu_info()
    if gpu is None:
        return None, None
    cache = ctx.run_dir / "cache" / f"peak-{gpu['name'].replace(' ', '_')}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if not cache.exists():
            cache.write_text(json.dumps({"measured_tflops": flops.measure_peak_bf16_tflops("cuda")}))
        measured = json.loads(cache.read_text())["measured_tflops"]
    return measured, flops.datasheet_tflops(gpu["name"])


def _timing(ctx: Context, measure, out: StageOutput) -> dict[str, float]:
    """Throughput from step statistics (``harness.measure.steps``), the noise guard's verdict, and MFU."""
    if not measure.step_s:
        return {}
    real, total, samples, sq = (list(col) for col in zip(*measure.step_tokens, strict=True))
    m = steps.step_stats(measure.step_s, real, total, samples, prefix="train.")
    if measure.guard is not None:
        verdict = measure.guard.verdict(m)
        m.update(verdict.as_metrics("train."))
        out.tables["train.timing"] = [{**verdict.as_env(), "device": ctx.device}]
    m.update(_flops(ctx, measure.step_s, real, sq, out))
    m.update(_instrumentation(measure, ctx.device))
    return m


def _instrumentation(measure, device: str) -> dict[str, float]:
    """What the harness's own measuring cost the timed phase, as a share of its wall time.

    Counted: the seconds of its callback and token counter (host code in the loop's path) and, on the CPU,
    the CPU seconds of its sampler and noise-guard threads, which take cores from the training threads. On a
    GPU those threads run beside a host thread that mostly waits on the device: their CPU time is recorded
    (``instrumentation_threads_cpu_s``) but not counted as delay. The harness runs the very ops of the
    hand-written recipe (``benchmarks/harness_vs_recipe.py --ops`` checks it), so this share is what its loop
    adds to the recipe's: a figure in every record, where a timing ratio between processes cannot resolve one
    percent on a shared machine.
    """
    if not measure.phase_wall_s:
        return {}
    spent = measure.inline_s + (measure.threads_cpu_s if device == "cpu" else 0.0)
    return {"train.instrumentation_s": spent, "train.instrumentation_share": spent / measure.phase_wall_s,
            "train.instrumentation_inline_s": measure.inline_s,
            "train.instrumentation_threads_cpu_s": measure.threads_cpu_s}


def _flops(ctx: Context, step_s, real, sum_sq, out: StageOutput) -> dict[str, float]:
    """Achieved FLOP/s (median over steps of each step's model FLOPs over its time, real tokens, attention at
    the real lengths); MFU against the datasheet peak (headline) and the matmul probe (GPU only)."""
    import numpy as np

    from harness.measure import flops

    preset = models.shape(ctx.source)
    layers = ctx.case.model.num_layers
    per_step = np.array([flops.step_model_flops(preset, ctx.case.settings, r, q, num_layers=layers)
                         for r, q in zip(real, sum_sq, strict=True)])
    rate = float(np.median(per_step / np.asarray(step_s)))  # FLOP/s
    o = {"train.flops_per_token": float(per_step.sum() / max(sum(real), 1))}
    out.tables["train.flops"] = [{"convention": flops.FLOP_CONVENTION}]
    if ctx.device != "cuda":
        return o  # MFU means nothing without a device peak: absent, not zero
    measured, datasheet = peak_tflops(ctx)
    o["train.achieved_tflops"] = rate / 1e12
    if datasheet:
        o["train.peak_datasheet_tflops"] = datasheet
        o["train.mfu"] = rate / 1e12 / datasheet
    if measured:
        o["train.peak_probe_tflops"] = measured
        o["train.mfu_probe"] = rate / 1e12 / measured
    return o


def _adapter_dtype(model) -> str | None:
    """The dtype the trainer holds the LoRA weights in (trl casts a quantized model's adapters to bf16)."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for name, p in model.named_parameters():
        if "lora_" in name:
            return names.get(p.dtype)
    return None


def _estimate_as_held(ctx: Context, measure, metrics: dict[str, float]) -> dict[str, float]:
    """The estimate again with what training held (largest micro-batch in tokens, padding included; the
    adapters' dtype), and its ratios to like measurements: the allocator estimate to torch's allocator peak,
    the total to NVML process memory (or the named device fallback), and on the CPU the total to the
    tensor-level peak of one step."""
    from harness import estimate

    shape = models.shape(ctx.source)
    if shape is None or not measure.max_batch_tokens:
        return {}
    kw = {"num_layers": ctx.case.model.num_layers, "device": ctx.device, "adapter_dtype": measure.adapter_dtype,
          "vocab_size": measure.vocab_size}
    kw = {k: v for k, v in kw.items() if v is not None}
    est = estimate.estimate(shape, ctx.case.settings, tokens=measure.max_batch_tokens, **kw)
    out = est.as_metrics()
    out["estimate.tokens_per_batch"] = float(measure.max_batch_tokens)
    if "train.peak_allocated_gib" in metrics:
        out["train.estimate_over_allocator_ratio"] = est.allocator_gib / metrics["train.peak_allocated_gib"]
    if "train.nvml_peak_gib" in metrics:
        out["train.estimate_over_nvml_ratio"] = est.total_gib / metrics["train.nvml_peak_gib"]
    tp = measure.tensor_peak
    if tp is not None and tp.peak_bytes and measure.profiled_tokens:
        at_step = estimate.estimate(shape, ctx.case.settings, tokens=measure.profiled_tokens, **kw)
        out["train.tensor_peak_gib"] = tp.peak_bytes / memory.GIB
        out["train.tensor_start_gib"] = tp.start_bytes / memory.GIB  # weights, adapters, grads, optimizer
        out["estimate.at_profiled_step_gib"] = at_step.total_gib
        out["estimate.at_profiled_step_activations_gib"] = at_step.activations_gib
        out["estimate.profiled_step_tokens"] = float(measure.profiled_tokens)
        measure.peak_by_op = [{"op": k, "mib": v / 2**20} for k, v in list(tp.by_op.items())[:15]]
        out["train.estimate_over_tensor_peak_ratio"] = at_step.total_gib / (tp.peak_bytes / memory.GIB)
    return out


def adapter_norm(model) -> float:
    """The Frobenius norm of every LoRA weight of the model, together (fp32 sums)."""
    import torch

    with torch.no_grad():
        total = sum(float(p.detach().float().pow(2).sum()) for n, p in model.named_parameters() if "lora_" in n)
    return math.sqrt(total)


def _mean_head(loss: list[list[float]], n: int = 3) -> float:
    return statistics.fmean(v for _, v in loss[:n])


def _mean_tail(loss: list[list[float]], n: int = 3) -> float:
    return statistics.fmean(v for _, v in loss[-n:])
