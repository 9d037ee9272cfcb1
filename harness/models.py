"""Loading per method: the base as each method holds it, from whatever a model source made ready.

Where models come from (synthetic presets, local folders, hub ids, GGUF files) is ``harness.sources``; the
names below are kept here for the code that imported them from this module.
"""

from __future__ import annotations

from typing import Any

from harness import methods, sources
from harness.matrix import Case
from harness.sources.base import Source, cache_dir
from harness.sources.base import fingerprint as _fingerprint
from harness.sources.synthetic import (
    MAX_MATERIALIZED_PARAMS,
    SPECIAL_TOKENS,
    deterministic_torch,
    pretrain,
    train_tokenizer,
)

__all__ = ["MAX_MATERIALIZED_PARAMS", "SPECIAL_TOKENS", "Source", "build_on_device", "cache_dir",
           "deterministic_torch", "device_map", "load_base", "load_tokenizer", "prepare", "pretrain",
           "train_tokenizer", "_fingerprint"]


def prepare(case: Case) -> Source:
    """Make the case's model ready through its source (``harness.sources``): built, fetched, converted or found."""
    return sources.prepare(case)


def shape(source: Source):
    """The model's shape for FLOPs and the estimator: the synthetic preset, else read from the checkpoint's
    config.json (a local, hub or converted GGUF model), else None."""
    from pathlib import Path

    if source.preset is not None:
        return source.preset
    if source.checkpoint is not None and (Path(source.checkpoint) / "config.json").is_file():
        from harness.presets import from_hf_config

        return from_hf_config(source.checkpoint)
    return None


def load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.tokenizer or source.checkpoint)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the QLoRA tutorials' convention
    return tok


def load_base(source: Source, method_name: str, compute_dtype: str, quant_storage: str, device: str,
              blocksize: int = 64):
    """The base as the method holds it (``from_pretrained`` with the method's config, or built on the device
    in ``quant_storage`` at ``blocksize``; transformers loads a 4-bit checkpoint at block size 64 always)."""
    from transformers import AutoModelForCausalLM

    if source.checkpoint is None:
        return build_on_device(source, method_name, compute_dtype, device, quant_storage=quant_storage,
                               blocksize=blocksize)
    method = methods.get(method_name)
    kwargs: dict[str, Any] = method.from_pretrained_kwargs(compute_dtype, quant_storage)
    kwargs["device_map"] = device_map(device)
    for key, value in source.load_kwargs.items():  # the suite's loading options (model.attn_implementation, dtype)
        kwargs[key] = methods.torch_dtype(value) if key == "dtype" else value
    model = AutoModelForCausalLM.from_pretrained(source.checkpoint, **kwargs)
    source.info["device_map"] = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values()})
    return model


def device_map(device: str):
    """One GPU when one is visible; accelerate's ``auto`` placement over several (the record says which)."""
    if device != "cuda":
        return {"": "cpu"}
    import torch

    return "auto" if torch.cuda.device_count() > 1 else {"": 0}


def build_on_device(source: Source, method_name: str, compute_dtype: str, device: str, seed: int = 0,
                    quant_storage: str = "uint8", blocksize: int = 64):
    """A synthetic preset built straight on the device, one linear at a time, in the method's stored form.

    No full 16-bit copy exists in host memory or on disk, so a 70B-shaped QLoRA base needs only its 4-bit
    bytes. Weights are N(0, initializer_range) from a seeded generator: the same weights on every build.
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    preset, method = source.preset, methods.get(method_name)
    config = preset.hf_config(num_layers=source.info.get("num_layers"))
    dtype = methods.torch_dtype(compute_dtype)
    target = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=target).manual_seed(seed)
    std = config.initializer_range

    def rand(*shape):
        return torch.empty(*shape, device=target, dtype=dtype).normal_(0.0, std, generator=gen)

    for _parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or name == "lm_head":
                continue
            weight = rand(child.out_features, child.in_features)
            layer = method.build_linear(child, weight, compute_dtype, target, quant_storage=quant_storage,
                                        blocksize=blocksize)
            if layer is None:  # kept 16-bit: every method's base is drawn from the same sequence of numbers
                set_module_tensor_to_device(child, "weight", target, value=weight)
            else:
                setattr(parent, name, layer)
            del weight  # only the stored copy stays
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":  # embeddings, norms, lm_head
            value = torch.ones(param.shape, dtype=dtype, device=target) if "norm" in name else rand(*param.shape)
            set_module_tensor_to_device(model, name, target, value=value)
    for name, buf in list(model.named_buffers()):
        if buf.device != target:
            set_module_tensor_to_device(model, name, target, value=buf.to(target))
    method.mark_built(model, compute_dtype, quant_storage)
    model.hf_device_map = {"": target.index if target.type == "cuda" else "cpu"}
    source.info["device_map"] = [str(target)]  # built on one device: multi-GPU placement is for checkpoints
    return model
