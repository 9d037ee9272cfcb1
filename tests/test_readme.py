"""The README's headline table is exactly what the committed reference records say."""

from __future__ import annotations

import re
from pathlib import Path

from harness.report import headline

ROOT = Path(__file__).resolve().parents[1]


def test_headline_table_matches_the_committed_records():
    readme = ROOT / "README.md"
    shown = headline.embedded(readme)
    quoted = re.search(r"; runs? (.*), suite `smoke`", shown).group(1)  # one run, or a run and those it extends
    run_id = max(re.findall(r"`([^`]+)`", quoted))  # the newest: it reads the records of those it extends
    assert shown == headline.table(_committed(run_id), "smoke")



def _committed(run_id: str) -> Path:
    runs = list((ROOT / "results" / "reference").glob(f"*/{run_id}"))
    assert len(runs) == 1, f"the README quotes run {run_id}, which must be committed under results/reference/"
    return runs[0]


def _real_blocks(start: str, end: str) -> list[str]:
    """Every real-model block of the README of one kind: the plain one and those naming their run."""
    readme = ROOT / "README.md"
    starts = headline.named_starts(readme.read_text(), start)
    assert starts, f"no {start} block"
    return [headline.embedded(readme, s, end) for s in starts.values()]


def test_real_model_table_matches_the_committed_records():
    for shown in _real_blocks(headline.REAL_START, headline.REAL_END):
        run_id = max(re.findall(r"`([^`]+)`", re.search(r"; runs? (.*), suite `smollm2`", shown).group(1)))
        assert shown == headline.table(_committed(run_id), "smollm2")
        assert "qlora-nf4-dq" in shown and "lora-bf16" in shown  # the reference and the tutorials' method, at least


def test_real_model_merge_costs_match_the_committed_records():
    for shown in _real_blocks(headline.REAL_MERGE_START, headline.REAL_MERGE_END):
        run_id = max(re.findall(r"`([^`]+)`", re.search(r"Runs? (.*), suite `smollm2`", shown).group(1)))
        assert shown == headline.merge_costs(_committed(run_id), "smollm2")
        assert "canary" in shown


def test_update_fills_the_block_that_names_the_run(tmp_path, monkeypatch):
    """Two real-model references side by side (seed 0 of every method on an AVX2 machine in fp32; three seeds of two
    methods on an AVX512-bf16 one): ``headline RUN --update`` must rewrite the block naming RUN (or a run it
    extends) and leave the other one as it is."""
    import json

    from harness import __main__ as cli

    for name, extends in (("a", None), ("b", None), ("b2", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"run_id": name, "extends": extends}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- real-model:start -->\nold a\n<!-- real-model:end -->\n"
                      "<!-- real-model:start b -->\nold b\n<!-- real-model:end -->\n")
    monkeypatch.setattr(headline, "has_suite", lambda run_dir, suite: suite == "smollm2")
    monkeypatch.setattr(headline, "table", lambda run_dir, suite: f"table of {run_dir.name}")
    monkeypatch.setattr(headline, "merge_costs", lambda run_dir, suite: "")
    for run, want in (("b2", "old a\n<!-- real-model:end -->\n<!-- real-model:start b -->\ntable of b2"),
                      ("a", "table of a\n<!-- real-model:end -->\n<!-- real-model:start b -->\ntable of b2")):
        assert cli.main(["headline", run, "--results", str(tmp_path), "--update", str(readme)]) in (0, None)
        assert want in readme.read_text(), readme.read_text()


def test_merge_costs_match_the_committed_records():
    shown = headline.embedded(ROOT / "README.md", headline.MERGE_START, headline.MERGE_END)
    run_id = re.search(r"Run `([^`]+)`", shown).group(1)
    assert shown == headline.merge_costs(_committed(run_id))


def test_speed_table_matches_the_committed_records():
    shown = headline.embedded(ROOT / "README.md", headline.SPEED_START, headline.SPEED_END)
    run_id = max(re.findall(r"`([^`]+)`", re.search(r"; runs? (.*), suite `speed`", shown).group(1)))
    assert shown == headline.speed_table(_committed(run_id))


