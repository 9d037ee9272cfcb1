"""Suite validation: every mistake a user can make gives one line naming the file, the field and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.matrix import expand
from harness.spec import SpecError, load_suite

GOOD = """\
name: s
tiers: [cpu]
model: {source: synthetic, preset: tiny-llama}
data: {train: data/train.jsonl}
stages: [quant, train]
settings: {seq_len: 64}
matrix:
  method: [lora-bf16, qlora-nf4]
expectations:
  - metric: quant.rmse
    max: 1.0
  - ratio: quant.rmse
    numerator: {method: qlora-nf4}
    denominator: {method: lora-bf16}
    min: 1.0
"""


@pytest.fixture
def suite_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return tmp_path


def write(suite_dir: Path, text: str) -> Path:
    p = suite_dir / "x.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def error(suite_dir: Path, text: str) -> str:
    with pytest.raises(SpecError) as info:
        p = write(suite_dir, text)
        expand(load_suite(p), p)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(suite_dir / "x.yaml") + ": ")
    return msg.split(": ", 1)[1]


def test_good_suite_loads(suite_dir):
    p = write(suite_dir, GOOD)
    cases = expand(load_suite(p), p)
    assert [c.case_id for c in cases] == ["s[lora-bf16]", "s[qlora-nf4]"]
    assert cases[0].settings.seq_len == 64 and Path(cases[0].data.train).is_absolute()


@pytest.mark.parametrize(
    "change, expected",
    [
        (("name: s", "name: s\ncolour: red"), "colour: unknown key"),
        (("settings: {seq_len: 64}", "settings: {seq_len: long}"), "settings.seq_len: Input should be a valid integer"),
        (("matrix:\n  method: [lora-bf16, qlora-nf4]", "matrix: {}"), "matrix: the matrix is empty"),
        (("[lora-bf16, qlora-nf4]", "[lora-bf16, qlora-nf4, nf5]"), "matrix.method[2]: unknown method 'nf5' (expected one of lora-bf16, qlora-nf4"),
        (("  - metric: quant.rmse\n    max: 1.0", "  - metric: quant.rmse"), "expectations[0]: an expectation needs 'min', 'max' or both"),
        (("  - metric: quant.rmse\n    max: 1.0", "  - 42"), "expectations[0]: an expectation is a mapping"),
        (("data/train.jsonl", "data/missing.jsonl"), "data.train: data file not found"),
        (("tiers: [cpu]", "tiers: [cpu, gpu-12gb]"), "tiers[1]: unknown tier 'gpu-12gb' (expected one of cpu, gpu-24gb"),
        (("settings: {seq_len: 64}\nmatrix:\n  method: [lora-bf16, qlora-nf4]", "matrix:\n  method: [qlora-nf4]\n  seq_len: [64, 64]"), "matrix: duplicate case id s[qlora-nf4-seq64]"),
        (("settings: {seq_len: 64}", "settings: {max_steps: 3, warmup_steps: 5}"), "settings: warmup_steps (5) must be below max_steps (3)"),
        (("matrix:\n  method", "matrix:\n  rank: [8]\n  method"), "matrix.rank: unknown setting"),
        (("stages: [quant, train]", "stages: [quant, fly]"), "stages[1]: Input should be 'quant', 'train', 'eval' or 'generate'"),
        (("source: synthetic, preset: tiny-llama", "source: synthetic, preset: gpt-9"), "model: unknown preset 'gpt-9'"),
        (("settings: {seq_len: 64}", "settings: {merge_strategy: dequant}"), "settings.merge_strategy: merge_strategy 'dequant': expected 'all' or a comma list of requantize, dequantize, original"),
        (("stages: [quant, train]", "stages: [quant, generate]"), "stage 'generate' times a trained adapter: add stage 'train'"),
        (("stages: [quant, train]\nsettings: {seq_len: 64}", "stages: [train, eval]\neval: {tasks: [t]}\nsettings: {score_merged: false}"),
         "settings.score_merged: false leaves the merged form's agreement with the adapter as its only eval measure: it needs eval.heldout"),
    ],
)
def test_mistakes_give_one_line(suite_dir, change, expected):
    old, new = change
    assert old in GOOD
    msg = error(suite_dir, GOOD.replace(old, new))
    assert msg.startswith(expected), msg


def test_yaml_syntax_error_names_its_line(suite_dir):
    msg = error(suite_dir, GOOD.replace("stages: [quant, train]", "stages: [quant, train"))
    assert msg.startswith("line ") and "YAML syntax error" in msg
    line = int(msg.split()[1].rstrip(":"))
    assert 5 <= line <= 8  # the unclosed bracket is on line 5; PyYAML reports where it noticed


def test_axis_value_error_names_the_index(suite_dir):
    msg = error(suite_dir, GOOD.replace("settings: {seq_len: 64}", "settings: {}\n").replace(
        "method: [lora-bf16, qlora-nf4]", "method: [qlora-nf4]\n  seq_len: [64, 4]"))
    assert msg.startswith("matrix.seq_len[1]: Input should be greater than or equal to 8"), msg


def test_shipped_suites_are_valid():
    root = Path(__file__).resolve().parents[1] / "suites"
    files = [p for p in root.glob("*.yaml")]
    assert files
    ids = []
    for p in files:
        ids += [c.case_id for c in expand(load_suite(p), p)]
    assert len(ids) == len(set(ids))


def test_answers_file_rows_must_be_conversational_prompts(tmp_path):
    """eval.answers: a row without a trl conversational 'prompt' is one line naming the file, row and format."""
    from harness.spec import SpecError, load_suite

    (tmp_path / "tasks").mkdir()
    (tmp_path / "answers.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n{"question": "hi"}\n')
    (tmp_path / "s.yaml").write_text(
        "name: s\ntiers: [cpu]\nmodel: {source: synthetic, preset: tiny-llama}\nstages: [quant]\n"
        "matrix: {method: [qlora-nf4]}\neval: {tasks: [x], answers: answers.jsonl}\n")
    with pytest.raises(SpecError, match=r"eval\.answers: .*answers\.jsonl:2: expected a 'prompt' list") as e:
        load_suite(tmp_path / "s.yaml")
    assert "\n" not in str(e.value)
