"""Model sources (synthetic presets, local folders, hub ids), locally trained tokenizers, and loading per method."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import methods, presets
from harness.matrix import Case

# Synthetic presets up to this size get a real 16-bit checkpoint on disk; larger shapes are built on the GPU.
MAX_MATERIALIZED_PARAMS = 2_000_000_000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass
class Source:
    """A model made ready for the stages: a 16-bit checkpoint folder (or none, for shapes built on the device)."""

    checkpoint: Path | None  # HF folder with config + safetensors, loadable with from_pretrained
    tokenizer: Path | None  # folder loadable with AutoTokenizer.from_pretrained
    preset: Any | None  # harness.presets.Preset for synthetic sources, else None
    info: dict[str, Any] = field(default_factory=dict)  # source, preset, parameter counts, hash


def cache_dir() -> Path:
    """Where synthetic checkpoints and tokenizers are kept between runs (``QLORA_HARNESS_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-harness"
    return Path(os.environ.get("QLORA_HARNESS_CACHE", default))


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


FULL_HASH_BYTES = 4 * 2**30  # checkpoints up to this size are hashed whole; larger ones by head and tail


def _fingerprint(folder: Path, tokenizer: Path | None = None) -> str:
    """A content hash of a checkpoint (every byte of its tensors and config) and of its tokenizer's files.

    Above ``FULL_HASH_BYTES`` (hub checkpoints of billions of parameters) each file contributes its size and
    first and last MiB, and the hash says so with a ``p:`` prefix.
    """
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json"))
    if tokenizer is not None:
        files += sorted(f for f in Path(tokenizer).glob("*") if f.is_file())
    full = sum(f.stat().st_size for f in files) <= FULL_HASH_BYTES
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if full:
                for block in iter(lambda: fh.read(2**24), b""):
                    h.update(block)
            else:
                h.update(fh.read(2**20))
                fh.seek(max(0, size - 2**20))
                h.update(fh.read(2**20))
    return ("" if full else "p:") + h.hexdigest()[:16]


def _synthetic(case: Case) -> Source:
    import torch
    from filelock import FileLock

    spec = case.model
    preset = presets.PRESETS[spec.preset]
    corpus = ([case.data.train] + list(case.data.tokenizer_corpus)) if case.data else []
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
        "fingerprint": _fingerprint(checkpoint, folder / "tokenizer" if corpus else None) if checkpoint else key,
    }
    return Source(checkpoint, folder / "tokenizer" if corpus else None, preset, info)


def prepare(case: Case) -> Source:
    """Make the case's model ready: build (or reuse) a synthetic checkpoint, or point at a local / hub one."""
    spec = case.model
    if spec.source == "synthetic":
        return _synthetic(case)
    if spec.source == "local":
        folder = Path(spec.path)
        return Source(folder, folder, None, {"source": "local", "path": str(folder),
                                             "fingerprint": _fingerprint(folder)})
    from huggingface_hub import snapshot_download

    # Uses the local cache when offline (HF_HUB_OFFLINE=1) and downloads when the hub is reachable.
    folder = Path(snapshot_download(spec.hub_id, revision=spec.revision,
                                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    return Source(folder, folder, None, {"source": "hub", "hub_id": spec.hub_id, "revision": spec.revision,
                                         "fingerprint": _fingerprint(folder)})


def load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.tokenizer or source.checkpoint)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the QLoRA tutorials' convention
    return tok


def load_base(source: Source, method_name: str, compute_dtype: str, quant_storage: str, device: str):
    """The base as the method holds it (``from_pretrained`` with the method's config, or built on the device)."""
    from transformers import AutoModelForCausalLM

    if source.checkpoint is None:
        return build_on_device(source, method_name, compute_dtype, device)
    method = methods.get(method_name)
    kwargs: dict[str, Any] = method.from_pretrained_kwargs(compute_dtype, quant_storage)
    kwargs["device_map"] = device_map(device)
    model = AutoModelForCausalLM.from_pretrained(source.checkpoint, **kwargs)
    source.info["device_map"] = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values()})
    return model


def device_map(device: str):
    """One GPU when one is visible; accelerate's ``auto`` placement over several (the record says which)."""
    if device != "cuda":
        return {"": "cpu"}
    import torch

    return "auto" if torch.cuda.device_count() > 1 else {"": 0}


def build_on_device(source: Source, method_name: str, compute_dtype: str, device: str, seed: int = 0):
    """A synthetic preset built straight on the device, one linear at a time, in the method's stored form.

    No full 16-bit copy exists in host memory or on disk, so a 70B-shaped QLoRA base needs only its 4-bit
    bytes. Weights are N(0, initializer_range) from a seeded generator: the same weights on every build.
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    preset, method = source.preset, methods.get(method_name)
    config = preset.hf_config(num_layers=source.info.get("num_layers"))
    dtype = methods.torch_dtype(compute_dtype)
    target = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=target).manual_seed(seed)
    std = config.initializer_range

    def rand(*shape):
        return torch.empty(*shape, device=target, dtype=dtype).normal_(0.0, std, generator=gen)

    for _parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or name == "lm_head":
                continue
            weight = rand(child.out_features, child.in_features)
            layer = method.build_linear(child, weight, compute_dtype, target)
            if layer is None:  # kept 16-bit: every method's base is drawn from the same sequence of numbers
                set_module_tensor_to_device(child, "weight", target, value=weight)
            else:
                setattr(parent, name, layer)
            del weight  # only the stored copy stays
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":  # embeddings, norms, lm_head
            value = torch.ones(param.shape, dtype=dtype, device=target) if "norm" in name else rand(*param.shape)
            set_module_tensor_to_device(model, name, target, value=value)
    for name, buf in list(model.named_buffers()):
        if buf.device != target:
            set_module_tensor_to_device(model, name, target, value=buf.to(target))
    method.mark_built(model, compute_dtype)
    model.hf_device_map = {"": target.index if target.type == "cuda" else "cpu"}
    source.info["device_map"] = [str(target)]  # built on one device: multi-GPU placement is for checkpoints
    return model
