"""Stages take a case and the typed values earlier stages handed on, and return metrics; nothing reaches back.

The worker runs a case's stages in order. Each stage is a module with ``run(ctx, inputs) -> StageOutput``;
what it hands to the next stages is a typed field of its output (``adapter``), which the worker folds into
the next stage's :class:`Inputs`. No stage imports another stage's helpers: what they share lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import methods
from harness.matrix import Case
from harness.models import Source


@dataclass(frozen=True)
class TrainedAdapter:
    """What the train stage hands on: the saved adapter, the tokenizer it was trained with, the dtypes held."""

    path: Path  # a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    tokenizer: Any  # a transformers tokenizer
    dtypes: dict[str, str] = field(default_factory=dict)  # precision.held() at the first step


@dataclass(frozen=True)
class Inputs:
    """The values earlier stages of this case handed on (None until a stage produced them)."""

    adapter: TrainedAdapter | None = None

    def trained(self, stage: str) -> TrainedAdapter:
        """The train stage's adapter, which ``stage`` needs (a ValueError naming both when it is missing)."""
        if self.adapter is None:
            raise ValueError(f"stage {stage!r} needs the adapter of stage 'train'")
        return self.adapter

    def updated(self, out: StageOutput) -> Inputs:
        return replace(self, adapter=out.adapter) if out.adapter is not None else self


@dataclass
class Context:
    case: Case
    source: Source
    device: str  # "cuda" or "cpu"
    run_dir: Path  # results/<run-id>/
    work_dir: Path  # results/<run-id>/work/<case file stem>/: adapters and other artifacts of this case
    sampler: Any = None  # harness.measure.memory.Sampler of this case's process


@dataclass
class StageOutput:
    metrics: dict[str, float] = field(default_factory=dict)  # flat names with units, prefixed by stage
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # relative to run_dir
    failures: list[str] = field(default_factory=list)  # reasons the case must fail (e.g. training diverged)
    adapter: TrainedAdapter | None = None  # handed on to later stages


def sync(device: str) -> None:
    """Wait for queued device work on every device the case uses, so a host clock reads finished work."""
    if device == "cuda":
        from harness.measure.memory import synchronize_all

        synchronize_all()


def between_stages(device: str) -> None:
    """Before a stage: the previous stage's tensors freed, the allocator's cached blocks returned and its
    peaks reset, so this stage's peaks are its own (the quant stage's cache would otherwise count)."""
    from harness.measure.memory import reset_torch_peaks

    free(device)
    if device == "cuda":
        reset_torch_peaks()


def free(device: str) -> None:
    """Drop unreferenced tensors and return cached device memory."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


PROJECTION_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                    "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


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
    """The method's base, prepared by the method (``prepare_model_for_kbit_training`` for kbit bases; a 4-bit base
    keeps the weight layout training uses, whatever forwards run before or during it), with LoRA."""
    from peft import get_peft_model

    from harness import models

    s = ctx.case.settings
    model = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device, blocksize=s.blocksize)
    model = methods.get(s.method).prepare_for_training(model, s)
    return get_peft_model(model, lora_config(s))
