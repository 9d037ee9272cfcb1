"""The GPU script's whole path on the CPU (issue 23): select, time-box, pack, unpack, render.

``.ci/gpu-reference --dry-run`` runs the very script the GPU machine runs, on CPU-sized suites derived by
the same selection code, inside a time-box short enough to be cut on purpose: what finished must still
come back in one archive under 16 MiB with no adapters or checkpoints, and ``.ci/gpu-unpack`` must put it
under results/reference/<machine>/ and render its report here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 150  # the dry run's time-box: a few cheap cases finish, the rest (the overhead suite last) is cut


def test_selection_touches_every_cuda_path_once(tmp_path):
    import importlib.util

    from harness.matrix import expand
    from harness.spec import load_suite

    spec = importlib.util.spec_from_file_location("gpu_selection", ROOT / ".ci" / "gpu_selection.py")
    sel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sel)
    ids = {c.case_id: c for f in sel.write(tmp_path) for c in expand(load_suite(f), f)}
    for method in ("lora-bf16", "qlora-nf4", "qlora-nf4-dq"):
        for seq in (512, 2048):
            assert f"memory-7b[{method}-seq{seq}]" in ids
    assert "memory-70b[qlora-nf4-dq-seq512]" in ids
    assert {f"train[{m}]" for m in ("lora-bf16", "qlora-nf4", "qlora-nf4-dq", "qlora-fp4", "qlora-fp4-dq",
                                    "lora-int8")} <= set(ids)
    assert any(c.suite == "fidelity" for c in ids.values()) and "inference-7b[qlora-nf4]" in ids
    assert all(c.settings.max_steps <= 8 and c.settings.seed == 0 for c in ids.values() if "train" in c.stages)
    assert len(ids) <= 20
    cpu = {c.case_id: c for f in sel.write(tmp_path / "cpu", cpu=True) for c in expand(load_suite(f), f)}
    assert all(c.model.preset == "tiny-llama" and "cpu" in c.tiers for c in cpu.values())
    assert {c.suite for c in cpu.values()} == {c.suite for c in ids.values()}  # every suite, CPU-sized


@pytest.mark.slow
def test_dry_run_cut_by_its_time_box_still_returns_what_finished(tmp_path):
    out = tmp_path / "out"
    # the harness's usual model cache: what the other tests built there is reused, as on a GPU machine's rerun
    env = {**os.environ, "OUT": str(out), "BUDGET_S": str(BUDGET_S), "PYTHONPATH": str(ROOT)}
    t = time.monotonic()
    done = subprocess.run([str(ROOT / ".ci" / "gpu-reference"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUDGET_S + 240)
    wall = time.monotonic() - t
    log = (out / "pytest.log").read_text() if (out / "pytest.log").exists() else done.stderr
    assert done.returncode == 0, done.stdout + done.stderr + log[-2000:]
    assert "time-box was reached" in log, log[-2000:]  # cut on purpose
    archive = out / "reference.tgz"
    assert 0 < archive.stat().st_size < 16 * 2**20
    run_id = (out / "run_id").read_text().strip()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    records = [n for n in names if n.startswith(f"results/{run_id}/") and n.count("/") == 2 and n.endswith(".json")]
    assert records, names
    assert not [n for n in names if "/adapter" in n or "/trainer" in n or n.endswith((".safetensors", ".bin"))]
    # the cut: the overhead suite (last) did not finish; the time-box held (plus packing and startup)
    assert "test_instrumentation_overhead PASSED" not in log
    pytest_s = int(re.search(r"pytest exit 1(?:24|37) after (\d+) s", log)[1])
    assert pytest_s <= BUDGET_S + 45, pytest_s  # SIGTERM at the budget, SIGKILL 40 s later at the latest
    results, reports = tmp_path / "results", tmp_path / "reports"
    un = subprocess.run([str(ROOT / ".ci" / "gpu-unpack"), str(archive), str(results), str(reports)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert un.returncode == 0, un.stdout + un.stderr
    run = results / "reference" / "cpu-dry-run" / run_id
    assert (run / "logs" / "pytest.log").is_file()
    assert len(list(run.glob("*.json"))) == len(records)
    assert all(json.loads(p.read_text())["run_id"] == run_id for p in run.glob("*.json"))
    assert list(reports.glob(f"{run_id}*.html")), list(reports.iterdir())
    print(f"dry run: {wall:.0f} s wall, {len(records)} records, archive {archive.stat().st_size} bytes")
