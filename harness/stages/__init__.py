"""Stages take a case (and what earlier stages produced) and return metrics; nothing reaches back up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.matrix import Case


@dataclass
class Source:
    """A model made ready for the stages: a 16-bit checkpoint folder (or none, for shapes built on the GPU)."""

    checkpoint: Path | None  # HF folder with config + safetensors, loadable with from_pretrained
    tokenizer: Path | None  # folder loadable with AutoTokenizer.from_pretrained
    preset: Any | None  # harness.presets.Preset for synthetic sources, else None
    info: dict[str, Any] = field(default_factory=dict)  # source, preset, parameter counts, hash


@dataclass
class Context:
    case: Case
    source: Source
    device: str  # "cuda" or "cpu"
    run_dir: Path  # results/<run-id>/
    work_dir: Path  # results/<run-id>/work/<case file stem>/: adapters and other artifacts of this case
    shared: dict[str, Any] = field(default_factory=dict)  # what earlier stages of this case handed on


@dataclass
class StageOutput:
    metrics: dict[str, float] = field(default_factory=dict)  # flat names with units, prefixed by stage
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # relative to run_dir
