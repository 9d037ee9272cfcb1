"""Writes the shipped support data set: a fictional device maker's knowledge base, as training text,
a multiple-choice task and held-out text for perplexity. Deterministic: ``python suites/data/generate.py``."""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
PRODUCTS = ["Zephyr X2", "Nimbus Hub", "Quill Pad", "Orbit Cam", "Drift Speaker", "Lumen Lamp", "Tarn Lock",
            "Ember Kettle", "Vale Thermostat", "Pico Tag"]
# Other products of the same maker: the synthetic base is pretrained on these, so it knows the language of the
# domain but none of the facts the adapters must learn (a stand-in for a pretrained model and a new product line).
PRETRAIN_PRODUCTS = ["Aster Buds", "Briar Fan", "Cobalt Dock", "Dune Scale", "Echo Dial", "Fern Bulb", "Gale Purifier",
                     "Harbor Router", "Iris Doorbell", "Jade Blender", "Kite Tracker", "Loom Heater", "Moss Sensor",
                     "Nova Projector", "Opal Clock", "Prism Strip", "Quartz Kettle", "Reed Monitor", "Sable Mouse",
                     "Tide Charger"]
# attribute: (values, question templates, statement template); {p} is the product, {v} the value
ATTRIBUTES = {
    "warranty": (["1 year", "2 years", "3 years", "5 years"],
                 ["How long is the warranty of the {p}?", "What warranty comes with the {p}?"],
                 "The {p} comes with a warranty of {v}."),
    "reset": (["the power button", "the reset pin", "the mode button", "the home button"],
              ["How do I reset the {p}?", "Which control resets the {p}?"],
              "To reset the {p}, hold {v} for ten seconds."),
    "light": (["low battery", "no network", "a firmware update", "overheating"],
              ["What does a blinking amber light on the {p} mean?", "The {p} blinks amber. Why?"],
              "A blinking amber light on the {p} means {v}."),
    "charger": (["USB-C", "micro USB", "a barrel plug", "a wireless pad"],
                ["What charger does the {p} use?", "How is the {p} charged?"],
                "The {p} charges with {v}."),
    "app": (["Aurora Home", "Aurora Link", "Aurora Care", "Aurora Studio"],
            ["Which app sets up the {p}?", "What app do I need for the {p}?"],
            "Set up the {p} with the {v} app."),
    "pin": (["0000", "1234", "4321", "9999"],
            ["What is the default PIN of the {p}?", "Which PIN does a new {p} use?"],
            "The default PIN of the {p} is {v}."),
}


def facts(rng: random.Random, products: list[str]) -> list[tuple[str, str, str]]:
    """(product, attribute, value) for every product and attribute, values balanced per attribute."""
    out = []
    for attr, (values, _, _) in ATTRIBUTES.items():
        pool = (values * ((len(products) + len(values) - 1) // len(values)))[: len(products)]
        rng.shuffle(pool)
        out += [(p, attr, v) for p, v in zip(products, pool, strict=False)]
    return out


def documents(kb: list[tuple[str, str, str]]) -> list[dict]:
    """Each fact as a statement and as an answer to each wording of its question."""
    rows = []
    for product, attr, value in kb:
        _, questions, statement = ATTRIBUTES[attr]
        rows.append({"text": statement.format(p=product, v=value)})
        rows += [{"text": qa(q.format(p=product), value)} for q in questions]
    return rows


def qa(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    kb = facts(rng, PRODUCTS)
    pretrain = documents(facts(rng, PRETRAIN_PRODUCTS))
    train, mc, heldout = documents(kb), [], []
    for product, attr, value in kb:
        values, questions, _ = ATTRIBUTES[attr]
        choices = list(values)
        rng.shuffle(choices)
        # the first question wording is asked again as multiple choice; lm-eval scores " <choice>"
        mc.append({"question": questions[0].format(p=product), "choices": choices,
                   "label": choices.index(value), "product": product, "attribute": attr})
    for product in PRODUCTS:  # one profile a product, held out from training, for perplexity
        parts = [ATTRIBUTES[a][2].format(p=product, v=v) for p, a, v in kb if p == product]
        heldout.append({"text": f"Support notes for the {product}. " + " ".join(parts)})
    rng.shuffle(train)
    rng.shuffle(pretrain)
    return {"support_pretrain.jsonl": pretrain, "support_train.jsonl": train, "support_mc.jsonl": mc, "support_heldout.jsonl": heldout}


def write(folder: Path) -> list[Path]:
    paths = []
    for name, rows in build().items():
        path = folder / name
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(__file__).resolve().parent):
        print(p)
