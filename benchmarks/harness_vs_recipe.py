"""The harness's training loop against the same QLoRA recipe written by hand (issue: within 1.01x).

Both sides load the same checkpoint with the same settings (the train suite's case for a method, random
weights, ``--steps`` steps) and time ``trainer.train()`` alone: the harness through its train stage
(callbacks, token counter, memory sampler, noise guard, precision policy), the recipe as the tutorials
write it (``from_pretrained`` with the method's quantization config, ``prepare_model_for_kbit_training``,
``LoraConfig``, trl's ``SFTTrainer``). Each run is a fresh process; the two sides alternate, and the
verdict is the median of the per-pair ratios (harness / recipe) of the median step time (what the harness's
tokens/s is made of; the recipe side times steps with two clock reads), with the whole ``trainer.train()``
(the harness's tensor-peak profile of one warm-up step included) beside it; drift of a shared machine hits
both sides alike.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/harness_vs_recipe.py \\
        --methods lora-bf16 qlora-nf4 --pairs 7 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def recipe(method: str, steps: int, warmup: int) -> dict:
    """The hand-written recipe on the harness case's checkpoint and settings; seconds of ``trainer.train()``."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from train_case import train_case
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from harness import methods, models
    from harness.measure.machine import resolve_compute_dtype
    from harness.stages.train import PROJECTION_NAMES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = train_case(method, steps, warmup)
    s = resolve_compute_dtype(case.settings, device)
    source = models.prepare(case)  # the same checkpoint folder the harness side loads
    torch.manual_seed(s.seed)
    kwargs = methods.get(method).from_pretrained_kwargs(s.compute_dtype, s.quant_storage)
    model = AutoModelForCausalLM.from_pretrained(source.checkpoint, device_map={"": 0 if device == "cuda" else "cpu"},
                                                 **kwargs)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=[PROJECTION_NAMES[t] for t in s.target_modules.split(",")]))
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer or source.checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"recipe-{os.getpid()}"
    config = SFTConfig(
        output_dir=str(out), max_steps=s.max_steps, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        optim=s.optimizer, gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=s.compute_dtype == "bf16",
        fp16=s.compute_dtype == "fp16", max_length=s.seq_len, packing=s.packing, dataset_text_field="text",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device == "cpu",
        seed=s.seed, data_seed=s.seed, dataloader_num_workers=0)
    dataset = load_dataset("json", data_files=case.data.train, split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    # the same numerics as the harness (its precision policy): trl casts a quantized model's adapters to bf16,
    # which an AVX2 CPU emulates at a fraction of fp32's speed; hold them in the compute dtype, as the harness does
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    trl_dtype = str(lora[0].dtype).removeprefix("torch.")
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.compute_dtype]
    for p in lora:
        p.data = p.data.to(want)
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # the least a step time needs: two clock reads (and a sync on a GPU)
        def __init__(self):
            self.t0, self.steps = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step > warmup:
                self.steps.append(time.perf_counter() - self.t0)

    clock = Clock()
    trainer.add_callback(clock)
    t = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"train_s": time.perf_counter() - t, "step_median_s": statistics.median(clock.steps),
            "adapters_as_trl_left_them": trl_dtype}


def harness_side(method: str, steps: int, warmup: int) -> dict:
    from train_case import run

    rec = run(method, steps, warmup)
    if rec.status != "passed":
        raise SystemExit(f"harness case {rec.status}: {rec.message}")
    return {"train_s": rec.metrics["train.wall_s"], "step_median_s": rec.metrics["train.step_median_ms"] / 1e3,
            "timing_clean": rec.metrics.get("train.timing_clean")}


def one(side: str, method: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--one", side, "--methods", method, "--steps", str(steps),
           "--warmup", str(warmup)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["lora-bf16", "qlora-nf4"])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-ratio", type=float, default=1.01)
    ap.add_argument("--one", choices=("harness", "recipe"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        fn = harness_side if a.one == "harness" else recipe
        print(json.dumps(fn(a.methods[0], a.steps, a.warmup)))
        return 0
    ok = True
    for method in a.methods:
        ratios: dict[str, list[float]] = {"train_s": [], "step_median_s": []}
        for i in range(a.pairs):
            order = ("harness", "recipe") if i % 2 == 0 else ("recipe", "harness")  # neither always goes first
            got = {side: one(side, method, a.steps, a.warmup) for side in order}
            for k in ratios:
                ratios[k].append(got["harness"][k] / got["recipe"][k])
            print(f"{method} pair {i}: " + ", ".join(
                f"{k} harness {got['harness'][k]:.3f} recipe {got['recipe'][k]:.3f} ({ratios[k][-1]:.3f}x)"
                for k in ratios) + f", harness timing clean: {got['harness'].get('timing_clean')}, trl left the "
                f"recipe's adapters in {got['recipe']['adapters_as_trl_left_them']}", flush=True)
        for k, rs in ratios.items():
            med = statistics.median(rs)
            print(f"{method} {k}: median ratio harness/recipe {med:.3f} (range {min(rs):.3f}-{max(rs):.3f}, "
                  f"{a.pairs} interleaved pairs)")
        ok &= statistics.median(ratios["step_median_s"]) <= a.max_ratio
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
