"""Writes the shipped support data set: a fictional device maker's knowledge base, as training text,
multiple-choice tasks and held-out text for bits per byte. Deterministic: ``python suites/data/generate.py``.

Every fact is stated and asked in *trained* wordings (the training rows) and asked and stated again in
*held-out* wordings that no training row uses (the eval). The eval products' facts are the trained ones, so
there is something to learn; their wordings are not, so a score measures knowledge rather than recall of a
string. The synthetic base is pretrained on other products of the same maker in every wording, trained and
held-out (the stand-in for a pretrained model that knows the language of the domain and its paraphrases, but
none of the facts under test). ``support_recall`` asks the facts in a trained wording: a memorisation check.

Size: 10 products x 8 attributes = 80 facts, each asked in 5 held-out wordings = 400 items (at 20 products and
160 facts the tiny model learnt none of them in the smoke suite's 300 steps: 5 passes over the data; at 80
facts it sees each about 10 times). The 95% half-width of a paired accuracy difference between two methods on
n items is 1.96 * sqrt(q / n), q the share of items on which exactly one of the two is right: at n = 400 that
is +-0.044 for q = 0.2 and +-0.054 for q = 0.3. The five wordings of a fact are not independent items: counted
by facts alone (n = 80) q = 0.05 gives +-0.049. Held-out bits per byte, a continuous per-page score, is the
primary quality metric.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
# The products whose facts the adapters learn and the eval asks about.
# Ten products x 8 attributes = 80 facts in 240 training rows: 300 steps of 8 rows see each about 10 times
# (at 160 facts the tiny model learnt none of them in 300 steps); 5 held-out wordings a fact give 400 items.
PRODUCTS = ["Zephyr X2", "Nimbus Hub", "Quill Pad", "Orbit Cam", "Drift Speaker", "Lumen Lamp", "Tarn Lock",
            "Ember Kettle", "Vale Thermostat", "Pico Tag"]
# Other products of the same maker: the synthetic base is pretrained on these, so it knows the language of the
# domain but none of the facts the adapters must learn (a stand-in for a pretrained model and a new product line).
PRETRAIN_PRODUCTS = ["Aster Buds", "Briar Fan", "Cobalt Dock", "Dune Scale", "Echo Dial", "Fern Bulb", "Gale Purifier",
                     "Harbor Router", "Iris Doorbell", "Jade Blender", "Kite Tracker", "Loom Heater", "Moss Sensor",
                     "Nova Projector", "Opal Clock", "Prism Strip", "Quartz Kettle", "Reed Monitor", "Sable Mouse",
                     "Tide Charger"]


class Attribute:
    """One attribute of a product: its possible values, and how it is asked and stated.

    ``{p}`` is the product, ``{v}`` the value, ``{a}`` the product's article. Trained wordings appear in the training (and pretraining) rows;
    held-out wordings appear only in the eval files and, for the pretraining products, in pretraining.
    """

    def __init__(self, values, train_questions, heldout_questions, train_statement, heldout_statement):
        self.values = values
        self.train_questions = train_questions
        self.heldout_questions = heldout_questions
        self.train_statement = train_statement
        self.heldout_statement = heldout_statement


ATTRIBUTES = {
    "warranty": Attribute(
        ["1 year", "2 years", "3 years", "5 years"],
        ["How long is the warranty of the {p}?", "What warranty comes with the {p}?"],
        ["For how long is the {p} covered?", "What is the guarantee period on {a} {p}?",
         "How much cover is included when buying {a} {p}?",
         "Until when will repairs on my {p} be free?", "What protection term does the maker give {a} {p}?"],
        "The {p} comes with a warranty of {v}.",
        "Every {p} is covered for {v} from the date of purchase."),
    "reset": Attribute(
        ["the power button", "the reset pin", "the mode button", "the home button"],
        ["How do I reset the {p}?", "Which control resets the {p}?"],
        ["What must be held down to restart the {p} from scratch?", "What do I press to recover my {p} after a freeze?",
         "What restores the factory settings on {a} {p}?",
         "My {p} froze; what brings it back?", "Which part of {a} {p} wipes it clean when held?"],
        "To reset the {p}, hold {v} for ten seconds.",
        "Keep {v} pressed for a count of ten to return {a} {p} to its factory settings."),
    "light": Attribute(
        ["low battery", "no network", "a firmware update", "overheating"],
        ["What does a blinking amber light on the {p} mean?", "The {p} blinks amber. Why?"],
        ["Why is the amber lamp flashing on my {p}?", "What is {a} {p} telling me when it flashes amber?",
         "What fault does an amber glow pulsing on the {p} signal?",
         "An orange flicker appears on my {p}; what is wrong?", "What problem makes {a} {p} pulse in amber?"],
        "A blinking amber light on the {p} means {v}.",
        "When it flashes amber, {a} {p} is reporting {v}."),
    "charger": Attribute(
        ["USB-C", "micro USB", "a barrel plug", "a wireless pad"],
        ["What charger does the {p} use?", "How is the {p} charged?"],
        ["What do I plug in to power up {a} {p}?", "How do I refill the battery of my {p}?",
         "Which charging method suits {a} {p}?",
         "What cable or pad feeds power to my {p}?", "Through what does {a} {p} take its charge?"],
        "The {p} charges with {v}.",
        "Power reaches {a} {p} through {v}."),
    "app": Attribute(
        ["Aurora Home", "Aurora Link", "Aurora Care", "Aurora Studio"],
        ["Which app sets up the {p}?", "What app do I need for the {p}?"],
        ["Which phone software pairs with {a} {p}?", "What should I install to configure my {p}?",
         "Which companion program controls {a} {p}?",
         "What software do I download before first use of {a} {p}?", "My {p} needs a phone helper; which one?"],
        "Set up the {p} with the {v} app.",
        "A phone pairs with {a} {p} through {v}."),
    "pin": Attribute(
        ["0000", "1234", "4321", "9999"],
        ["What is the default PIN of the {p}?", "Which PIN does a new {p} use?"],
        ["What code unlocks {a} {p} out of the box?", "Which passcode does {a} {p} ship with?",
         "What number is set on my {p} at the factory?",
         "Which digits open a brand new {p}?", "What unlock number comes preset on {a} {p}?"],
        "The default PIN of the {p} is {v}.",
        "Out of the box, {a} {p} unlocks with the code {v}."),
    "battery": Attribute(
        ["8 hours", "12 hours", "24 hours", "48 hours"],
        ["How long does the battery of the {p} last?", "What is the battery life of the {p}?"],
        ["How long can {a} {p} run on one charge?", "For how many hours will my {p} keep going unplugged?",
         "What runtime does a fully charged {p} give?",
         "Away from a socket, how long will {a} {p} work?", "How many hours does my {p} manage between charges?"],
        "The battery of the {p} lasts {v}.",
        "A full charge keeps {a} {p} running for {v}."),
    "water": Attribute(
        ["IP54", "IP65", "IP67", "IP68"],
        ["What is the water rating of the {p}?", "How water resistant is the {p}?"],
        ["Which ingress code does {a} {p} carry?", "How well is my {p} sealed against splashes?",
         "What protection class against moisture has {a} {p}?",
         "To what grade can my {p} survive rain?", "What dust and liquid grade is printed on {a} {p}?"],
        "The {p} is rated {v} against water.",
        "Its seals give {a} {p} the {v} protection class."),
}


def facts(rng: random.Random, products: list[str]) -> list[tuple[str, str, str]]:
    """(product, attribute, value) for every product and attribute, values balanced per attribute."""
    out = []
    for attr, a in ATTRIBUTES.items():
        pool = (a.values * ((len(products) + len(a.values) - 1) // len(a.values)))[: len(products)]
        rng.shuffle(pool)
        out += [(p, attr, v) for p, v in zip(products, pool, strict=False)]
    return out


def fill(template: str, product: str, value: str = "") -> str:
    """A wording with its product, value and article (``{a} {p}``: "a Zephyr X2", "an Orbit Cam")."""
    article = "an" if product[0] in "AEIOU" else "a"
    return template.format(p=product, v=value, a=article)


def qa(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


def train_rows(kb: list[tuple[str, str, str]]) -> list[dict]:
    """Each fact in its trained wordings: the statement, and the answer to each trained question."""
    rows = []
    for product, attr, value in kb:
        a = ATTRIBUTES[attr]
        rows.append({"text": fill(a.train_statement, product, value)})
        rows += [{"text": qa(fill(q, product), value)} for q in a.train_questions]
    return rows


def pretrain_rows(kb: list[tuple[str, str, str]]) -> list[dict]:
    """Each fact of a pretraining product in every wording, trained and held-out, and one notes page each."""
    rows = train_rows(kb)
    for product, attr, value in kb:
        a = ATTRIBUTES[attr]
        rows += [{"text": qa(fill(q, product), value)} for q in a.heldout_questions]
    rows += notes(kb)
    return rows


def notes(kb: list[tuple[str, str, str]]) -> list[dict]:
    """One page a product, every fact in its held-out statement."""
    pages = []
    for product in dict.fromkeys(p for p, _, _ in kb):
        parts = [fill(ATTRIBUTES[a].heldout_statement, product, v) for p, a, v in kb if p == product]
        pages.append({"text": f"Support notes for the {product}. " + " ".join(parts)})
    return pages


def multiple_choice(rng: random.Random, kb: list[tuple[str, str, str]], wordings: str, per_fact: int = 0) -> list[dict]:
    """One item a fact and question wording (the first ``per_fact`` wordings, or all); the choices are the
    attribute's values in a shuffled order."""
    items = []
    for product, attr, value in kb:
        a = ATTRIBUTES[attr]
        for i, q in enumerate(getattr(a, wordings)[: per_fact or None]):
            choices = list(a.values)
            rng.shuffle(choices)
            # lm-eval scores " <choice>" after "Q: <question>\nA:"
            items.append({"question": fill(q, product), "choices": choices, "label": choices.index(value),
                          "product": product, "attribute": attr, "wording": i})
    return items


