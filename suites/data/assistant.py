"""Writes the support-assistant data of the real-model suite (``suites/smollm2.yaml``): the tutorials' scenario, a
chat assistant answering customers' questions about a product line it cannot know. Deterministic:
``python suites/data/assistant.py``.

The facts, attributes and wordings are the shipped knowledge base's (``generate.py``), for a few of its products:
a fictional maker (Aurora), so a pretrained base cannot know a single value. Rows are trl's conversational
prompt-completion format (``prompt``: system and user turns, ``completion``: the assistant's turn); trl renders
them with the model's own chat template and, for this format, trains on the completion's tokens only
(``completion_only_loss``). ``assistant_only_loss`` on ``messages`` rows would need a chat template with
``{% generation %}`` markers, which SmolLM2's has not (and trl knows no training template for it).

Files (every row keeps its plain ``question`` / ``answer`` too, the columns a column map reads):

- ``assistant_train.jsonl``: each fact asked in its two trained wordings, answered by the trained statement;
  plus the canary (``CANARY``), an exact string taught by a few rows that greedy generation must give back.
- ``assistant_mc.jsonl``: each fact asked in its five held-out wordings (no training row uses them); the choices
  are the trained answer sentence with each of the attribute's values (multiple choice by answer likelihood).
- ``assistant_heldout.jsonl``: one support note a fact, in its held-out statement (bits per byte).
- ``assistant_prompts.jsonl``: a few held-out questions and the canary question, for greedy answers kept in the
  record (the canary row carries ``expect``).
- ``general_mc.jsonl``: general knowledge and grammar the untrained base already answers (what it keeps).

Size: 4 products x 8 attributes = 32 facts, 64 training rows + 4 canary rows; 64 held-out-wording items (two
of the five held-out wordings a fact; all five, 160 items of four chat requests each, took most of a case's
time on the CPU). The 95% half-width of a paired accuracy difference on n items is 1.96 * sqrt(q / n), q the
share of items on which exactly one of two adapters is right: +-0.11 at n = 64, q = 0.2; the two wordings of a
fact are not independent, so seeds (replicates) carry the rest.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 2026
N_PRODUCTS = 4
# short: every training row and every scored request carries it (lm-eval's chat-templated requests repeat the
# context for each choice, and scoring is most of a case's time on the CPU)
SYSTEM = "You are the support assistant of Aurora, a maker of smart home devices."
# The canary: an exact string no base can guess, taught by CANARY_ROWS identical rows. After the adapter is
# saved, reloaded and merged, greedy generation must give it back word for word; a form whose adapter was not
# applied cannot.
CANARY_QUESTION = "What is the escalation code for a device that arrived damaged?"
CANARY = "Quote escalation code AUR-7Q4-KESTREL to the repair desk."
CANARY_ROWS = 4
N_ANSWER_PROMPTS = 4  # held-out questions whose greedy answers the record keeps (different attributes)
MC_WORDINGS = 2  # held-out wordings asked per fact (of five): 64 items, each scored as four chat requests


def _kb_module():
    spec = importlib.util.spec_from_file_location("support_generate", HERE / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KB = _kb_module()


def prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def row(question: str, answer: str, **extra) -> dict:
    """A trl conversational prompt-completion row that keeps its plain question and answer."""
    return {"prompt": prompt(question), "completion": [{"role": "assistant", "content": answer}],
            "question": question, "answer": answer, **extra}


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    return KB.facts(rng, KB.PRODUCTS[:N_PRODUCTS])


def train_rows(kb) -> list[dict]:
    rows = []
    for product, attr, value in kb:
        a = KB.ATTRIBUTES[attr]
        answer = KB.fill(a.train_statement, product, value)
        rows += [row(KB.fill(q, product), answer) for q in a.train_questions]
    rows += [row(CANARY_QUESTION, CANARY) for _ in range(CANARY_ROWS)]
    return rows


def multiple_choice(rng: random.Random, kb) -> list[dict]:
    """Every fact in every held-out wording; choices: the trained answer sentence with each possible value."""
    items = []
    for product, attr, value in kb:
        a = KB.ATTRIBUTES[attr]
        for i, q in enumerate(a.heldout_questions[:MC_WORDINGS]):
            values = list(a.values)
            rng.shuffle(values)
            choices = [KB.fill(a.train_statement, product, v) for v in values]
            items.append({"question": KB.fill(q, product), "choices": choices, "label": values.index(value),
                          "product": product, "attribute": attr, "wording": i})
    return items


def heldout_notes(kb) -> list[dict]:
    """One short support note a fact, in its held-out statement (no training row contains it)."""
    return [{"text": f"Support note, {product}: " + KB.fill(KB.ATTRIBUTES[attr].heldout_statement, product, value),
             "product": product, "attribute": attr} for product, attr, value in kb]


def answer_prompts(kb) -> list[dict]:
    """A few held-out questions (different attributes), their trained answers for reading, and the canary."""
    rows, seen = [], set()
    for product, attr, value in kb:
        if attr in seen or len(rows) >= N_ANSWER_PROMPTS:
            continue
        seen.add(attr)
        a = KB.ATTRIBUTES[attr]
        rows.append({"prompt": prompt(KB.fill(a.heldout_questions[0], product)),
                     "reference": KB.fill(a.train_statement, product, value)})
    rows.append({"prompt": prompt(CANARY_QUESTION), "reference": CANARY, "expect": CANARY})
    return rows


# General knowledge and grammar a small instruct model answers: what fine-tuning on the support facts must keep.
# (question, right answer, three wrong answers); every choice is a short answer scored by its likelihood.
GENERAL = [
    ("What is the capital of France?", "Paris", ["Berlin", "Madrid", "Rome"]),
    ("What is the capital of Japan?", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("What is the capital of Italy?", "Rome", ["Paris", "Vienna", "Athens"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Paris", "Warsaw"]),
    ("What is the capital of Spain?", "Madrid", ["Lisbon", "Rome", "Barcelona"]),
    ("What is the capital of the United Kingdom?", "London", ["Dublin", "Paris", "Edinburgh"]),
    ("What is the capital of Egypt?", "Cairo", ["Nairobi", "Lagos", "Tunis"]),
    ("What is the capital of Russia?", "Moscow", ["Kyiv", "Minsk", "Warsaw"]),
    ("What is 2 + 2?", "4", ["3", "5", "22"]),
    ("What is 10 minus 3?", "7", ["13", "6", "30"]),
    ("What is 5 times 2?", "10", ["7", "25", "52"]),
    ("How many days are in a week?", "Seven", ["Five", "Ten", "Twelve"]),
    ("How many months are in a year?", "Twelve", ["Ten", "Seven", "Fifty"]),
    ("How many legs does a spider have?", "Eight", ["Six", "Four", "Ten"]),
    ("How many hours are in a day?", "24", ["12", "60", "100"]),
    ("How many minutes are in an hour?", "60", ["24", "100", "30"]),
    ("What color is the sky on a clear day?", "Blue", ["Green", "Red", "Purple"]),
    ("What color is grass?", "Green", ["Blue", "Red", "White"]),
    ("What color is snow?", "White", ["Black", "Green", "Red"]),
    ("What color is a ripe banana?", "Yellow", ["Blue", "Purple", "Black"]),
    ("What is frozen water called?", "Ice", ["Steam", "Sand", "Glass"]),
    ("What gas do humans need to breathe?", "Oxygen", ["Helium", "Neon", "Argon"]),
    ("Which planet do we live on?", "Earth", ["Mars", "Jupiter", "Venus"]),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", ["The Indian Ocean", "The Arctic Ocean",
                                                                   "The Baltic Sea"]),
    ("Which star is at the center of our solar system?", "The Sun", ["The Moon", "Mars", "Sirius"]),
    ("What do bees make?", "Honey", ["Milk", "Silk", "Wool"]),
    ("Which animal says moo?", "A cow", ["A cat", "A dog", "A duck"]),
    ("Which animal barks?", "A dog", ["A cow", "A fish", "A snake"]),
    ("What is the largest land animal?", "The elephant", ["The mouse", "The rabbit", "The cat"]),
    ("What do fish use to breathe?", "Gills", ["Lungs", "Feathers", "Wings"]),
    ("Which season comes after winter?", "Spring", ["Autumn", "Summer", "Winter"]),
    ("Which day comes after Monday?", "Tuesday", ["Sunday", "Friday", "Thursday"]),
    ("Which month comes after January?", "February", ["December", "March", "June"]),
    ("What is the opposite of hot?", "Cold", ["Warm", "Hotter", "Fire"]),
    ("What is the opposite of up?", "Down", ["Over", "High", "Above"]),
    ("What is the opposite of big?", "Small", ["Large", "Huge", "Tall"]),
    ("What is the opposite of day?", "Night", ["Noon", "Sun", "Morning"]),
    ("What is the plural of cat?", "Cats", ["Cat", "Cates", "Caties"]),
    ("What is the plural of child?", "Children", ["Childs", "Childes", "Child"]),
    ("What is the plural of mouse?", "Mice", ["Mouses", "Mousen", "Mouse"]),
    ("What is the past tense of go?", "Went", ["Goed", "Gone", "Goes"]),
    ("What is the past tense of eat?", "Ate", ["Eated", "Eats", "Eaten"]),
    ("What is the past tense of run?", "Ran", ["Runned", "Runs", "Running"]),
    ("Complete the sentence: She ___ a student.", "is", ["are", "am", "be"]),
    ("Complete the sentence: They ___ playing football.", "are", ["is", "am", "was"]),
    ("Complete the sentence: I ___ hungry.", "am", ["is", "are", "be"]),
    ("Which word is a fruit?", "Apple", ["Carrot", "Potato", "Onion"]),
    ("Which word is a vegetable?", "Carrot", ["Apple", "Banana", "Cherry"]),
    ("Which word is a color?", "Red", ["Table", "Run", "Happy"]),
    ("Which word is a number?", "Five", ["Chair", "Blue", "Quickly"]),
    ("What do you use to write on paper?", "A pen", ["A spoon", "A shoe", "A cup"]),
    ("What do you use to cut paper?", "Scissors", ["A spoon", "A pillow", "A towel"]),
    ("Where do you keep food cold?", "In a refrigerator", ["In an oven", "In a closet", "In a drawer"]),
    ("What do you wear on your feet?", "Shoes", ["Hats", "Gloves", "Scarves"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Mark Twain", "Jane Austen"]),
    ("What is the boiling point of water in degrees Celsius?", "100", ["50", "0", "200"]),
    ("What is the freezing point of water in degrees Celsius?", "0", ["100", "50", "-50"]),
    ("What language is mainly spoken in Brazil?", "Portuguese", ["Spanish", "French", "English"]),
    ("What language is mainly spoken in Mexico?", "Spanish", ["Portuguese", "German", "Italian"]),
    ("Which continent is Kenya in?", "Africa", ["Asia", "Europe", "South America"]),
]


def general(rng: random.Random) -> list[dict]:
    items = []
    for i, (q, right, wrong) in enumerate(GENERAL):
        choices = [right, *wrong]
        rng.shuffle(choices)
        items.append({"question": q, "choices": choices, "label": choices.index(right), "id": i})
    return items


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    kb = facts(rng)
    train = train_rows(kb)
    rng.shuffle(train)
    return {"assistant_train.jsonl": train, "assistant_mc.jsonl": multiple_choice(rng, kb),
            "assistant_heldout.jsonl": heldout_notes(kb), "assistant_prompts.jsonl": answer_prompts(kb),
            "general_mc.jsonl": general(rng)}


def write(folder: Path) -> list[Path]:
    paths = []
    for name, rows in build().items():
        path = folder / name
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(HERE):
        print(p)
