"""Model sources: where a case's base comes from, and how it is fetched, converted, cached and fingerprinted.

Adding a source (a GPTQ checkpoint, a torch.hub model, …) is one file in this folder:

1. Write ``harness/sources/<name>.py`` with a subclass of :class:`harness.sources.base.ModelSource` that sets
   ``name`` (and ``requires``, ``path_fields``, ``network``) and implements ``prepare`` (fetch, convert and cache
   once; a :class:`Source` whose ``info`` carries what the record must say, a ``fingerprint`` at least);
   override ``check`` and ``check_files`` for what collection can refuse before a worker starts.
2. End the file with ``SOURCES = (YourSource(),)``: the suite schema (``model.source``) and the worker know it.
3. Name it in a suite's ``model: {source: <name>, ...}``.

Every source gets the suite's loading options (``model.tokenizer``, ``attn_implementation``, ``dtype``) here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness import registry
from harness.sources.base import ModelSource, Source, SourceError, cache_dir, fingerprint

if TYPE_CHECKING:
    from harness.matrix import Case

__all__ = ["SOURCES", "ModelSource", "Source", "SourceError", "cache_dir", "fingerprint", "get", "names",
           "prepare"]


def _discover() -> dict[str, ModelSource]:
    return registry.discover(__name__, __path__, "SOURCES", "model source", skip=("base",))


SOURCES: dict[str, ModelSource] = _discover()


def get(name: str) -> ModelSource:
    """The registered source called ``name``; a ValueError listing the known ones otherwise."""
    return registry.lookup(SOURCES, name, "model source")


def names() -> list[str]:
    return list(SOURCES)


def tokenizer_is_path(value: str) -> bool:
    """A ``model.tokenizer`` that names a folder (``./tok``, ``../x``, ``/abs``) rather than a hub id."""
    return value.startswith((".", "/", "~")) or Path(value).is_absolute()


def prepare(case: Case) -> Source:
    """The case's model made ready by its source, with the suite's loading options applied."""
    spec = case.model
    source = get(spec.source).prepare(case)
    if spec.tokenizer is not None:
        if tokenizer_is_path(spec.tokenizer):
            source.tokenizer = Path(spec.tokenizer)
        else:
            from harness.sources import hub

            source.tokenizer = hub.snapshot(spec.tokenizer, None, hub.TOKENIZER_PATTERNS, "model.tokenizer")
        source.info["tokenizer"] = spec.tokenizer
        source.info["tokenizer_fingerprint"] = fingerprint(source.tokenizer, source.tokenizer)
    if spec.attn_implementation is not None:
        source.load_kwargs["attn_implementation"] = spec.attn_implementation
    if spec.dtype != "auto":
        source.load_kwargs["dtype"] = spec.dtype
    source.info.update({k: v for k, v in (("attn_implementation", spec.attn_implementation),
                                          ("dtype", spec.dtype)) if v is not None})
    return source


def needs_network(spec) -> bool:
    """Whether a case's worker keeps the hub reachable: a hub source, or a tokenizer named by hub id."""
    return get(spec.source).network or (spec.tokenizer is not None and not tokenizer_is_path(spec.tokenizer))
