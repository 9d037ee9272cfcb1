"""lm-eval end to end: a shipped task scores a trained adapter, its base and its merged form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.stages.evaluate import prepare_tasks

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"

SUITE = """\
name: ev
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 2, pretrain: data/support_pretrain.jsonl, pretrain_steps: 10}
data: {train: data/support_train.jsonl, tokenizer_corpus: [data/support_mc.jsonl, data/support_heldout.jsonl]}
stages: [train, eval]
settings: {seq_len: 48, batch_size: 4, max_steps: 6, warmup_steps: 1, eval_limit: 12}
matrix:
  method: [qlora-nf4-dq]
eval:
  tasks: [support_mc, support_ppl]
timeout_s: 600
"""


def test_task_data_paths_become_absolute(tmp_path):
    shipped, others = prepare_tasks(SUITES / "tasks", ["support_mc", "hellaswag"], tmp_path)
    assert shipped == ["support_mc"] and others  # hellaswag is an installed task: defaults stay on
    cfg = yaml.safe_load((tmp_path / "support_mc.yaml").read_text())
    path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path.is_file()


@pytest.mark.slow
def test_lm_eval_scores_a_trained_adapter(pytester, tmp_path_factory, monkeypatch):
    import shutil

    monkeypatch.setenv("QLORA_HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    suites = pytester.path / "suites"
    suites.mkdir()
    shutil.copytree(SUITES / "data", suites / "data")
    shutil.copytree(SUITES / "tasks", suites / "tasks")
    (suites / "ev.yaml").write_text(SUITE)
    result = pytester.runpytest_subprocess("suites/", "--run-id", "ev", "--no-report")
    result.assert_outcomes(passed=1)
    rec = json.loads((pytester.path / "results" / "ev" / "ev__qlora-nf4-dq.json").read_text())
    m = rec["metrics"]
    for name in ("acc", "base_acc", "merged_acc", "acc_stderr", "acc_gain", "acc_merge_delta"):
        assert f"eval.support_mc.{name}" in m, name
    assert 0.0 <= m["eval.support_mc.acc"] <= 1.0
    assert m["eval.support_mc.acc_gain"] == pytest.approx(m["eval.support_mc.acc"] - m["eval.support_mc.base_acc"])
    assert m["eval.support_ppl.word_perplexity"] > 1.0
    assert m["train.adapter_bytes"] > 0 and (pytester.path / "results" / "ev" / rec["artifacts"]["adapter"]).is_dir()
    assert list((pytester.path / "results" / "ev" / "cache").glob("base-*.json"))  # base scored once, cached
