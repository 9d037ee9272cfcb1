"""The eval stage: lm-eval scores of the untrained base, the adapter, and the adapter merged into its base.

Scores are float32 log-likelihoods (lm-eval's ``softmax_dtype``; in bf16 a document's log-likelihood lands on
a grid of 2). The merge goes into a freshly loaded base that has never run a forward: on the CPU a 4-bit
linear repacks its weight in place on its first no-grad forward, and a merge into that weight would read
garbage. The merged model's fidelity to the unmerged adapter is measured on held-out text.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from harness import methods
from harness.metrics import EVAL_TASKS_TABLE, merged_variant
from harness.stages import Context, Inputs, StageOutput, free, sync

# lm-eval builders of local data files, by suffix (a registered task pointed at a local copy reads it with these)
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _absolute_files(cfg: dict, folder: Path) -> None:
    """lm-eval resolves data_files from the working directory, not from the task file: make them absolute."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    if isinstance(files, dict):
        for split, rel in files.items():
            files[split] = str((folder / rel).resolve())


def _first(n: int, process=None):
    """A task's ``process_docs`` that keeps the first ``n`` documents (after the task's own processing)."""

    def keep(docs):
        docs = process(docs) if process is not None else docs
        return docs.select(range(min(n, len(docs))))

    return keep


