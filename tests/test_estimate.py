"""The memory model against figures worked by hand for the Llama-2-7B shape, and its sanity orderings."""

from __future__ import annotations

import pytest

from harness import methods
from harness.estimate import GIB, estimate, fits
from harness.presets import PRESETS, param_count
from harness.spec import Settings

L7 = PRESETS["llama-2-7b"]  # h 4096, i 11008, 32 layers, 32 heads (MHA), vocab 32000

# Llama-2-7B by hand, per layer: q, k, v, o = 4 * 4096 * 4096 = 67,108,864; gate, up, down =
# 3 * 4096 * 11008 = 135,266,304; sum 202,375,168; x 32 layers = 6,476,005,376 linear weights.
# Not quantized: embed + lm_head = 2 * 32000 * 4096 = 262,144,000; norms (2 * 32 + 1) * 4096 = 266,240.
LINEAR_7B = 6_476_005_376
REST_7B = 262_144_000 + 266_240
# LoRA r=16 on all 7 projections, r * (in + out) each: q, k, v, o 4 * 16 * 8192 = 524,288;
# gate, up, down 3 * 16 * (4096 + 11008) = 724,992; per layer 1,249,280; x 32 = 39,976,960.
LORA_7B = 39_976_960


def settings(**kw) -> Settings:
    return Settings(**{"seq_len": 512, "batch_size": 4, **kw})


def test_bits_per_param_follow_the_qlora_paper_exactly():
    def bits_per_param_4bit(blocksize, dq):
        name = "qlora-nf4-dq" if dq else "qlora-nf4"
        return methods.get(name).bits_per_param(Settings(method=name, blocksize=blocksize))

    assert bits_per_param_4bit(64, True) == 4 + 8 / 64 + 32 / (64 * 256)  # 4.126953125
    assert bits_per_param_4bit(64, False) == 4.5  # 4 + 32 / 64
    assert bits_per_param_4bit(64, False) - bits_per_param_4bit(64, True) == pytest.approx(0.373, abs=1e-3)
    assert bits_per_param_4bit(128, False) == 4.25


def test_param_count_of_llama_2_7b_is_the_published_6_74b():
    assert param_count(L7)["linear"] == LINEAR_7B
    assert param_count(L7)["total"] == 6_738_415_616 == LINEAR_7B + REST_7B


def test_weights_of_llama_2_7b_by_hand():
    # nf4 + DQ: 6,476,005,376 / 8 = 809,500,672 bytes per bit/param; x 4.126953125 = 3,340,771,328 B;
    # the rest in fp32 (prepare_model_for_kbit_training): 262,410,240 * 4 = 1,049,640,960 B.
    dq = estimate(L7, settings(method="qlora-nf4-dq"))
    assert dq.bits_per_param == 4.126953125
    assert dq.weights_gib == pytest.approx((3_340_771_328 + 1_049_640_960) / GIB, rel=1e-12)  # 4.089 GiB
    # nf4 alone: 809,500,672 * 4.5 = 3,642,753,024 B + the same fp32 rest.
    no_dq = estimate(L7, settings(method="qlora-nf4"))
    assert no_dq.weights_gib == pytest.approx((3_642_753_024 + 1_049_640_960) / GIB, rel=1e-12)  # 4.370 GiB
    # lora-bf16: every one of the 6,738,415,616 parameters in 2 bytes = 13,476,831,232 B.
    bf16 = estimate(L7, settings(method="lora-bf16"))
    assert bf16.bits_per_param == 16.0
    # The default precision policy (recipe) holds its embeddings, norms and lm_head in fp32 as the 4-bit
    # bases do: 6,476,005,376 * 2 + 262,410,240 * 4 = 14,001,651,712 B.
    assert bf16.weights_gib == pytest.approx(14_001_651_712 / GIB, rel=1e-12)  # 13.040 GiB
    native = estimate(L7, settings(method="lora-bf16", precision="native"))
    assert native.weights_gib == pytest.approx(13_476_831_232 / GIB, rel=1e-12)  # 12.551 GiB
    # fp4 stores exactly what nf4 stores
    assert estimate(L7, settings(method="qlora-fp4-dq")).weights_gib == dq.weights_gib


def test_lora_gradients_and_adamw_of_llama_2_7b_by_hand():
    # the default policy (recipe): bf16 adapters as trl casts them; torch's AdamW keeps m and v in their dtype
    est = estimate(L7, settings(method="qlora-nf4", optimizer="adamw_torch"))
    assert est.trainable_params == LORA_7B
    assert est.lora_gib == pytest.approx(LORA_7B * 2 / GIB)  # bf16 adapters: 79,953,920 B
    assert est.gradients_gib == pytest.approx(LORA_7B * 2 / GIB)  # bf16 gradients, frozen base has none
    assert est.optimizer_gib == pytest.approx(LORA_7B * 4 / GIB)  # bf16 m and v: 159,907,840 B
    assert est.optimizer_paged_gib == 0
    est = estimate(L7, settings(method="qlora-nf4", optimizer="adamw_torch", precision="fp32-adapters"))
    assert est.lora_gib == pytest.approx(LORA_7B * 4 / GIB)  # fp32 adapters: 159,907,840 B
    assert est.gradients_gib == pytest.approx(LORA_7B * 4 / GIB)
    assert est.optimizer_gib == pytest.approx(LORA_7B * 8 / GIB)  # fp32 m and v: 319,815,680 B


