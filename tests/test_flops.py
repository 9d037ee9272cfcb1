"""Analytic FLOPs against the Llama-2-7B shape worked by hand; datasheet lookup; MFU; the probe on the CPU."""

from __future__ import annotations

import pytest

from harness.measure.flops import (
    FLOP_CONVENTION,
    datasheet_tflops,
    measure_peak_bf16_tflops,
    mfu,
    model_flops_per_token_6n,
    step_model_flops,
    train_flops_per_token,
)
from harness.presets import PRESETS, param_count
from harness.spec import Settings

L7 = PRESETS["llama-2-7b"]
# By hand (see test_estimate): frozen decoder linears 6,476,005,376; lm_head 4096 * 32000 = 131,072,000;
# LoRA r=16 on all projections 39,976,960; attention at seq 2048: 4 * 32 layers * 2048 * 4096 = 1,073,741,824.
# forward  = 2 * 6,476,005,376 + 2 * 131,072,000 + 1,073,741,824 + 2 * 39,976,960        = 14,367,850,496
# backward = 2 * 6,476,005,376 + 2 * 131,072,000 + 2 * 1,073,741,824 + 4 * 39,976,960    = 15,521,546,240
# recompute (checkpointing) = forward - lm_head's 262,144,000                            = 14,105,706,496
FORWARD, BACKWARD, RECOMPUTE = 14_367_850_496, 15_521_546_240, 14_105_706_496


def test_llama_2_7b_flops_per_token_by_hand():
    f = train_flops_per_token(L7, Settings(seq_len=2048))
    assert f["forward"] == FORWARD
    assert f["backward"] == BACKWARD
    assert f["recompute"] == 0
    assert f["model"] == f["total"] == FORWARD + BACKWARD  # 29,889,396,736


def test_checkpointing_adds_one_forward_of_the_layers():
    f = train_flops_per_token(L7, Settings(seq_len=2048, gradient_checkpointing=True))
    assert f["recompute"] == RECOMPUTE
    assert f["total"] == FORWARD + BACKWARD + RECOMPUTE
    assert f["model"] == FORWARD + BACKWARD  # MFU does not count recomputation


def test_frozen_base_costs_less_than_full_fine_tuning():
    n = param_count(L7)["total"]
    assert model_flops_per_token_6n(n) == 6 * 6_738_415_616
    f = train_flops_per_token(L7, Settings(seq_len=2048))
    full = model_flops_per_token_6n(n) + 12 * 32 * 2048 * 4096  # 6N + attention (PaLM's count)
    assert 4 * n < f["model"] < 0.8 * full  # no weight gradients for the base: ~4N, not 6N


def test_attention_term_scales_with_seq_len_and_lora_with_rank():
    short = train_flops_per_token(L7, Settings(seq_len=1024))
    long = train_flops_per_token(L7, Settings(seq_len=2048))
    assert long["forward"] - short["forward"] == 4 * 32 * 1024 * 4096  # 4 * L * delta_s * h
    r8 = train_flops_per_token(L7, Settings(seq_len=2048, lora_r=8))
    assert long["model"] - r8["model"] == 6 * 39_976_960 // 2  # 6 FLOPs per LoRA param, half the params
    qv = train_flops_per_token(L7, Settings(seq_len=2048, target_modules="q,v"))
    assert long["forward"] - qv["forward"] == 2 * (39_976_960 - 8_388_608)


def test_overrides_of_layers_and_vocab():
    two = train_flops_per_token(L7, Settings(seq_len=2048), num_layers=2)
    assert two["forward"] == 2 * (2 * 202_375_168 + 131_072_000 + 2 * 1_249_280) + 4 * 2 * 2048 * 4096
    big = train_flops_per_token(L7, Settings(seq_len=2048), vocab_size=128_256)
    assert big["forward"] - FORWARD == 2 * 4096 * (128_256 - 32_000)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA A10G", None),  # no NVIDIA datasheet: not guessed from the A10
    ("Tesla V100-SXM2-16GB", None),  # no BF16 tensor cores
])
def test_datasheet_lookup_matches_whole_names(name, tflops):
    assert datasheet_tflops(name) == tflops


def test_mfu_and_the_probe_without_cuda():
    assert mfu(3000, 29_889_396_736, 989.4) == pytest.approx(3000 * 29_889_396_736 / 989.4e12)  # ~0.0906
    assert mfu(1000, 1e12, 1000) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1000, 1e12, 0)
    assert measure_peak_bf16_tflops(device="cpu") is None


def test_step_flops_count_real_tokens_and_attention_at_real_lengths():
    # Two rows of real lengths 300 and 500 padded to 500 (seq_len 2048): 800 real tokens, sum l^2 = 340,000.
    # Without attention, per token: forward 14,367,850,496 - 1,073,741,824 = 13,294,108,672;
    # backward 15,521,546,240 - 2 * 1,073,741,824 = 13,374,062,592; model 26,668,171,264.
    # Attention forward + backward per row: 3 * 4 * 32 layers * 4096 * l^2 = 1,572,864 * l^2
    #   -> 1,572,864 * 340,000 = 534,773,760,000.
    # Total 800 * 26,668,171,264 + 534,773,760,000 = 21,869,310,771,200.
    s = Settings(seq_len=2048)
    assert step_model_flops(L7, s, 800, 340_000) == 21_869_310_771_200
    # one full row of 2048 agrees with the per-token count at seq_len: 2048 * 29,889,396,736
    assert step_model_flops(L7, s, 2048, 2048**2) == 2048 * (FORWARD + BACKWARD)
    # padding is not counted: the old count (1000 padded tokens at the full 2048) is 37% higher
    assert 1000 * (FORWARD + BACKWARD) / step_model_flops(L7, s, 800, 340_000) == pytest.approx(1.3667, abs=1e-4)
    assert "real (non-padding) tokens" in FLOP_CONVENTION and "datasheet" in FLOP_CONVENTION
