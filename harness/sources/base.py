"""The contract every model source implements, the value it hands the stages, and what sources share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness import cache as harness_cache  # imported before a worker's memory cap

if TYPE_CHECKING:  # the registry is read by the suite schema, which never imports torch
    from harness.matrix import Case
    from harness.spec import ModelSpec

FULL_HASH_BYTES = 4 * 2**30  # checkpoints up to this size are hashed whole; larger ones by head and tail


class SourceError(Exception):
    """A model a user named cannot be had (not cached, not reachable, a bad file): ``str()`` is one line."""


@dataclass
class Source:
    """A model made ready for the stages: a checkpoint folder (or none, for shapes built on the device)."""

    checkpoint: Path | None  # HF folder with config + safetensors, loadable with from_pretrained
    tokenizer: Path | None  # folder loadable with AutoTokenizer.from_pretrained
    preset: Any | None  # harness.presets.Preset for synthetic sources, else None
    info: dict[str, Any] = field(default_factory=dict)  # what the record's ``model`` says: source, hash, ...
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # from_pretrained options the suite set


def cache_dir() -> Path:
    """Where built, fetched and converted checkpoints are kept between runs (harness.cache: ``QLORA_HARNESS_CACHE``)."""
    return harness_cache.cache_dir()


def fingerprint(folder: Path, tokenizer: Path | None = None) -> str:
    """A content hash of a checkpoint (every byte of its tensors and config) and of its tokenizer's files.

    Above ``FULL_HASH_BYTES`` (hub checkpoints of billions of parameters) each file contributes its size and
    first and last MiB, and the hash says so with a ``p:`` prefix. A tokenizer kept in the checkpoint's own
    folder counts each file once.
    """
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("config.json"))
    if tokenizer is not None:
        files += sorted(f for f in Path(tokenizer).glob("*") if f.is_file() and f not in files)
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


def sha256_file(path: Path) -> str:
    """The full sha256 of one file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**24), b""):
            h.update(block)
    return h.hexdigest()


class ModelSource:
    """One way of getting a model: how it is fetched, converted, cached and fingerprinted.

    A subclass sets ``name`` and ``requires`` and implements ``prepare``; it overrides ``check`` (the suite's
    fields, no I/O), ``check_files`` (at collection: files that must exist, before a worker starts), ``resolve``
    (paths relative to the suite made absolute) and ``network`` where the defaults do not hold. Heavy libraries
    are imported inside the hooks.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # ModelSpec fields that must be set, e.g. ("path",)
    path_fields: ClassVar[tuple[str, ...]] = ()  # ModelSpec fields that are paths relative to the suite file
    network: ClassVar[bool] = False  # its worker keeps the hub reachable (HF_HUB_OFFLINE unset)

    def check(self, spec: ModelSpec) -> None:
        """ValueError for a spec this source cannot use (the fields only; no file is read)."""
        for need in self.requires:
            if getattr(spec, need) is None:
                raise ValueError(f"source {self.name!r} needs '{need}'")

    def check_files(self, spec: ModelSpec, base: Path) -> tuple[str, str] | None:
        """(field, message) for a file the spec names that is missing, checked at collection; None when fine."""
        return None

    def resolve(self, spec: ModelSpec, base: Path) -> ModelSpec:
        """The spec with its ``path_fields`` absolute (resolved from the suite file's folder)."""
        update = {f: str((base / getattr(spec, f)).resolve()) for f in self.path_fields
                  if getattr(spec, f) is not None}
        return spec.model_copy(update=update) if update else spec

    def prepare(self, case: Case) -> Source:
        """Fetch, convert and cache what the case needs (once) and say where it is; SourceError if it cannot."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model source {self.name}>"
