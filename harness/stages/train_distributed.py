"""The train stage on N ranks (torchrun): the QLoRA recipe, sharded by FSDP2 or replicated by DDP, in a plain loop.

The recipe is the one-process stage's: the method's base and preparation (``prepare_model_for_kbit_training``
for a quantized base), the same ``LoraConfig``, the precision policy applied after every cast, AdamW with the
trainer's defaults (no weight decay, gradients clipped at norm 1), autocast in the compute dtype, trl's
tokenization (an EOS appended, rows cut at ``seq_len``, padding masked out of the loss). The loop is driven
directly: trl's ``SFTTrainer`` with FSDP settings on the CPU silently trains with DDP. Each rank reads its
rows through ``DistributedSampler``; the loss a step minimizes is the mean over ranks of each rank's mean
token loss, which is what one process replaying every rank's batch would minimize.

What the model really is after wrapping is read back from it (``in_force``: ``FSDPModule`` instances and
DTensor parameters, or ``DistributedDataParallel``) and a mismatch with the setting fails the case. Each
rank measures what the one-process stage measures (its own tensor peak on the CPU, torch's allocator and
NVML on a GPU, RSS, step times and tokens); every rank's figures are gathered, so that each record holds
all of them, their max and sum over ranks, and the whole job's tokens/s.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from harness import estimate, precision
from harness.measure import health, memory, steps, tensors
from harness.stages import Context, Inputs, StageOutput, TrainedAdapter, free, load_for_training, sync

MAX_GRAD_NORM = 1.0  # transformers' Trainer default, which the one-process stage runs with
# Fault injection for the harness's own tests of failure handling, ``kind@rank:step`` (crash: SIGSEGV, hang:
# sleep, oom: MemoryError, all at the start of that step), or ``wrap=ddp`` / ``wrap=none``: the fsdp2 strategy
# silently wraps with DDP or with nothing (what must fail the case and the exactness test).
FAULT_ENV = "QLORA_HARNESS_FAULT"
PER_RANK = ("peak_rss_gib", "tensor_peak_gib", "tensor_start_gib", "peak_allocated_gib", "peak_reserved_gib",
            "nvml_peak_gib", "estimate_gib", "estimate_held_gib", "tokens_per_s")


def _fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, where = spec.partition("@")
    if not where:
        return
    r, _, s = where.partition(":")
    if int(r) != rank or int(s or 0) != step:
        return
    print(f"[rank {rank}] injected fault: {kind} at step {step}", flush=True)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "oom":
        raise MemoryError(f"injected on rank {rank} at step {step}")


def _no_split(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or ())


def wrap(model, strategy: str, device: str):
    """The model wrapped for ``strategy``: ``fsdp2`` shards each decoder layer, then the root; ``ddp`` replicates."""
    override = os.environ.get(FAULT_ENV, "")
    if strategy == "fsdp2" and override.startswith("wrap="):
        strategy = override.removeprefix("wrap=")
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        names = _no_split(model)
        for m in [m for m in model.modules() if type(m).__name__ in names]:
            fully_shard(m)
        fully_shard(model)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None)
    return model


def in_force(model) -> dict[str, float | str]:
    """The strategy the wrapped model really has, read from it: FSDP2 modules and DTensor parameters, DDP, FSDP1."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = FullyShardedDataParallel = ()  # noqa: N806
    params = list(model.parameters())
    dtensors = sum(isinstance(p, DTensor) for p in params)
    sharded = sum(isinstance(m, FSDPModule) for m in model.modules()) if FSDPModule else 0
    if isinstance(model, DistributedDataParallel):
        kind = "ddp"
    elif FullyShardedDataParallel and isinstance(model, FullyShardedDataParallel):
        kind = "fsdp1"
    elif sharded and dtensors == len(params):
        kind = "fsdp2"
    elif sharded:
        kind = "fsdp2-partial"
    else:
        kind = "none"
    return {"strategy": kind, "fsdp_modules": float(sharded), "dtensor_params": float(dtensors),
            "params": float(len(params))}


