"""The record schema, run folders, atomic never-overwrite writes, and loading runs into pandas."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness import SCHEMA_VERSION

Status = Literal["passed", "failed", "skipped", "oom", "error"]
Scalar = str | int | float | bool | None


class ExpectationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    metric: str
    value: float | None
    ok: bool
    message: str


class Record(BaseModel):
    """One case's outcome: everything a reader needs to trust (or distrust) its numbers."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    run_id: str
    suite: str
    case_id: str
    method: str
    params: dict[str, Scalar]  # every resolved setting of the case, the method included
    model: dict[str, Any] = Field(default_factory=dict)  # source, preset, shapes, parameter count, hash
    status: Status
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)  # flat names with units, e.g. train.peak_rss_gib
    series: dict[str, list[list[float]]] = Field(default_factory=dict)  # e.g. train.loss: [[step, loss], ...]
    tables: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)  # e.g. quant.layers: one row a layer
    timings_s: dict[str, float] = Field(default_factory=dict)  # wall time per stage
    expectations: list[ExpectationResult] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict)  # paths relative to the run folder
    env: dict[str, Any] = Field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(now: datetime | None = None, host: str | None = None) -> str:
    """A run id that sorts by time and names the machine: ``20261122T133522Z-myhost``."""
    now = now or datetime.now(timezone.utc)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", host or socket.gethostname()).strip("-")[:40] or "host"
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{host}"


def case_filename(case_id: str) -> str:
    """``smoke[qlora-nf4-seq128]`` -> ``smoke__qlora-nf4-seq128.json`` (safe on every file system)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id.replace("[", "__").replace("]", ""))
    return f"{safe}.json"


def write_json_atomic(path: Path, data: Any, *, overwrite: bool = False) -> Path:
    """Write JSON to a temporary file beside ``path``, then rename it; refuse to replace a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and fails with FileExistsError: nothing is ever overwritten
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_record(run_dir: Path, record: Record) -> Path:
    return write_json_atomic(Path(run_dir) / case_filename(record.case_id), record.model_dump(mode="json"))


def read_record(path: Path) -> Record:
    data = json.loads(Path(path).read_text())
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}, this harness reads {SCHEMA_VERSION}")
    return Record.model_validate(data)


def iter_records(run_dir: Path) -> list[Record]:
    run_dir = Path(run_dir)
    return [read_record(p) for p in sorted(run_dir.glob("*.json")) if p.name != "run.json"]


def resolve_run(ref: str | Path, results_dir: Path = Path("results")) -> Path:
    """A run given as a path, a run id under ``results/``, or ``latest``."""
    p = Path(ref)
    if p.is_dir():
        return p
    if str(ref) == "latest":
        runs = sorted(d for d in Path(results_dir).iterdir() if (d / "run.json").exists())
        if not runs:
            raise FileNotFoundError(f"{results_dir}: no runs yet")
        return runs[-1]
    if (Path(results_dir) / str(ref)).is_dir():
        return Path(results_dir) / str(ref)
    raise FileNotFoundError(f"{ref}: not a run folder nor a run id under {results_dir}/")


def records_frame(records: list[Record]):
    """One row per case: identity columns, every parameter as ``param.<name>``, every metric by name."""
    import pandas as pd

    rows = []
    for r in records:
        row: dict[str, Any] = {
            "run_id": r.run_id,
            "suite": r.suite,
            "case_id": r.case_id,
            "method": r.method,
            "status": r.status,
            "message": r.message,
            "gpu": (r.env.get("gpu") or {}).get("name") or "cpu",
        }
        row.update({f"param.{k}": v for k, v in r.params.items()})
        row.update(r.metrics)
        rows.append(row)
    return pd.DataFrame(rows)
