"""``python -m harness estimate``: a model's config.json (a file, a folder, a cached hub id) to its predicted
peak, checked against the cases the memory suites build; every bad input is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _case(suite: str, method: str, seq_len: int):
    from harness.matrix import expand
    from harness.spec import load_suite

    path = ROOT / "suites" / f"{suite}.yaml"
    return next(c for c in expand(load_suite(path), path)
                if c.method == method and c.settings.seq_len == seq_len)


def _args(case) -> list[str]:
    s = case.settings
    return ["--method", s.method, "--seq-len", str(s.seq_len), "--batch", str(s.batch_size),
            "--optimizer", s.optimizer, "--lora-r", str(s.lora_r)]


def _total(out: str) -> float:
    return float(re.search(r"^total\s+([\d.]+)", out, re.M)[1])


@pytest.mark.parametrize(("suite", "method", "seq_len"), [("memory-7b", "qlora-nf4-dq", 512),
                                                          ("memory-7b", "lora-bf16", 2048),
                                                          ("memory-70b", "qlora-nf4-dq", 512)])
def test_a_config_json_predicts_what_the_memory_suites_case_predicts(suite, method, seq_len, tmp_path, capsys):
    """The preset's config written as a checkpoint's config.json (transformers' own writer, no weights) gives
    the estimate the worker records for the suite's case (estimate.for_case on the shape it builds)."""
    from harness import estimate, presets

    case = _case(suite, method, seq_len)
    presets.PRESETS[case.model.preset].hf_config().save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path / "config.json"), *_args(case)]) == 0
    out = capsys.readouterr().out
    expected = estimate.for_case(case, "cuda").total_gib
    assert _total(out) == pytest.approx(expected, abs=0.006)
    assert main(["estimate", str(tmp_path), *_args(case)]) == 0  # the folder: the same
    assert _total(capsys.readouterr().out) == _total(out)


def test_fits_the_tiers_of_the_tutorials(capsys):
    # the QLoRA tutorials: a 70B in 4 bits with double quantization needs about 48 GB, not 24
    assert main(["estimate", "llama-2-70b", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "24 GB does not fit, 48 GB fits, 80 GB fits" in out
    for part in ("weights", "lora", "gradients", "optimizer", "activations", "workspace", "context"):
        assert re.search(rf"^{part}\s+[\d.]+", out, re.M), part


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch, capsys):
    """A hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<sha>/config.json)."""
    from harness import presets

    repo = tmp_path / "models--someone--llama-7b-like"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    presets.PRESETS["llama-2-7b"].hf_config().save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert main(["estimate", "someone/llama-7b-like"]) == 0
    via_hub = _total(capsys.readouterr().out)
    assert main(["estimate", "llama-2-7b"]) == 0
    assert via_hub == _total(capsys.readouterr().out)
    assert main(["estimate", "someone/not-cached"]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache: set HF_HUB_OFFLINE=0" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "says"), [
    (["./no/such/place"], "not a preset"),
    (["llama-2-7b", "--method", "qlora-nf3"], "--method qlora-nf3: unknown"),
    (["llama-2-7b", "--batch", "0"], "--batch 0"),
    (["llama-2-7b", "--optimizer", "sgd"], "--optimizer 'sgd'"),
    (["llama-2-7b", "--lora-r", "0"], "--lora-r 0"),
])
def test_bad_input_is_one_line(argv, says, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_bad_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"hidden_size": 4096}')
    (tmp_path / "b.json").write_text("{")
    (tmp_path / "empty").mkdir()
    for path, says in ((tmp_path / "a.json", "has no 'num_attention_heads'"), (tmp_path / "b.json", "not JSON"),
                       (tmp_path / "empty", "no config.json")):
        assert main(["estimate", str(path)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


def test_readme_shows_what_the_command_prints(capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```\n\$ python -m harness estimate (.*?)\n(.*?)```", text, re.S)
    assert main(["estimate", *block[1].split()]) == 0
    assert capsys.readouterr().out == block[2]


def test_a_config_file_under_another_name_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch, capsys):
    """A bare ``llama.json`` is read through a copy named config.json: that copy is gone afterwards (it was left
    in /tmp, one folder per call)."""
    import tempfile

    from harness import presets

    presets.PRESETS["tiny-llama"].hf_config().save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "config.json").rename(tmp_path / "llama.json")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["estimate", str(tmp_path / "llama.json")]) == 0
    assert "total" in capsys.readouterr().out.lower()
    assert list(scratch.iterdir()) == []