def test_a_real_models_tokens_per_second_keeps_its_digits():
    """SmolLM2 trains at about 5 tokens/s on two cores: whole numbers showed every method as 5."""
    from harness.records import Record

    def rec(seed, tps):
        return Record(run_id="r", suite="s", case_id=f"s[qlora-nf4-seed{seed}]", method="qlora-nf4", status="passed",
                      params={"method": "qlora-nf4", "seed": seed}, metrics={"train.tokens_per_s": tps})

    from harness import stats

    one, (g,) = rec(0, 5.312), stats.groups([rec(0, 5.312), rec(1, 5.6), rec(2, 5.0)])
    assert headline._cell(one, "train.tokens_per_s", headline.COLUMNS[7][2]) == "5.31"
    assert headline._group_cell(g, stats.summarise(g), "train.tokens_per_s", headline.COLUMNS[7][2]) == "5.3 ± 0.7"


def test_a_one_seed_table_says_its_brackets_cover_eval_items_only(tmp_path):
    """A real-model run of one seed per method (SmolLM2's seed 0): its Δ brackets come from the eval items alone
    and its ± on a score is lm-eval's standard error, not an interval over seeds; the table must say which."""
    from harness.records import Record

    def rec(method, items):
        rows = [{"task": "support_mc", "doc_id": i, "acc": float(v)} for i, v in enumerate(items)]
        return Record(run_id="one", suite="s", case_id=f"s[{method}-seed0]", method=method, status="passed",
                      params={"method": method, "seed": 0},
                      metrics={"eval.support_mc.acc": sum(items) / len(items), "eval.support_mc.acc_stderr": 0.05,
                               "eval.support_mc.base_acc": 0.25},
                      tables={"eval.items.adapter": rows})

    for r in (rec("lora-bf16", [1, 0] * 40), rec("qlora-nf4", [1, 1, 0, 0] * 20)):
        (tmp_path / f"s__{r.method}-seed0.json").write_text(r.model_dump_json())
    text = headline.table(tmp_path, "s")
    assert "| qlora-nf4 |" in text and "[" in text.split("| qlora-nf4 |")[1].split("\n")[0]  # a Δ with brackets
    assert "paired over eval items: one seed" in text and "paired over seeds" not in text
    assert "0.250 → 0.500 ± 0.050" in text and "± on a score: lm-eval's standard error over its eval items." in text
    # and the report's forest plot says so in its title
    from harness import stats
    from harness.records import read_run_records
    from harness.report.charts import forest_chart

    st = stats.run_stats(read_run_records(tmp_path))["suites"]["s"]
    title = forest_chart(st).title
    assert "one seed, not over seeds" in title and "paired over seeds" not in title, title


def test_the_merge_table_says_which_merged_form_lost_the_canary(tmp_path):
    """SmolLM2 nf4-dq seed 0: merged back into its 4-bit codes the adapter no longer said the canary (top-1 agreement
    0.47), merged into the 16-bit dequantized base it did: the table must show that, form by form, from the records."""
    from harness.records import Record

    metrics = {"eval.merge.requantize.kl_mean": 1.17, "eval.merge.requantize.top1_agreement": 0.47,
               "eval.merge.dequantize.kl_mean": 0.0, "eval.merge.dequantize.top1_agreement": 1.0,
               "gen.none.canary_reproduced": 1.0, "gen.requantize.canary_reproduced": 0.0,
               "gen.dequantize.canary_reproduced": 1.0}
    for seed in (0, 1):
        r = Record(run_id="m", suite="s", case_id=f"s[qlora-nf4-dq-seed{seed}]", method="qlora-nf4-dq",
                   status="passed", params={"method": "qlora-nf4-dq", "seed": seed}, metrics=metrics)
        (tmp_path / f"s__qlora-nf4-dq-seed{seed}.json").write_text(r.model_dump_json())
    text = headline.merge_costs(tmp_path, "s")
    row = next(line for line in text.splitlines() if line.startswith("| qlora-nf4-dq seed 0 |"))
    requantize, dequantize = row.split(" | ")[2:4]
    assert "top-1 0.470" in requantize and "canary lost" in requantize
    assert "top-1 1.000" in dequantize and "canary said" in dequantize
    assert "after save and reload 2 of 2; requantize 0 of 2; dequantize 2 of 2 cases" in text
    assert "2 seeds a method, a row each" in text and "one seed" not in text
