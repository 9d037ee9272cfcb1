"""Synthetic presets built straight on the device in 4-bit (the path 7B/13B/70B shapes take on a GPU)."""

from __future__ import annotations

import pytest
import torch

from harness import presets
from harness.models import build_on_device
from harness.stages import Source


def source(num_layers=1):
    return Source(None, None, presets.PRESETS["tiny-llama"], {"num_layers": num_layers})


@pytest.mark.parametrize("method", ["qlora-nf4-dq", "qlora-fp4", "lora-bf16"])
def test_build_then_train_one_step(method):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = build_on_device(source(), method, "bf16", "cpu")
    q = model.model.layers[0].self_attn.q_proj
    if method == "lora-bf16":
        assert type(q) is torch.nn.Linear and q.weight.dtype == torch.bfloat16
    else:
        assert isinstance(q, bnb.nn.Linear4bit) and q.weight.bnb_quantized
        assert q.weight.quant_state.nested is method.endswith("-dq")
        assert q.weight.quant_state.quant_type == method.split("-")[1]
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"))
    ids = torch.randint(0, 2048, (2, 16))
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads)


def test_builds_are_reproducible():
    a = build_on_device(source(), "qlora-nf4", "bf16", "cpu")
    b = build_on_device(source(), "qlora-nf4", "bf16", "cpu")
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
