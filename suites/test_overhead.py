"""What the measurement costs: the same LoRA steps with and without the harness's instrumentation.

The memory sampler (a thread polling RSS/NVML every 5 ms), the per-step synchronize + clock reads and the
token-counting collator must cost under 1% of throughput. The ratio lands in pytest-benchmark's extra_info.
"""

from __future__ import annotations

import time

import pytest
import torch

from harness import presets
from harness.measure.memory import Sampler
from harness.models import build_on_device
from harness.stages import Source
from harness.stages.train import TokenCounter, _sync

STEPS = 15


@pytest.fixture(scope="module")
def setup():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build_on_device(Source(None, None, presets.PRESETS["tiny-llama"], {"num_layers": 2}),
                            "lora-bf16", "bf16", "cuda" if torch.cuda.is_available() else "cpu")
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = next(model.parameters()).device
    batch = {"input_ids": torch.randint(0, 2048, (8, 64), device=device)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return model, opt, batch, device.type


def _steps(model, opt, batch, device, instrumented: bool) -> float:
    collate = TokenCounter(lambda b: b) if instrumented else (lambda b: b)
    sampler = Sampler(cuda=device == "cuda").start() if instrumented else None
    t0 = time.perf_counter()
    for _ in range(STEPS):
        if instrumented:
            _sync(device)
            t = time.perf_counter()
        b = collate(batch)
        loss = model(**b, labels=b["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if instrumented:
            _sync(device)
            _ = time.perf_counter() - t
    _sync(device)
    elapsed = time.perf_counter() - t0
    if sampler:
        sampler.stop()
    return elapsed


def test_instrumentation_overhead(benchmark, setup):
    model, opt, batch, device = setup
    _steps(model, opt, batch, device, False)  # warm-up
    plain, measured = [], []
    for _ in range(3):  # interleaved, so drift on a shared machine hits both alike
        plain.append(_steps(model, opt, batch, device, False))
        measured.append(_steps(model, opt, batch, device, True))
    benchmark.pedantic(_steps, args=(model, opt, batch, device, True), rounds=1, iterations=1)
    ratio = min(measured) / min(plain)
    benchmark.extra_info.update({"overhead_ratio": ratio, "plain_s": min(plain), "instrumented_s": min(measured),
                                 "steps": STEPS, "device": device})
    print(f"instrumentation overhead: {100 * (ratio - 1):+.2f}% over {STEPS} steps on {device}")