def heldout_configs(ctx: Context, tokenizer, names: list[str]) -> dict[str, dict]:
    """lm-eval configs scoring the data's held-out split, written at run time (no YAML from the user):
    ``heldout_text`` bits per byte of each rendered row; ``heldout_answers`` the log-likelihood of each answer
    given its prompt (perplexity) and whether greedy decoding gives the whole answer (acc, an exact match)."""
    from harness import data

    if not any(n in data.HELDOUT_TASKS for n in names):
        return {}
    spec = ctx.case.data
    _, heldout, fmt = data.load(spec)
    data.apply_template(spec, tokenizer, fmt)
    rows = data.rendered(heldout, tokenizer)
    file = ctx.work_dir / "heldout.jsonl"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(file.resolve())}},
              "test_split": "test", "metadata": {"version": 1.0}}
    return {
        "heldout_text": {"task": "heldout_text", **common, "output_type": "loglikelihood_rolling",
                         "doc_to_text": "", "doc_to_target": "{{text}}",
                         "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]},
        "heldout_answers": {"task": "heldout_answers", **common, "output_type": "loglikelihood",
                            "doc_to_text": lambda doc: doc["prompt"], "doc_to_target": lambda doc: doc["completion"],
                            "target_delimiter": "", "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    }


def task_config(task, dirs: list[Path], generated: dict[str, dict]) -> dict:
    """The full lm-eval config of one eval task, with the suite's options applied: the data's held-out split
    (generated), a YAML of the user's folder or the shipped ``tasks/``, else lm-eval's registered task; ``data_files``
    points it at local files, ``num_fewshot`` and ``limit`` apply to it alone."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from harness.spec import installed_task_path

    if task.name in generated:
        cfg = dict(generated[task.name])
    else:
        own = next((d / f"{task.name}.yaml" for d in dirs if (d / f"{task.name}.yaml").is_file()), None)
        path = own or installed_task_path(task.name)
        if path is None:
            raise ValueError(f"lm-eval task {task.name!r} is a group or tag: name its tasks one by one")
        cfg = load_yaml(path, resolve_func=True)  # includes and !function resolved, relative to the YAML file
        _absolute_files(cfg, Path(path).parent)
        for key in ("tag", "group"):
            cfg.pop(key, None)
    if task.data_files:  # a local copy in the task's own row format
        suffix = Path(next(iter(task.data_files.values()))).suffix.lower()
        cfg["dataset_path"] = _BUILDERS.get(suffix, "json")
        cfg["dataset_name"] = None
        cfg["dataset_kwargs"] = {"data_files": dict(task.data_files)}
        for split in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if cfg.get(split) is not None and cfg[split] not in task.data_files:
                cfg[split] = None  # a split the local copy does not have
    if task.num_fewshot is not None:
        cfg["num_fewshot"] = task.num_fewshot
    if task.limit is not None:
        cfg["process_docs"] = _first(task.limit, cfg.get("process_docs"))
    return cfg


def score(model, tokenizer, ctx: Context) -> tuple[dict[str, float], float, list[dict]]:
    """lm-eval ``simple_evaluate`` over an ``HFLM`` wrapping an already built model (adapter applied by us).

    Every task goes in as its full config (``task_config``), so lm-eval's index of its own tasks is never built
    (``include_defaults=False``). Returns the aggregate scores, the seconds taken, and one row per eval item
    (harness.stats.item_table) for the paired bootstrap between methods.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.stats import item_table

    s = ctx.case.settings
    ev = ctx.case.eval
    t = time.perf_counter()
    dirs = ([Path(ev.task_dir)] if ev.task_dir else []) + [Path(ctx.case.task_dir)]
    generated = heldout_configs(ctx, tokenizer, ev.names)
    configs = []
    for task in ev.tasks:
        cfg = task_config(task, dirs, generated)
        if task.num_fewshot is None and cfg.get("num_fewshot") is None:
            cfg["num_fewshot"] = ev.num_fewshot
        configs.append(cfg)
    # in the case's work folder: a worker killed during eval leaves it inside the run, not in /tmp
    with tempfile.TemporaryDirectory(prefix="harness-tasks-", dir=ctx.work_dir) as tmp:
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.eval_batch_size, softmax_dtype="float32")
        results = simple_evaluate(
            model=lm,
            tasks=configs,
            num_fewshot=None,  # each config says its own
            limit=s.eval_limit,
            task_manager=manager,
            apply_chat_template=ev.apply_chat_template,
            fewshot_as_multiturn=ev.fewshot_as_multiturn,
            log_samples=True,  # per-item results: paired differences between methods need them
            bootstrap_iters=1000,
            random_seed=s.seed,
            verbosity="ERROR",
            system_instruction=ev.system_instruction,
        )
    flat: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value == value:  # lm-eval reports NaN stderr for single samples: leave it out
                flat[f"{task}.{name}"] = float(value)
    return flat, time.perf_counter() - t, item_table(results.get("samples") or {})


def task_table(ev, flat: dict[str, float]) -> list[dict]:
    """Each eval task's main metric (its bits_per_byte, else acc, else its first score) and which one is the
    suite's primary quality metric (``eval.primary``; default: the first task's main metric), for the headline
    and report to pick their quality columns from the suite's own tasks."""
    rows = []
    for task in ev.names:
        names = [k.split(".", 1)[1] for k in flat if k.startswith(f"{task}.") and not k.endswith("_stderr")]
        main = next((m for m in ("bits_per_byte", "acc") if m in names), names[0] if names else None)
        if ev.primary is not None and ev.primary.split(".")[1] == task:
            main = ev.primary.split(".", 2)[2]
        if main is not None:
            rows.append({"task": task, "metric": main, "primary": False})
    if rows:
        want = ev.primary or metric_name(rows[0])
        for row in rows:
            row["primary"] = metric_name(row) == want
    return rows


def metric_name(row: dict) -> str:
    return f"eval.{row['task']}.{row['metric']}"


def _base_key(ctx: Context) -> str:
    s = ctx.case.settings
    ev = ctx.case.eval
    tasks = sorted(t.model_dump_json() for t in ev.tasks)
    parts = [ctx.source.info.get("fingerprint"), s.method, s.compute_dtype, s.quant_storage, tasks, ev.num_fewshot,
             s.eval_limit, s.seed, ev.apply_chat_template, ev.fewshot_as_multiturn, ev.system_instruction,
             ctx.case.data.model_dump_json() if ctx.case.data else None]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def base_scores(ctx: Context, tokenizer) -> tuple[dict[str, float], bool, list[dict]]:
    """Scores of the untrained base, computed once per model, quantization and tasks within a run."""
    from filelock import FileLock

    from harness import models

    s = ctx.case.settings
    cache = ctx.run_dir / "cache" / f"base-{_base_key(ctx)}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if cache.exists():
            cached = json.loads(cache.read_text())
            return cached["scores"], True, cached["items"]
        base = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device, blocksize=s.blocksize)
        flat, seconds, items = score(base, tokenizer, ctx)
        flat["_seconds"] = seconds
        cache.write_text(json.dumps({"scores": flat, "items": items}, indent=1))
        del base
        return flat, False, items


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


def probe_texts(ctx: Context, limit: int = 32) -> list[str]:
    """Held-out text for merge fidelity: the suite's ``eval.heldout`` JSONL (``text`` rows), first ``limit``."""
    path = ctx.case.eval.heldout
    if not path:
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows if r.get("text")][:limit]


