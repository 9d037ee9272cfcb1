"""QLoRA: the base's linears in bitsandbytes 4-bit (NF4 or FP4), with or without double quantization."""

from __future__ import annotations

import time

from harness.methods.base import Method, RoundTrip, Storage, nbytes, torch_dtype

NESTED_BLOCKSIZE = 256  # double quantization groups 256 first-level absmax values per fp32 constant
LOAD_BLOCKSIZE = 64  # bitsandbytes' block size when transformers loads a 4-bit model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def storage_of(packed, state) -> Storage:
    """Storage of a 4-bit weight, read from its packed data and QuantState (double quantization included)."""
    import math

    s = Storage(math.prod(state.shape), nbytes(packed), nbytes(state.absmax), code_bytes=nbytes(state.code))
    if state.nested:
        s.nested_absmax_bytes = nbytes(state.state2.absmax)
        s.nested_bytes = s.nested_absmax_bytes + nbytes(state.offset) + nbytes(state.state2.code)
    return s


def _attach_quantizer(model, config) -> None:
    """What ``from_pretrained`` attaches to a quantized model; the Trainer refuses to train one without it."""
    from transformers.quantizers import AutoHfQuantizer

    model.hf_quantizer = AutoHfQuantizer.from_config(config)
    model.config.quantization_config = config
    model.is_quantized = True


class FourBit(Method):
    """A bitsandbytes 4-bit base, loaded the QLoRA way (``BitsAndBytesConfig(load_in_4bit=True, …)``)."""

    quantized = True
    quant_type: str
    double_quant: bool
    packages = ("bitsandbytes",)
    reference_bits = ((4.127, "QLoRA paper: 4-bit + DQ, 4.127"), (4.5, "4-bit without DQ, 4.5"))

    def from_pretrained_kwargs(self, compute_dtype: str, quant_storage: str):
        from transformers import BitsAndBytesConfig

        return {
            "dtype": torch_dtype(compute_dtype),
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
                bnb_4bit_quant_storage="uint8" if quant_storage == "uint8" else torch_dtype(quant_storage),
            ),
        }

    def build_linear(self, linear, weight, compute_dtype, target, quant_storage="uint8", blocksize=LOAD_BLOCKSIZE):
        import bitsandbytes as bnb
        import torch

        storage = torch.uint8 if quant_storage == "uint8" else torch_dtype(quant_storage)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch_dtype(compute_dtype), compress_statistics=self.double_quant,
                                  quant_type=self.quant_type, quant_storage=storage, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=self.quant_type,
                                         compress_statistics=self.double_quant, blocksize=blocksize,
                                         quant_storage=storage).to(target)
        return layer

    def mark_built(self, model, compute_dtype: str, quant_storage: str = "uint8") -> None:
        _attach_quantizer(model, self.from_pretrained_kwargs(compute_dtype, quant_storage)["quantization_config"])
        model.is_loaded_in_4bit = True  # what from_pretrained sets; prepare_model_for_kbit_training reads it

    def round_trip(self, w, settings) -> RoundTrip:
        import bitsandbytes.functional as bnbf
        import torch

        storage = torch.uint8 if settings.quant_storage == "uint8" else torch_dtype(settings.quant_storage)
        x = w.to(torch_dtype(settings.compute_dtype))
        _sync(w.device)
        t0 = time.perf_counter()
        packed, state = bnbf.quantize_4bit(x, blocksize=settings.blocksize, compress_statistics=self.double_quant,
                                           quant_type=self.quant_type, quant_storage=storage)
        _sync(w.device)
        t1 = time.perf_counter()
        w_hat = bnbf.dequantize_4bit(packed, state)
        _sync(w.device)
        return RoundTrip(w_hat, storage_of(packed, state), t1 - t0, time.perf_counter() - t1)

    def param_storage(self, param) -> Storage:
        state = getattr(param, "quant_state", None)
        return storage_of(param, state) if state is not None else super().param_storage(param)

    def bits_per_param(self, settings) -> float:
        blocksize = settings.blocksize
        if not self.double_quant:
            return 4 + 32 / blocksize  # one fp32 absmax per block
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)  # uint8 absmax + fp32 per 256 of them

    def prepare_for_training(self, model, settings):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        model.harness_repack_guarded = keep_layout(model)  # the train stage's note says so when it evaluates
        return model

    def quantized_codes(self, model) -> dict:
        """One 4-bit code per weight (two per packed byte) of every quantized linear, to count what a merge changed."""
        import bitsandbytes as bnb
        import torch

        out = {}
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                packed = m.weight.data.detach().contiguous().view(torch.uint8)
                out[name] = torch.stack([packed >> 4, packed & 0x0F]).clone()
        return out

    def dequantized(self, module):
        """A 4-bit linear's weight in its compute dtype, or None for any other module."""
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        if not isinstance(module, bnb.nn.Linear4bit):
            return None
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _method(name: str, quant_type: str, double_quant: bool, label: str, colour: str) -> FourBit:
    cls = type(name.replace("-", "_"), (FourBit,), {"name": name, "quant_type": quant_type,
                                                     "double_quant": double_quant, "label": label,
                                                     "colour": colour})
    return cls()


METHODS = (
    _method("qlora-nf4", "nf4", False, "QLoRA, NF4", "#55a868"),
    _method("qlora-nf4-dq", "nf4", True, "QLoRA, NF4 + double quantization", "#1b7837"),
    _method("qlora-fp4", "fp4", False, "QLoRA, FP4", "#dd8452"),
    _method("qlora-fp4-dq", "fp4", True, "QLoRA, FP4 + double quantization", "#b3501b"),
)


def keep_layout(model) -> int:
    """Turn off bitsandbytes' CPU repack of 4-bit weights in a model that will train; the modules it applies to.

    On an avx512-bf16 CPU, bitsandbytes 0.50 repacks a ``Linear4bit`` weight in place on its first forward in eval
    mode without grad (the trainer's evaluation, a probe): training then runs through ``gemv_4bit``, which has
    no autograd kernel (about 10x slower, the loss flat, a warning only) and a state dict read after it is garbage.
    With the module's ``support_avx512bf16_for_cpu`` off, every forward keeps the layout training uses.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
