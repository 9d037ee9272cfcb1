"""First-principles peak-memory model of one training case: weights, adapter, optimizer, activations.

Dtype assumptions (read from the peft 0.21, transformers 5 and quantization library sources and checked on
the CPU against the bytes autograd saves; the activation formula is in the comment on activation_bytes_per_token):

- The base's linears take what the method says (``Method.linear_bytes``: 16-bit, or packed codes plus their
  scales). Embeddings, lm_head and norms take what the precision policy says (``harness.precision``): fp32
  under ``recipe`` and ``fp32-adapters``; under ``native``, fp32 for a quantized base
  (``prepare_model_for_kbit_training``) and ``compute_dtype`` for a 16-bit one.
- LoRA A/B: ``compute_dtype`` under ``recipe`` (trl's cast, applied to every method), fp32 under
  ``fp32-adapters``; under ``native``, 16-bit for a quantized base and fp32 for a 16-bit one.
- ``adapter_dtype`` overrides the policy's adapter dtype with the one a run actually held (the train stage
  reads it at the first step); gradients and torch AdamW states follow it.
- Activations scale with the tokens a micro-batch holds (``tokens``: rows padded to the longest, or packed),
  not ``batch_size * seq_len``; the loss is trl's fused LM head (``loss_bytes``).
- Training runs under autocast in ``compute_dtype`` (Trainer ``bf16=True``), which keeps 16-bit copies of
  fp32 LoRA weights for the step (``autocast=False`` models a plain loop without it).
- Quantized bits/param come from the method and ``settings.blocksize``; pass ``bits_per_param`` where it
  was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness import precision
from harness.methods import get as get_method
from harness.presets import Preset, linear_shapes, param_count
from harness.spec import Settings

GIB = 2**30
CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace: seen by NVML, not by torch's allocator
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PAGED_MIN_NUMEL = 100_000  # paged optimizers page only the states of tensors with >= 1e5 elements
MIN_8BIT_NUMEL = 4096  # the 8-bit optimizer's min_8bit_size: smaller tensors keep 32-bit states
OPTIM_8BIT_BLOCK = 256  # block size of the 8-bit optimizer's fp32 absmax statistics
PROJ_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
SAME_INPUT = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}  # shared inputs


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory of one training step, by term, in GiB."""

    weights_gib: float  # base model: quantized linears at bits_per_param, the rest at its stored dtype
    lora_gib: float  # LoRA A/B parameters (in the dtype the precision policy gives them)
    gradients_gib: float  # LoRA gradients only (the adapters' dtype): the base is frozen
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


def optimizer_bytes(numel: int, optimizer: str, param_bytes: int = 4) -> int:
    """AdamW state bytes of one tensor: m and v in the parameter's dtype (torch), fp32 (paged 32-bit), or
    8-bit blockwise with fp32 absmax (paged 8-bit; small tensors keep fp32 states)."""
    if optimizer == "paged_adamw_8bit" and numel >= MIN_8BIT_NUMEL:
        return 2 * numel + 2 * 4 * math.ceil(numel / OPTIM_8BIT_BLOCK)
    if optimizer == "adamw_torch":
        return 2 * param_bytes * numel
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
# The loss: see loss_bytes (trl's fused LM head; the logits are never materialized whole).
def activation_bytes_per_token(preset: Preset, settings: Settings, *, vocab_size: int | None = None,
                               autocast: bool = True, attn_impl: str = "sdpa", device: str = "cuda",
                               seq_len: int | None = None, adapter_bytes: int = 4) -> dict[str, float]:
    """Bytes autograd holds per token: one layer's saved tensors, its input, its backward, the loss.

    ``seq_len``: the row length as held (padded to the longest row), default ``settings.seq_len``."""
    method = get_method(settings.method)
    e = DTYPE_BYTES[settings.compute_dtype]
    h, i, a = preset.hidden_size, preset.intermediate_size, preset.num_attention_heads
    kv, s, r = preset.num_key_value_heads * preset.head_dim, seq_len or settings.seq_len, settings.lora_r
    shapes = linear_shapes(preset)
    # saved input of lora_A: peft casts x to the adapter's dtype, autocast then to compute_dtype
    lora_in = e if autocast else adapter_bytes
    # dropout: CUDA's fused kernel saves a bool mask, the CPU path a noise tensor in the input's fp32
    mask = 0 if settings.lora_dropout == 0 else (1 if device.startswith("cuda") else 4)
    att = 4 if method.quantized and not autocast else e  # dtype of q, k, v reaching attention
    mlp = 4 if method.quantized else e  # Linear4bit casts its output back to the fp32 residual stream
    norms = 2 * (4 * h + 4)
    # Without autocast or dropout, peft hands a 4-bit base's fp32 input to lora_A uncopied: projections
    # reading the same tensor (q/k/v, gate/up) then share one saved input.
    shared = method.quantized and not autocast and mask == 0
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
    # residual stream: the embeddings' dtype (fp32 under recipe and fp32-adapters for every method, and for
    # a 4-bit base under native); adding a 16-bit attention or MLP output to it keeps it fp32
    stream = precision.unquantized_bytes(settings.precision, method.quantized, e)
    return {
        "layer": norms + lora + attn + 3 * mlp * i,  # saved by one decoder layer
        "layer_input": stream * h,  # what gradient checkpointing keeps of a layer
        # gradients in flight inside one layer's backward (MLP: 3 x intermediate, in the MLP's dtype: fp32
        # for a 4-bit base, whose Linear4bit returns its fp32 input's dtype)
        "backward": 3 * mlp * i,
        "final_norm": 4 * h + 4,  # the final RMSNorm's fp32 input and rsqrt
    }


