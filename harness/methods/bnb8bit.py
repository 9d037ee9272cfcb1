"""LoRA on an LLM.int8() base: the linears in bitsandbytes 8-bit (one int8 code per weight, an fp32 scale per row)."""

from __future__ import annotations

import time

from harness.methods.base import Method, RoundTrip, Storage, nbytes, torch_dtype

OUTLIER_THRESHOLD = 6.0  # BitsAndBytesConfig's default llm_int8_threshold: activations above it stay 16-bit


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantize(w):
    """Row-wise absmax int8 of ``w`` as ``Int8Params`` does it (through fp16): (codes, per-row scales)."""
    import bitsandbytes.functional as bnbf
    import torch

    codes, scales, _ = bnbf.int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return codes, scales


class Int8(Method):
    name = "lora-int8"
    label = "LoRA on an LLM.int8() 8-bit base"
    colour = "#8172b3"
    quantized = True
    packages = ("bitsandbytes",)

    def from_pretrained_kwargs(self, compute_dtype: str, quant_storage: str):
        from transformers import BitsAndBytesConfig

        return {"dtype": torch_dtype(compute_dtype),
                "quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=OUTLIER_THRESHOLD)}

    def build_linear(self, linear, weight, compute_dtype, target, quant_storage="uint8", blocksize=64):
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=OUTLIER_THRESHOLD, device="meta")
        codes, scales = _quantize(weight)  # on the device: Int8Params quantizes only when leaving the CPU
        param = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = param.data, scales
        layer.weight = param
        return layer

    def mark_built(self, model, compute_dtype: str, quant_storage: str = "uint8") -> None:
        from harness.methods.bnb4bit import _attach_quantizer

        _attach_quantizer(model, self.from_pretrained_kwargs(compute_dtype, "uint8")["quantization_config"])
        model.is_loaded_in_8bit = True

    def round_trip(self, w, settings) -> RoundTrip:
        import bitsandbytes.functional as bnbf

        _sync(w.device)
        t0 = time.perf_counter()
        codes, scales = _quantize(w)
        _sync(w.device)
        t1 = time.perf_counter()
        w_hat = bnbf.int8_vectorwise_dequant(codes, scales).to(torch_dtype(settings.compute_dtype))
        _sync(w.device)
        return RoundTrip(w_hat, Storage(w.numel(), nbytes(codes), nbytes(scales)), t1 - t0,
                         time.perf_counter() - t1)

    def param_storage(self, param) -> Storage:
        scales = getattr(param, "SCB", None)
        if scales is None:
            return super().param_storage(param)
        return Storage(param.numel(), nbytes(param), nbytes(scales))

    def bits_per_param(self, settings) -> float:
        """Nominal: 8-bit codes; the fp32 scale per output row adds 32 / in_features (see ``linear_bytes``)."""
        return 8.0

    def linear_bytes(self, shapes, settings) -> float:
        return sum(o * i + 4 * o for o, i in shapes)  # int8 codes + one fp32 scale per output row

    def prepare_for_training(self, model, settings):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def quantized_codes(self, model) -> dict:
        import bitsandbytes as bnb

        return {name: m.weight.data.detach().clone() for name, m in model.named_modules()
                if isinstance(m, bnb.nn.Linear8bitLt)}

    def dequantized(self, module):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        if not isinstance(module, bnb.nn.Linear8bitLt):
            return None
        return bnbf.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)


METHODS = (Int8(),)