def test_paged_optimizers_by_hand():
    # Per layer, tensors of 65,536 elements (16 x 4096 or 4096 x 16): 8 for q,k,v,o + gate A, up A, down B
    # = 11; of 176,128 elements (11008 x 16 or 16 x 11008): gate B, up B, down A = 3.
    # 8-bit: 2 bytes/param + two fp32 absmax per 256: 65,536 -> 131,072 + 8 * 256 = 133,120 B;
    # 176,128 -> 352,256 + 8 * 688 = 357,760 B; per layer 11 * 133,120 + 3 * 357,760 = 2,537,600 B; x 32.
    eight = estimate(L7, settings(optimizer="paged_adamw_8bit"))
    assert eight.optimizer_gib == pytest.approx(32 * 2_537_600 / GIB, rel=1e-12)  # 81,203,200 B
    # 32-bit paged: bitsandbytes pages only tensors of >= 1e5 elements: 96 x 176,128 x 8 B = 135,266,304 B.
    paged = estimate(L7, settings(optimizer="paged_adamw_32bit"))
    assert paged.optimizer_gib == pytest.approx(LORA_7B * 8 / GIB)
    assert paged.optimizer_paged_gib == pytest.approx(135_266_304 / GIB, rel=1e-12)
    assert paged.allocator_gib == pytest.approx(paged.total_gib - 0.5 - 135_266_304 / GIB)
    # on the CPU nothing is paged and there is no CUDA context
    cpu = estimate(L7, settings(optimizer="paged_adamw_32bit"), device="cpu")
    assert cpu.optimizer_paged_gib == 0 and cpu.context_gib == 0


def test_activations_of_llama_2_7b_by_hand():
    # qlora-nf4, bf16 autocast, sdpa, lora_dropout 0.05 on CUDA, seq 512 x batch 4 = 2048 tokens.
    # Bytes per token of one layer (h 4096, i 11008, kv 4096, 32 heads, r 16):
    #   norms     2 * (4 * 4096 + 4)                     =  32,776
    #   LoRA      2 * (6 * 4096 + 11008) + 1 * 35,584 + 7 * 2 * 16 = 106,976  (inputs, bool masks, B inputs)
    #   sdpa      2 * (2 * 4096 + 2 * 4096) + 4 * 32     =  32,896
    #   SwiGLU    3 * 4 * 11008 (fp32 out of Linear4bit) = 132,096   -> layer = 304,744
    # The loss (trl's fused LM head, CUDA): N = 2048 - 4 predicted positions = 2044; a bf16 tile buffer of
    # 2044 x 32768 = 133,955,584 B; the fp32 lm_head cast chunk 32000 x 4096 x 2 = 262,144,000 B; the fp32
    # hidden gradient 2044 x 4096 x 4 = 33,488,896 B; log-normalizer and entropy 2044 x 8 = 16,352 B
    # -> 429,604,832 B, more than one layer's backward (3 * 4 * 11008 * 2048 = 270,532,608 B: the MLP's
    # gradients are fp32 like its outputs, Linear4bit returning its fp32 input's dtype).
    # Saved: 32 * 304,744 + the final norm 4 * 4096 + 4 = 9,768,196 per token x 2048 = 20,005,265,408 B.
    no_gc = estimate(L7, settings(method="qlora-nf4"))
    assert no_gc.activations_gib == pytest.approx((20_005_265_408 + 429_604_832) / GIB, rel=1e-12)  # 19.03
    # checkpointing keeps each layer's fp32 input (4 * 4096) and the final norm: 540,676 per token x 2048 =
    # 1,107,304,448 B; then one recomputed layer and its fp32 backward, (304,744 + 132,096) * 2048 =
    # 894,648,320 B, outweighs the loss's 429,604,832 B.
    gc = estimate(L7, settings(method="qlora-nf4", gradient_checkpointing=True))
    assert gc.activations_gib == pytest.approx((1_107_304_448 + 894_648_320) / GIB, rel=1e-12)  # 1.864 GiB
    # the real tokens: a micro-batch padded to 300 of 4 rows holds 1200 tokens, not 2048
    short = estimate(L7, settings(method="qlora-nf4"), tokens=1200)
    # N = 1196: 1196 * 32768 * 2 + 262,144,000 + 1196 * 4096 * 4 + 1196 * 8 = 360,129,888
    assert short.activations_gib == pytest.approx((9_768_196 * 1200 + 360_129_888) / GIB, rel=1e-12)
    # no dropout: no bool masks, 35,584 bytes per token per layer less
    nodrop = estimate(L7, settings(method="qlora-nf4", lora_dropout=0.0))
    assert no_gc.activations_gib - nodrop.activations_gib == pytest.approx(32 * 35_584 * 2048 / GIB)


