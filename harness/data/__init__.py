"""Training data: a source (local files or folder, hub id) read by ``datasets``, a format mapped onto trl's, a chat
template, and a held-out split. ``check`` runs at collection (column names only, no model); ``load`` in the worker.

    source (sources.py) ──datasets──▶ splits ──columns──▶ format (formats/) ──▶ trl rows (text | messages |
    prompt/completion) ──split──▶ train, held-out ──▶ SFTTrainer (train stage), heldout_* lm-eval tasks (eval)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.data import formats
from harness.data.sources import DataError, source_for

HELDOUT_TASKS = ("heldout_text", "heldout_answers")  # eval task names scored on the data's held-out split


def fmt_of(spec, columns: list[str] | None = None) -> formats.Format:
    if spec.format != "auto":
        return formats.get(spec.format)
    # the fields the columns hold after the map, and those the map names (a mapped column missing is said by check)
    renamed = {_renamed(spec).get(c, c) for c in (columns or [])} | set(spec.columns)
    found = formats.detect(renamed)
    if found is None:
        raise DataError(f"no data format fits the columns {', '.join(columns or []) or '(none)'}: name data.format "
                        f"({', '.join(formats.FORMATS)}) and map its fields with data.columns")
    return found


def _renamed(spec) -> dict[str, str]:
    """The file's column -> the format's field (``data.columns`` maps the other way round)."""
    return {col: field for field, col in spec.columns.items()}


def chat_template_file(spec) -> str | None:
    t = spec.chat_template
    return t if t not in (None, "model", "none") else None


def check(spec) -> formats.Format:
    """Collection: the source exists and its columns hold the format's fields (one DataError line if not)."""
    source = source_for(spec)
    source.check(spec)
    cols = source.columns(spec)
    where = source.where(spec)
    if spec.split not in cols and cols:
        raise DataError(f"{where}: no split {spec.split!r} (splits: {', '.join(cols)}): set data.split")
    if spec.eval_split is not None and spec.eval_split not in cols:
        raise DataError(f"{where}: no split {spec.eval_split!r} for data.eval_split (splits: {', '.join(cols)})")
    have = cols.get(spec.split, [])
    fmt = fmt_of(spec, have)
    for field in fmt.fields:
        column = spec.columns.get(field, field)
        if have and column not in have:
            mapped = f" (data.columns maps {field!r} to it)" if field in spec.columns else ""
            raise DataError(f"{where}: no column {column!r}{mapped} for the {fmt.name} format; the rows have "
                            f"{', '.join(have)}: map them with data.columns, e.g. {{{field}: {have[0]}}}")
    for field in spec.columns:
        if field not in fmt.fields:
            raise DataError(f"data.columns: {field!r} is not a field of the {fmt.name} format "
                            f"({', '.join(fmt.fields)})")
    template = chat_template_file(spec)
    if template is not None:
        if not Path(template).is_file():
            raise DataError(f"chat template file not found: {template}")
        if spec.loss == "completion" and fmt.name == "messages" and "generation" not in Path(template).read_text():
            raise DataError(f"{template}: loss on assistant turns (trl's assistant_only_loss) needs "
                            "{% generation %} … {% endgeneration %} around the assistant's content")
    if spec.chat_template == "none" and fmt.name == "messages":
        raise DataError("data.chat_template: none, but messages rows need a chat template to become text")
    return fmt


def uses_chat(spec, fmt: formats.Format) -> bool:
    """Whether rows are rendered with a chat template: conversational formats always, qa and prompt-completion
    unless ``chat_template: none``."""
    if fmt.name == "text":
        return False
    return fmt.conversational or spec.chat_template != "none"


def apply_template(spec, tokenizer, fmt: formats.Format) -> None:
    """Set the template file on the tokenizer (a base model without one); refuse rows needing a missing template."""
    path = chat_template_file(spec)
    if path is not None:
        tokenizer.chat_template = Path(path).read_text()
    if uses_chat(spec, fmt) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template: give data.chat_template a Jinja file, or "
                        "data.chat_template: none for plain prompt/completion text")


def corpus_files(spec) -> list[str]:
    """The source's local JSON/JSONL files (a synthetic model's tokenizer is trained on their strings)."""
    if spec.hub is not None:
        return []
    files = [f for fs in (spec.files or {spec.split: [spec.train]}).values() for f in ([fs] if isinstance(fs, str) else fs)]
    return [f for f in files if Path(f).suffix.lower() in (".json", ".jsonl") and Path(f).is_file()]


def load(spec) -> tuple[Any, Any | None, formats.Format]:
    """(training rows, held-out rows or None, format) as ``datasets.Dataset`` in trl's format."""
    source = source_for(spec)
    splits = source.load(spec)
    if spec.split not in splits:
        raise DataError(f"{source.where(spec)}: no split {spec.split!r} (splits: {', '.join(splits)})")
    train = splits[spec.split]
    fmt = fmt_of(spec, list(train.column_names))
    held = None
    if spec.eval_split is not None:
        held = splits[spec.eval_split]
    elif spec.test_size is not None:
        size = int(spec.test_size) if spec.test_size >= 1 else spec.test_size
        parts = train.train_test_split(test_size=size, seed=spec.split_seed)
        train, held = parts["train"], parts["test"]
    if spec.max_rows is not None:
        train = train.select(range(min(spec.max_rows, len(train))))
    return _shaped(train, spec, fmt), (_shaped(held, spec, fmt) if held is not None else None), fmt


def _shaped(ds, spec, fmt: formats.Format):
    rename = {c: f for c, f in _renamed(spec).items() if c in ds.column_names and c != f}
    if rename:
        ds = ds.rename_columns(rename)
    chat = uses_chat(spec, fmt)
    return ds.map(lambda row: fmt.to_trl(row, spec.system_prompt, chat), remove_columns=ds.column_names)


def rendered(rows, tokenizer) -> list[dict[str, str]]:
    """Held-out rows as text for scoring: ``prompt`` and ``completion`` strings (answers formats) and ``text``,
    rendered with the tokenizer's chat template where the rows are conversational (as trl renders them)."""
    out = []
    for r in rows:
        if "text" in r:
            out.append({"text": r["text"]})
        elif "messages" in r:
            out.append({"text": tokenizer.apply_chat_template(r["messages"], tokenize=False)})
        else:
            prompt, completion = r["prompt"], r["completion"]
            if isinstance(prompt, list):
                p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
                if not full.startswith(p):
                    raise DataError("the chat template renders the prompt differently inside the conversation: "
                                    "its completion cannot be scored apart")
                prompt, completion = p, full[len(p):]
            out.append({"prompt": prompt, "completion": completion, "text": prompt + completion})
    return out


__all__ = ["HELDOUT_TASKS", "DataError", "apply_template", "check", "formats", "load", "rendered", "uses_chat"]
