"""Merge strategies for an adapter trained on a 4-bit base: what each one keeps of the unmerged adapter.

The yardstick for "within bf16 rounding" is measured, not assumed: the same unmerged adapter computed in
bf16 and in fp32 (the 4-bit weights dequantized exactly into fp32). A strategy that only rounds moves the
next-token distribution by about that much; one that changes the weights moves it by far more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.methods import merge
from harness.models import build_on_device
from harness.stages.evaluate import agreement

pytest.importorskip("bitsandbytes")

from test_methods import _logprobs, _trained_adapter, tiny  # noqa: E402

METHOD = "qlora-nf4"
U_BF16 = 2.0**-8  # bf16 keeps 8 significant bits: round to nearest errs by at most 2^-8 of the value


def _load(name: str):
    return build_on_device(tiny(2), name, "bf16", "cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One adapter trained on the 4-bit base, the unmerged adapter's log-probs in bf16 and in fp32."""
    from peft import PeftModel

    adapter, ids = _trained_adapter(METHOD, tmp_path_factory.mktemp("merge") / "adapter", steps=30)
    unmerged = _logprobs(merge.build("none", METHOD, adapter, _load, "bf16"), ids)
    # the same computation in fp32: the 4-bit weights dequantized (exactly) into fp32 linears, the adapter unmerged
    base32 = merge.dequantize_base(_load(METHOD), METHOD, "fp32").float()
    exact = _logprobs(PeftModel.from_pretrained(base32, adapter).float().eval(), ids)
    return adapter, ids, unmerged, agreement(exact, unmerged)


def _delta_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = B·A·alpha/r of every adapted linear, computed here in fp64 from the adapter's files."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (b.double() @ a.double()) * scale
    return out


@pytest.mark.slow
def test_dequantize_merges_within_bf16_rounding(trained):
    adapter, ids, unmerged, bf16_noise = trained
    merged = merge.build("dequantize", METHOD, adapter, _load, "bf16")

    # weights: W' = bf16(W_dq + bf16(ΔW)); two roundings, each within U_BF16 of its value
    fresh = _load(METHOD)
    from harness.methods import get

    deltas = _delta_weights(adapter)
    assert deltas
    for name, delta in deltas.items():
        w_dq = get(METHOD).dequantized(fresh.get_submodule(name)).double()
        want = w_dq + delta
        got = merged.get_submodule(name).weight.double()
        assert merged.get_submodule(name).weight.dtype == torch.bfloat16
        bound = U_BF16 * (want.abs() + delta.abs()) + 1e-12
        assert ((got - want).abs() <= bound).all(), name
        assert (delta.abs() > 4 * U_BF16 * w_dq.abs()).float().mean() > 0.05  # the update is not lost in rounding

    # logits: no farther from the unmerged adapter than bf16 arithmetic moves the unmerged adapter itself
    got = agreement(unmerged, _logprobs(merged, ids))
    assert got["top1_agreement"] == 1.0
    assert got["kl_mean"] <= 2 * bf16_noise["kl_mean"], (got, bf16_noise)
    assert got["max_abs_logprob_diff"] <= 2 * bf16_noise["max_abs_logprob_diff"], (got, bf16_noise)


@pytest.mark.slow
def test_original_weights_differ_measurably_from_the_unmerged_adapter(trained):
    """The adapter corrected the 4-bit weights; merged into the original 16-bit ones it sees other weights."""
    adapter, ids, unmerged, bf16_noise = trained
    got = agreement(unmerged, _logprobs(merge.build("original", METHOD, adapter, _load, "bf16"), ids))
    assert got["kl_mean"] > 20 * bf16_noise["kl_mean"], (got, bf16_noise)
    assert got["max_abs_logprob_diff"] > 4 * bf16_noise["max_abs_logprob_diff"], (got, bf16_noise)


def test_strategies_parse_and_apply_per_method():
    assert merge.parse("all") == ("requantize", "dequantize", "original")
    assert merge.parse("original, requantize") == ("requantize", "original")
    with pytest.raises(ValueError, match="merge_strategy 'dequant'"):
        merge.parse("dequant")
    assert merge.applicable("lora-bf16", merge.MERGED) == ("requantize",)
    assert merge.applicable("qlora-nf4-dq", merge.MERGED) == merge.MERGED
