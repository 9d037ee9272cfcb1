"""First-principles peak-memory model of one training case: weights, adapter, optimizer, activations.

Dtype assumptions (read from the peft 0.21, bitsandbytes 0.50 and transformers 5 sources and checked on the
CPU against the bytes autograd saves; the activation formula is in the comment on activation_bytes_per_token):

- lora-bf16 loads the base in ``compute_dtype`` (2 bytes for bf16/fp16). A 4-bit base keeps its linears
  packed; ``prepare_model_for_kbit_training`` upcasts everything else (embeddings, lm_head, norms) to fp32.
- LoRA A/B are fp32 for every method: peft creates them in fp32 and, with ``autocast_adapter_dtype=True``
  (the default of ``get_peft_model``), casts 16-bit adapters back to fp32; so grads are fp32 as well.
- Training runs under autocast in ``compute_dtype`` (Trainer ``bf16=True``), which keeps 16-bit copies of
  the fp32 LoRA weights for the step (``autocast=False`` models a plain loop without it).
- 4-bit bits/param come from ``settings.blocksize``; pass ``bits_per_param`` where loading used another
  block size (transformers loads at bitsandbytes' default, 64) or where it was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.methods import get as get_method
from harness.presets import Preset, linear_shapes, param_count
from harness.spec import Settings

GIB = 2**30
CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace: seen by NVML, not by torch's allocator
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization groups 256 absmax values per fp32 constant
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only optimizer states of tensors with >= 1e5 elements
MIN_8BIT_NUMEL = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit optimizer states
OPTIM_8BIT_BLOCK = 256  # block size of the 8-bit optimizer's fp32 absmax statistics
PROJ_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
SAME_INPUT = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}  # shared inputs


def bits_per_param_4bit(blocksize: int = 64, double_quant: bool = False,
                        nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Storage bits per weight of a bitsandbytes 4-bit tensor: 4-bit codes plus its absmax constants."""
    if not double_quant:
        return 4 + 32 / blocksize  # one fp32 absmax per block
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)  # uint8 absmax + fp32 per 256 of them


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory of one training step, by term, in GiB."""

    weights_gib: float  # base model: quantized linears at bits_per_param, the rest at its stored dtype
    lora_gib: float  # LoRA A/B parameters (fp32)
    gradients_gib: float  # LoRA gradients only: the base is frozen
    optimizer_gib: float  # AdamW moments of the LoRA parameters (all of them, paged or not)
    optimizer_paged_gib: float  # the part in CUDA managed memory (paged optimizers): invisible to torch
    activations_gib: float  # tensors saved for backward at the step's peak, logits buffers included
    workspace_gib: float  # transients: one dequantized 4-bit weight, autocast copies of the LoRA weights
    context_gib: float  # CUDA context (0 on the CPU)
    bits_per_param: float  # storage bits per parameter of the base's linears
    trainable_params: int  # LoRA parameters

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.lora_gib + self.gradients_gib + self.optimizer_gib
                + self.activations_gib + self.workspace_gib + self.context_gib)

    @property
    def allocator_gib(self) -> float:
        """The part torch's caching allocator sees: total less the CUDA context and paged optimizer state."""
        return self.total_gib - self.context_gib - self.optimizer_paged_gib

    def breakdown(self) -> dict[str, float]:
        """Every term in GiB, plus the total, keyed by its field name."""
        keys = ("weights_gib", "lora_gib", "gradients_gib", "optimizer_gib", "activations_gib",
                "workspace_gib", "context_gib")
        out = {k: getattr(self, k) for k in keys}
        out["total_gib"] = self.total_gib
        return out

    def as_metrics(self, prefix: str = "estimate.") -> dict[str, float]:
        """Flat metrics for a record, e.g. ``{"estimate.total_gib": 9.1, "estimate.bits_per_param": 4.127}``."""
        out = {**self.breakdown(), "optimizer_paged_gib": self.optimizer_paged_gib,
               "allocator_gib": self.allocator_gib, "bits_per_param": self.bits_per_param,
               "trainable_params": float(self.trainable_params)}
        return {f"{prefix}{k}": float(v) for k, v in out.items()}


def targets(settings: Settings) -> list[str]:
    """The projections LoRA wraps, in ``PROJ_NAMES`` order."""
    wanted = {t.strip() for t in settings.target_modules.split(",")}
    return [p for p in PROJ_NAMES if p in wanted]