def next_token_logprobs(model, tokenizer, texts: list[str], device: str, max_length: int = 128):
    """float32 log-probabilities of the next token at every real position of ``texts``: (tokens, vocab)."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.no_grad():
        logits = model(**enc).logits.float()
    mask = enc["attention_mask"].bool()
    return torch.log_softmax(logits[mask], dim=-1)


def agreement(reference, other) -> dict[str, float]:
    """KL(reference ‖ other) per token (nats), top-1 agreement, and max |Δ log p| of two next-token tables."""
    import torch

    # KL >= 0; float32 rounding leaves identical distributions at about -1e-8 per token
    kl = torch.nn.functional.kl_div(other, reference, log_target=True, reduction="none").sum(-1).clamp_min(0)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
        "max_abs_logprob_diff": float((reference - other).abs().max()),
    }


def codes_changed(before: dict, after: dict) -> tuple[int, int]:
    """(codes that differ, codes compared) between two ``Method.quantized_codes`` snapshots."""
    changed = total = 0
    for name, a in before.items():
        if name in after:  # merge_and_unload hands back the base with its own module names
            changed += int((a != after[name]).sum())
            total += a.numel()
    return changed, total


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _load_saved(folder: Path, ctx: Context, adapter: Path | None):
    from transformers import AutoModelForCausalLM

    from harness import models

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=methods.torch_dtype(ctx.case.settings.compute_dtype),
                                                 device_map=models.device_map(ctx.device))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model


def merge_fresh(ctx: Context, adapter: Path, strategy: str = "requantize"):
    """The adapter merged by ``strategy`` into freshly loaded bases (no forward has run), and the codes it changed."""
    from harness import models
    from harness.methods import merge

    s = ctx.case.settings
    method = methods.get(s.method)
    before: dict = {}

    def load(name: str):
        base = models.load_base(ctx.source, name, s.compute_dtype, s.quant_storage, ctx.device, blocksize=s.blocksize)
        if name == s.method and not before:
            before.update(method.quantized_codes(base))
        return base

    t = time.perf_counter()
    merged = merge.build(strategy, s.method, adapter, load, s.compute_dtype)
    seconds = time.perf_counter() - t
    return merged, seconds, codes_changed(before, method.quantized_codes(merged))


def on_disk(ctx: Context, model, strategy: str, adapter: Path) -> dict[str, float]:
    """Size of the form as saved (``save_pretrained``; unmerged: the base plus the adapter) and its load time; the
    saved folder is removed again (a 16-bit merge of a 7B model is 13 GB a case; the adapter stays)."""
    import shutil

    from harness import models

    s = ctx.case.settings
    folder = ctx.work_dir / f"model-{strategy}"
    if strategy == "none":  # what the tutorials ship: the base as loaded, the adapter beside it
        base = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device, blocksize=s.blocksize)
        base.save_pretrained(folder, safe_serialization=True)
        del base
        size = folder_bytes(folder) + sum(f.stat().st_size for f in Path(adapter).glob("*.safetensors"))
    else:
        model.save_pretrained(folder, safe_serialization=True)
        size = folder_bytes(folder)
    t = time.perf_counter()
    loaded = _load_saved(folder, ctx, adapter if strategy == "none" else None)
    sync(ctx.device)
    load_s = time.perf_counter() - t
    del loaded
    free(ctx.device)
    shutil.rmtree(folder, ignore_errors=True)
    return {f"eval.merge.{strategy}.size_bytes": float(size), f"eval.merge.{strategy}.load_s": load_s}


def _merged(ctx: Context, strategy: str, adapter: Path, tokenizer, texts, reference, flat,
            scored: dict[str, float]) -> tuple[dict[str, float], str, list[dict]]:
    """One merge strategy: merge time, codes changed, size on disk, load time, fidelity and scores; the
    variant's name (``merged``, ``merged_dequantize``, …) and its per-item rows."""
    m: dict[str, float] = {}
    merged, merge_s, (changed, total) = merge_fresh(ctx, adapter, strategy)
    key = f"eval.merge.{strategy}"
    m[f"{key}.merge_s"] = merge_s
    if total:
        m[f"{key}.codes_changed_pct"] = 100.0 * changed / total
    m.update(on_disk(ctx, merged, strategy, adapter))  # saved before any forward (a 4-bit CPU forward repacks)
    if reference is not None:
        other = next_token_logprobs(merged, tokenizer, texts, ctx.device)
        m.update({f"{key}.{k}": v for k, v in agreement(reference, other).items()})
    name = merged_variant(strategy)
    items: list[dict] = []
    if ctx.case.settings.score_merged:
        mflat, seconds, items = score(merged, tokenizer, ctx)
        m.update(_prefixed(mflat, name))
        m[f"eval.{name}_s"] = seconds
        suffix = "merge_delta" if strategy == "requantize" else f"{strategy}_merge_delta"
        both = {**scored, **m}  # the unmerged adapter's scores beside the merged form's
        _deltas(both, flat, name, suffix, -1)
        m.update({k: v for k, v in both.items() if k.endswith(f"_{suffix}")})
    del merged
    free(ctx.device)
    return m, name, items


