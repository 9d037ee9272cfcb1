"""Merge strategies for an adapter trained on a (quantized) base, built from the methods' hooks.

- ``none``: the base as the method loads it, with the adapter on top (how the tutorials load it).
- ``requantize``: PEFT's ``merge_and_unload`` into the method's stored weights (a 4-bit base rounds the
  update into its 4-bit codes).
- ``dequantize``: every quantized linear replaced by a 16-bit ``nn.Linear`` holding ``Method.dequantized``,
  the adapter merged in 16 bits, the result kept 16-bit.
- ``original``: the adapter merged into the original 16-bit weights that were quantized, loaded as the
  reference method loads its base. The adapter learned to correct the quantized weights, not these.

For a 16-bit base there is nothing to dequantize and no other original: only ``none`` and ``requantize``.
Every strategy takes a freshly loaded base (``load(method_name)``): on the CPU a 4-bit linear repacks its
weight in place on its first no-grad forward, and dequantizing or merging after that reads garbage.
"""

from __future__ import annotations

from collections.abc import Callable

# the registry imports every module of this package: read it inside the functions, never at import

STRATEGIES = ("none", "requantize", "dequantize", "original")
MERGED = STRATEGIES[1:]
LABELS = {
    "none": "base + adapter (unmerged)",
    "requantize": "merged, requantized",
    "dequantize": "merged into the dequantized base (16-bit)",
    "original": "merged into the original 16-bit weights",
}


def parse(value: str) -> tuple[str, ...]:
    """``"requantize,dequantize"`` or ``"all"`` -> the merged strategies named, in the usual order."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if names == ["all"]:
        return MERGED
    bad = [n for n in names if n not in MERGED]
    if not names or bad:
        raise ValueError(f"merge_strategy {value!r}: expected 'all' or a comma list of {', '.join(MERGED)}")
    return tuple(s for s in MERGED if s in names)


def applicable(method_name: str, strategies: tuple[str, ...]) -> tuple[str, ...]:
    """The strategies that differ for this method (a 16-bit base has only the plain merge)."""
    from harness.methods import get

    if get(method_name).quantized:
        return strategies
    return tuple(s for s in strategies if s == "requantize")


def dequantize_base(model, method_name: str, compute_dtype: str):
    """Replace every quantized linear of a freshly loaded base with a 16-bit ``nn.Linear`` (in place)."""
    import torch

    from harness.methods import get, torch_dtype

    method, dtype = get(method_name), torch_dtype(compute_dtype)
    replaced = 0
    for _parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            weight = method.dequantized(child)
            if weight is None:
                continue
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.to(dtype))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.to(dtype))
            linear.requires_grad_(False)
            setattr(parent, name, linear)
            replaced += 1
    if not replaced:
        raise ValueError(f"{method_name}: no quantized linear to dequantize (merge into a base that ran a forward?)")
    # a plain 16-bit model now: save_pretrained must not write a quantization config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def build(strategy: str, method_name: str, adapter, load: Callable[[str], object], compute_dtype: str):
    """The model a strategy gives: ``load(method_name)`` returns a freshly loaded base of that method."""
    from peft import PeftModel

    from harness.methods import REFERENCE, get

    method = get(method_name)
    if strategy == "none":
        return PeftModel.from_pretrained(load(method_name), adapter).eval()
    if strategy == "requantize":
        return method.merge(PeftModel.from_pretrained(load(method_name), adapter)).eval()
    if strategy == "dequantize":
        base = dequantize_base(load(method_name), method_name, compute_dtype)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    if strategy == "original":
        return PeftModel.from_pretrained(load(REFERENCE), adapter).merge_and_unload().eval()
    raise ValueError(f"unknown merge strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