def lora_tensors(preset: Preset, settings: Settings, num_layers: int | None = None) -> list[int]:
    """Element counts of every LoRA tensor: A is r x in, B is out x r, per targeted projection per layer."""
    layers = num_layers or preset.num_hidden_layers
    shapes = linear_shapes(preset)
    r = settings.lora_r
    one_layer = [n for p in targets(settings) for n in (r * shapes[p][1], shapes[p][0] * r)]
    return one_layer * layers


def optimizer_bytes(numel: int, optimizer: str) -> int:
    """AdamW state bytes of one tensor: fp32 m and v, or 8-bit blockwise m and v with fp32 absmax."""
    if optimizer == "paged_adamw_8bit" and numel >= MIN_8BIT_NUMEL:
        return 2 * numel + 2 * 4 * math.ceil(numel / OPTIM_8BIT_BLOCK)
    return 8 * numel


# Activation model (checked on the CPU against the bytes autograd saves and the peak RSS of a step).
# One Llama layer (h hidden, i intermediate, kv = kv_heads * head_dim, a heads, s seq_len, r rank)
# saves, per token, with e = bytes of compute_dtype (a Korthikanti-style count, for a frozen base):
#   2 RMSNorms          2 * (4h + 4)      fp32 copy of the input + fp32 rsqrt (frozen linears save nothing)
#   LoRA, per target    l*f + m*f + l*r   the 16-bit copy of A's input (f = in_features), the dropout mask
#                                         (m = 1 byte bool on CUDA, a 4-byte noise tensor on the CPU) and
#                                         B's input; l = e under autocast, else 4 (peft casts x to fp32)
#   attention, sdpa     t*(2h + 2kv) + 4a q, k, v, output and the fp32 log-sum-exp (flash/mem-efficient)
#   attention, eager    3t*h + (4 + t)*a*s q, k, v (repeated to all heads), fp32 softmax + its t-byte copy
#   SwiGLU MLP          3*o*i             gate out, silu(gate), up out
#   where t = e (4 for a 4-bit base without autocast) and o = 4 for a 4-bit base (Linear4bit returns its
#   fp32 input dtype) else e.
# Backward through one layer holds about 3 (tokens x intermediate) gradients: 3*e*i (calibrated on the CPU).
# Loss: HF upcasts the logits to fp32; at the start of backward the saved log-softmax output, the dense
# NLL gradient and the log-softmax gradient coexist: 12 bytes per vocab entry per token (measured on the
# CPU: 10 in forward with 16-bit logits, 12 at the start of backward).
def activation_bytes_per_token(preset: Preset, settings: Settings, *, vocab_size: int | None = None,
                               autocast: bool = True, attn_impl: str = "sdpa",
                               device: str = "cuda") -> dict[str, float]:
    """Bytes autograd holds per token: one layer's saved tensors, its input, its backward, the loss."""
    method = get_method(settings.method)
    e = DTYPE_BYTES[settings.compute_dtype]
    h, i, a = preset.hidden_size, preset.intermediate_size, preset.num_attention_heads
    kv, s, r = preset.num_key_value_heads * preset.head_dim, settings.seq_len, settings.lora_r
    shapes = linear_shapes(preset)
    lora_in = e if autocast else 4  # saved input of lora_A (peft casts x to the fp32 adapter dtype)
    # dropout: CUDA's fused kernel saves a bool mask, the CPU path a noise tensor in the input's fp32
    mask = 0 if settings.lora_dropout == 0 else (1 if device.startswith("cuda") else 4)
    att = 4 if method.is_4bit and not autocast else e  # dtype of q, k, v reaching attention
    mlp = 4 if method.is_4bit else e  # Linear4bit casts its output back to the fp32 residual stream
    norms = 2 * (4 * h + 4)
    # Without autocast or dropout, peft hands a 4-bit base's fp32 input to lora_A uncopied: projections
    # reading the same tensor (q/k/v, gate/up) then share one saved input.
    shared = method.is_4bit and not autocast and mask == 0
    saved_inputs = {}  # one entry per distinct tensor saved as lora_A's input -> its in_features
    for p in targets(settings):
        key = SAME_INPUT.get(p, p) if shared else p
        saved_inputs[key] = shapes[p][1]
    lora = sum(lora_in * f for f in saved_inputs.values())
    lora += sum(mask * shapes[p][1] + lora_in * r for p in targets(settings))
    if attn_impl == "eager":
        attn = 3 * att * h + (4 + (att if att != 4 else 0)) * a * s
    elif attn_impl == "sdpa":
        attn = att * (2 * h + 2 * kv) + 4 * a
    else:
        raise ValueError(f"attn_impl {attn_impl!r}: expected 'sdpa' or 'eager'")
    stream = 4 if method.is_4bit else e  # residual stream: fp32 embeddings/norms of a 4-bit base
    return {
        "layer": norms + lora + attn + 3 * mlp * i,  # saved by one decoder layer
        "layer_input": stream * h,  # what gradient checkpointing keeps of a layer
        "backward": 3 * e * i,  # gradients in flight inside one layer's backward (MLP: 3 x intermediate)
        "loss": 12 * (vocab_size or preset.vocab_size) + 4 * h + 4,  # 3 fp32 logits buffers + final norm
    }