def _batches(ctx: Context, tokenizer, rank: int, world: int) -> list[tuple[list[int], dict]]:
    """(row indices, batch) of every step of this rank: trl's tokenization, ``DistributedSampler``'s rows."""
    from datasets import load_dataset
    from torch.utils.data import DistributedSampler

    s = ctx.case.settings
    data = load_dataset("json", data_files=ctx.case.data.train, split="train")
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=s.seed, drop_last=True)
    out, epoch, order = [], 0, []
    while len(out) < s.max_steps:
        if len(order) < s.batch_size:
            sampler.set_epoch(epoch)
            order += list(sampler)
            epoch += 1
            continue
        rows, order = order[:s.batch_size], order[s.batch_size:]
        out.append((rows, collate(tokenizer, [data[i]["text"] for i in rows], s.seq_len)))
    return out


def collate(tokenizer, texts: list[str], seq_len: int) -> dict:
    """trl's language-modelling batch: EOS appended, cut at ``seq_len``, padded right, padding out of the loss."""
    import torch

    ids = [tokenizer(t)["input_ids"] for t in texts]
    eos = tokenizer.eos_token_id
    ids = [(x if x and x[-1] == eos else x + [eos])[:seq_len] for x in ids]
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def loss_of(model, batch: dict, device: str, compute_dtype: str):
    """The mean token loss of one micro-batch through trl's fused LM head (as ``SFTTrainer`` computes it: the
    logits are never materialized whole), under autocast in the compute dtype."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_dtype)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(**batch, use_cache=False, fused_lm_head=True)
    return -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)


def step(model, optimizer, batch: dict, device: str, compute_dtype: str):
    """One optimizer step on one micro-batch (the loss, gradients clipped at norm 1, AdamW); its loss."""
    import torch

    loss = loss_of(model, batch, device, compute_dtype)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def fused_head(model) -> None:
    """trl's fused LM head on the PEFT model's base, with the outputs ``SFTTrainer`` asks for."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))


def optimizer_for(model, settings):
    """AdamW as transformers' Trainer builds it for ``adamw_torch``: no weight decay, its betas and eps."""
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                             betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def adapter_state(model) -> dict:
    """Every LoRA tensor whole, on the CPU (a collective under FSDP2: every rank calls it). FSDP2's full state
    dict would not keep a 4-bit base's quant state: the adapters are all a rank saves."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = full.detach().cpu().clone()
    return out


def _loop(ctx: Context, model, optimizer, batches, rank: int, world: int):
    """Every step of this rank: (losses [step, mean over ranks], timed step seconds, timed (real, total, rows)
    tokens, the tensor peak of the last warm-up step on the CPU, that step's tokens). A failure inside the
    profiled step ends the profiler first (left running, it crashes the interpreter's exit)."""
    import torch.distributed as dist

    s = ctx.case.settings
    losses, step_s, tokens, profiled, profiled_tokens, phase = [], [], [], None, 0, None
    try:
        for i, (_, batch) in enumerate(batches):
            _fault(rank, i)
            if ctx.device == "cpu" and i == max(s.warmup_steps - 1, 0):
                profiled = tensors.TensorPeak()
                profiled.start(model, optimizer)
            if i == s.warmup_steps:
                memory.reset_torch_peaks()
                phase = ctx.sampler.phase("train")
                phase.__enter__()
            sync(ctx.device)
            t0 = time.perf_counter()
            loss = step(model, optimizer, batch, ctx.device, s.compute_dtype)
            sync(ctx.device)
            dt = time.perf_counter() - t0
            if profiled is not None and profiled.peak_bytes is None:
                profiled.stop()
                profiled_tokens = batch["input_ids"].numel()
            dist.all_reduce(loss)  # the job's loss: the mean over ranks (gloo has no AVG: a sum over the world)
            losses.append([float(i + 1), float(loss) / world])
            if i >= s.warmup_steps:
                step_s.append(dt)
                tokens.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel(),
                               batch["input_ids"].shape[0]))
        sync(ctx.device)
    finally:
        if profiled is not None and profiled.prof is not None:
            profiled.prof.__exit__(None, None, None)
            profiled.prof = None
        if phase is not None:
            phase.__exit__(None, None, None)
    return losses, step_s, tokens, profiled, profiled_tokens


