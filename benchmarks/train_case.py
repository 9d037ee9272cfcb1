"""One case of suites/train.yaml in this process on an untrained tiny model (no pretraining), for quick
measurement checks: ``python benchmarks/train_case.py qlora-nf4 --steps 12 [--out rec.json]``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_case(method: str, steps: int = 12, warmup: int = 3, **settings):
    """The train suite's case for ``method`` with random weights and ``steps`` steps, as a Case."""
    from harness.matrix import expand
    from harness.spec import load_suite

    path = ROOT / "suites" / "train.yaml"
    case = next(c for c in expand(load_suite(path), path) if c.method == method)
    model = case.model.model_copy(update={"pretrain": None, "pretrain_steps": 0})
    s = case.settings.model_copy(update={"max_steps": steps, "warmup_steps": warmup, **settings})
    return case.model_copy(update={"model": model, "settings": s})


def run(method: str, steps: int = 12, warmup: int = 3, **settings):
    """Execute the case in this process; the Record."""
    from harness.worker import execute

    case = train_case(method, steps, warmup, **settings)
    tmp = Path(tempfile.mkdtemp(prefix="train-case-"))
    return execute(case, "bench", tmp, tmp / "work")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    rec = run(a.method, a.steps, a.warmup)
    keys = [k for k in rec.metrics if k.startswith(("train.", "estimate.")) and "loss" not in k]
    print(rec.status, rec.message)
    for k in keys:
        print(f"{k:45s} {rec.metrics[k]:.6g}")
    print(json.dumps(rec.tables.get("train.timing")))
    for row in rec.tables.get("train.tensor_peak_by_op", []):
        print(f"  {row['op']:40s} {row['mib']:.3f} MiB")
    if a.out:
        Path(a.out).write_text(rec.model_dump_json(indent=1))
    sys.exit(0 if rec.status == "passed" else 1)