def estimate(preset: Preset, settings: Settings, *, vocab_size: int | None = None,
             num_layers: int | None = None, bits_per_param: float | None = None, device: str = "cuda",
             autocast: bool = True, attn_impl: str = "sdpa") -> Estimate:
    """Predicted peak memory of training ``settings`` on ``preset`` (overrides: vocab, layers, bits)."""
    method = get_method(settings.method)
    layers = num_layers or preset.num_hidden_layers
    vocab = vocab_size or preset.vocab_size
    e = DTYPE_BYTES[settings.compute_dtype]
    counts = param_count(preset, vocab_size=vocab, num_layers=layers)
    rest = counts["embed"] + counts["lm_head"] + counts["norm"]  # never quantized
    if method.is_4bit:
        bpp = bits_per_param if bits_per_param is not None else bits_per_param_4bit(
            settings.blocksize, method.double_quant)
        weights = counts["linear"] * bpp / 8 + rest * 4  # prepare_model_for_kbit_training: fp32 rest
    else:
        bpp = bits_per_param if bits_per_param is not None else 8.0 * e
        weights = counts["linear"] * bpp / 8 + rest * e
    tensors = lora_tensors(preset, settings, layers)
    trainable = sum(tensors)
    optim = [optimizer_bytes(n, settings.optimizer) for n in tensors]
    paged = sum(b for n, b in zip(tensors, optim, strict=True) if n >= PAGED_MIN_NUMEL) \
        if settings.optimizer.startswith("paged_") and device.startswith("cuda") else 0

    per = activation_bytes_per_token(preset, settings, vocab_size=vocab, autocast=autocast,
                                     attn_impl=attn_impl, device=device)
    tokens = settings.batch_size * settings.seq_len
    # The loss buffers are freed before backward reaches the last layer, so the peak is the larger of
    # "everything saved + loss buffers" (start of backward) and "everything saved + one layer's backward".
    if settings.gradient_checkpointing:  # each layer keeps its input; backward recomputes one at a time
        act = layers * per["layer_input"] + max(per["loss"], per["layer"] + per["backward"])
    else:
        act = layers * per["layer"] + max(per["loss"], per["backward"])

    largest = max(o * i for o, i in linear_shapes(preset).values())
    dequant = largest * e if method.is_4bit else 0  # bitsandbytes dequantizes one weight per matmul
    copies = trainable * e if autocast and e < 4 else 0  # autocast's cached 16-bit LoRA weights
    return Estimate(
        weights_gib=weights / GIB,
        lora_gib=trainable * 4 / GIB,
        gradients_gib=trainable * 4 / GIB,
        optimizer_gib=sum(optim) / GIB,
        optimizer_paged_gib=paged / GIB,
        activations_gib=act * tokens / GIB,
        workspace_gib=(dequant + copies) / GIB,
        context_gib=CONTEXT_GIB if device.startswith("cuda") else 0.0,
        bits_per_param=bpp,
        trainable_params=trainable,
    )


def fits(est: Estimate, budget_gib: float) -> tuple[bool, str]:
    """Whether the estimated peak fits ``budget_gib``; when not, a one-line reason naming the big terms."""
    if est.total_gib <= budget_gib:
        return True, ""
    terms = sorted(est.breakdown().items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{k.removesuffix('_gib')} {v:.1f}" for k, v in terms if k != "total_gib" and v >= 0.05)
    return False, f"estimated peak {est.total_gib:.1f} GiB exceeds the {budget_gib:g} GiB budget ({parts})"


def for_case(case, device: str) -> Estimate | None:
    """The estimate of a suite case whose model shape is known (synthetic presets), else None."""
    from harness import presets

    if case.model.source != "synthetic":
        return None
    return estimate(presets.PRESETS[case.model.preset], case.settings, num_layers=case.model.num_layers,
                    device=device)
