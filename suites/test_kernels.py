"""Micro-benchmarks of bitsandbytes' 4-bit kernels at real layer shapes: quantize, dequantize, and a 4-bit
linear forward (and forward + backward, as LoRA training runs the frozen base) against the 16-bit nn.Linear.

Run: ``pytest suites/test_kernels.py --benchmark-group-by=group``; ``--benchmark-disable`` runs each once.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from harness import presets  # noqa: E402

BLOCKSIZE = 64  # bitsandbytes' default, the one 4-bit loading uses
COMPUTE = torch.bfloat16  # dtype of the activations, the 16-bit weight and the dequantized 4-bit weight
TOKENS = 512  # activation rows: batch 4 x seq 128, the default training step
ROUNDS = {"cpu": 10, "cuda": 50}  # timed calls per benchmark (kept small: the CPU file runs in seconds)
WARMUP_ROUNDS = {"cpu": 2, "cuda": 10}  # untimed calls first (kernel loads, caches, clocks)
METHODS = {"nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False), "fp4-dq": ("fp4", True)}
# (device, preset): the CPU tier's real shapes always; a 7B model's when a GPU is present.
TARGETS = [("cpu", "tiny-llama"), ("cuda", "llama-2-7b")]


def _shapes() -> list:
    """One param per distinct (out, in) shape of each target preset, labelled with its projections."""
    params = []
    for device, name in TARGETS:
        by_shape: dict[tuple[int, int], list[str]] = {}
        for proj, shape in presets.linear_shapes(presets.PRESETS[name]).items():
            by_shape.setdefault(shape, []).append(proj)
        skip = pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")
        for shape, projs in by_shape.items():
            label = f"{name}-{'+'.join(projs)}-{shape[0]}x{shape[1]}"
            params.append(pytest.param(device, shape, id=label, marks=skip))
    return params


OPS = [(op, m) for op in ("quantize", "dequantize") for m in METHODS] + [
    (op, m) for op in ("forward", "forward_backward") for m in ("bf16", *METHODS)
]


def _weight(shape: tuple[int, int], device: str) -> torch.Tensor:
    """A seeded N(0, 0.02) weight in the compute dtype."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=COMPUTE)


def _linear(w: torch.Tensor, method: str) -> torch.nn.Module:
    """A frozen linear layer holding w: nn.Linear for bf16, else bnb's Linear4bit quantized from w."""
    out_f, in_f = w.shape
    if method == "bf16":
        layer = torch.nn.Linear(in_f, out_f, bias=False, device=w.device, dtype=COMPUTE)
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        return layer
    qt, dq = METHODS[method]
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=COMPUTE, compress_statistics=dq, quant_type=qt)
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=dq,
                                     quant_type=qt)
    return layer.to(w.device)  # quantizes


def _call(op: str, method: str, w: torch.Tensor):
    """The function to time for (op, method) on weight w."""
    if op == "quantize":
        qt, dq = METHODS[method]
        return lambda: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=dq, quant_type=qt)
    if op == "dequantize":
        qt, dq = METHODS[method]
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=dq, quant_type=qt)
        return lambda: bnbf.dequantize_4bit(packed, state)
    layer = _linear(w, method).eval()
    x = torch.randn(TOKENS, w.shape[1], device=w.device, dtype=COMPUTE)
    if op == "forward":  # inference: no autograd (bnb's fused CPU/GPU 4-bit GEMM path)

        def forward():
            with torch.no_grad():
                return layer(x)

        return forward
    x.requires_grad_(True)  # training: the input carries LoRA's gradient, the frozen base weight none
    grad_out = torch.randn(TOKENS, w.shape[0], device=w.device, dtype=COMPUTE)
    return lambda: torch.autograd.grad(layer(x), x, grad_out)


@pytest.mark.parametrize(("op", "method"), OPS, ids=[f"{op}-{m}" for op, m in OPS])
@pytest.mark.parametrize(("device", "shape"), _shapes())
def test_kernel(benchmark, device, shape, op, method):
    """Time one kernel call, synchronizing the device inside the timed function."""
    w = _weight(shape, device)
    fn = _call(op, method, w)
    fn()  # first call outside the timer: kernel loads, bnb's one-time CPU weight repacking

    def timed():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{device} {shape[0]}x{shape[1]} {op}"
    benchmark.extra_info.update(device=device, shape=list(shape), op=op, method=method, tokens=TOKENS)
    benchmark.pedantic(timed, rounds=ROUNDS[device], iterations=1, warmup_rounds=WARMUP_ROUNDS[device])