def run(ctx: Context, inputs: Inputs) -> StageOutput:
    from peft import PeftModel

    from harness import models

    trained = inputs.trained("eval")
    s = ctx.case.settings
    out = StageOutput()
    tokenizer = trained.tokenizer or models.load_tokenizer(ctx.source)
    adapter = trained.path

    base_flat, cached, base_items = base_scores(ctx, tokenizer)
    out.tables["eval.items.base"] = base_items
    out.metrics.update(_prefixed(base_flat, "base"))
    out.metrics["eval.base_s"] = 0.0 if cached else base_flat["_seconds"]

    base = models.load_base(ctx.source, s.method, s.compute_dtype, s.quant_storage, ctx.device, blocksize=s.blocksize)
    model = PeftModel.from_pretrained(base, adapter)  # HFLM ignores peft= for a model object: wrap it here
    model.eval()
    flat, seconds, items = score(model, tokenizer, ctx)
    out.tables["eval.items.adapter"] = items
    out.tables[EVAL_TASKS_TABLE] = task_table(ctx.case.eval, flat)
    out.metrics.update(_prefixed(flat, "adapter"))
    out.metrics["eval.adapter_s"] = seconds
    _deltas(out.metrics, flat, "base", "gain", +1)
    texts = probe_texts(ctx) if s.merge else []
    reference = next_token_logprobs(model, tokenizer, texts, ctx.device) if texts else None
    del model, base
    free(ctx.device)

    if s.merge:
        from harness.methods import merge

        strategies = merge.applicable(s.method, merge.parse(s.merge_strategy))
        out.metrics.update(on_disk(ctx, None, "none", adapter))
        for strategy in strategies:
            m, name, items = _merged(ctx, strategy, adapter, tokenizer, texts, reference, flat, out.metrics)
            out.metrics.update(m)
            if items:
                out.tables[f"eval.items.{name}"] = items  # per-item rows for the paired bootstrap
    free(ctx.device)
    return out
