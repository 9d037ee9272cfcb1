"""The eval stage: lm-eval scores of the untrained base, the adapter, and the adapter merged into its base."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import yaml

from harness import methods
from harness.stages import Context, StageOutput


def prepare_tasks(task_dir: Path, tasks: list[str], out: Path) -> tuple[list[str], bool]:
    """Copy shipped task files into ``out`` with absolute ``data_files``; say whether others are needed."""
    shipped = []
    for task in tasks:
        src = Path(task_dir) / f"{task}.yaml"
        if not src.is_file():
            continue
        cfg = yaml.safe_load(src.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            # lm-eval resolves data_files from the working directory, not from the task file: make them absolute
            files[split] = str((src.parent / rel).resolve())
        (out / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
        shipped.append(task)
    return shipped, len(shipped) < len(tasks)


def score(model, tokenizer, ctx: Context) -> tuple[dict[str, float], float]:
    """lm-eval ``simple_evaluate`` over an ``HFLM`` wrapping an already built model (adapter applied by us)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    s = ctx.case.settings
    tasks = list(ctx.case.eval.tasks)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="harness-tasks-") as tmp:
        _, need_installed = prepare_tasks(Path(ctx.case.task_dir), tasks, Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=need_installed)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.eval_batch_size)
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=ctx.case.eval.num_fewshot,
            limit=s.eval_limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=s.seed,
            verbosity="ERROR",
        )
    flat: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value == value:  # lm-eval reports NaN stderr for single samples: leave it out
                flat[f"{task}.{name}"] = float(value)
    return flat, time.perf_counter() - t


def _base_key(ctx: Context) -> str:
    s = ctx.case.settings
    method = methods.get(s.method)
    parts = [ctx.source.info.get("fingerprint"), method.quant_type, method.double_quant, s.compute_dtype,
             s.quant_storage, sorted(ctx.case.eval.tasks), ctx.case.eval.num_fewshot, s.eval_limit, s.seed]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def base_scores(ctx: Context, tokenizer) -> tuple[dict[str, float], bool]:
    """Scores of the untrained base, computed once per model, quantization and tasks within a run."""
    from filelock import FileLock

    from harness import models

    s = ctx.case.settings
    cache = ctx.run_dir / "cache" / f"base-{_base_key(ctx)}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if cache.exists():
            return json.loads(cache.read_text()), True
        base = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device)
        flat, seconds = score(base, tokenizer, ctx)
        flat["_seconds"] = seconds
        cache.write_text(json.dumps(flat, indent=1))
        del base
        return flat, False


def _prefixed(flat: dict[str, float], variant: str) -> dict[str, float]:
    """``support_mc.acc`` -> ``eval.support_mc.acc`` (adapter) or ``eval.support_mc.base_acc``."""
    out = {}
    for key, value in flat.items():
        if key.startswith("_"):
            continue
        task, metric = key.split(".", 1)
        out[f"eval.{task}.{metric if variant == 'adapter' else f'{variant}_{metric}'}"] = value
    return out


def _deltas(metrics: dict[str, float], flat: dict[str, float], other: str, suffix: str, sign: int) -> None:
    for key in flat:
        if key.startswith("_") or key.endswith("_stderr"):
            continue
        task, metric = key.split(".", 1)
        a, b = metrics.get(f"eval.{task}.{metric}"), metrics.get(f"eval.{task}.{other}_{metric}")
        if a is None or b is None:
            continue
        lower_better = "perplexity" in metric or "bits_per_byte" in metric
        d = (b - a) if lower_better else (a - b)  # positive = the adapter is better
        metrics[f"eval.{task}.{metric}_{suffix}"] = sign * d


def run(ctx: Context) -> StageOutput:
    from peft import PeftModel

    from harness import models
    from harness.stages.train import _free

    s = ctx.case.settings
    out = StageOutput()
    tokenizer = ctx.shared.get("tokenizer") or models.load_tokenizer(ctx.source)
    adapter = ctx.shared["adapter"]

    base_flat, cached = base_scores(ctx, tokenizer)
    out.metrics.update(_prefixed(base_flat, "base"))
    out.metrics["eval.base_s"] = 0.0 if cached else base_flat["_seconds"]

    base = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device)
    model = PeftModel.from_pretrained(base, adapter)  # HFLM ignores peft= for a model object: wrap it here
    model.eval()
    flat, seconds = score(model, tokenizer, ctx)
    out.metrics.update(_prefixed(flat, "adapter"))
    out.metrics["eval.adapter_s"] = seconds
    _deltas(out.metrics, flat, "base", "gain", +1)

    if s.merge:
        t = time.perf_counter()
        # for a 4-bit base peft dequantizes, adds the update and requantizes: the naive merge
        merged = model.merge_and_unload()
        merge_s = time.perf_counter() - t
        mflat, seconds = score(merged, tokenizer, ctx)
        out.metrics.update(_prefixed(mflat, "merged"))
        out.metrics["eval.merge_s"] = merge_s
        out.metrics["eval.merged_s"] = seconds
        _deltas(out.metrics, flat, "merged", "merge_delta", -1)
        del merged
    del model, base
    _free(ctx.device)
    return out

