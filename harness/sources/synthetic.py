"""Synthetic presets: real architecture shapes with seeded random weights, a tokenizer trained on the suite's data."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import presets
from harness.sources.base import ModelSource, Source, cache_dir, fingerprint

if TYPE_CHECKING:
    from harness.matrix import Case

# Synthetic presets up to this size get a real 16-bit checkpoint on disk; larger shapes are built on the GPU.
MAX_MATERIALIZED_PARAMS = 2_000_000_000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def _corpus_texts(paths: list[str]):
    """Every string field of every JSONL row of the given files (text, questions, choices...)."""
    for p in paths:
        with open(p) as fh:
            for line in fh:
                if line.strip():
                    yield from _strings(json.loads(line))


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _digest(paths: list[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def train_tokenizer(corpus: list[str], vocab_size: int, out: Path):
    """A byte-level BPE tokenizer trained here on the suite's own data, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_texts(corpus), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return fast


@contextlib.contextmanager
def deterministic_torch(seed: int):
    """One CPU thread, deterministic kernels and every RNG seeded, restored on exit.

    The thread count decides how matmuls and reductions split their sums: 8 threads gave a different
    pretrained base than 1 or 2 after 10 steps, so a machine with more cores rebuilt a different base.
    """
    import random

    import numpy as np
    import torch

    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def pretrain(model, tokenizer, path: str, steps: int, seed: int, batch_size: int = 16, max_length: int = 64,
             lr: float = 2e-3) -> list[float]:
    """A short full-parameter pretraining of a small synthetic model on the given JSONL's ``text`` rows.

    Bit for bit reproducible on any machine of the same kind: run it inside ``deterministic_torch``.
    """
    import random

    import torch
    from rich.progress import Progress

    texts = [json.loads(line)["text"] + tokenizer.eos_token for line in open(path) if line.strip()]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)  # one fixed kernel path
    model.train()
    losses = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"pretraining the synthetic base on {Path(path).name}", total=steps)
        for _ in range(steps):
            enc = tokenizer(rng.sample(texts, min(batch_size, len(texts))), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.advance(task)
    model.eval()
    return losses


class Synthetic(ModelSource):
    """A preset's architecture with seeded random weights (optionally pretrained briefly on the suite's text)."""

    name = "synthetic"
    requires = ("preset",)
    path_fields = ("pretrain",)

    def check(self, spec) -> None:
        super().check(spec)
        if spec.preset not in presets.PRESETS:
            raise ValueError(f"unknown preset {spec.preset!r} (expected one of {', '.join(presets.PRESETS)})")

    def check_files(self, spec, base: Path):
        if spec.pretrain is not None and not (base / spec.pretrain).is_file():
            return "model.pretrain", f"data file not found: {base / spec.pretrain}"
        return None

    def prepare(self, case: Case) -> Source:
        return _synthetic(case)


def _synthetic(case: Case) -> Source:
    import torch
    from filelock import FileLock

    spec = case.model
    preset = presets.PRESETS[spec.preset]
    from harness import data

    corpus = (data.corpus_files(case.data) + list(case.data.tokenizer_corpus)) if case.data else []
    if spec.pretrain:
        corpus.append(spec.pretrain)
    key = _digest(corpus, f"{preset}-{spec.num_layers}-{spec.pretrain_steps}-{case.settings.seed}-v2")
    folder = cache_dir() / "synthetic" / f"{preset.name}-{key}"
    counts = presets.param_count(preset, num_layers=spec.num_layers)
    materialize = counts["total"] <= MAX_MATERIALIZED_PARAMS
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # xdist workers share the cache: one builds, the others wait
        if not (folder / "done").exists():
            tok_dir = folder / "tokenizer"
            if corpus:
                train_tokenizer(corpus, preset.vocab_size, tok_dir)
            if materialize:
                from transformers import AutoModelForCausalLM

                config = preset.hf_config(num_layers=spec.num_layers)
                with deterministic_torch(case.settings.seed):  # the same base on every machine of this kind
                    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                    if spec.pretrain:
                        from harness.models import load_tokenizer

                        tokenizer = load_tokenizer(Source(None, tok_dir, preset))
                        pretrain(model, tokenizer, spec.pretrain, spec.pretrain_steps, case.settings.seed)
                # fp32 on disk: the 16-bit base is then a rounding of it, and the quant stage has a true floor
                model.save_pretrained(folder / "checkpoint")
            (folder / "done").write_text("ok\n")
    checkpoint = folder / "checkpoint" if materialize else None
    info = {
        "source": "synthetic",
        "preset": preset.name,
        "shape_from": preset.source,
        "num_layers": spec.num_layers or preset.num_hidden_layers,
        "params": counts,
        "fingerprint": fingerprint(checkpoint, folder / "tokenizer" if corpus else None) if checkpoint else key,
    }
    return Source(checkpoint, folder / "tokenizer" if corpus else None, preset, info)


SOURCES = (Synthetic(),)
