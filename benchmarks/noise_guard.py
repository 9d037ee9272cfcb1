"""The noise guard's done-when check: a train case disturbed by short bursts of busy loops on every core is
flagged noisy with its reason and keeps its headline tokens/s within 25% of a quiet run's; a quiet run is
not flagged. Quiet and disturbed runs are interleaved (``--pairs`` of each).

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/noise_guard.py --pairs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def bursts(stop, busy_s: float, idle_s: float) -> None:
    """Busy loops on every core for ``busy_s``, then ``idle_s`` of quiet, until ``stop`` is set."""
    ctx = mp.get_context("fork")
    while not stop.is_set():
        procs = [ctx.Process(target=_spin, args=(busy_s,)) for _ in range(os.cpu_count() or 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        stop.wait(idle_s)


def one_run(method: str, steps: int, warmup: int, out: Path) -> dict:
    """The train case in a fresh process (as the harness runs it); its record's timing figures."""
    cmd = [sys.executable, str(HERE / "train_case.py"), method, "--steps", str(steps), "--warmup", str(warmup),
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    keys = ("train.tokens_per_s", "train.tokens_per_s_mean", "train.step_median_ms", "train.step_p90_ms",
            "train.step_cv", "train.stalled_steps", "train.timing_clean", "train.noise.other_cpu_pct",
            "train.noise.other_cpu_max_pct")
    return {**{k: m.get(k) for k in keys}, "reason": (rec["tables"].get("train.timing") or [{}])[0].get("reason")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="qlora-nf4")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--busy", type=float, default=0.3, help="seconds of busy loops per burst")
    ap.add_argument("--idle", type=float, default=1.2, help="seconds of quiet between bursts")
    a = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"noise-guard-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"quiet": [], "disturbed": []}
    for i in range(a.pairs):
        for kind in ("quiet", "disturbed"):
            stop = mp.Event()
            noise = None
            if kind == "disturbed":
                noise = mp.get_context("fork").Process(target=bursts, args=(stop, a.busy, a.idle))
                noise.start()
            try:
                r = one_run(a.method, a.steps, a.warmup, tmp / f"{kind}-{i}.json")
            finally:
                stop.set()
                if noise is not None:
                    noise.join()
            runs[kind].append(r)
            print(kind, json.dumps(r), flush=True)
    q = statistics.median(r["train.tokens_per_s"] for r in runs["quiet"])
    d = statistics.median(r["train.tokens_per_s"] for r in runs["disturbed"])
    qm = statistics.median(r["train.tokens_per_s_mean"] for r in runs["quiet"])
    dm = statistics.median(r["train.tokens_per_s_mean"] for r in runs["disturbed"])
    print(f"headline tokens/s (median step rate): quiet {q:.0f}, disturbed {d:.0f} ({100 * (d / q - 1):+.1f}%)")
    print(f"sum-based tokens/s:                   quiet {qm:.0f}, disturbed {dm:.0f} ({100 * (dm / qm - 1):+.1f}%)")
    flagged = [r["train.timing_clean"] == 0 for r in runs["disturbed"]]
    clean = [r["train.timing_clean"] == 1 for r in runs["quiet"]]
    print(f"disturbed runs flagged noisy: {sum(flagged)}/{len(flagged)}; quiet runs clean: {sum(clean)}/{len(clean)}")
    ok = all(flagged) and all(clean) and abs(d / q - 1) <= 0.25
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
