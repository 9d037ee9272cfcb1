"""The record schema and the one reader and writer of run folders.

A run folder is ``results/<run-id>/``: ``run.json`` (what the run was), one ``<case>.json`` record per
case at its top level, ``suites/`` (cross-case results) and ``work/`` (each case's scratch folder: model
files, logs, adapters; never read as records). Every other module goes through this one to make a run
folder (:func:`create_run_dir`, exclusive), to list and read its records (:func:`record_paths`,
:func:`read_records`), to read ``run.json`` (:func:`read_run_meta`) and to write anything
(:func:`write_text_atomic` and the helpers built on it: atomic, 0644 under the umask, never overwriting a
record). Non-finite metrics are stored as the JSON strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
and read back as floats.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness import SCHEMA_VERSION

# interrupted: the run was stopped (Ctrl-C, SIGTERM) while the case ran; killed: its worker was killed from
# outside without evidence of running out of memory
Status = Literal["passed", "failed", "skipped", "oom", "error", "interrupted", "killed"]
Scalar = str | int | float | bool | None
RUN_FILE = "run.json"
WORK = "work"  # results/<run-id>/work/<case>/: a case's scratch files, never records
SAFE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"  # run ids and suite names: path and link safe, no leading dot
MAX_SHOWN = 200  # characters of a user's value shown in an error message


def slug(text: str) -> str:
    """``text`` as a file name: anything outside letters, digits, ``._-`` becomes ``_`` (at most 120 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


class RecordError(ValueError):
    """A record or run file that cannot be read; ``str()`` names the file in one line."""


class ExpectationResult(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")
    name: str
    metric: str
    value: float | None
    ok: bool
    message: str


class Record(BaseModel):
    """One case's outcome: everything a reader needs to trust (or distrust) its numbers."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")
    schema_version: int = SCHEMA_VERSION
    run_id: str = Field(pattern=SAFE_NAME)
    suite: str = Field(pattern=SAFE_NAME)
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

    @field_validator("series")
    @classmethod
    def _pairs(cls, v: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
        for name, points in v.items():  # every reader takes a point as [step, value]
            for i, point in enumerate(points):
                if len(point) != 2:
                    raise ValueError(f"{name}[{i}]: expected a [step, value] pair, got {len(point)} numbers")
        return v


class RunMeta(BaseModel):
    """``run.json``: what a run was. The harness writes ``run_id`` and ``started_at`` first; other keys pass."""

    model_config = ConfigDict(extra="allow")
    run_id: str = Field(pattern=SAFE_NAME)
    started_at: str = ""
    extends: str | None = Field(None, pattern=SAFE_NAME)
    env: dict[str, Any] = Field(default_factory=dict)


class ExpectationCheck(BaseModel):
    """One outcome of a non-inferiority check as ``stats/expectations/*.json`` keeps it (other keys pass)."""

    model_config = ConfigDict(extra="allow")
    outcome: Literal["pass", "fail", "inconclusive"]
    message: str
    margin: float


class ExpectationFile(BaseModel):
    """``stats/expectations/<suite>.<label>.json``: a non-inferiority expectation's outcomes."""

    model_config = ConfigDict(extra="forbid")
    suite: str
    name: str
    results: list[ExpectationCheck]


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def one_line(value: Any, limit: int = MAX_SHOWN) -> str:
    """A value as it may appear in a one-line error: line breaks and tabs as ``\\n``, ``\\r``, ``\\t``; cut to ``limit``.

    Backslashes are kept as they are, so a message that passes through here twice (a SpecError shown by the
    plugin) reads the same, and a ``repr`` inside it shows a tab as ``\\t``, once, as the user wrote it.
    """
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_name(value: str, what: str) -> str:
    """``value`` if it is a safe run id or suite name (letters, digits, ``._-``, no leading dot), else ValueError."""
    if not isinstance(value, str) or not re.fullmatch(SAFE_NAME, value):
        raise ValueError(f"{what} {one_line(repr(value), 80)}: use letters, digits, '.', '_' and '-' "
                         "(at most 128, not starting with '.')")
    return value


def new_run_id(now: datetime | None = None, host: str | None = None) -> str:
    """A run id that sorts by time and names the machine: ``20261122T133522Z-myhost``."""
    now = now or datetime.now(timezone.utc)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", host or socket.gethostname()).strip("-.")[:40] or "host"
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{host}"


def case_filename(case_id: str) -> str:
    """``smoke[qlora-nf4-seq128]`` -> ``smoke__qlora-nf4-seq128.json`` (safe on every file system)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id.replace("[", "__").replace("]", "")).lstrip(".")
    return f"{safe}.json"


# -- writing ---------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and move it into place in one step.

    The file gets the mode an ordinary ``open()`` would give (0666 under the umask, not mkstemp's 0600).
    With ``overwrite=False`` an existing file is never replaced: FileExistsError instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
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


def _finite_json(data: Any) -> Any:
    """Non-finite floats as the strings pydantic reads back (``NaN``, ``Infinity``, ``-Infinity``)."""
    if isinstance(data, float) and not math.isfinite(data):
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    if isinstance(data, dict):
        return {k: _finite_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite_json(v) for v in data]
    return data


def write_json_atomic(path: Path, data: Any, *, overwrite: bool = False) -> Path:
    """JSON (standard: non-finite numbers as strings) written atomically; by default never replacing a file."""
    text = json.dumps(_finite_json(data), indent=2, default=str, allow_nan=False)
    return write_text_atomic(path, text + "\n", overwrite=overwrite)


def write_record(run_dir: Path, record: Record) -> Path:
    """The case's record at the top of its run folder; FileExistsError if the case already has one."""
    return write_text_atomic(Path(run_dir) / case_filename(record.case_id),
                             record.model_dump_json(indent=2) + "\n", overwrite=False)


def create_run_dir(results_dir: Path, run_id: str, *, retry: bool = True) -> Path:
    """Make ``results_dir/run_id`` exclusively (never an existing folder) and return it.

    With ``retry`` a taken id gets a suffix (``-2``, ``-3``, …) until a new folder is made, so two runs
    started in the same second get two folders; without it FileExistsError says the id is taken.
    """
    check_name(run_id, "run id")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = results_dir / (run_id if n == 1 else f"{run_id}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if not retry:
                raise FileExistsError(f"{path}: run folder already exists (run ids are never reused)") from None
    raise FileExistsError(f"{results_dir}: no free run folder for {run_id}")


# -- reading ---------------------------------------------------------------------------------------------
# Everything in a run folder is read as untrusted input: a truncated, hand-edited or hostile file gives a
# RecordError (one line naming the file and what is wrong), never a traceback, and its run is left out or marked.
M = TypeVar("M", bound=BaseModel)
_problems: list[str] = []  # the lines of files left out since the last take_problems()


def warn(line: str) -> None:
    """Report a file that was left out: one line on stderr, kept for the pytest summary (``take_problems``)."""
    line = one_line(line, 400)
    print(f"warning: {line}", file=sys.stderr)
    _problems.append(line)


def take_problems() -> list[str]:
    """The lines :func:`warn` reported since the last call (each once)."""
    out = list(dict.fromkeys(_problems))
    _problems.clear()
    return out


def read_json(path: Path, expect: type | tuple[type, ...] | None = None) -> Any:
    """A JSON file's content; RecordError naming the file when it cannot be read, is not JSON, is nested too
    deeply for Python's parser, or is not of the ``expect``-ed type (``dict``: an object, ``list``: an array)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({one_line(exc.strerror or exc)})") from None
    except RecursionError:
        raise RecordError(f"{path}: nested too deeply to be read as JSON") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"{path}: not valid JSON ({one_line(exc, 120)})") from None
    if expect is not None and not isinstance(data, expect):
        kinds = expect if isinstance(expect, tuple) else (expect,)
        wanted = " or ".join({dict: "object", list: "array"}.get(t, t.__name__) for t in kinds)
        raise RecordError(f"{path}: expected a JSON {wanted}, found {_json_kind(data)}")
    return data


def _json_kind(data: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(data), "a number")


def validate_file(path: Path, model: type[M], data: Any) -> M:
    """``data`` (read from ``path``) as ``model``; RecordError naming the file and the first wrong field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        what = one_line(err["msg"].removeprefix("Value error, "), 160)
        raise RecordError(f"{path}: {where + ': ' if where else ''}{what}") from None
    except RecursionError:
        raise RecordError(f"{path}: nested too deeply to be a {model.__name__}") from None


def read_model(path: Path, model: type[M]) -> M:
    """A JSON object file validated as ``model`` (see :func:`read_json` and :func:`validate_file`)."""
    return validate_file(path, model, read_json(path, dict))


def record_paths(run_dir: Path) -> list[Path]:
    """The record files of a run folder: ``*.json`` at its top level only (never ``work/`` or ``suites/``)."""
    run_dir = Path(run_dir)
    return [p for p in sorted(run_dir.glob("*.json")) if p.name != RUN_FILE and not p.name.startswith(".")]


def read_record(path: Path) -> Record:
    """One record; a file that is not one raises RecordError naming it in one line."""
    path = Path(path)
    data = read_json(path)
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: not a record of schema_version {SCHEMA_VERSION} (found {one_line(repr(version), 40)})")
    return validate_file(path, Record, data)


def read_records(run_dir: Path, suite: str | None = None, *, skip_bad: bool = False) -> list[Record]:
    """Every record of a run folder (optionally of one suite), in file-name order. A file that is not a record
    raises RecordError, or with ``skip_bad`` is named by :func:`warn` and left out."""
    records = []
    for p in record_paths(run_dir):
        try:
            records.append(read_record(p))
        except RecordError as exc:
            if not skip_bad:
                raise
            warn(f"{exc} (left out)")
    return [r for r in records if suite is None or r.suite == suite]


iter_records = read_records  # the older name

# A run may extend an earlier run of the same suites on the same kind of machine (``pytest --extends RUN``):
# it measures only the cases the earlier run lacks (more seeds, or cases an interruption or crash cut off),
# and its statistics, report and headline pool both. ``run.json`` names the earlier run ("extends"), a
# sibling folder; records are never copied.
RERUN = ("error", "interrupted", "killed")  # an extension measures these cases again; any other status stands


def run_chain(run_dir: Path) -> list[Path]:
    """The run folder, then the run it extends, and so on (newest first); RecordError on a missing or looping link."""
    chain = [Path(run_dir)]
    while name := read_run_meta(chain[-1]).get("extends"):
        try:
            nxt = chain[-1].parent / check_name(name, "extends")
        except ValueError as exc:
            raise RecordError(f"{chain[-1] / RUN_FILE}: {exc}") from None
        if not (nxt / RUN_FILE).is_file():
            raise RecordError(f"{chain[-1] / RUN_FILE}: extends {name}, which is not a run folder beside it")
        if any(nxt.resolve() == d.resolve() for d in chain):
            raise RecordError(f"{chain[-1] / RUN_FILE}: extends {name}, which extends it back")
        chain.append(nxt)
    return chain


def read_run_records(run_dir: Path, suite: str | None = None) -> list[Record]:
    """A run's records pooled with those of the runs it extends (``run_chain``); where a case was measured
    again (an extension re-runs the ``RERUN`` statuses) the newer record stands. Oldest run's cases first."""
    by_id: dict[str, Record] = {}
    for folder in reversed(run_chain(run_dir)):
        for rec in read_records(folder, suite):
            by_id.pop(rec.case_id, None)
            by_id[rec.case_id] = rec
    return list(by_id.values())


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder ({} when absent), checked against :class:`RunMeta` (a safe run id, …)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    data = read_json(path, dict)
    if "run_id" in data and not (isinstance(data["run_id"], str) and re.fullmatch(SAFE_NAME, data["run_id"])):
        raise RecordError(f"{path}: {check_name_message(data['run_id'], 'run_id')}")
    validate_file(path, RunMeta, data)
    return data


def check_name_message(value: Any, what: str) -> str:
    try:
        check_name(value, what)
    except ValueError as exc:
        return str(exc)
    return ""


def check_run_dir(run_dir: Path) -> Path:
    """``run_dir`` if it is a run folder the harness wrote (a valid ``run.json``), else RecordError in one line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecordError(f"{one_line(run_dir)}: not a folder")
    if not (run_dir / RUN_FILE).is_file():
        raise RecordError(f"{one_line(run_dir)}: not a run folder (no {RUN_FILE}; runs are written by "
                          "'pytest suites/' under results/)")
    read_run_meta(run_dir)
    return run_dir


def read_stats_checks(run_dir: Path) -> tuple[list[ExpectationFile], list[str]]:
    """The run's ``stats/expectations/*.json`` files, and one line for each that cannot be read (left out)."""
    files, bad = [], []
    for p in sorted((Path(run_dir) / "stats" / "expectations").glob("*.json")):
        try:
            files.append(read_model(p, ExpectationFile))
        except RecordError as exc:
            bad.append(str(exc))
    return files, bad


def read_references(run_dir: Path) -> tuple[dict[str, str], list[str]]:
    """The reference methods the session's processes noted (``stats/references.*.json``), and a line per bad file."""
    refs: dict[str, str] = {}
    bad = []
    for p in sorted((Path(run_dir) / "stats").glob("references.*.json")):
        try:
            data = read_json(p, dict)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                raise RecordError(f"{p}: expected suite names mapped to method names")
            refs.update(data)
        except RecordError as exc:
            bad.append(str(exc))
    return refs, bad


def list_runs(results_dir: Path) -> list[Path]:
    """Run folders (those with a ``run.json``) directly under ``results_dir``, oldest first by name."""
    results_dir = Path(results_dir)
    return sorted(p.parent for p in results_dir.glob(f"*/{RUN_FILE}")) if results_dir.is_dir() else []


def resolve_run(ref: str | Path, results_dir: Path = Path("results")) -> Path:
    """A run given as a path, a run id under ``results/``, or ``latest``."""
    p = Path(ref)
    if p.is_dir():
        return p
    if str(ref) == "latest":
        runs = list_runs(results_dir)
        if not runs:
            raise FileNotFoundError(f"{results_dir}: no runs yet")
        return runs[-1]
    if (Path(results_dir) / str(ref)).is_dir():
        return Path(results_dir) / str(ref)
    raise FileNotFoundError(f"{one_line(ref)}: not a run folder nor a run id under {results_dir}/")


def baseline_record_paths(folder: Path) -> list[Path]:
    """Records of a baseline folder: its own, or else those of the run folders directly inside it."""
    folder = Path(folder)
    own = record_paths(folder)
    if own:
        return own
    subs = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name not in (WORK, "suites")
            and not d.name.startswith(".")] if folder.is_dir() else []
    return [p for d in subs for p in record_paths(d)]


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
    frame = pd.DataFrame(rows)
    frame.attrs["metrics"] = sorted({n for r in records for n in r.metrics})  # NaN in the frame: measured or absent
    return frame
