"""The CPU tensor-level peak against allocations of known sizes."""

from __future__ import annotations

import torch

from harness.measure.tensors import TensorPeak, live_tensors, storage_bytes


def test_peak_counts_live_weights_and_the_steps_largest_moment():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256, bias=False)  # 256 * 256 * 4 = 262,144 bytes of weight
    tied = torch.nn.Sequential(model, model)  # the same weight twice is one storage
    assert storage_bytes(live_tensors(tied)) == 262_144
    peak = TensorPeak()
    peak.start(tied)
    a = torch.empty(1000, 256)  # 1,024,000 bytes
    b = torch.empty(500, 256)  # 512,000 bytes
    del a
    c = torch.empty(3000, 256)  # 3,072,000 bytes: live with b, 3,584,000
    del b, c
    peak.stop()
    assert peak.peak_bytes == 262_144 + 3_584_000


def test_gradients_and_optimizer_state_count_at_the_start():
    model = torch.nn.Linear(128, 64, bias=False)  # 32,768 bytes
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 128)).sum().backward()
    opt.step()  # exp_avg and exp_avg_sq 32,768 bytes each, step a 4-byte scalar
    assert storage_bytes(live_tensors(model, opt)) == 4 * 32_768 + 4