def run(ctx: Context, inputs: Inputs) -> StageOutput:
    import torch
    import torch.distributed as dist

    from harness import models
    from harness.launchers.torchrun import all_ready, process_group

    s = ctx.case.settings
    process_group(s, startup_s=ctx.case.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = StageOutput()
    torch.manual_seed(s.seed)  # every rank starts from the same LoRA initialization
    sampler = ctx.sampler
    tokenizer = models.load_tokenizer(ctx.source)
    memory.reset_torch_peaks()
    rss_start = memory.memory_now()["rss_gib"]
    t = time.perf_counter()
    with sampler.phase("load"):
        model = load_for_training(ctx)
        fused_head(model)
        precision.apply(model, s.precision, s.compute_dtype)  # the one-process stage's policy, before wrapping
        model.train()  # before any forward: an eval-mode forward repacks 4-bit weights in place on this CPU
        dtypes = precision.held(model)
        storage = sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()
                          if precision.part_of(n, p) == "linears"})
        all_ready(s)
        model = wrap(model, s.strategy, ctx.device)
    out.metrics["train.load_s"] = time.perf_counter() - t
    out.metrics.update(sampler.metrics("train.load_", "load"))
    force = in_force(model)
    out.tables["train.strategy"] = [{"setting": s.strategy, "in_force": force["strategy"], "world_size": world,
                                     "backend": dist.get_backend(), "fsdp_modules": force["fsdp_modules"],
                                     "dtensor_params": force["dtensor_params"], "params": force["params"],
                                     "linears_stored_as": "+".join(storage), "quant_storage": s.quant_storage}]
    out.metrics["train.world_size"] = float(world)
    out.metrics["train.fsdp_modules"] = force["fsdp_modules"]
    out.metrics["train.dtensor_param_share"] = force["dtensor_params"] / max(force["params"], 1)
    if force["strategy"] != s.strategy:
        out.failures.append(f"strategy {s.strategy} was set but the model is wrapped as {force['strategy']} "
                            f"({force['fsdp_modules']:.0f} FSDP modules, {force['dtensor_params']:.0f} of "
                            f"{force['params']:.0f} parameters DTensors)")
    optimizer = optimizer_for(model, s)
    batches = _batches(ctx, tokenizer, rank, world)
    (ctx.work_dir / f"batches.rank{rank}.json").write_text(json.dumps([rows for rows, _ in batches]))

    t_train = time.perf_counter()
    losses, step_s, tokens, profiled, profiled_tokens = _loop(ctx, model, optimizer, batches, rank, world)
    out.metrics["train.wall_s"] = time.perf_counter() - t_train

    mine = {**sampler.metrics("", "train"), **memory.torch_peaks("")}
    if profiled is not None and profiled.peak_bytes:
        mine["tensor_peak_gib"] = profiled.peak_bytes / memory.GIB
        mine["tensor_start_gib"] = profiled.start_bytes / memory.GIB
        at_step = estimate.per_rank(ctx.source.preset, s, world_size=world, tokens=profiled_tokens,
                                    num_layers=ctx.case.model.num_layers, device=ctx.device,
                                    adapter_dtype=_adapter_dtype(dtypes)) if ctx.source.preset else None
        if at_step is not None:
            mine["estimate_gib"] = at_step.total_gib
            # what the step starts with (gradients were set to None): the rank's weights, adapters and AdamW state
            mine["estimate_held_gib"] = at_step.weights_gib + at_step.lora_gib + at_step.optimizer_gib
            mine["estimate_activations_gib"] = at_step.activations_gib
    if step_s:
        mine["tokens_per_s"] = float(sum(r for r, _, _ in tokens) / sum(step_s))
    mine.update({"rss_start_gib": rss_start, "host": os.uname().nodename, "step_s": step_s, "tokens": tokens})
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    out.metrics.update(merge_ranks(gathered))
    out.tables["train.ranks"] = [{"rank": r, "host": g["host"], **{k: g[k] for k in PER_RANK if k in g}}
                                 for r, g in enumerate(gathered)]
    out.tables["train.dtypes"] = [{"part": k, "dtype": v} for k, v in dtypes.items()]
    out.series["train.loss"] = losses
    if losses:
        head, tail = [v for _, v in losses[:3]], [v for _, v in losses[-3:]]
        out.metrics["train.loss_first"] = sum(head) / len(head)
        out.metrics["train.loss_last"] = sum(tail) / len(tail)
        out.metrics["train.loss_drop"] = out.metrics["train.loss_first"] - out.metrics["train.loss_last"]
    unhealthy = health.check(losses)
    out.metrics["train.healthy"] = 0.0 if unhealthy else 1.0
    if unhealthy:
        out.failures.append(f"training unhealthy: {unhealthy}")

    state = adapter_state(model)  # every rank takes part; rank 0 writes
    adapter = ctx.work_dir / "adapter"
    if rank == 0:
        inner = model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model
        inner.save_pretrained(adapter, state_dict=state, safe_serialization=True)
        out.metrics["train.adapter_bytes"] = float(sum(f.stat().st_size for f in Path(adapter).glob("*.safetensors")))
        out.artifacts["adapter"] = str(adapter.relative_to(ctx.run_dir))
        out.adapter = TrainedAdapter(path=adapter, tokenizer=tokenizer, dtypes=dtypes)
    dist.barrier()
    del model, optimizer
    free(ctx.device)
    return out


