"""The first GPU run's selection: the shipped suites cut down to touch every CUDA path once (issue 23).

    python3 .ci/gpu_selection.py OUT_DIR [--cpu]

writes OUT_DIR/suites/NN-<suite>.yaml, derived from suites/<suite>.yaml: the matrix restricted, fewer steps,
a per-case timeout, data paths made absolute (the derived files live outside the repository), and the
expectations that judge a step budget the cut-down run does not have left out. Suite names stay: records
say which settings they ran with. ``--cpu`` (the dry run) substitutes CPU-sized shapes (the tiny preset,
short sequences, the cpu tier, no expectations) but writes the same files through the same code.
The order is the order of the run: the cheapest paths first, so a time-box cuts the dearest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "suites"

# (suite, matrix restriction, settings overrides, stages or None, per-case timeout in s)
SELECTION = [
    # the CUDA quantize kernels of the forms the memory suites do not quantize: FP4 + DQ and int8 (NF4 too)
    ("fidelity", {"weight_source": ["model"], "method": ["qlora-nf4", "qlora-fp4-dq", "lora-int8"]}, {}, None, 120),
    ("train", {}, {"max_steps": 8, "warmup_steps": 3, "seed": 0}, None, 180),  # every method, seed 0
    ("memory-7b", {"method": ["lora-bf16", "qlora-nf4", "qlora-nf4-dq"], "seq_len": [512, 2048]},
     {"max_steps": 6, "warmup_steps": 2}, None, 240),
    ("inference-7b", {"method": ["qlora-nf4"]},  # one generation case: train a few steps, generate every form
     {"max_steps": 3, "warmup_steps": 1, "gen_repeats": 1, "gen_batch_sizes": "1", "gen_new_tokens": 32}, None, 300),
    ("memory-70b", {"method": ["qlora-nf4-dq"], "seq_len": [512]}, {"max_steps": 4, "warmup_steps": 2}, None, 300),
]
# expectations that need the full step budget (the loss falling by a margin) are left out of the cut-down run
STEP_BOUND_METRICS = {"train.loss_drop"}
CPU_SEQ = {512: 32, 2048: 64}  # the dry run's sequence lengths in place of the GPU's


def _absolute(suite: dict) -> None:
    model, data, ev = suite.get("model") or {}, suite.get("data") or {}, suite.get("eval") or {}
    if model.get("pretrain"):
        model["pretrain"] = str(SUITES / model["pretrain"])
    if model.get("path"):
        model["path"] = str(SUITES / model["path"])
    if data.get("train"):
        data["train"] = str(SUITES / data["train"])
    if data.get("tokenizer_corpus"):
        data["tokenizer_corpus"] = [str(SUITES / p) for p in data["tokenizer_corpus"]]
    if ev.get("heldout"):
        ev["heldout"] = str(SUITES / ev["heldout"])


def derive(name: str, restrict: dict, settings: dict, stages, timeout_s: int, cpu: bool) -> dict:
    suite = yaml.safe_load((SUITES / f"{name}.yaml").read_text())
    matrix = suite.setdefault("matrix", {})
    for key, values in restrict.items():
        if key in matrix:
            matrix[key] = [v for v in matrix[key] if v in values]
        else:
            suite.setdefault("settings", {})[key] = values[0]
    suite.setdefault("settings", {}).update(settings)
    suite.pop("replicates", None)  # seed 0 only
    if stages:
        suite["stages"] = stages
    suite["timeout_s"] = timeout_s
    def selects_kept(e: dict) -> bool:  # an expectation selecting only cases the cut-down matrix left out goes too
        selectors = [e.get(k) or {} for k in ("where", "numerator", "denominator")]
        selectors += [{"method": e[k]} for k in ("method", "against") if e.get(k) is not None]
        for selector in selectors:
            for key, want in selector.items():
                have = matrix.get(key, [suite["settings"][key]] if key in suite["settings"] else None)
                if have is not None and not set(want if isinstance(want, list) else [want]) & set(have):
                    return False
        return True

    suite["expectations"] = [e for e in suite.get("expectations", [])
                             if e.get("metric") not in STEP_BOUND_METRICS and selects_kept(e)]
    if cpu:  # the dry run: the same files, CPU-sized
        suite["tiers"] = ["cpu"]
        suite["model"]["preset"] = "tiny-llama"
        if suite["model"].get("pretrain_steps"):
            suite["model"]["pretrain_steps"] = 10
        if "seq_len" in matrix:
            matrix["seq_len"] = [CPU_SEQ.get(v, v) for v in matrix["seq_len"]]
        if "method" in matrix:
            matrix["method"] = matrix["method"][:2]
        s = suite["settings"]
        s["max_steps"], s["warmup_steps"] = min(s.get("max_steps", 3), 3), 1
        if "gen_prompt_tokens" in s:
            s["gen_prompt_tokens"], s["gen_new_tokens"] = 16, 8
        suite["expectations"] = []
        suite["timeout_s"] = 600
    _absolute(suite)
    return suite


def write(out: Path, cpu: bool = False) -> list[Path]:
    folder = out / "suites"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (name, restrict, settings, stages, timeout_s) in enumerate(SELECTION):
        path = folder / f"{i:02d}-{name}.yaml"
        path.write_text(yaml.safe_dump(derive(name, restrict, settings, stages, timeout_s, cpu), sort_keys=False))
        files.append(path)
    return files


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit("usage: python3 .ci/gpu_selection.py OUT_DIR [--cpu]")
    for f in write(Path(args[0]), cpu="--cpu" in args):
        print(f)
