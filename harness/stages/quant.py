"""Quantization fidelity: each method's round trip of every linear layer, its error and its storage.

For each quantizable projection W (q, k, v, o, gate, up, down of every decoder layer), one tensor at a time:

* method: W -> the method's stored form -> back to the compute dtype = Ŵ (``Method.round_trip``: for the
  4-bit methods quantize_4bit/dequantize_4bit, the dtype the 4-bit layer's matmul sees; for ``lora-bf16``,
  W rounded to bf16).
* references, in the same record: ``int4_ref`` (symmetric absmax int4, same blocksize, written here) and
  ``bf16_floor`` (W rounded to bf16: the error every 16-bit method already has).

Errors are measured against W in fp32 and pooled over elements (a layer weighs by its parameter count).

Weights that were stored Q4_1 (a GGUF source: every block of 32 on 16 levels, ``w = d·q + m``) are not what
4-bit methods meet in a 16-bit checkpoint. ``weight_transform`` is the control: ``dither`` adds to each block
uniform noise over ±d/2 (d = (max − min)/15, the block's Q4_1 step; a Q4_1 value's original lies within ±d/2
of it), giving continuous weights with the real ones' scales and outliers; ``q4_1`` is a Q4_1 round trip with
the gguf package's own quantizer; ``dither+q4_1`` both, which should give back the grid's figures if the origin
is what differs. ``quant.weights.block32_levels_*`` says how many distinct values a block of 32 holds.
Storage is counted from the tensors the quantizer returns, so double quantization's nested statistics show.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import methods, presets
from harness.methods import Storage
from harness.spec import PROJECTIONS
from harness.stages import Context, Inputs, StageOutput

INIT_STD = 0.02  # std of every synthetic distribution (Llama's initializer_range)
STUDENT_T_DF = 3  # student_t: degrees of freedom (heavy tails, finite variance)
OUTLIER_EVERY = 256  # outliers: one outlier input column per this many input features (at least one)
OUTLIER_SCALE = 20.0  # outliers: factor applied to those columns
INT4_LEVELS = 7  # int4_ref: round(x / absmax * 7) in [-7, 7]; -8 would never be produced, so 15 levels
WARMUP_NUMEL = 64 * 256  # elements of the tensor quantized once before timing (kernel load, first-call costs)
BF16_BITS = 16  # storage of a 16-bit weight, and of everything a 4-bit model leaves unquantized

# Checkpoint keys of the quantizable linears: model.layers.<i>.self_attn.q_proj.weight, ...mlp.down_proj.weight
LINEAR_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
METRICS = ("rmse", "rel_error", "mae", "max_abs_error", "cosine")


@dataclass
class ErrorStats:
    """Sufficient statistics of W vs Ŵ; they add over tensors, so pooled metrics weigh by element count."""

    n: int = 0
    sse: float = 0.0  # sum (W - Ŵ)^2
    sae: float = 0.0  # sum |W - Ŵ|
    max_abs: float = 0.0
    w2: float = 0.0  # sum W^2
    h2: float = 0.0  # sum Ŵ^2
    dot: float = 0.0  # sum W * Ŵ

    @classmethod
    def of(cls, w: torch.Tensor, w_hat: torch.Tensor) -> ErrorStats:
        """Statistics of one tensor (fp32 differences, fp64 sums)."""
        w, w_hat = w.float(), w_hat.float()
        d = w_hat - w
        f64 = torch.float64
        sums = torch.stack([(d * d).sum(dtype=f64), d.abs().sum(dtype=f64), (w * w).sum(dtype=f64),
                            (w_hat * w_hat).sum(dtype=f64), (w * w_hat).sum(dtype=f64),
                            d.abs().max().to(f64)]).tolist()  # one device->host transfer
        return cls(w.numel(), sums[0], sums[1], sums[5], sums[2], sums[3], sums[4])

    def __iadd__(self, o: ErrorStats) -> ErrorStats:
        self.n, self.sse, self.sae = self.n + o.n, self.sse + o.sse, self.sae + o.sae
        self.max_abs = max(self.max_abs, o.max_abs)
        self.w2, self.h2, self.dot = self.w2 + o.w2, self.h2 + o.h2, self.dot + o.dot
        return self

    def metrics(self) -> dict[str, float]:
        """rmse, rel_error (‖W−Ŵ‖_F/‖W‖_F), mae, max_abs_error, cosine."""
        n = max(self.n, 1)
        norm = math.sqrt(self.w2 * self.h2)
        return {
            "rmse": math.sqrt(self.sse / n),
            "rel_error": math.sqrt(self.sse / self.w2) if self.w2 else 0.0,
            "mae": self.sae / n,
            "max_abs_error": self.max_abs,
            "cosine": self.dot / norm if norm else 1.0,
        }


def int4_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Reference, written here (no quantization library): symmetric absmax int4 per block, x̂ = round(x·7/absmax)·absmax/7."""
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    scale = blocks.abs().amax(1, keepdim=True) / INT4_LEVELS
    scale.clamp_(min=torch.finfo(torch.float32).tiny)  # an all-zero block: 0 / tiny = 0, not 0 / 0
    q = torch.round(blocks / scale).clamp_(-INT4_LEVELS, INT4_LEVELS)
    return (q * scale).view(-1)[: flat.numel()].view_as(w)