FUSED_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns per tile
FUSED_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE: tokens per tile
CPU_FOLD_BYTES = 29  # per tile entry, the torch fold of a tile (no Triton): 7 fp32 temporaries + a bool mask


def loss_bytes(preset: Preset, settings: Settings, tokens: int, *, vocab_size: int | None = None,
               device: str = "cuda", head_bytes: int | None = None) -> float:
    """Bytes the loss's backward holds for one micro-batch of ``tokens`` tokens (trl 1.x's fused LM head,
    ``trl.kernels.chunked_logprob``, measured on the CPU with torch's profiler):

    - a tile buffer of min(N, 4096) x 32768 entries in ``compute_dtype``, sized by the chunk, not the vocabulary
      (N = tokens less one per row: the predicted positions);
    - on the CPU (no Triton) the torch fold of a tile: 29 bytes per tile entry (min(N, 4096) x min(vocab, 32768));
    - the lm_head chunk cast to ``compute_dtype`` where the head is held wider (``head_bytes``, fp32 under
      the recipe policy and for quantized bases): min(vocab, 32768) x h x e;
    - the fp32 gradient of the hidden states, N x h x 4, and the saved log-normalizer and entropy, N x 8.
    """
    method = get_method(settings.method)
    e = DTYPE_BYTES[settings.compute_dtype]
    if head_bytes is None:
        head_bytes = precision.unquantized_bytes(settings.precision, method.quantized, e)
    vocab = vocab_size or preset.vocab_size
    h = preset.hidden_size
    n = max(tokens - settings.batch_size, 1)
    rows, cols = min(n, FUSED_TOKEN_CHUNK), min(vocab, FUSED_VOCAB_CHUNK)
    out = rows * FUSED_VOCAB_CHUNK * e
    if not device.startswith("cuda"):
        out += rows * cols * CPU_FOLD_BYTES
    if head_bytes > e:
        out += cols * h * e
    return float(out + n * h * 4 + n * 8)


