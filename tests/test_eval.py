"""lm-eval end to end: a shipped task scores a trained adapter, its base and its merged form."""

from __future__ import annotations

import json
from pathlib import Path

# pytester restores sys.modules after a test: extension modules first imported inside one (numpy.fft through
# lm-eval's metrics) then cannot be loaded again by a later test. Import them before any test runs.
import numpy.fft  # noqa: F401
import peft  # noqa: F401
import pytest
import yaml

from harness.spec import TaskSpec
from harness.stages.evaluate import score, task_config

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"

SUITE = """\
name: ev
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama, num_layers: 2, pretrain: data/support_pretrain.jsonl, pretrain_steps: 10}
data: {train: data/support_train.jsonl}
stages: [train, eval]
settings: {seq_len: 48, batch_size: 4, max_steps: 12, warmup_steps: 1, eval_limit: 12, learning_rate: 0.002, compute_dtype: auto}
matrix:
  method: [qlora-nf4-dq]
eval:
  tasks: [support_mc, support_ppl]
timeout_s: 600
"""


def test_task_data_paths_become_absolute(tmp_path):
    """lm-eval resolves data_files from the working directory: a shipped task's relative paths become absolute."""
    cfg = task_config(TaskSpec(name="support_mc", num_fewshot=2), [SUITES / "tasks"], {})
    path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path.is_file() and cfg["num_fewshot"] == 2


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
    # per-item rows (for paired bootstraps) rebuild lm-eval's own aggregates of every variant
    from harness import stats

    for variant, prefix in (("adapter", ""), ("merged", "merged_"), ("base", "base_")):
        rows = rec["tables"][f"eval.items.{variant}"]
        assert len([r for r in rows if r["task"] == "support_mc"]) == 12, variant
        for metric in ("acc", "bits_per_byte"):
            name = f"eval.{'support_mc' if metric == 'acc' else 'support_ppl'}.{prefix}{metric}"
            arr = list(stats.item_metric(name).arrays(rows).values())
            num, den = sum(a[0] for a in arr), sum(a[1] for a in arr)
            assert float(stats.item_metric(name).finish(num / den)) == pytest.approx(m[name], rel=1e-9), name


def _rolling_task() -> str:
    """The shipped held-out text task (loglikelihood_rolling: bits per byte)."""
    for f in sorted((SUITES / "tasks").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        if cfg.get("output_type") == "loglikelihood_rolling":
            return cfg["task"]
    raise AssertionError("no loglikelihood_rolling task shipped")


@pytest.mark.slow
def test_scores_are_float32_log_likelihoods(tmp_path):
    """bf16 log-softmax puts a document's log-likelihood on a grid of 2 or 4 nats: the scores must not be."""
    import math
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    from harness import presets
    from harness.matrix import expand
    from harness.models import Source, build_on_device, train_tokenizer
    from harness.spec import load_suite
    from harness.stages import Context

    shutil.copytree(SUITES / "data", tmp_path / "data")
    shutil.copytree(SUITES / "tasks", tmp_path / "tasks")
    task = _rolling_task()
    (tmp_path / "s.yaml").write_text(SUITE.replace("tasks: [support_mc, support_ppl]", f"tasks: [{task}]")
                                     .replace("eval_limit: 12", "eval_limit: 40"))
    case = expand(load_suite(tmp_path / "s.yaml"), tmp_path / "s.yaml")[0]
    tok = train_tokenizer([str(tmp_path / "data" / "support_train.jsonl")], 2048, tmp_path / "tok")
    texts = [yaml.safe_load(line)["text"] for line in
             (tmp_path / "tasks" / yaml.safe_load((tmp_path / "tasks" / f"{task}.yaml").read_text())
              ["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines() if line.strip()][:40]
    n_bytes = sum(len(t.encode()) for t in texts)
    totals = []
    for seed in (0, 1):  # two different adapters on one base
        torch.manual_seed(seed)
        base = build_on_device(Source(None, None, presets.PRESETS["tiny-llama"], {"num_layers": 1}),
                               "lora-bf16", "bf16", "cpu")
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
        flat, *_ = score(model, tok, Context(case, None, "cpu", tmp_path, tmp_path))
        nats = flat[f"{task}.bits_per_byte"] * n_bytes * math.log(2)  # the summed log-likelihood, in nats
        totals.append(nats)
    # bf16 sums are whole numbers; a float32 sum lands within 1e-3 of one by chance 0.2% of the time (it did
    # once here: 6405.99976), so both adapters must miss the grid for the test to fail
    assert max(abs(t - round(t)) for t in totals) > 1e-3, totals
    assert totals[0] != totals[1]


@pytest.mark.slow
def test_score_merged_false_keeps_the_agreement_and_skips_the_merged_lm_eval_pass(pytester, tmp_path_factory,
                                                                                monkeypatch):
    """``score_merged: false``: the merged form is still built, saved and compared with the unmerged adapter on
    held-out text (kl, top-1), but lm-eval does not score it (a pass as long as the adapter's own)."""
    import shutil

    monkeypatch.setenv("QLORA_HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    suites = pytester.path / "suites"
    suites.mkdir()
    shutil.copytree(SUITES / "data", suites / "data")
    shutil.copytree(SUITES / "tasks", suites / "tasks")
    suite = SUITE.replace("max_steps: 12", "max_steps: 12, score_merged: false").replace("eval_limit: 12", "eval_limit: 4")
    (suites / "ev.yaml").write_text(suite.replace("tasks: [support_mc, support_ppl]",
                                                  "tasks: [support_mc]\n  heldout: data/support_heldout.jsonl"))
    pytester.runpytest_subprocess("suites/", "--run-id", "ev", "--no-report").assert_outcomes(passed=1)
    rec = json.loads((pytester.path / "results" / "ev" / "ev__qlora-nf4-dq.json").read_text())
    m = rec["metrics"]
    assert "eval.support_mc.acc" in m and "eval.support_mc.base_acc" in m
    assert not [k for k in m if k.startswith("eval.support_mc.merged") or k.endswith("_merge_delta")]
    assert "eval.items.merged" not in rec["tables"]
    assert m["eval.merge.requantize.top1_agreement"] > 0 and "eval.merge.requantize.kl_mean" in m
    # each form was saved to measure its size and load time, then removed: on SmolLM2 they were 0.8 GB a case
    assert m["eval.merge.requantize.size_bytes"] > 0 and m["eval.merge.none.size_bytes"] > 0
    work = pytester.path / "results" / "ev" / "work" / "ev__qlora-nf4-dq"
    assert (work / "adapter").is_dir() and not sorted(p.name for p in work.glob("model-*"))
