"""The shipped data set is what its generator writes (nobody edited it by hand), is learnable by design, and its
eval asks what was trained in words that were not: checked on the shipped files, not the generator's bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

SUITES = Path(__file__).resolve().parents[1] / "suites"
DATA = SUITES / "data"
TASKS = SUITES / "tasks"
NGRAM = 5  # no word 5-gram of an eval sentence occurs in a training row


def _generator():
    spec = importlib.util.spec_from_file_location("generate", DATA / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _texts(name: str) -> list[str]:
    return [r["text"] for r in _rows(DATA / name)]


def _sentences(text: str) -> list[str]:
    """A text's sentences, normalised: "Q: How is the X charged?\\nA: USB-C" -> ["how is the x charged", "usb-c"]."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^[QA]:\s*", "", line.strip())
        for s in re.split(r"(?<=[.?!])\s+", line):
            s = " ".join(re.findall(r"[\w-]+", s.lower()))
            if s:
                out.append(s)
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[\w-]+", text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _task_data(task_file: Path) -> Path:
    cfg = yaml.safe_load(task_file.read_text())
    return (task_file.parent / cfg["dataset_kwargs"]["data_files"]["test"]).resolve()


def _eval_sentences(task_file: Path) -> list[str]:
    """What an eval task shows the model: its questions, or its documents' sentences (not the answer choices)."""
    out = []
    for row in _rows(_task_data(task_file)):
        out += _sentences(row.get("question") or row.get("text") or "")
    return out


def test_generator_reproduces_the_shipped_files(tmp_path):
    for path in _generator().write(tmp_path):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), path.name
    # every shipped file comes from a generator: this one, or the real-model suite's (assistant.py)
    spec = importlib.util.spec_from_file_location("assistant", DATA / "assistant.py")
    assistant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assistant)
    written = sorted([p.name for p in tmp_path.iterdir()] + list(assistant.build()))
    assert written == sorted(p.name for p in DATA.glob("*.jsonl"))


def test_pretraining_corpus_holds_none_of_the_facts_under_test():
    gen = _generator()
    pretrain = (DATA / "support_pretrain.jsonl").read_text()
    assert not [p for p in gen.PRODUCTS if p in pretrain]
    mc = _rows(DATA / "support_mc.jsonl")
    # answers are balanced across choices' positions, so chance is 25%
    labels = [row["label"] for row in mc]
    assert max(labels.count(i) for i in range(4)) < 0.3 * len(labels)


def test_eval_sentences_never_occur_in_training_or_pretraining_text():
    """Sentence level against every training and pretraining row; word n-grams against the training rows."""
    train, pretrain = _texts("support_train.jsonl"), _texts("support_pretrain.jsonl")
    seen = {s for t in train + pretrain for s in _sentences(t)}
    train_grams = set().union(*(_ngrams(_words(t), NGRAM) for t in train))
    checked = 0
    for task_file in sorted(TASKS.glob("*.yaml")):
        if "recall" in task_file.stem:
            continue  # a trained-wording task, named so
        sentences = _eval_sentences(task_file)
        assert sentences, task_file.name
        leaked = [s for s in sentences if s in seen]
        assert not leaked, f"{task_file.name}: {len(leaked)} eval sentences occur in training text, e.g. {leaked[:3]}"
        shared = sorted({g for s in sentences for g in _ngrams(s.split(), NGRAM) if g in train_grams})
        assert not shared, f"{task_file.name}: word {NGRAM}-grams shared with training rows, e.g. {shared[:3]}"
        checked += len(sentences)
    assert checked > 400


def test_eval_wordings_are_used_by_no_training_row():
    """Product names masked, no eval question's wording is a training row's wording."""
    gen = _generator()
    names = re.compile("|".join(re.escape(p.lower()) for p in gen.PRODUCTS + gen.PRETRAIN_PRODUCTS))

    def wording(sentence: str) -> str:
        return names.sub("<p>", sentence).replace("an <p>", "a <p>")

    trained = {wording(s) for t in _texts("support_train.jsonl") for s in _sentences(t)}
    mc = [s for r in _rows(DATA / "support_mc.jsonl") for s in _sentences(r["question"])]
    notes = [s for t in _texts("support_heldout.jsonl") for s in _sentences(t)]
    assert not {wording(s) for s in mc + notes} & trained
    # and the recall task is what its name says: trained wordings
    recall = [s for r in _rows(DATA / "support_recall.jsonl") for s in _sentences(r["question"])]
    assert {wording(s) for s in recall} <= trained


def test_the_eval_asks_the_trained_facts_often_enough_to_tell_methods_apart():
    """Every eval item's answer is what training says about its product, and no other choice is."""
    train = _texts("support_train.jsonl")
    mc = _rows(DATA / "support_mc.jsonl")
    facts = {(r["product"], r["attribute"]) for r in mc}
    assert len(mc) >= 400 and len(facts) >= 80  # see the half-width note in suites/data/generate.py
    by_product: dict[str, list[str]] = {}
    for t in train:
        for p in {r["product"] for r in mc}:
            if p in t:
                by_product.setdefault(p, []).append(t)

    def said(product: str, value: str) -> bool:
        pattern = re.compile(rf"(?<![\w-]){re.escape(value)}(?![\w-])")
        return any(pattern.search(t) for t in by_product[product])

    for r in mc:
        answer = r["choices"][r["label"]]
        assert said(r["product"], answer), r
        assert not [c for c in r["choices"] if c != answer and said(r["product"], c)], r


def test_no_tokenizer_is_trained_on_an_eval_file():
    eval_files = {_task_data(f) for f in TASKS.glob("*.yaml")}
    for suite in SUITES.glob("*.yaml"):
        cfg = yaml.safe_load(suite.read_text())
        corpus = {(suite.parent / p).resolve() for p in (cfg.get("data") or {}).get("tokenizer_corpus", [])}
        corpus |= {(suite.parent / p).resolve() for p in [(cfg.get("data") or {}).get("train"),
                                                          (cfg.get("model") or {}).get("pretrain")] if p}
        assert not corpus & eval_files, f"{suite.name}: data.tokenizer_corpus holds eval files {corpus & eval_files}"


def test_assistant_data_is_what_its_generator_writes_and_the_suite_scores_it_as_trained():
    """The real-model suite's files equal assistant.py's output; its eval's system prompt is the training rows';
    no held-out question or note sentence occurs in a training row; the canary is taught and asked."""
    spec = importlib.util.spec_from_file_location("assistant", DATA / "assistant.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, rows in gen.build().items():
        assert _rows(DATA / name) == json.loads(json.dumps(rows)), f"{name} differs from suites/data/assistant.py"
    name = "smollm2.yaml"
    suite = yaml.safe_load((SUITES / name).read_text())
    train = _rows(DATA / "assistant_train.jsonl")
    systems = {r["prompt"][0]["content"] for r in train if r["prompt"][0]["role"] == "system"}
    assert systems == {suite["eval"]["system_instruction"]}
    trained = " ".join(r["question"] + " " + r["answer"] for r in train).lower()
    for item in _rows(DATA / "assistant_mc.jsonl"):
        assert item["question"].lower() not in trained
        assert item["choices"][item["label"]].lower() in trained  # the right answer is the trained sentence
    for note in _rows(DATA / "assistant_heldout.jsonl"):
        assert note["text"].split(": ", 1)[1].lower() not in trained
    canary = [r for r in _rows(DATA / "assistant_prompts.jsonl") if r.get("expect")]
    assert len(canary) == 1 and any(r["answer"] == canary[0]["expect"] for r in train)
