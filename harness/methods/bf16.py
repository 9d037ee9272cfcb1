"""LoRA on a 16-bit base: the reference every quantized method is compared with."""

from __future__ import annotations

from harness.methods.base import DTYPE_BYTES, Method, RoundTrip, Storage, torch_dtype


class SixteenBit(Method):
    """The base held in the compute dtype; its only error is the rounding of fp32 weights to 16 bits."""

    quantized = False
    dtype = "bf16"

    def round_trip(self, w, settings) -> RoundTrip:
        w_hat = w.to(torch_dtype(self.dtype))
        return RoundTrip(w_hat, Storage(w.numel(), w.numel() * DTYPE_BYTES[self.dtype]))

    def bits_per_param(self, settings) -> float:
        return 8.0 * DTYPE_BYTES[settings.compute_dtype]


class LoraBf16(SixteenBit):
    name = "lora-bf16"
    label = "LoRA on a 16-bit base"
    colour = "#4c72b0"


METHODS = (LoraBf16(),)
