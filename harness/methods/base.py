"""The contract every method implements, and the value types it hands to the stages."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the registry is read by the spec and the report, which never import torch
    import torch

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def torch_dtype(name: str):
    """``"bf16"`` -> ``torch.bfloat16``."""
    import torch

    return getattr(torch, DTYPES[name])


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes held by a tensor (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class Storage:
    """Bytes of one stored weight; the fields add over tensors."""

    n: int = 0  # parameters
    packed_bytes: int = 0  # the weight data (codes of a quantized weight; for a 16-bit weight, the weight)
    absmax_bytes: int = 0  # scales: one per block (4-bit) or per row (8-bit)
    nested_absmax_bytes: int = 0  # double quantization: the fp32 scales of the quantized scales
    nested_bytes: int = 0  # double quantization: nested absmax + offset + the 8-bit code table
    code_bytes: int = 0  # the code table of the quantizer (4-bit: 16 values)

    def __iadd__(self, o: Storage) -> Storage:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self

    @property
    def bits_per_param(self) -> float:
        """Per-element storage, the QLoRA paper's definition: codes + absmax (+ nested absmax)."""
        return 8 * (self.packed_bytes + self.absmax_bytes + self.nested_absmax_bytes) / self.n

    @property
    def total_bytes(self) -> int:
        """Everything a checkpoint stores for the tensor, per-tensor constants included."""
        return self.packed_bytes + self.absmax_bytes + self.nested_bytes + self.code_bytes


@dataclass
class RoundTrip:
    """One weight through a method's storage and back: Ŵ in the compute dtype, its storage, the times."""

    w_hat: Any  # torch.Tensor
    storage: Storage
    quantize_s: float = 0.0
    dequantize_s: float = 0.0


class Method:
    """One way of holding the frozen base while LoRA trains on top of it.

    A subclass sets the class attributes and implements the hooks below; the stages, the estimator and the
    report ask the method and never branch on its name. Heavy libraries are imported inside the hooks: the
    registry is read by code that must not import torch (suite validation, the report).
    """

    name: ClassVar[str]
    label: ClassVar[str]  # for people: "QLoRA, NF4 + double quantization"
    colour: ClassVar[str]  # report colour, a CSS hex
    quantized: ClassVar[bool] = False  # the base's linears are stored quantized (frozen, kbit-prepared)
    reference_bits: ClassVar[tuple[tuple[float, str], ...]] = ()  # published bits/param to draw beside ours
    packages: ClassVar[tuple[str, ...]] = ()  # distributions whose versions a record must carry

    # -- the base ------------------------------------------------------------------------------------
    def from_pretrained_kwargs(self, compute_dtype: str, quant_storage: str) -> dict[str, Any]:
        """Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` that load this method's base."""
        return {"dtype": torch_dtype(compute_dtype)}

    def build_linear(self, linear: torch.nn.Linear, weight: torch.Tensor, compute_dtype: str,
                     target: torch.device, quant_storage: str = "uint8",
                     blocksize: int = 64) -> torch.nn.Module | None:
        """The stored form of one linear built straight on the device from ``weight`` (in the suite's quant
        storage dtype and block size where the method has them); None keeps it 16-bit."""
        return None

    def mark_built(self, model, compute_dtype: str, quant_storage: str = "uint8") -> None:
        """Set on a model built on the device what ``from_pretrained`` would set for this method."""

    # -- fidelity ------------------------------------------------------------------------------------
    def round_trip(self, w: torch.Tensor, settings) -> RoundTrip:
        """Store ``w`` (fp32) as this method does and read it back in the compute dtype."""
        raise NotImplementedError

    def param_storage(self, param) -> Storage:
        """Storage of one loaded parameter of the base, read from what the library holds."""
        return Storage(param.numel(), nbytes(param))

    def bits_per_param(self, settings) -> float:
        """Storage bits per parameter of the base's linears, from first principles (for the estimator)."""
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------------------
    def prepare_for_training(self, model, settings):
        """What the recipe does to the loaded base before LoRA adapters are added."""
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model

    # -- after training ------------------------------------------------------------------------------
    def merge(self, peft_model):
        """The adapter merged into the base it wraps (which must be freshly loaded, never run before)."""
        return peft_model.merge_and_unload()

    def linear_bytes(self, shapes: list[tuple[int, int]], settings) -> float:
        """Bytes of the base's linears, given as (out, in) shapes, as held in training.

        What else the base holds (embeddings, norms, lm_head) is the precision policy's, not the method's.
        """
        return sum(o * i for o, i in shapes) * self.bits_per_param(settings) / 8

    def quantized_codes(self, model) -> dict:
        """One integer code per stored weight of every quantized linear, by module name (none for a 16-bit base)."""
        return {}

    def dequantized(self, module):
        """A quantized linear's weight in its compute dtype; None for a module the method did not quantize."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def blocks(n: int, size: int) -> int:
    """Number of blocks of ``size`` covering ``n`` elements."""
    return math.ceil(n / size)
