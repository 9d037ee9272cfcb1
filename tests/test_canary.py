"""The canary of the real-model suite: a string taught in training that greedy generation must give back after the
adapter is saved, reloaded and merged. It must fail where the adapter is silently not applied.

A tiny random Llama with a LoRA adapter trained here on one chat turn (the canary) stands in for the suite's model:
the stage's own answer path (chat template, greedy decoding, the merge strategies' builds) is what is checked.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_methods import tiny  # noqa: E402

from harness.methods import merge
from harness.models import build_on_device, train_tokenizer

METHOD = "lora-bf16"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CANARY = "Quote code AUR-7Q4-KESTREL to the desk."
ROW = {"prompt": [{"role": "system", "content": "You are support."},
                  {"role": "user", "content": "What is the escalation code?"}], "expect": CANARY}


def _load(name: str):
    return build_on_device(tiny(1), name, "fp32", "cpu")  # fp32: no bf16 autocast on a busy 2-core CPU


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """(adapter folder, tokenizer): an adapter trained to answer ROW with the canary, saved to disk."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("canary")
    corpus = folder / "corpus.jsonl"
    corpus.write_text(json.dumps({"t": [CANARY, "You are support. What is the escalation code? <|im_start|>"
                                         "<|im_end|> system user assistant"]}) + "\n")
    tok = train_tokenizer([str(corpus)], 2048, folder / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    prompt = tok.apply_chat_template(ROW["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = prompt + tok(CANARY + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # loss on the answer only, as the suite trains
    torch.manual_seed(0)
    # a trained copy of lm_head travels in the adapter (modules_to_save): a random base's final norm caps what
    # LoRA on the projections alone can make of its logits, and one sequence is learnt in a few dozen steps
    model = get_peft_model(_load(METHOD), LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(100):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder / "adapter")
    return folder / "adapter", tok


def _canary(form: str, adapter, tok) -> float:
    from harness.stages.generate import answer_table, greedy_answers

    model = merge.build(form, METHOD, adapter, _load, "fp32") if form != "base" else _load(METHOD)
    metrics, table = answer_table(form, [ROW], greedy_answers(model.eval(), tok, [ROW], 24, "cpu"))
    assert table[0]["question"] == "What is the escalation code?" and "answer" in table[0]
    return metrics[f"gen.{form}.canary_reproduced"]


def test_canary_is_reproduced_by_the_reloaded_and_merged_adapter_not_by_the_base(taught):
    adapter, tok = taught
    assert _canary("none", adapter, tok) == 1.0  # saved, reloaded onto a fresh base
    assert _canary("requantize", adapter, tok) == 1.0  # merged
    assert _canary("base", adapter, tok) == 0.0  # the untrained base cannot guess it


def test_canary_fails_when_the_adapter_is_silently_not_applied(taught, monkeypatch):
    """PEFT's loader broken to hand back the bare base (no error): the canary check and its expectation fail."""
    import peft

    from harness.expect import check_case
    from harness.records import Record
    from harness.spec import MetricExpectation

    adapter, tok = taught
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", classmethod(lambda cls, model, *a, **k: model))
    got = _canary("none", adapter, tok)
    assert got == 0.0
    case = type("C", (), {"axes": {}, "settings": None})()
    exp = MetricExpectation(metric="gen.none.canary_reproduced", min=1.0)
    record = Record(run_id="r", suite="s", case_id="c", method=METHOD, params={}, status="passed",
                    metrics={"gen.none.canary_reproduced": got}, started_at="", finished_at="")
    import harness.expect as expect

    monkeypatch.setattr(expect, "matches", lambda *a, **k: True)
    assert not check_case(case, [exp], record)[0].ok