def test_vocab_override_grows_logits_and_embeddings():
    base = estimate(L7, settings())
    big = estimate(L7, settings(), vocab_size=128_256)
    # the fused LM head casts the fp32 head in chunks of 32,768 rows: 32,768 x 4096 x 2 instead of 32,000 x ...
    assert big.activations_gib - base.activations_gib == pytest.approx((32_768 - 32_000) * 4096 * 2 / GIB)
    assert big.weights_gib - base.weights_gib == pytest.approx(2 * (128_256 - 32_000) * 4096 * 4 / GIB)


def test_adapter_dtype_as_held():
    # the dtype a run held overrides the policy's: bf16 adapters halve adapters, gradients and torch AdamW
    # states against fp32 ones, and autocast makes no 16-bit copies of them
    fp32 = estimate(L7, settings(method="qlora-nf4"), adapter_dtype="fp32")
    bf16 = estimate(L7, settings(method="qlora-nf4"), adapter_dtype="bf16")
    assert bf16.lora_gib == bf16.gradients_gib == pytest.approx(LORA_7B * 2 / GIB)
    assert bf16.optimizer_gib == pytest.approx(LORA_7B * 4 / GIB)
    assert fp32.workspace_gib - bf16.workspace_gib == pytest.approx(LORA_7B * 2 / GIB)
    # bitsandbytes' optimizers keep their own state dtype whatever the parameters'
    eight = estimate(L7, settings(optimizer="paged_adamw_8bit"), adapter_dtype="bf16")
    assert eight.optimizer_gib == estimate(L7, settings(optimizer="paged_adamw_8bit")).optimizer_gib


def test_overrides_for_layers_bits_and_targets():
    two = estimate(L7, settings(), num_layers=2)
    assert two.trainable_params == 2 * 1_249_280
    measured = estimate(L7, settings(method="qlora-nf4-dq"), bits_per_param=4.2)
    assert measured.bits_per_param == 4.2
    assert measured.weights_gib == pytest.approx((LINEAR_7B * 4.2 / 8 + REST_7B * 4) / GIB)
    qv = estimate(L7, settings(target_modules="q,v"))
    assert qv.trainable_params == 32 * 2 * 16 * (4096 + 4096)  # 8,388,608


def test_sanity_orderings():
    s = settings(method="qlora-nf4")
    assert estimate(L7, settings(method="qlora-nf4-dq")).weights_gib < estimate(L7, s).weights_gib
    assert estimate(L7, settings(method="lora-bf16")).weights_gib > 2.5 * estimate(L7, s).weights_gib
    assert (estimate(L7, settings(optimizer="paged_adamw_8bit")).optimizer_gib
            < 0.3 * estimate(L7, settings(optimizer="paged_adamw_32bit")).optimizer_gib)
    assert (estimate(L7, settings(gradient_checkpointing=True)).activations_gib
            < 0.2 * estimate(L7, s).activations_gib)
    long = settings(seq_len=2048, batch_size=1)
    assert estimate(L7, long, attn_impl="eager").activations_gib > estimate(L7, long).activations_gib
    assert estimate(L7, settings(batch_size=8)).activations_gib == pytest.approx(
        2 * estimate(L7, settings(batch_size=4)).activations_gib, rel=0.03)  # the loss's head copy is fixed
    with pytest.raises(ValueError, match="attn_impl"):
        estimate(L7, s, attn_impl="flash")


def test_tiny_llama_is_small_and_cuda_adds_the_context():
    tiny = PRESETS["tiny-llama"]
    cpu = estimate(tiny, settings(seq_len=128), device="cpu")
    assert cpu.context_gib == 0
    assert cpu.total_gib < 0.25
    s = settings(seq_len=128, lora_dropout=0.0)  # dropout masks differ: 1-byte bool on CUDA, 4-byte on CPU
    # ... and the CPU's torch fold of the loss tile (no Triton): 29 B x 508 predicted positions x 2048 vocab
    assert estimate(tiny, s).total_gib == pytest.approx(
        estimate(tiny, s, device="cpu").total_gib + 0.5 - 29 * 508 * 2048 / GIB)
    assert estimate(tiny, settings(seq_len=128)).activations_gib < cpu.activations_gib


def test_breakdown_metrics_and_fits():
    est = estimate(L7, settings(method="qlora-nf4-dq", gradient_checkpointing=True))
    parts = est.breakdown()
    assert parts["total_gib"] == pytest.approx(sum(v for k, v in parts.items() if k != "total_gib"))
    metrics = est.as_metrics()
    assert metrics["estimate.total_gib"] == est.total_gib
    assert metrics["estimate.bits_per_param"] == 4.126953125
    assert all(k.startswith("estimate.") for k in metrics)
    assert set(est.as_metrics(prefix="x.")) == {k.replace("estimate.", "x.") for k in metrics}
    assert fits(est, 24.0) == (True, "")
    ok, reason = fits(estimate(L7, settings(method="lora-bf16")), 24.0)
    assert not ok
    assert reason.startswith("estimated peak 2") and "24 GiB budget" in reason
    assert reason.index("activations") < reason.index("weights")  # largest term first
