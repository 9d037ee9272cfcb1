"""Isolation: an out-of-memory case and a hung case become records while the session goes on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.worker import is_oom

pytest_plugins = ["pytester"]

SUITE = """\
name: iso
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 1}
stages: [quant]
settings: {memory_limit_gib: LIMIT}
matrix:
  method: [qlora-nf4]
  seed: [0]
timeout_s: TIMEOUT
"""


def test_oom_case_is_recorded_and_the_session_goes_on(project):
    # case 1: an address-space cap far below what loading and quantizing needs; case 2: the same without a cap
    (project.path / "suites" / "a.yaml").write_text(SUITE.replace("LIMIT", "0.001").replace("TIMEOUT", "300"))
    (project.path / "suites" / "b.yaml").write_text(
        SUITE.replace("name: iso", "name: ok").replace("LIMIT", "null").replace("TIMEOUT", "300"))
    result = project.runpytest_subprocess("suites/", "-v", "--run-id", "oom", "--no-report")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*iso[[]qlora-nf4-seed0[]] FAILED*", "*ok[[]qlora-nf4-seed0[]] PASSED*"])
    rec = json.loads((project.path / "results" / "oom" / "iso__qlora-nf4-seed0.json").read_text())
    assert rec["status"] == "oom", rec["message"]
    assert rec["metrics"]["failure.rss_gib"] > 0  # the memory at the failure is kept
    ok = json.loads((project.path / "results" / "oom" / "ok__qlora-nf4-seed0.json").read_text())
    assert ok["status"] == "passed"


def test_hung_case_is_killed_after_its_timeout(project):
    (project.path / "suites" / "a.yaml").write_text(SUITE.replace("LIMIT", "null").replace("TIMEOUT", "0.5"))
    result = project.runpytest_subprocess("suites/", "--run-id", "hang", "--no-report")
    result.assert_outcomes(failed=1)
    rec = json.loads((project.path / "results" / "hang" / "iso__qlora-nf4-seed0.json").read_text())
    assert rec["status"] == "error" and "timed out after" in rec["message"]


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), True),
    (ValueError("shapes do not match"), False),
])
def test_oom_classification(exc, oom):
    assert is_oom(exc) is oom


def test_a_forked_child_ended_by_sigterm_does_not_take_the_worker_with_it(tmp_path):
    """A library's process pool (datasets, multiprocess) forks children that inherit the worker's SIGTERM handler
    and ends them with SIGTERM: that must end the child alone. It ended the whole process group, the worker
    included, which the case then recorded as 'killed with SIGKILL from outside' (your-data in CI)."""
    import subprocess
    import sys

    from harness import worker

    script = tmp_path / "w.py"
    script.write_text(
        "import multiprocessing as mp, os, sys\n"
        "from harness import worker\n"
        "worker._guard_parent()\n"
        "pool = mp.get_context('fork').Pool(1)\n"
        "pool.apply(os.getpid)\n"
        "pool.terminate(); pool.join()\n"  # SIGTERM to the pool's forked child
        "print('alive'); sys.exit(0)\n")
    root = str(Path(worker.__file__).resolve().parents[1])  # this checkout's harness, in the child too
    env = {**os.environ, worker.PARENT_ENV: str(os.getpid()), "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert proc.returncode == 0 and "alive" in proc.stdout, (proc.returncode, proc.stderr[-500:])