def estimate(preset: Preset, settings: Settings, *, vocab_size: int | None = None,
             num_layers: int | None = None, bits_per_param: float | None = None, device: str = "cuda",
             autocast: bool = True, attn_impl: str = "sdpa", tokens: int | None = None,
             adapter_dtype: str | None = None) -> Estimate:
    """Predicted peak memory of training ``settings`` on ``preset`` (overrides: vocab, layers, bits).

    ``tokens``: tokens of the largest micro-batch as held (rows padded to the longest, or packed), default
    ``batch_size * seq_len``; the real batches are often much shorter. ``adapter_dtype``: the dtype the run
    held the LoRA weights in, where measured (default: what the precision policy gives them), which sets the
    adapter, gradient and torch-AdamW state bytes and whether autocast copies them.
    """
    method = get_method(settings.method)
    layers = num_layers or preset.num_hidden_layers
    vocab = vocab_size or preset.vocab_size
    e = DTYPE_BYTES[settings.compute_dtype]
    counts = param_count(preset, vocab_size=vocab, num_layers=layers)
    rest = counts["embed"] + counts["lm_head"] + counts["norm"]  # never quantized
    shapes = [shape for shape in linear_shapes(preset).values()] * layers
    linear = method.linear_bytes(shapes, settings)
    if bits_per_param is not None:  # measured elsewhere
        linear = counts["linear"] * bits_per_param / 8
    bpp = 8 * linear / counts["linear"]
    weights = linear + rest * precision.unquantized_bytes(settings.precision, method.quantized, e)
    a = precision.adapter_bytes(settings.precision, method.quantized, e)
    tensors = lora_tensors(preset, settings, layers)
    trainable = sum(tensors)
    if adapter_dtype is not None:  # the dtype a run actually held
        a = DTYPE_BYTES[adapter_dtype]
    optim = [optimizer_bytes(n, settings.optimizer, a) for n in tensors]
    paged = sum(b for n, b in zip(tensors, optim, strict=True) if n >= PAGED_MIN_NUMEL) \
        if settings.optimizer.startswith("paged_") and device.startswith("cuda") else 0

    tokens = tokens or settings.batch_size * settings.seq_len
    per = activation_bytes_per_token(preset, settings, vocab_size=vocab, autocast=autocast, attn_impl=attn_impl,
                                     device=device, seq_len=math.ceil(tokens / settings.batch_size),
                                     adapter_bytes=a)
    head_bytes = precision.unquantized_bytes(settings.precision, method.quantized, e)
    # The loss buffers are freed before backward reaches the last layer, so the peak is the larger of
    # "everything saved + loss buffers" (start of backward) and "everything saved + one layer's backward".
    loss = loss_bytes(preset, settings, tokens, vocab_size=vocab, device=device, head_bytes=head_bytes)
    if settings.gradient_checkpointing:  # each layer keeps its input; backward recomputes one at a time
        act = (layers * per["layer_input"] + per["final_norm"]) * tokens + max(
            loss, (per["layer"] + per["backward"]) * tokens)
    else:
        act = (layers * per["layer"] + per["final_norm"]) * tokens + max(loss, per["backward"] * tokens)

    largest = max(o * i for o, i in linear_shapes(preset).values())
    dequant = largest * e if method.quantized else 0  # a quantized linear dequantizes one weight per matmul
    copies = trainable * e if autocast and e < a else 0  # autocast's cached 16-bit copies of fp32 LoRA weights
    return Estimate(
        weights_gib=weights / GIB,
        lora_gib=trainable * a / GIB,
        gradients_gib=trainable * a / GIB,
        optimizer_gib=sum(optim) / GIB,
        optimizer_paged_gib=paged / GIB,
        activations_gib=act / GIB,
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
    from harness.measure.machine import resolve_compute_dtype

    if case.model.source != "synthetic":
        return None
    settings = resolve_compute_dtype(case.settings, device)
    if settings.strategy != "none":  # a case over ranks: what one rank holds
        from harness.launchers.torchrun import ranks_per_node

        return per_rank(presets.PRESETS[case.model.preset], settings,
                        world_size=ranks_per_node(settings) * settings.nnodes,
                        num_layers=case.model.num_layers, device=device)
    return estimate(presets.PRESETS[case.model.preset], settings, num_layers=case.model.num_layers, device=device)


def per_rank(preset: Preset, settings: Settings, *, world_size: int, strategy: str | None = None,
             **kw) -> Estimate:
    """Predicted peak memory of one rank of a case trained on ``world_size`` ranks (``strategy``, default the
    settings'), each rank on its own micro-batch of ``batch_size`` rows; ``kw`` as for :func:`estimate`.

    - ``fsdp2`` (``fully_shard`` on every decoder layer, then on the root): every parameter, gradient and AdamW
      state is split over the ranks (weights, LoRA, gradients and optimizer divided by N), and what is gathered
      whole for the moment joins the workspace: the root group's parameters (embeddings, final norm, lm_head:
      gathered for the forward and again for the backward), two decoder layers' parameters (the one computing
      and the one prefetched) and one layer's LoRA gradients before their reduce-scatter.
    - ``ddp``: every rank holds a whole replica, and DDP's gradient buckets hold a second copy of the LoRA
      gradients (workspace).
    - Activations, the loss buffers and the transients are each rank's own, as in one process.
    """
    from dataclasses import replace

    strategy = strategy or settings.strategy
    est = estimate(preset, settings, **kw)
    n = max(int(world_size), 1)
    if strategy == "ddp":
        return replace(est, workspace_gib=est.workspace_gib + est.gradients_gib)
    if strategy != "fsdp2":
        return est
    method = get_method(settings.method)
    layers = kw.get("num_layers") or preset.num_hidden_layers
    vocab = kw.get("vocab_size") or preset.vocab_size
    counts = param_count(preset, vocab_size=vocab, num_layers=layers)
    rest_bytes = precision.unquantized_bytes(settings.precision, method.quantized, DTYPE_BYTES[settings.compute_dtype])
    root = (counts["embed"] + counts["lm_head"] + preset.hidden_size) * rest_bytes / GIB
    layer = (est.weights_gib - root) / layers  # one decoder layer: its linears as stored and its two norms
    lora_layer, grad_layer = est.lora_gib / layers, est.gradients_gib / layers
    gathered = root + 2 * (layer + lora_layer) + grad_layer
    return replace(est, weights_gib=est.weights_gib / n, lora_gib=est.lora_gib / n,
                   gradients_gib=est.gradients_gib / n, optimizer_gib=est.optimizer_gib / n,
                   optimizer_paged_gib=est.optimizer_paged_gib / n, workspace_gib=est.workspace_gib + gathered)


TIERS_GB = (24, 48, 80)  # the GPU memory sizes users pick between (decimal GB, as cards are sold)


class ModelShapeError(ValueError):
    """A model the estimator cannot read the shape of: one line naming it and what to do."""


def preset_for(model: str) -> Preset:
    """The shape of ``model``: a preset name, a ``config.json`` file, a folder holding one, or a hub id whose
    config.json is in the local hub cache (nothing is downloaded, no weights are read)."""
    from pathlib import Path

    from harness import presets

    if model in presets.PRESETS:
        return presets.PRESETS[model]
    path = Path(model)
    if path.is_file():
        folder = path.parent
        if path.name != "config.json":
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory(prefix="estimate-") as tmp:  # read, then gone: nothing left in /tmp
                shutil.copy(path, Path(tmp) / "config.json")
                return _read_config(Path(tmp), model)
        return _read_config(folder, model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelShapeError(f"{model}: no config.json in this folder")
        return _read_config(path, model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception as exc:  # noqa: BLE001 - a malformed id is the user's to fix
            raise ModelShapeError(f"{model}: not a hub id ({' '.join(str(exc).split())[:120]})") from None
        if isinstance(cached, str):
            return _read_config(Path(cached).parent, model)
        raise ModelShapeError(f"{model}: not in the local cache: set HF_HUB_OFFLINE=0 and fetch its config.json "
                              f"(huggingface-cli download {model} config.json), or pass a config.json path")
    raise ModelShapeError(f"{model}: not a preset ({', '.join(presets.PRESETS)}), file, folder or hub id")


def _read_config(folder, model: str) -> Preset:
    import json

    from harness.presets import from_hf_config

    try:
        return from_hf_config(folder)
    except json.JSONDecodeError as exc:
        raise ModelShapeError(f"{model}: config.json is not JSON (line {exc.lineno}: {exc.msg})") from None
    except KeyError as exc:
        raise ModelShapeError(f"{model}: config.json has no {exc.args[0]!r} (a decoder-only transformer's "
                              f"config is needed: hidden_size, intermediate_size, num_hidden_layers, "
                              f"num_attention_heads, vocab_size)") from None
    except (TypeError, AttributeError):
        raise ModelShapeError(f"{model}: config.json is not a model config object") from None


def render(est: Estimate, preset: Preset, settings: Settings, device: str = "cuda") -> str:
    """The estimate as a small table: every term, the total, and whether it fits each GPU size."""
    rows = [("weights", est.weights_gib, f"base at {est.bits_per_param:.3f} bits/param in its linears"),
            ("lora", est.lora_gib, f"{est.trainable_params:,} adapter parameters"),
            ("gradients", est.gradients_gib, "adapters only: the base is frozen"),
            ("optimizer", est.optimizer_gib, f"{settings.optimizer}" + (
                f", {est.optimizer_paged_gib:.2f} GiB of it in managed memory" if est.optimizer_paged_gib else "")),
            ("activations", est.activations_gib, f"{settings.batch_size} x {settings.seq_len} tokens, "
             f"checkpointing {'on' if settings.gradient_checkpointing else 'off'}"),
            ("workspace", est.workspace_gib, "a dequantized weight, autocast copies"),
            ("context", est.context_gib, "CUDA context and cuBLAS workspace")]
    lines = [f"{preset.name}: {settings.method}, seq {settings.seq_len}, batch {settings.batch_size}, "
             f"{settings.compute_dtype}, precision {settings.precision}",
             f"{'component':<12}{'GiB':>9}  note"]
    lines += [f"{name:<12}{v:>9.2f}  {note}" for name, v, note in rows]
    total_gb = est.total_gib * GIB / 1e9
    lines.append(f"{'total':<12}{est.total_gib:>9.2f}  = {total_gb:.2f} GB (1e9 bytes)")
    fits_line = ", ".join(f"{t} GB {'fits' if est.total_gib * GIB <= t * 1e9 else 'does not fit'}" for t in TIERS_GB)
    lines.append(f"fits: {fits_line}")
    return "\n".join(lines)