def _adapter_dtype(dtypes: dict[str, str]) -> str | None:
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return names.get(dtypes.get("adapters", ""))


def merge_ranks(gathered: list[dict]) -> dict[str, float]:
    """Every rank's figures (``train.rank<R>.*``), their max and sum over ranks (``train.ranks_max.*``,
    ``train.ranks_sum.*``: optimum-benchmark sums allocated, reserved and process memory over ranks) and the
    whole job's throughput: each timed step's real tokens summed over ranks over the slowest rank's time of that
    step (the ranks wait for each other in every collective), as ``harness.measure.steps`` reports one process."""
    out: dict[str, float] = {}
    for r, g in enumerate(gathered):
        for k, v in g.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"train.rank{r}.{k}"] = float(v)
    for k in PER_RANK + ("rss_start_gib",):
        values = [g[k] for g in gathered if k in g]
        if values and k != "tokens_per_s":
            out[f"train.ranks_max.{k}"] = float(max(values))
            out[f"train.ranks_sum.{k}"] = float(sum(values))
    if "estimate_gib" in gathered[0] and "tensor_peak_gib" in gathered[0]:
        out["train.estimate_over_tensor_peak_ratio"] = max(g["estimate_gib"] / g["tensor_peak_gib"] for g in gathered)
    if "peak_rss_gib" in gathered[0]:
        out["train.peak_rss_gib"] = out["train.ranks_max.peak_rss_gib"]
    n = min(len(g["step_s"]) for g in gathered)
    if n:
        job_s = [max(g["step_s"][i] for g in gathered) for i in range(n)]
        real = [sum(g["tokens"][i][0] for g in gathered) for i in range(n)]
        total = [sum(g["tokens"][i][1] for g in gathered) for i in range(n)]
        samples = [sum(g["tokens"][i][2] for g in gathered) for i in range(n)]
        out.update(steps.step_stats(job_s, real, total, samples, prefix="train."))
    return out