Q4_1_BLOCK = 32  # GGML's Q4_1: blocks of 32 along a row, 16 levels d·q + m (q in 0..15, fp16 d and m)


def q4_1_round_trip(w: torch.Tensor) -> torch.Tensor:
    """``w`` through GGML's Q4_1 and back, with the gguf package's quantizer (fp32, on ``w``'s device)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    q4_1 = GGMLQuantizationType.Q4_1
    out = dequantize(quantize(w.detach().float().cpu().numpy(), q4_1), q4_1)
    return torch.from_numpy(out).to(w.device).view_as(w)


def dither(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each block of 32 plus uniform noise over ±d/2, d = (max − min)/15 of the block (its Q4_1 step)."""
    blocks = w.float().reshape(-1, Q4_1_BLOCK)
    step = (blocks.amax(1, keepdim=True) - blocks.amin(1, keepdim=True)) / 15
    noise = torch.rand(blocks.shape, generator=gen, device=w.device, dtype=torch.float32).sub_(0.5)
    return blocks.add(noise.mul_(step)).view_as(w)


def transform(w: torch.Tensor, how: str, gen: torch.Generator) -> torch.Tensor:
    """The weight the method meets, after the case's ``weight_transform``."""
    if "dither" in how:
        w = dither(w, gen)
    if "q4_1" in how:
        w = q4_1_round_trip(w)
    return w


def block_levels(w: torch.Tensor) -> torch.Tensor:
    """Distinct values in each block of 32 along a row (16 at most for weights stored Q4_1)."""
    b = w.reshape(-1, Q4_1_BLOCK).sort(1).values
    return 1 + (b.diff(dim=1) != 0).sum(1)


