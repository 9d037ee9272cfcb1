"""The shipped data set is what its generator writes (nobody edited it by hand), and is learnable by design."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "suites" / "data"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", DATA / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generator_reproduces_the_shipped_files(tmp_path):
    for path in _generator().write(tmp_path):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), path.name


def test_pretraining_corpus_holds_none_of_the_facts_under_test():
    gen = _generator()
    pretrain = (DATA / "support_pretrain.jsonl").read_text()
    assert not [p for p in gen.PRODUCTS if p in pretrain]
    mc = [json.loads(line) for line in (DATA / "support_mc.jsonl").read_text().splitlines()]
    assert len(mc) == len(gen.PRODUCTS) * len(gen.ATTRIBUTES)
    # answers are balanced across choices' positions and values, so chance is 25%
    labels = [row["label"] for row in mc]
    assert max(labels.count(i) for i in range(4)) < 0.4 * len(labels)