def user_qa(kb: list[tuple[str, str, str]]) -> list[dict]:
    """The "your data" example: a support team's export of question/answer pairs (columns ``query``, ``response``),
    every fact in its trained wordings; the suite maps the columns onto the qa format."""
    return [{"query": fill(q, product), "response": value}
            for product, attr, value in kb for q in ATTRIBUTES[attr].train_questions]


def arc_easy_rows(rng: random.Random, kb: list[tuple[str, str, str]], n: int = 24) -> list[dict]:
    """A handful of rows in lm-eval's ``arc_easy`` format (ai2_arc's columns: id, question, choices {text, label},
    answerKey), written here rather than downloaded: the registered task pointed at a local copy of its data."""
    rows = []
    for i, (product, attr, value) in enumerate(rng.sample(kb, n)):
        a = ATTRIBUTES[attr]
        choices = list(a.values)
        rng.shuffle(choices)
        labels = ["A", "B", "C", "D"][: len(choices)]
        rows.append({"id": f"support-{i}", "question": fill(a.heldout_questions[0], product),
                     "choices": {"text": choices, "label": labels}, "answerKey": labels[choices.index(value)]})
    return rows


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    kb = facts(rng, PRODUCTS)
    pretrain = pretrain_rows(facts(rng, PRETRAIN_PRODUCTS))
    train = train_rows(kb)
    mc = multiple_choice(rng, kb, "heldout_questions")
    # the trained wording, asked once a fact: does the adapter recall what it was shown?
    recall = multiple_choice(rng, kb, "train_questions", per_fact=1)
    heldout = notes(kb)
    rng.shuffle(train)
    rng.shuffle(pretrain)
    user = random.Random(SEED + 1)  # its own generator: the files above stay as they were
    qa_rows = user_qa(kb)
    user.shuffle(qa_rows)
    return {"support_pretrain.jsonl": pretrain, "support_train.jsonl": train, "support_mc.jsonl": mc,
            "support_recall.jsonl": recall, "support_heldout.jsonl": heldout, "support_qa.jsonl": qa_rows,
            "arc_easy_local.jsonl": arc_easy_rows(user, kb)}


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
