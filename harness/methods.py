"""The five methods under test, and the load configuration each one implies."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Method:
    name: str
    quant_type: str | None  # "nf4" | "fp4" | None for a 16-bit base
    double_quant: bool
    label: str

    @property
    def is_4bit(self) -> bool:
        return self.quant_type is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora-bf16", None, False, "LoRA on a 16-bit base"),
        Method("qlora-nf4", "nf4", False, "QLoRA, NF4"),
        Method("qlora-nf4-dq", "nf4", True, "QLoRA, NF4 + double quantization"),
        Method("qlora-fp4", "fp4", False, "QLoRA, FP4"),
        Method("qlora-fp4-dq", "fp4", True, "QLoRA, FP4 + double quantization"),
    )
}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (expected one of {', '.join(METHODS)})") from None


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def bnb_config(method: Method, compute_dtype: str, quant_storage: str = "uint8"):
    """The ``BitsAndBytesConfig`` of the QLoRA recipe for a 4-bit method (None for lora-bf16)."""
    if not method.is_4bit:
        return None
    from transformers import BitsAndBytesConfig

    storage = "uint8" if quant_storage == "uint8" else DTYPES[quant_storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        bnb_4bit_quant_storage=storage,
    )
