"""The generate stage: how fast the fine-tuned model generates, unmerged (as the tutorials load it) and merged.

For every form of the case's adapter (``none``: the base as the method loads it plus the adapter; then each
merge strategy the case names, harness/methods/merge.py) and every batch size: greedy ``model.generate``
with fixed prompt and output lengths (``min_new_tokens == max_new_tokens``, KV cache on), one warm-up call,
then ``gen_repeats`` timed calls with the device synchronised, medians reported:

- time to first token: a call generating one token (prefill plus one decoding step's sampling);
- prefill tokens/s: batch × prompt tokens / time to first token;
- decode tokens/s: batch × (new tokens − 1) / (full call − time to first token);
- peak memory of the form (torch allocator on a GPU, process RSS on the CPU);
- the share of greedy outputs identical to the unmerged adapter's (and of tokens, position by position);
- the noise guard's verdict over each form's timed calls (``gen.<form>.timing_clean``, the reason in the
  ``gen.timing`` table): a busy host once slowed one form's batch-1 decode 20x while its batch-8 run was fine.

With ``eval.answers`` (trl conversational ``prompt`` rows), every form and the untrained base (``base``, as the
method loads it) also answer each prompt greedily, rendered with the tokenizer's chat template; the texts are
kept in the ``gen.answers`` table. A row's ``expect`` is a string the answer must contain: a canary taught in
training, so ``gen.<form>.canary_reproduced`` (the share of such rows answered with it) is 1 for an adapter
saved, reloaded and merged, and 0 where the adapter was silently not applied (and for the base).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

from harness.measure import memory, noise
from harness.metrics import GEN_ANSWERS_TABLE, GEN_TIMING_TABLE
from harness.stages import Context, Inputs, StageOutput, free, sync


def prompt_ids(ctx: Context, tokenizer, batch: int, length: int):
    """``batch`` prompts of exactly ``length`` tokens: consecutive windows of the held-out (else training) text."""
    import torch

    path = (ctx.case.eval.heldout if ctx.case.eval is not None else None) or ctx.case.data.train
    texts = [json.loads(line).get("text", "") for line in Path(path).read_text().splitlines() if line.strip()]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= batch * length:
            break
    if not stream:
        raise ValueError(f"{path}: no text to build generation prompts from")
    while len(stream) < batch * length:  # a short file: cycle it
        stream += stream
    return torch.tensor(stream[: batch * length]).view(batch, length)


def _generate(model, ids, new_tokens: int, pad_id: int, device: str):
    """Greedy generation of exactly ``new_tokens`` tokens; (seconds, generated ids)."""
    import torch

    ids = ids.to(device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                             pad_token_id=pad_id)
    sync(device)
    return time.perf_counter() - t, out[:, ids.shape[1]:].cpu()


def answer_rows(ctx: Context) -> list[dict]:
    """The suite's ``eval.answers`` rows (empty without one)."""
    path = ctx.case.eval.answers if ctx.case.eval is not None else None
    if not path:
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def greedy_answers(model, tokenizer, rows: list[dict], new_tokens: int, device: str) -> list[str]:
    """Each row's greedy answer (at most ``new_tokens``, stopping at the end of the turn), one prompt at a time."""
    import torch

    texts = []
    for row in rows:
        enc = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")
        ids = enc["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def answer_table(form: str, rows: list[dict], texts: list[str]) -> tuple[dict[str, float], list[dict]]:
    """The canary metric of one form (rows with ``expect``) and its answers as table rows."""
    table, hits, expected = [], 0, 0
    for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
        user = next((t["content"] for t in reversed(row["prompt"]) if t["role"] == "user"), "")
        entry = {"form": form, "prompt": i, "question": user, "answer": text}
        if row.get("expect"):
            expected += 1
            entry["expect"] = row["expect"]
            entry["reproduced"] = row["expect"] in text
            hits += entry["reproduced"]
        table.append(entry)
    metrics = {f"gen.{form}.canary_reproduced": hits / expected} if expected else {}
    return metrics, table


def time_form(model, prompts: dict[int, object], s, pad_id: int, device: str) -> tuple[dict[str, float], dict]:
    """Timings of one model at every batch size, and its greedy outputs per batch size."""
    metrics, outputs = {}, {}
    p, n = s.gen_prompt_tokens, s.gen_new_tokens
    for b, ids in prompts.items():
        _generate(model, ids, 2, pad_id, device)  # warm-up: kernels, caches, lazy weight layouts
        first, full = [], []
        for _ in range(s.gen_repeats):
            first.append(_generate(model, ids, 1, pad_id, device)[0])
            seconds, out = _generate(model, ids, n, pad_id, device)
            full.append(seconds)
            outputs.setdefault(b, out)
        ttft, total = statistics.median(first), statistics.median(full)
        decode_s = max(total - ttft, 1e-9)
        metrics.update({
            f"bs{b}.ttft_ms": ttft * 1e3,
            f"bs{b}.prefill_tokens_per_s": b * p / ttft,
            f"bs{b}.decode_tokens_per_s": b * (n - 1) / decode_s,
            f"bs{b}.tpot_ms": decode_s / (n - 1) * 1e3,  # time per output token while decoding
            f"bs{b}.total_ms": total * 1e3,
        })
    return metrics, outputs


def guarded_form(model, prompts: dict[int, object], s, pad_id: int, device: str, sampler=None):
    """``time_form`` under the noise guard: (timings, outputs, the guard's verdict on the host meanwhile)."""
    nv = getattr(sampler, "nvml", None)
    guard = noise.NoiseGuard(nvml=nv.nv if nv else None, handles=nv.handles if nv else ()).start()
    try:
        timings, outputs = time_form(model, prompts, s, pad_id, device)
    finally:
        guard.stop()
    return timings, outputs, guard.verdict()


def same_outputs(reference: dict, outputs: dict) -> tuple[float, float]:
    """(share of sequences identical to the reference's, share of tokens equal position by position)."""
    seqs = same = tokens = equal = 0
    for b, ref in reference.items():
        got = outputs[b]
        seqs += ref.shape[0]
        same += int((ref == got).all(dim=1).sum())
        tokens += ref.numel()
        equal += int((ref == got).sum())
    return same / seqs, equal / tokens


def run(ctx: Context, inputs: Inputs) -> StageOutput:
    from harness import methods, models
    from harness.methods import merge

    trained = inputs.trained("generate")
    s = ctx.case.settings
    out = StageOutput()
    tokenizer = trained.tokenizer or models.load_tokenizer(ctx.source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sizes = [int(b) for b in s.gen_batch_sizes.split(",")]
    prompts = {b: prompt_ids(ctx, tokenizer, b, s.gen_prompt_tokens) for b in sizes}
    forms = ("none", *merge.applicable(s.method, merge.parse(s.merge_strategy)))
    reference = None

    def load(name: str):
        return models.load_base(ctx.source, name, s.compute_dtype, s.quant_storage, ctx.device, blocksize=s.blocksize)

    rows = answer_rows(ctx)

    def keep_answers(form: str, model) -> None:
        if rows:
            m, table = answer_table(form, rows, greedy_answers(model, tokenizer, rows, s.gen_answer_tokens, ctx.device))
            out.metrics.update(m)
            out.tables.setdefault(GEN_ANSWERS_TABLE, []).extend(table)

    if rows:  # the untrained base as the method loads it: what the adapter's answers are read against
        base = load(s.method)
        keep_answers("base", base)
        del base

    for form in forms:
        free(ctx.device)
        memory.reset_torch_peaks()
        phase = f"generate-{form}"
        sampler = ctx.sampler
        with sampler.phase(phase) if sampler is not None else contextlib.nullcontext():
            t = time.perf_counter()
            model = merge.build(form, s.method, trained.path, load, s.compute_dtype)
            sync(ctx.device)
            build_s = time.perf_counter() - t
            timings, outputs, verdict = guarded_form(model, prompts, s, pad_id, ctx.device, sampler)
        key = f"gen.{form}"
        out.metrics.update(verdict.as_metrics(f"{key}."))
        out.tables.setdefault(GEN_TIMING_TABLE, []).append({"form": form, **verdict.as_env(), "device": ctx.device})
        out.metrics[f"{key}.build_s"] = build_s
        out.metrics.update({f"{key}.{k}": v for k, v in timings.items()})
        if sampler is not None:
            out.metrics.update(sampler.metrics(f"{key}.", phase))
        out.metrics.update(memory.torch_peaks(f"{key}."))
        if reference is None:
            reference = outputs
        else:
            seqs, toks = same_outputs(reference, outputs)
            out.metrics[f"{key}.identical_outputs"] = seqs
            out.metrics[f"{key}.token_agreement"] = toks
        keep_answers(form, model)  # after timing: the answers' generation is no part of the timed calls
        del model
    out.metrics["gen.prompt_tokens"] = float(s.gen_prompt_tokens)
    out.metrics["gen.new_tokens"] = float(s.gen_new_tokens)
    out.tables["gen.forms"] = [{"form": f, "label": merge.LABELS[f], "method": methods.get(s.method).label}
                               for f in forms]
    free(ctx.device)
    return out