def int4_storage(n: int, blocksize: int) -> Storage:
    """Storage of the int4 reference: 4-bit codes and one fp32 absmax per block."""
    return Storage(n, (n + 1) // 2, 4 * math.ceil(n / blocksize))


# --- weights: a checkpoint's layers, or synthetic tensors shaped like the model's -------------------------

def synthetic(shape: tuple[int, int], dist: str, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """One (out, in) fp32 tensor with std INIT_STD drawn from ``dist``, on ``device``."""
    randn = lambda: torch.randn(shape, generator=gen, device=device)  # noqa: E731
    if dist in ("normal", "model", "outliers"):
        w = randn()
    elif dist == "student_t":  # z / sqrt(chi2_df / df), chi2 as a sum of df squared normals
        chi2 = sum(randn().square_() for _ in range(STUDENT_T_DF))
        w = randn().div_(chi2.div_(STUDENT_T_DF).sqrt_()).div_(math.sqrt(STUDENT_T_DF / (STUDENT_T_DF - 2)))
    elif dist == "laplace":  # log(u1 / u2) of two uniforms on (0, 1] is Laplace(0, 1), variance 2
        u1, u2 = (1 - torch.rand(shape, generator=gen, device=device) for _ in range(2))
        w = u1.div_(u2).log_().div_(math.sqrt(2))
    else:
        raise ValueError(f"unknown weight source {dist!r}")
    w.mul_(INIT_STD)
    if dist == "outliers":
        cols = torch.randperm(shape[1], generator=gen, device=device)[: max(1, shape[1] // OUTLIER_EVERY)]
        w[:, cols] *= OUTLIER_SCALE
    return w


def _shape_preset(ctx: Context) -> presets.Preset:
    """The shapes synthetic weights take: the source's preset, its checkpoint's config, or tiny-llama."""
    if ctx.source.preset is not None:
        return ctx.source.preset
    config = ctx.source.checkpoint and Path(ctx.source.checkpoint) / "config.json"
    if not config or not config.is_file():
        return presets.PRESETS["tiny-llama"]
    c = json.loads(config.read_text())
    heads = c["num_attention_heads"]
    return presets.Preset(
        "checkpoint", "llama", c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
        c.get("num_key_value_heads") or heads, c["vocab_size"], c.get("max_position_embeddings", 2048),
        c.get("rope_theta", 10000.0), c.get("rms_norm_eps", 1e-5), str(config),
        bool(c.get("tie_word_embeddings", False)),
    )


Layer = tuple[int, str, str, torch.Tensor]  # (layer index, type, name, W in fp32 on the device)


def generated_layers(ctx: Context, dist: str) -> tuple[Iterator[Layer], int]:
    """Seeded synthetic layers generated on the device one tensor at a time, and the unquantized param count."""
    p = _shape_preset(ctx)
    num_layers = ctx.case.model.num_layers or p.num_hidden_layers
    counts = presets.param_count(p, num_layers=num_layers)
    device = torch.device(ctx.device)
    gen = torch.Generator(device=device).manual_seed(ctx.case.settings.seed)

    def layers() -> Iterator[Layer]:
        for i in range(num_layers):
            for kind, shape in presets.linear_shapes(p).items():
                name = f"model.layers.{i}.{'mlp' if kind in ('gate', 'up', 'down') else 'self_attn'}.{kind}_proj"
                yield i, kind, name, synthetic(shape, dist, gen, device)

    return layers(), counts["total"] - counts["linear"]


def checkpoint_layers(ctx: Context) -> tuple[Iterator[Layer], int]:
    """A checkpoint's linears (of its first ``model.num_layers`` layers, when set), read one tensor at a time with
    safe_open, and its unquantized param count."""
    from safetensors import safe_open

    files = sorted(Path(ctx.source.checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ctx.source.checkpoint}")
    linears: list[tuple[int, int, str, Path]] = []  # (layer, type order, key, file)
    keep = ctx.case.model.num_layers  # only the first N decoder layers (a slice of a large checkpoint)
    other = 0
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                m = LINEAR_KEY.search(key)
                if m and (keep is None or int(m[1]) < keep):
                    linears.append((int(m[1]), PROJECTIONS.index(m[2]), key, f))
                elif not m:
                    other += math.prod(fh.get_slice(key).get_shape())
    device = torch.device(ctx.device)

    def layers() -> Iterator[Layer]:
        for i, t, key, f in sorted(linears):
            with safe_open(f, framework="pt") as fh:
                w = fh.get_tensor(key).to(device=device, dtype=torch.float32)
            yield i, PROJECTIONS[t], key.removesuffix(".weight"), w

    return layers(), other


def weights(ctx: Context) -> tuple[Iterator[Layer], int]:
    """The layers the settings ask for: the checkpoint's (or the preset's, generated) or a synthetic law."""
    source = ctx.case.settings.weight_source
    if source == "model" and ctx.source.checkpoint is not None:
        return checkpoint_layers(ctx)
    if source == "model" and ctx.source.preset is None:
        raise ValueError("weight_source 'model' needs a checkpoint or a preset")
    return generated_layers(ctx, source)  # "model" without a checkpoint: the preset's shapes, N(0, 0.02)


# --- the stage ------------------------------------------------------------------------------------------

def run(ctx: Context, inputs: Inputs | None = None) -> StageOutput:
    """Quantize every linear layer with the case's method; error, storage and timing per layer and pooled."""
    s = ctx.case.settings
    method = methods.get(s.method)
    cdtype = methods.torch_dtype(s.compute_dtype)
    device = torch.device(ctx.device)
    layers, unquantized = weights(ctx)

    def roundtrip(w: torch.Tensor):
        rt = method.round_trip(w, s)
        return rt.w_hat, rt.storage, rt.quantize_s, rt.dequantize_s

    if method.quantized:  # first calls load kernels; keep them out of the timings
        roundtrip(torch.linspace(-1, 1, WARMUP_NUMEL, device=device).view(-1, 64))

    total, int4, floor, moved = ErrorStats(), ErrorStats(), ErrorStats(), ErrorStats()
    gen = torch.Generator(device=device).manual_seed(s.seed + 1)  # the dither's own numbers
    levels_sum, levels_max, n_blocks = 0, 0, 0
    by_type: dict[str, ErrorStats] = {}
    stored, int4_stored = Storage(), Storage()
    quantize_s = dequantize_s = 0.0
    rows = []
    for i, kind, name, w in layers:
        if s.weight_transform != "none":
            original, w = w, transform(w, s.weight_transform, gen)
            moved += ErrorStats.of(original, w)
            del original
        if w.shape[-1] % Q4_1_BLOCK == 0:
            lv = block_levels(w)
            levels_sum, levels_max, n_blocks = levels_sum + int(lv.sum()), max(levels_max, int(lv.max())), n_blocks + lv.numel()
        w_hat, st, tq, tdq = roundtrip(w)
        err = ErrorStats.of(w, w_hat)
        del w_hat
        ref = ErrorStats.of(w, int4_absmax(w.to(cdtype), s.blocksize).to(cdtype))
        flo = ErrorStats.of(w, w.to(torch.bfloat16))
        total += err
        int4 += ref
        floor += flo
        by_type.setdefault(kind, ErrorStats())
        by_type[kind] += err
        stored += st
        int4_stored += int4_storage(w.numel(), s.blocksize)
        quantize_s += tq
        dequantize_s += tdq
        rows.append({
            "layer": i, "type": kind, "name": name, "shape": "x".join(map(str, w.shape)), "n_params": w.numel(),
            **err.metrics(), "bits_per_param": st.bits_per_param,
            "packed_bytes": st.packed_bytes, "absmax_bytes": st.absmax_bytes, "nested_bytes": st.nested_bytes,
            "int4_ref_rmse": ref.metrics()["rmse"], "bf16_floor_rmse": flo.metrics()["rmse"],
            "quantize_s": tq, "dequantize_s": tdq,
        })
    if not rows:
        raise ValueError(f"no quantizable linear layers found in {ctx.source.checkpoint}")

    m: dict[str, float] = {f"quant.{k}": v for k, v in total.metrics().items()}
    for kind in PROJECTIONS:
        if kind in by_type:
            m.update({f"quant.{kind}.{k}": v for k, v in by_type[kind].metrics().items()})
    m.update({f"quant.int4_ref.{k}": v for k, v in int4.metrics().items()})
    m.update({f"quant.bf16_floor.{k}": v for k, v in floor.metrics().items()})
    if s.weight_transform != "none":
        m.update({f"quant.transform.{k}": moved.metrics()[k] for k in ("rmse", "rel_error")})
    if n_blocks:
        m["quant.weights.block32_levels_mean"] = levels_sum / n_blocks
        m["quant.weights.block32_levels_max"] = levels_max
    if m["quant.rmse"] > 0:  # 0 for lora-bf16 on a checkpoint already stored in bf16
        m["quant.int4_over_method_rmse_ratio"] = m["quant.int4_ref.rmse"] / m["quant.rmse"]
    m["quant.int4_ref.bits_per_param"] = int4_stored.bits_per_param
    m["quant.bits_per_param"] = stored.bits_per_param
    m["quant.serialized.bits_per_param"] = 8 * stored.total_bytes / stored.n  # per-tensor constants included
    for f in ("packed_bytes", "absmax_bytes", "nested_absmax_bytes", "nested_bytes", "code_bytes"):
        m[f"quant.{f}"] = getattr(stored, f)
    m["quant.linear_params"] = stored.n
    m["quant.unquantized_params"] = unquantized
    m["quant.linear_bytes"] = stored.total_bytes
    m["quant.model_bytes"] = stored.total_bytes + unquantized * BF16_BITS // 8
    m["quant.model_16bit_bytes"] = (stored.n + unquantized) * BF16_BITS // 8
    if method.quantized:  # a 16-bit base has nothing to quantize
        m["quant.quantize_s"], m["quant.dequantize_s"] = quantize_s, dequantize_s
    settings = {"method": method.name, "label": method.label,
                "blocksize": s.blocksize, "compute_dtype": s.compute_dtype if method.quantized else "bf16",
                "quant_storage": s.quant_storage, "weight_source": s.weight_source,
                "weight_transform": s.weight_transform, "device": str(device),
                "layers": len(rows), "int4_ref": f"symmetric absmax, round(x*{INT4_LEVELS}/absmax) in "
                f"[-{INT4_LEVELS}, {INT4_LEVELS}], blocksize {s.blocksize}, fp32 absmax"}
    return StageOutput(metrics=m, tables={"quant.layers": rows, "quant.settings": [settings]})
