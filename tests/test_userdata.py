"""The user's own data and tasks, said in a suite: every line the issue (#26) got from collection or a run has a
test here that fails on the code before it. Checks run on small files written by the tests; no model is loaded."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from harness.matrix import expand
from harness.spec import SpecError, load_suite

ROOT = Path(__file__).resolve().parents[1]
SUITE = """\
name: u
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama}
data:
  DATA
stages: [train]
settings: {seq_len: 64, SETTINGS}
matrix:
  method: [lora-bf16, qlora-nf4]
"""
QA = """train: data/qa.jsonl
  columns: {question: q, answer: a}
  system_prompt: You are a support agent.
  chat_template: chat.jinja
  test_size: 0.25"""


def write(tmp: Path, data: str = QA, settings: str = "max_steps: 4", rows=None, extra: str = "") -> Path:
    (tmp / "data").mkdir(exist_ok=True)
    rows = rows if rows is not None else [{"q": f"question {i}?", "a": f"answer {i}"} for i in range(8)]
    (tmp / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "chat.jinja").write_text((ROOT / "suites" / "templates" / "plain-chat.jinja").read_text())
    p = tmp / "u.yaml"
    p.write_text(SUITE.replace("DATA", data).replace("SETTINGS", settings) + textwrap.dedent(extra))
    return p


def error(p: Path) -> str:
    with pytest.raises(SpecError) as info:
        expand(load_suite(p), p)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{p}: "), msg
    return msg.split(": ", 1)[1]


def test_a_question_answer_file_is_said_with_a_column_map_a_template_and_a_split(tmp_path):
    """The issue: data.fields, data.system_prompt, data.chat_template, data.test_size were 'unknown key'."""
    p = write(tmp_path)
    [case, _] = expand(load_suite(p), p)
    d = case.data
    assert d.columns == {"question": "q", "answer": "a"} and d.test_size == 0.25 and d.heldout
    assert Path(d.chat_template).is_absolute() and Path(d.train).is_absolute()


def test_the_rows_become_trl_prompt_completion_with_the_template(tmp_path):
    """What trl gets: the column map applied, the system prompt first, the held-out split set apart (the 25% of
    8 rows: 2), every row in trl's conversational prompt-completion format; the template renders the prompt as a
    prefix of the whole conversation, so the completion scored is exactly the answer and the EOS token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from harness import data

    p = write(tmp_path)
    spec = expand(load_suite(p), p)[0].data
    train, held, fmt = data.load(spec)
    assert fmt.name == "qa" and (len(train), len(held)) == (6, 2)
    row = train[0]
    assert row["prompt"][0] == {"role": "system", "content": "You are a support agent."}
    assert row["prompt"][1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert {r["prompt"][1]["content"] for r in train} | {r["prompt"][1]["content"] for r in held} == {
        f"question {i}?" for i in range(8)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="</s>")
    data.apply_template(spec, tok, fmt)
    [r] = data.rendered([held[0]], tok)
    i = held[0]["prompt"][1]["content"].split()[1].rstrip("?")
    assert r["prompt"] == f"You are a support agent.\nUser: question {i}?\nAssistant: "
    assert r["completion"] == f"answer {i}</s>\n"
    assert fmt.trainer_options("completion", True) == {"completion_only_loss": True}


def test_a_raw_question_answer_file_without_a_map_fails_at_collection_naming_file_and_columns(tmp_path):
    """The issue: a raw {question, answer} JSONL passed collection, loaded and quantized the model, then failed
    with "KeyError (in stage train): 'text'". Now collection reads its first row and says what is missing."""
    p = write(tmp_path, data="train: data/qa.jsonl")
    msg = error(p)
    assert msg.startswith("data.train: no data format fits the columns q, a: name data.format"), msg
    p = write(tmp_path, data="train: data/qa.jsonl\n  format: qa\n  columns: {question: ask, answer: a}")
    msg = error(p)
    assert msg.startswith(f"data.train: {tmp_path / 'data' / 'qa.jsonl'}: no column 'ask'"), msg


def test_question_answer_columns_are_found_without_a_map(tmp_path):
    rows = [{"question": "x?", "answer": "y"}] * 4
    p = write(tmp_path, data="train: data/qa.jsonl\n  chat_template: none", rows=rows)
    assert expand(load_suite(p), p)[0].data.format == "auto"
    from harness import data

    train, held, fmt = data.load(expand(load_suite(p), p)[0].data)
    assert fmt.name == "qa" and held is None and train[0] == {"prompt": "x?\n", "completion": "y"}


@pytest.mark.parametrize("kind", ["parquet", "csv", "saved"])
def test_local_parquet_csv_and_saved_folders_are_read_by_datasets(tmp_path, kind):
    """Column checks at collection read the schema or the first rows of every local kind datasets reads."""
    from datasets import Dataset

    ds = Dataset.from_list([{"q": f"q{i}", "a": f"a{i}"} for i in range(5)])
    target = {"parquet": "data/qa.parquet", "csv": "data/qa.csv", "saved": "data/saved"}[kind]
    write(tmp_path)
    out = tmp_path / target
    {"parquet": ds.to_parquet, "csv": ds.to_csv, "saved": ds.save_to_disk}[kind](str(out))
    p = write(tmp_path, data=QA.replace("data/qa.jsonl", target))
    from harness import data

    train, held, fmt = data.load(expand(load_suite(p), p)[0].data)
    assert (len(train), len(held)) == (3, 2) and fmt.name == "qa"
    p = write(tmp_path, data=QA.replace("data/qa.jsonl", target).replace("answer: a", "answer: reply"))
    assert "no column 'reply'" in error(p)


def test_a_hub_dataset_missing_from_the_offline_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    p = write(tmp_path, data="hub: nobody/no-such-set\n  revision: main\n  format: qa")
    msg = error(p)
    assert msg.startswith("data.hub: hub dataset nobody/no-such-set@main: not in the local cache"), msg


@pytest.mark.parametrize("settings", [
    "num_train_epochs: 2", "lr_scheduler_type: cosine, lr_warmup_ratio: 0.1", "max_grad_norm: 0.3",
    "group_by_length: true", "eval_steps: 2, lr_warmup_steps: 2", "weight_decay: 0.01",
])
def test_the_tutorials_trainer_settings_are_settings(tmp_path, settings):
    """The issue: settings.num_train_epochs, lr_scheduler_type, max_grad_norm were 'unknown setting'."""
    p = write(tmp_path, settings=settings)
    [case, _] = expand(load_suite(p), p)
    name, value = settings.split(",")[0].split(": ")
    assert getattr(case.settings, name) == yaml.safe_load(value)


@pytest.mark.parametrize("settings, expected", [
    ("max_length: 64", "settings.max_length: unknown setting 'max_length': the harness calls it seq_len"),
    ("dataset_text_field: body", "settings.dataset_text_field: unknown setting 'dataset_text_field': the harness "
                                 "calls it data.columns"),
    ("learning_rat: 0.1", "settings.learning_rat: unknown setting 'learning_rat' (did you mean 'learning_rate'?)"),
    ("num_train_epochs: 2, max_steps: 4", "settings: give max_steps or num_train_epochs, not both"),
])
def test_unknown_settings_read_whole(tmp_path, settings, expected):
    """The issue: "unknown setting (expected one of … m…": the list was cut mid-word, its last entries never
    showed. Now: the harness's name for a tutorial's name, or close matches, and where all are listed."""
    p = write(tmp_path, settings=settings)
    msg = error(p)
    assert msg.startswith(expected) and "…" not in msg, msg


def test_eval_during_training_without_a_held_out_split_fails_at_collection(tmp_path):
    p = write(tmp_path, data=QA.replace("\n  test_size: 0.25", ""), settings="max_steps: 4, eval_steps: 2")
    assert error(p).startswith("settings.eval_steps: eval loss during training needs a held-out split")


@pytest.mark.parametrize("old, new, expected", [
    ("columns:", "column:", "data.column: unknown key (did you mean 'columns'?)"),
    ("columns:", "fields:", "data.fields: unknown key: the harness calls it columns"),  # the words
    ("test_size: 0.25", "eval: test", "data.eval: unknown key: the harness calls it eval_split (a named split) or "
                                      "test_size"),
])
def test_an_unknown_data_key_says_the_right_one(tmp_path, old, new, expected):
    p = write(tmp_path, data=QA.replace(old, new))
    assert error(p) == expected


def test_a_registered_task_pointed_at_local_data_loads_offline(tmp_path, monkeypatch):
    """The issue: eval.tasks: [arc_easy] failed when scoring with "Couldn't reach 'allenai/ai2_arc' on the Hub".
    Pointed at the project's own ARC-format rows (suites/data/generate.py writes them), lm-eval builds the
    registered task offline and its documents are those rows, in arc_easy's own prompt."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from harness.spec import TaskSpec
    from harness.stages.evaluate import task_config

    local = ROOT / "suites" / "data" / "arc_easy_local.jsonl"
    rows = [json.loads(line) for line in local.read_text().splitlines()]
    task = TaskSpec(name="arc_easy", data_files={"test": str(local)}, limit=5)
    cfg = task_config(task, [], {})
    loaded = TaskManager(include_defaults=False).load([cfg])
    [t] = loaded["tasks"].values()
    docs = list(t.test_docs())
    assert [d["question"] for d in docs] == [r["question"] for r in rows[:5]]
    assert t.doc_to_text(docs[0]) == f"Question: {rows[0]['question']}\nAnswer:"
    assert t.doc_to_target(docs[0]) == rows[0]["choices"]["label"].index(rows[0]["answerKey"])


def test_tasks_are_checked_at_collection(tmp_path):
    p = write(tmp_path, extra="eval: {tasks: [heldout_answers, {name: arc_easy, data_files: {test: nope.jsonl}}]}\n")
    p.write_text(p.read_text().replace("stages: [train]", "stages: [train, eval]"))
    assert error(p).startswith("eval.tasks[1].data_files.test: data file not found")
    p = write(tmp_path, data="train: data/qa.jsonl\n  columns: {question: q, answer: a}\n  chat_template: none",
              extra="eval: {tasks: [heldout_text]}\n")
    p.write_text(p.read_text().replace("stages: [train]", "stages: [train, eval]"))
    assert error(p).startswith("eval.tasks[0]: heldout_text scores the data's held-out split")
    p = write(tmp_path, extra="eval: {tasks: [heldout_text], primary: eval.other.acc}\n")
    p.write_text(p.read_text().replace("stages: [train]", "stages: [train, eval]"))
    assert error(p).startswith("eval: primary 'eval.other.acc': expected eval.<task>.<metric>")


def test_the_training_model_keeps_its_4bit_layout_through_eval_forwards(tmp_path):
    """Checks the harness's handling with a fake: this CPU has no avx512-bf16, so bitsandbytes' repack flag is
    set by hand as that CPU would set it. An eval-mode no-grad forward then repacks a Linear4bit in place (the
    trap); on a module ``keep_layout`` has handled it does not."""
    import bitsandbytes as bnb
    import torch

    from harness.methods.bnb4bit import keep_layout

    def layer():
        lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        lin.support_avx512bf16_for_cpu = True  # what an avx512-bf16 CPU sets in __init__
        return lin

    trapped, kept = torch.nn.Sequential(layer()), torch.nn.Sequential(layer())
    assert keep_layout(kept) == 1 and keep_layout(trapped.__class__()) == 0
    import bitsandbytes.nn.modules as mods

    calls = []
    real = mods._convert_weight_packed_for_cpu
    mods._convert_weight_packed_for_cpu = lambda w, qs, *a: (calls.append(1), (w, qs))[1]
    try:
        for model in (trapped, kept):
            model.eval()
            with torch.no_grad():
                model(torch.randn(2, 64))
    finally:
        mods._convert_weight_packed_for_cpu = real
    assert len(calls) == 1  # the trapped model repacked, the kept one did not


@pytest.mark.parametrize("with_table", [True, False])
def test_the_headline_shows_the_suites_own_tasks_primary_first(tmp_path, with_table):
    """The issue: a hand-written task of the user's own worked, but the headline printed no quality column (its
    columns were tied to the shipped task names). Known truth: 3 seeds of two methods on the user's task
    ``faq`` (acc 0.70 vs 0.60 over 200 items) and ``notes`` (bits/byte); the primary, named by the suite (the
    eval stage's eval.tasks table) or, for records without it, the bits/byte metric, leads the quality columns
    and the differences."""
    import numpy as np

    from harness.records import Record, write_json_atomic, write_record
    from harness.report import headline

    rng = np.random.default_rng(3)
    run = tmp_path / "run"
    write_json_atomic(run / "run.json", {"run_id": "run", "started_at": "2026-12-01T00:00:00+00:00"})
    table = [{"task": "faq", "metric": "acc", "primary": False}, {"task": "notes", "metric": "bits_per_byte",
                                                                  "primary": True}]
    for seed in range(3):
        for method, acc in (("lora-bf16", 0.70), ("qlora-nf4", 0.60)):
            items = rng.random(200) < acc
            rows = [{"task": "faq", "doc_id": i, "acc": float(v)} for i, v in enumerate(items)]
            rows += [{"task": "notes", "doc_id": i, "loglikelihood": -100.0 - rng.random(), "bytes": 120}
                     for i in range(30)]
            rec = Record(run_id="run", suite="mine", case_id=f"mine[{method}-seed{seed}]", method=method,
                         params={"method": method, "seed": seed}, status="passed",
                         metrics={"eval.faq.acc": float(items.mean()), "eval.faq.base_acc": 0.25,
                                  "eval.notes.bits_per_byte": 1.2 + 0.01 * seed},
                         tables={"eval.items.adapter": rows, **({"eval.tasks": table} if with_table else {})})
            write_record(run, rec)
    text = headline.table(run, "mine")
    head = text.splitlines()[0]
    assert "notes bits/byte" in head and "faq acc (base → adapter)" in head, head
    assert head.index("notes bits/byte") < head.index("faq acc")
    assert head.index("Δ to lora-bf16, notes bits/byte [CI]") < head.index("Δ to lora-bf16, faq acc [CI]")
    row = next(x for x in text.splitlines() if x.startswith("| qlora-nf4 (n=3) |"))
    assert "| 0.250 → 0.5" in row or "| 0.250 → 0.6" in row, row
    assert "- qlora-nf4 against lora-bf16: notes bits_per_byte:" in text and "faq acc: worse by" in text
