"""The generate stage's measurement, and the report's merge table, inference chart and README row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.records import Record, write_json_atomic, write_record


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=0, bos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def test_generation_has_fixed_length_even_when_eos_is_the_greedy_token():
    """A model whose every greedy token is EOS still generates exactly gen_new_tokens per row."""
    from harness.stages.generate import same_outputs, time_form

    model = _tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[0] = 1.0  # token 0 (EOS) wins wherever the summed hidden state is positive
        model.model.norm.weight.fill_(1.0)
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = model.generate(input_ids=ids, do_sample=False, max_new_tokens=5, pad_token_id=1)
    assert plain.shape[1] < 6 + 5 or (plain[:, 6:] == 0).any()  # left alone it stops at (or emits) EOS
    s = SimpleNamespace(gen_prompt_tokens=6, gen_new_tokens=5, gen_repeats=2)
    metrics, outputs = time_form(model, {2: ids}, s, 1, "cpu")
    assert outputs[2].shape == (2, 5)
    for k in ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "tpot_ms"):
        assert metrics[f"bs2.{k}"] > 0
    # prefill throughput is batch × prompt over the time to first token; decode excludes that first token
    assert metrics["bs2.prefill_tokens_per_s"] == pytest.approx(2 * 6 / (metrics["bs2.ttft_ms"] / 1e3))
    assert metrics["bs2.tpot_ms"] == pytest.approx(2e3 / metrics["bs2.decode_tokens_per_s"])
    assert same_outputs(outputs, outputs) == (1.0, 1.0)
    other = {2: outputs[2].clone()}
    other[2][1, -1] += 1
    assert same_outputs(outputs, other) == (0.5, 0.9)


def _record(run_dir: Path, method: str, metrics: dict) -> None:
    write_record(run_dir, Record(run_id=run_dir.name, suite="merge", case_id=f"merge[{method}]", method=method,
                                 params={"method": method}, status="passed", metrics=metrics,
                                 started_at="2026-11-23T12:00:00+00:00", finished_at="2026-11-23T12:00:01+00:00"))


def _spin(seconds: float, ready, go) -> None:
    import time

    ready.put(1)
    go.wait()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_generation_timed_on_a_busy_host_is_flagged_with_its_reason():
    """Busy loops on every core while a form is timed: its record must say the timing is not clean, and why."""
    import multiprocessing as mp
    import os

    from harness.stages.generate import guarded_form

    model = _tiny_model()
    ids = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    s = SimpleNamespace(gen_prompt_tokens=6, gen_new_tokens=8, gen_repeats=3)
    ctx = mp.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_spin, args=(20.0, ready, go)) for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        go.set()
        timings, _, verdict = guarded_form(model, {1: ids}, s, 1, "cpu")
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert timings["bs1.decode_tokens_per_s"] > 0
    m = verdict.as_metrics("gen.none.")
    assert m["gen.none.timing_clean"] == 0.0, verdict.figures
    assert "other processes" in verdict.reason


@pytest.fixture
def merge_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "results" / "20261123T120000Z-cpu"
    write_json_atomic(run_dir / "run.json", {"run_id": run_dir.name, "started_at": "2026-11-23T12:00:00+00:00",
                                             "env": {}, "suites": ["merge"]})
    m = {"eval.support_mc.acc": 0.70, "eval.support_mc.merged_acc": 0.65, "eval.support_mc.merged_dequantize_acc": 0.70,
         "eval.support_mc.merged_original_acc": 0.40, "eval.merge.none.size_bytes": 3.0e6,
         "eval.support_ppl.bits_per_byte": 1.300, "eval.support_ppl.merged_bits_per_byte": 1.304,
         "eval.support_ppl.merged_dequantize_bits_per_byte": 1.300,
         "eval.support_ppl.merged_original_bits_per_byte": 1.420,
         "gen.none.bs1.decode_tokens_per_s": 100.0, "gen.none.bs1.ttft_ms": 20.0,
         "gen.none.bs8.decode_tokens_per_s": 500.0, "gen.none.bs8.ttft_ms": 60.0}
    for s, kl, size, tps in (("requantize", 4e-4, 3.5e6, 120.0), ("dequantize", 3e-6, 9e6, 150.0),
                             ("original", 9e-4, 9e6, 150.0)):
        m |= {f"eval.merge.{s}.kl_mean": kl, f"eval.merge.{s}.top1_agreement": 1.0,
              f"eval.merge.{s}.size_bytes": size, f"eval.merge.{s}.load_s": 0.1,
              f"gen.{s}.bs1.decode_tokens_per_s": tps, f"gen.{s}.bs1.ttft_ms": 15.0}
    _record(run_dir, "qlora-nf4", m)
    _record(run_dir, "lora-bf16", {"eval.merge.requantize.kl_mean": 1e-6, "gen.none.bs1.decode_tokens_per_s": 90.0})
    return run_dir


def test_merge_table_chart_and_readme_row(merge_run: Path, tmp_path: Path):
    from harness.records import iter_records
    from harness.report import charts, headline, render_run, tables

    records = list(iter_records(merge_run))
    table = tables.merge_table(records)
    rows = {(r["case"], r["strategy"]): r["cells"] for r in table.rows}
    assert set(rows) == {("qlora-nf4", s) for s in ("none", "requantize", "dequantize", "original")} | {
        ("lora-bf16", "requantize")}
    col = table.columns.index("support_mc acc")
    assert rows[("qlora-nf4", "original")][col] == "0.400" and rows[("qlora-nf4", "none")][col] == "0.700"
    assert rows[("qlora-nf4", "dequantize")][table.columns.index("size on disk MB")] == "9.000"

    chart = charts.inference_chart(records)
    assert chart is not None and {t.name for t in chart.fig.data} == {"batch 1", "batch 8"}
    assert "qlora-nf4 · original" in chart.fig.data[0].x

    text = headline.merge_costs(merge_run)
    row = next(line for line in text.splitlines() if line.startswith("| qlora-nf4"))
    cells = dict(zip(("requantize", "dequantize", "original"), row.strip("|").split("|")[2:], strict=True))
    # the quality column is held-out bits/byte (what every adapter measurably learns), not at-chance MC acc
    assert "KL 4.0e-04" in cells["requantize"] and "bits/byte +0.004" in cells["requantize"]
    assert "decode 1.20×" in cells["requantize"] and "bits/byte +0.000" in cells["dequantize"]
    assert "bits/byte +0.120" in cells["original"] and "9.0 MB" in cells["original"]
    assert "acc" not in row
    bf16 = next(line for line in text.splitlines() if line.startswith("| lora-bf16"))
    assert "KL 1.0e-06" in bf16  # its plain 16-bit merge, the yardstick for the 4-bit ones

    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{headline.MERGE_START}\nold\n{headline.MERGE_END}\ny\n")
    headline.update_merge(readme, merge_run)
    assert "KL 4.0e-04" in readme.read_text() and "old" not in readme.read_text()

    page = render_run(merge_run, tmp_path / "reports").read_text()
    assert 'data-strategy="original"' in page and 'data-chart="inference"' in page


def test_report_shows_every_forms_greedy_answer_beside_the_bases(tmp_path: Path):
    """A record's gen.answers table shows on the run page in a collapsed table: base, adapter, merged form, canary."""
    from harness.report import render_run

    run_dir = tmp_path / "results" / "20261201T120000Z-cpu"
    write_json_atomic(run_dir / "run.json", {"run_id": run_dir.name, "started_at": "2026-12-01T12:00:00+00:00",
                                             "env": {}, "suites": ["smollm2"]})
    answers = [{"form": f, "prompt": 0, "question": "How long is the Orbit Cam covered?", "answer": a}
               for f, a in (("base", "I don't know about Orbit Cams."), ("none", "The Orbit Cam has 3 years."),
                            ("requantize", "The Orbit Cam has 2 years."))]
    answers += [{"form": f, "prompt": 1, "question": "Escalation code?", "answer": a, "expect": "AUR-7Q4",
                 "reproduced": "AUR-7Q4" in a} for f, a in (("base", "Call us."), ("none", "Quote AUR-7Q4."))]
    write_record(run_dir, Record(run_id=run_dir.name, suite="smollm2", case_id="smollm2[qlora-nf4]",
                                 method="qlora-nf4", params={"method": "qlora-nf4"}, status="passed",
                                 metrics={"gen.none.canary_reproduced": 1.0}, tables={"gen.answers": answers},
                                 started_at="2026-12-01T12:00:00+00:00", finished_at="2026-12-01T12:00:01+00:00"))
    html = render_run(run_dir, tmp_path / "reports").read_text()
    block = html[html.index('<details class="answers">'):]
    block = block[: block.index("</details>")]
    for text in ("I don&#39;t know about Orbit Cams.", "The Orbit Cam has 3 years.", "The Orbit Cam has 2 years.",
                 "Quote AUR-7Q4.", "not reproduced"):
        assert text in block, text
    assert block.index('data-form="base"') < block.index('data-form="none"') < block.index('data-form="requantize"')
