"""Analytic training FLOPs of LoRA on a frozen base, datasheet peaks, a matmul probe, and MFU."""

from __future__ import annotations

import re

from harness.presets import Preset, linear_shapes
from harness.spec import Settings

# Dense (no 2:4 sparsity) BF16 tensor-core peaks in TFLOP/s from NVIDIA datasheets: half the "with
# sparsity" figure. Keys match torch.cuda.get_device_name() as whole words; the longest match wins.
DATASHEET_BF16_DENSE_TFLOPS: dict[str, float] = {
    "H100": 989.4,  # H100 SXM5 (get_device_name: "NVIDIA H100 80GB HBM3"): 1,979 sparse
    "H100 PCIe": 756.0,  # 1,513 sparse
    "H100 NVL": 835.5,  # 1,671 sparse
    "H200": 989.4,  # H200 SXM: same compute as H100 SXM, more and faster HBM3e
    "H200 NVL": 835.5,  # 1,671 sparse
    "GH200": 989.4,  # Grace Hopper superchip's H100
    "A100": 312.0,  # SXM and PCIe alike: 624 sparse
    "A10": 125.0,  # 250 sparse; the A10G (AWS) has no NVIDIA datasheet, so it is left out
    "L4": 121.0,  # 242 sparse
    "L40": 181.05,  # 362.1 sparse
    "L40S": 362.05,  # 733 sparse
    "RTX A6000": 154.8,  # BF16 with FP32 accumulate; 309.7 sparse
    "RTX 4090": 165.2,  # BF16 with FP32 accumulate; 330.4 sparse
}


def datasheet_tflops(gpu_name: str) -> float | None:
    """The datasheet dense BF16 peak of a GPU named like torch.cuda.get_device_name(), or None if unknown."""
    for key in sorted(DATASHEET_BF16_DENSE_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", gpu_name, re.IGNORECASE):
            return DATASHEET_BF16_DENSE_TFLOPS[key]
    return None


def model_flops_per_token_6n(n_params: int) -> float:
    """The classic 6N training FLOPs per token (2N forward + 4N backward, every weight trained)."""
    return 6.0 * n_params


# FLOP count (a matmul of m x k by k x n costs 2mnk), per token:
#   forward   2 * (frozen linear weights + lm_head) + 2 * LoRA params + 4 * L * s * h for the attention
#             score and value matmuls (full s x s as in PaLM's and nanoGPT's counts; causal kernels skip
#             about half)
#   backward  the frozen base computes input gradients only (1x its forward, no weight gradients), the
#             attention matmuls need gradients for both operands (2x), LoRA input + weight gradients (2x)
#   recompute gradient checkpointing runs every decoder layer's forward once more (lm_head excluded)
# ``model`` (forward + backward) is what MFU counts; ``total`` adds recomputation (hardware FLOPs).
def train_flops_per_token(preset: Preset, settings: Settings, *, num_layers: int | None = None,
                          vocab_size: int | None = None, attn_len: float | None = None) -> dict[str, float]:
    """FLOPs per token of one LoRA training step on a frozen base: forward, backward, recompute, totals.

    ``attn_len`` is the length the attention matmuls run over (default ``settings.seq_len``; 0 leaves
    attention out, as ``step_model_flops`` does before adding it per row)."""
    layers = num_layers or preset.num_hidden_layers
    vocab = vocab_size or preset.vocab_size
    h = preset.hidden_size
    s = settings.seq_len if attn_len is None else attn_len
    shapes = linear_shapes(preset)
    wanted = {t.strip() for t in settings.target_modules.split(",")}
    base = sum(o * i for o, i in shapes.values()) * layers  # frozen decoder linears (quantized or not)
    head = h * vocab  # lm_head, frozen; the embedding lookup costs no matmul
    lora = sum(settings.lora_r * (o + i) for p, (o, i) in shapes.items() if p in wanted) * layers
    attn = 4 * layers * s * h  # Q K^T and P V: 2 * s * h FLOPs each per token per layer
    layer_fwd = 2 * base + attn + 2 * lora
    forward = layer_fwd + 2 * head
    backward = 2 * base + 2 * head + 2 * attn + 4 * lora
    recompute = layer_fwd if settings.gradient_checkpointing else 0
    return {
        "forward": float(forward),
        "backward": float(backward),
        "recompute": float(recompute),
        "model": float(forward + backward),
        "total": float(forward + backward + recompute),
    }


FLOP_CONVENTION = (
    "model FLOPs of real (non-padding) tokens: a matmul m x k by k x n is 2mnk; forward 2 per frozen linear "
    "and lm_head weight, 2 per LoRA weight, attention QK^T and PV 4*h*l per token per layer at each row's "
    "real length l (full l x l, causal halving not taken); backward 2 per frozen weight (input gradients "
    "only), 2x the attention, 4 per LoRA weight; checkpoint recomputation excluded; peak: NVIDIA datasheet "
    "dense BF16 (train.mfu), bf16 matmul probe (train.mfu_probe)"
)


def step_model_flops(preset: Preset, settings: Settings, real_tokens: float, sum_sq_lengths: float, *,
                     num_layers: int | None = None, vocab_size: int | None = None) -> float:
    """Model FLOPs of one training step (see ``FLOP_CONVENTION``): every real token's weight FLOPs, plus
    forward + backward attention at each row's real length l: 3 x 4 * layers * h * l^2 per row, summed
    (``sum_sq_lengths`` is the sum over rows of l^2)."""
    layers = num_layers or preset.num_hidden_layers
    dense = train_flops_per_token(preset, settings, num_layers=layers, vocab_size=vocab_size, attn_len=0)["model"]
    return real_tokens * dense + 12.0 * layers * preset.hidden_size * sum_sq_lengths


def measure_peak_bf16_tflops(device: str = "cuda", n: int = 8192, iters: int = 20,
                             warmup: int = 3) -> float | None:
    """Achieved TFLOP/s of an n x n x n BF16 matmul on ``device``; None on the CPU or without CUDA."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):  # cuBLAS heuristics, clocks ramping up
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.matmul(a, b, out=out)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000 / iters
    del a, b, out
    return 2 * n**3 / seconds / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak, as a fraction (0.4 = 40 %)."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
