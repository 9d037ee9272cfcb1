"""One precision policy for every method, applied after the libraries' own casting, and the dtypes held.

Left alone, the methods train with different numerics: ``prepare_model_for_kbit_training`` casts a quantized
base's norms, embeddings and lm_head to fp32 and trl's SFTTrainer casts a quantized model's adapters to bf16,
while a 16-bit base keeps everything in bf16 with fp32 adapters. A comparison between them would confound
quantization with precision. A policy names what every part of the model holds, whatever the method:

- ``recipe`` (default): the QLoRA reference recipe (paper §3, trl's SFTTrainer) for every method: norms,
  embeddings and lm_head in fp32, adapters in the compute dtype, the base's linears as the method stores them.
- ``fp32-adapters``: the same with fp32 adapters (master weights in fp32, autocast computes in 16 bits).
- ``native``: no enforcement: whatever peft, trl and the method's preparation left (not a fair comparison).
"""

from __future__ import annotations

from typing import Literal

Policy = Literal["recipe", "fp32-adapters", "native"]
POLICIES: tuple[str, ...] = ("recipe", "fp32-adapters", "native")
PARTS = ("linears", "adapters", "norms", "embeddings", "lm_head", "other")


def part_of(name: str, param) -> str:
    """Which part of the model a parameter belongs to (by its name in a PEFT-wrapped causal LM)."""
    if "lora_" in name:
        return "adapters"
    if "lm_head" in name:
        return "lm_head"
    if "embed_tokens" in name or "wte" in name or "wpe" in name:
        return "embeddings"
    if "norm" in name:
        return "norms"
    if getattr(param, "ndim", 0) >= 2 or getattr(param, "quant_state", None) is not None:
        return "linears"
    return "other"


def apply(model, policy: str, compute_dtype: str) -> None:
    """Cast ``model``'s parameters to what ``policy`` prescribes (in place); the linears are never touched."""
    import torch

    from harness.methods import torch_dtype

    if policy == "native":
        return
    if policy not in POLICIES:
        raise ValueError(f"unknown precision policy {policy!r} (expected one of {', '.join(POLICIES)})")
    adapters = torch.float32 if policy == "fp32-adapters" else torch_dtype(compute_dtype)
    for name, param in model.named_parameters():
        part = part_of(name, param)
        if part == "adapters":
            want = adapters
        elif part in ("norms", "embeddings", "lm_head"):
            want = torch.float32
        else:
            continue
        if param.dtype != want and param.dtype.is_floating_point:
            param.data = param.data.to(want)


def held(model, optimizer=None) -> dict[str, str]:
    """The dtypes each part of the model actually holds (``"float32"``, or ``"bfloat16+float32"`` if mixed)."""
    seen: dict[str, set[str]] = {}
    for name, param in model.named_parameters():
        seen.setdefault(part_of(name, param), set()).add(str(param.dtype).removeprefix("torch."))
    if optimizer is not None:
        states = {str(t.dtype).removeprefix("torch.") for state in optimizer.state.values()
                  for t in state.values() if hasattr(t, "dtype") and getattr(t, "ndim", 0) >= 1}
        if states:
            seen["optimizer_state"] = states
    return {part: "+".join(sorted(v)) for part, v in sorted(seen.items())}


def adapter_bytes(policy: str, quantized: bool, compute_bytes: int) -> int:
    """Bytes per LoRA parameter under ``policy`` (``native``: trl casts a quantized model's adapters to 16 bits)."""
    if policy == "fp32-adapters":
        return 4
    if policy == "native":
        return compute_bytes if quantized else 4
    return compute_bytes


def unquantized_bytes(policy: str, quantized: bool, compute_bytes: int) -> int:
    """Bytes per parameter of embeddings, norms and lm_head under ``policy``."""
    if policy == "native" and not quantized:
        return compute_bytes
    return 4
