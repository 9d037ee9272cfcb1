"""Loading a run folder for the report, and the small labels every page shares."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.records import (
    Record,
    RecordError,
    check_name,
    check_run_dir,
    read_run_meta,
    read_run_records,
    write_text_atomic,
)

__all__ = ["STATUSES", "Run", "case_label", "env_items", "git_text", "load_run", "machine", "write_text_atomic"]
STATUSES = ("passed", "failed", "oom", "killed", "interrupted", "error", "skipped")


@dataclass
class Run:
    """A run folder: its metadata (``run.json``, may be empty) and its records in execution order."""

    path: Path
    meta: dict[str, Any]
    records: list[Record]
    run_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.run_id = self.meta.get("run_id") or (self.records[0].run_id if self.records else self.path.name)
        try:  # the id names the report's files and links: it must be a safe name
            check_name(self.run_id, "run id")
        except ValueError as exc:
            raise RecordError(f"{self.path}: {exc}") from None

    @property
    def env(self) -> dict[str, Any]:
        return self.meta.get("env") or (self.records[0].env if self.records else {})

    @property
    def started_at(self) -> str:
        return self.meta.get("started_at") or min((r.started_at for r in self.records if r.started_at), default="")

    @property
    def suites(self) -> list[str]:
        return list(dict.fromkeys(r.suite for r in self.records))

    def counts(self) -> dict[str, int]:
        """Cases per status, in a fixed order, zeros left out."""
        c = Counter(r.status for r in self.records)
        return {s: c[s] for s in STATUSES if c[s]}

    def by_suite(self, suite: str) -> list[Record]:
        return [r for r in self.records if r.suite == suite]


def load_run(path: Path) -> Run:
    """Read ``run.json`` and every record; a folder that is not a run, or a file of it that cannot be read, is a
    RecordError naming the file in one line."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run folder")
    meta = read_run_meta(check_run_dir(path))
    records = sorted(read_run_records(path), key=lambda r: (r.started_at or "~", r.case_id))  # with extended runs
    return Run(path, meta, records)


def case_label(case_id: str) -> str:
    """``smoke[qlora-nf4-seq128]`` -> ``qlora-nf4-seq128``."""
    if "[" in case_id and case_id.endswith("]"):
        return case_id[case_id.index("[") + 1 : -1]
    return case_id


def machine(env: dict[str, Any], run_id: str = "") -> str:
    """``2× NVIDIA H100 80GB (79 GiB)`` or ``CPU: <model>``, with the host when known."""
    gpu = env.get("gpu") or None
    if gpu and gpu.get("name"):
        count = gpu.get("count") or 1
        mem = gpu.get("memory_gib")
        text = f"{count}× {gpu['name']}" if count > 1 else str(gpu["name"])
        if mem:
            text += f" ({mem:.0f} GiB)"
    else:
        cpu = env.get("cpu")
        if isinstance(cpu, dict):
            cores = cpu.get("cores")
            cpu = (cpu.get("name") or cpu.get("model") or "") + (f" ({cores} cores)" if cores else "")
        text = f"CPU: {cpu}" if cpu else "CPU"
    host = env.get("host") or env.get("hostname") or (run_id.split("-", 1)[1] if "-" in run_id else "")
    return f"{text} · {host}" if host else text


def git_text(env: dict[str, Any]) -> str:
    """The short commit, ``1a2b3c4d5e``, or ``–`` (pages show the dirty flag as a badge beside it)."""
    git = env.get("git") or {}
    return str(git.get("commit") or "")[:10] or "–"


def env_items(env: dict[str, Any]) -> list[tuple[str, str]]:
    """The environment as label/value pairs for the page's environment block."""
    items = [("machine", machine(env))]
    if env.get("cpu"):
        cpu = env["cpu"]
        items.append(("cpu", ", ".join(f"{k} {v}" for k, v in cpu.items()) if isinstance(cpu, dict) else str(cpu)))
    if env.get("python"):
        items.append(("python", str(env["python"])))
    items.append(("git", git_text(env)))
    for key, value in env.items():
        if key not in {"gpu", "cpu", "python", "git", "versions", "host", "hostname"} and value not in (None, "", {}):
            items.append((key, json.dumps(value) if isinstance(value, dict | list) else str(value)))
    return items


def differing_bases(records: list[Record], baseline: dict[str, Record] | None = None) -> list[str]:
    """One line per comparison whose cases were not run on the same base (``record.model['fingerprint']``).

    Within a run, cases of a suite that differ only by method are compared with each other; against a baseline,
    each case is compared with the baseline's record of the same id. Records without a fingerprint are skipped.
    """
    lines = []
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for r in records:
        fp = r.model.get("fingerprint")
        if fp is None:
            continue
        key = (r.suite, json.dumps({k: v for k, v in r.params.items() if k != "method"}, sort_keys=True, default=str))
        groups.setdefault(key, {}).setdefault(str(fp), []).append(case_label(r.case_id))
    for (suite, _), by_fp in groups.items():
        if len(by_fp) > 1:
            parts = "; ".join(f"{fp[:12]}: {', '.join(cases)}" for fp, cases in sorted(by_fp.items()))
            lines.append(f"{suite}: cases compared with each other ran on different bases ({parts})")
    for r in records:
        old = (baseline or {}).get(r.case_id)
        fp, old_fp = r.model.get("fingerprint"), old.model.get("fingerprint") if old else None
        if fp is not None and old_fp is not None and fp != old_fp:
            lines.append(f"{r.case_id}: base {str(fp)[:12]} differs from the baseline's {str(old_fp)[:12]}")
    return lines
