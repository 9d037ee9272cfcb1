"""The train stage: the QLoRA recipe with trl's SFTTrainer for a fixed step budget, measured honestly."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from harness import methods, precision
from harness.measure import memory
from harness.stages import Context, Inputs, StageOutput, TrainedAdapter, free, sync

PROJECTION_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                    "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class TokenCounter:
    """Wraps the trainer's collator to count real (non-padding) and total tokens of every batch."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int, int]] = []  # (real tokens, total tokens, samples)

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int((batch.get("labels", ids) != -100).sum())
        self.batches.append((real, ids.numel(), ids.shape[0]))
        return batch


def _callback(ctx: Context, counter: TokenCounter, sampler: memory.Sampler, warmup: int):
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        """Times each optimizer step (device synchronized) and keeps the loss curve."""

        def __init__(self):
            self.step_s: list[float] = []
            self.step_tokens: list[tuple[int, int, int]] = []
            self.loss: list[list[float]] = []
            self.t0 = 0.0
            self.seen = 0
            self.managed = 0
            self.measured = None
            self.dtypes: dict[str, str] = {}

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:  # the measured phase starts after the warm-up steps
                memory.reset_torch_peaks()
                self.measured = sampler.phase("train")
                self.measured.__enter__()
            sync(ctx.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, model=None, **kw):
            sync(ctx.device)
            dt = time.perf_counter() - self.t0
            batches = counter.batches[self.seen:]
            self.seen = len(counter.batches)
            if state.global_step > warmup:
                self.step_s.append(dt)
                self.step_tokens.append(tuple(sum(b[i] for b in batches) for i in range(3)))
            if optimizer is not None:
                self.managed = max(self.managed, memory.managed_bytes(optimizer))
            if not self.dtypes and model is not None:  # what the first step actually held, optimizer included
                self.dtypes = precision.held(model, optimizer)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append([float(state.global_step), float(logs["loss"])])

        def on_train_end(self, args, state, control, **kw):
            if self.measured is not None:
                self.measured.__exit__(None, None, None)

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


def lora_config(settings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=[PROJECTION_NAMES[t] for t in settings.target_modules.split(",")],
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_for_training(ctx: Context):
    """The method's base, prepared by the method (``prepare_model_for_kbit_training`` for kbit bases), with LoRA."""
    from peft import get_peft_model

    from harness import models

    s = ctx.case.settings
    model = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device)
    model = methods.get(s.method).prepare_for_training(model, s)
    return get_peft_model(model, lora_config(s))


def run(ctx: Context, inputs: Inputs) -> StageOutput:
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from harness import models

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

    dataset = load_dataset("json", data_files=ctx.case.data.train, split="train")
    trainer_dir = ctx.work_dir / "trainer"
    config = SFTConfig(
        output_dir=str(trainer_dir),
        max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate,
        lr_scheduler_type="constant",
        optim=s.optimizer,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=s.compute_dtype == "bf16",
        fp16=s.compute_dtype == "fp16",
        max_length=s.seq_len,
        packing=s.packing,
        dataset_text_field="text",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=ctx.device == "cpu",
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    # after the trainer's own casting (bf16 adapters for a quantized base), one policy for every method
    precision.apply(trainer.model, s.precision, s.compute_dtype)
    out.metrics.update(weight_bytes(trainer.model, method))
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
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
    steps = measure.step_s
    if steps:
        timed = sum(steps)
        real, total_tok, samples = (sum(x[i] for x in measure.step_tokens) for i in range(3))
        out.metrics["train.tokens_per_s"] = real / timed
        out.metrics["train.total_tokens_per_s"] = total_tok / timed
        out.metrics["train.samples_per_s"] = samples / timed
        out.metrics["train.step_median_ms"] = statistics.median(steps) * 1e3
        out.metrics["train.step_p90_ms"] = _quantile(steps, 0.9) * 1e3
        out.metrics["train.timed_steps"] = float(len(steps))
        out.metrics["train.padding_pct"] = 100.0 * (1 - real / total_tok) if total_tok else 0.0
        out.metrics.update(_flops(ctx, total_tok / timed))
    if measure.loss:
        out.series["train.loss"] = measure.loss
        first, last = _mean_head(measure.loss), _mean_tail(measure.loss)
        out.metrics["train.loss_first"] = first
        out.metrics["train.loss_last"] = last
        out.metrics["train.loss_drop"] = first - last

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


def _flops(ctx: Context, tokens_per_s: float) -> dict[str, float]:
    """Achieved FLOP/s from the analytic count, and MFU against the measured and the datasheet peak (GPU only)."""
    from harness.measure import flops

    preset = ctx.source.preset
    if preset is None:
        from harness.presets import from_hf_config

        preset = from_hf_config(ctx.source.checkpoint)
    per_token = flops.train_flops_per_token(preset, ctx.case.settings, num_layers=ctx.case.model.num_layers)
    out = {"train.flops_per_token": per_token["model"]}
    achieved = tokens_per_s * per_token["model"] / 1e12
    if ctx.device != "cuda":
        return out  # MFU means nothing without a device peak: absent, not zero
    measured, datasheet = peak_tflops(ctx)
    out["train.achieved_tflops"] = achieved
    if measured:
        out["train.peak_measured_tflops"] = measured
        out["train.mfu"] = achieved / measured
    if datasheet:
        out["train.peak_datasheet_tflops"] = datasheet
        out["train.mfu_datasheet"] = achieved / datasheet
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _mean_head(loss: list[list[float]], n: int = 3) -> float:
    return statistics.fmean(v for _, v in loss[:n])


def _mean_tail(loss: list[list[float]], n: int = 3) -> float:
    return statistics.fmean(v for _, v in loss[-n:])
