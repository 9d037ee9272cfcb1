"""A pretrained synthetic base rebuilds bit for bit: same code, data and seed give the same fingerprint in a fresh
process, whatever the thread counts of torch and of the tokenizer trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = """\
name: rb
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 2, pretrain: data/support_pretrain.jsonl, pretrain_steps: 30}
data: {train: data/support_train.jsonl}
stages: [train]
matrix:
  method: [lora-bf16]
"""
BUILD = """\
import json, sys, torch
from harness import matrix, models, spec
torch.set_num_threads(int(sys.argv[2]))  # what the worker would pick on a machine with that many cores
case = matrix.expand(spec.load_suite(sys.argv[1]), sys.argv[1])[0]
source = models.prepare(case)
print(json.dumps({"fingerprint": source.info["fingerprint"], "threads": torch.get_num_threads()}))
"""


def _build(suite: Path, cache: Path, torch_threads: int, rayon_threads: int) -> dict:
    env = {**os.environ, "QLORA_HARNESS_CACHE": str(cache), "RAYON_NUM_THREADS": str(rayon_threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", BUILD, str(suite), str(torch_threads)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_pretrained_base_rebuilds_bit_for_bit_in_fresh_processes(tmp_path):
    import shutil

    shutil.copytree(ROOT / "suites" / "data", tmp_path / "data")
    suite = tmp_path / "rb.yaml"
    suite.write_text(SUITE)
    # a 1-core and an 8-thread machine: the thread counts that built different bases before
    a = _build(suite, tmp_path / "cache-a", torch_threads=1, rayon_threads=1)
    b = _build(suite, tmp_path / "cache-b", torch_threads=8, rayon_threads=4)
    assert (a["threads"], b["threads"]) == (1, 8)  # the pretraining's own thread count is restored afterwards
    assert a["fingerprint"] == b["fingerprint"]


def test_the_fingerprint_covers_every_byte_of_the_tensors_and_the_tokenizer(tmp_path):
    from harness.models import _fingerprint

    ckpt, tok = tmp_path / "ckpt", tmp_path / "tok"
    ckpt.mkdir()
    tok.mkdir()
    weights = bytearray(3 * 2**20)  # a change past the first MiB went unnoticed before
    (ckpt / "model.safetensors").write_bytes(bytes(weights))
    (ckpt / "config.json").write_text("{}")
    (tok / "tokenizer.json").write_text('{"v": 1}')
    before = _fingerprint(ckpt, tok)
    weights[-1] = 1
    (ckpt / "model.safetensors").write_bytes(bytes(weights))
    changed = _fingerprint(ckpt, tok)
    assert changed != before
    (tok / "tokenizer.json").write_text('{"v": 2}')
    assert _fingerprint(ckpt, tok) != changed


def _record(method: str, fingerprint: str | None, seed: int = 0, suite: str = "smoke"):
    from harness.records import Record

    model = {"source": "synthetic"} | ({"fingerprint": fingerprint} if fingerprint else {})
    return Record(run_id="r", suite=suite, case_id=f"{suite}[{method}-s{seed}]", method=method,
                  params={"method": method, "seed": seed}, model=model, status="passed")


def test_the_report_names_comparisons_whose_bases_differ():
    from harness.report.data import differing_bases

    same = [_record("lora-bf16", "aaaa"), _record("qlora-nf4", "aaaa"), _record("qlora-nf4", "bbbb", seed=1)]
    assert differing_bases(same) == []  # another seed is another comparison
    mixed = same + [_record("qlora-fp4", "cccc")]
    [line] = differing_bases(mixed)
    assert line.startswith("smoke: ") and "aaaa: lora-bf16-s0, qlora-nf4-s0" in line and "cccc: qlora-fp4-s0" in line
    assert differing_bases([_record("lora-bf16", None), _record("qlora-nf4", "aaaa")]) == []
    baseline = {r.case_id: r for r in [_record("lora-bf16", "32178ac"), _record("qlora-nf4", "aaaa")]}
    assert differing_bases(same[:2], baseline) == ["smoke[lora-bf16-s0]: base aaaa differs from the baseline's 32178ac"]


def test_the_run_page_flags_a_suite_whose_bases_differ(tmp_path):
    from harness.records import write_json_atomic, write_record
    from harness.report.render import render_run

    run_dir = tmp_path / "results" / "r"
    write_json_atomic(run_dir / "run.json", {"run_id": "r", "started_at": "2026-12-01T00:00:00+00:00", "env": {},
                                             "suites": ["smoke"]})
    for r in [_record("lora-bf16", "aaaa1111"), _record("qlora-nf4", "bbbb2222")]:
        write_record(run_dir, r)
    page = render_run(run_dir, tmp_path / "reports").read_text()
    assert "Different bases: smoke: cases compared with each other ran on different bases" in page
    assert "aaaa1111: lora-bf16-s0" in page
