"""Where rows come from: local files or a save_to_disk folder, or a hub dataset id, all read by ``datasets``.

A small registry: each source says whether it applies to a DataSpec, how it reads the column names cheaply (the
schema or the first rows, at collection, before any model is loaded) and how it loads a split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# file suffix -> the datasets builder that reads it
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class DataError(Exception):
    """A data source a user named that cannot be read as asked: ``str()`` is one line."""


def _is_saved(folder: Path) -> bool:
    """A ``save_to_disk`` folder (Dataset or DatasetDict)."""
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file() or (
        folder / "state.json").is_file()


def builder_for(files: list[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise DataError(f"{files[0]}: expected JSON/JSONL/CSV/Parquet/Arrow files of one kind "
                        f"(suffixes {', '.join(sorted(BUILDERS))}), got {', '.join(sorted(suffixes))}")
    return builders.pop()


class Local:
    """``train: <file or folder>`` or ``files: {split: file(s)}``, paths absolute (the matrix resolves them)."""

    name = "local"

    def applies(self, spec) -> bool:
        return spec.hub is None

    def files(self, spec) -> dict[str, list[str]]:
        if spec.files is not None:
            return {k: [v] if isinstance(v, str) else list(v) for k, v in spec.files.items()}
        return {spec.split: [spec.train]}

    def where(self, spec) -> str:
        return spec.train if spec.train is not None else next(iter(self.files(spec).values()))[0]

    def check(self, spec) -> None:
        for paths in self.files(spec).values():
            for p in paths:
                path = Path(p)
                if path.is_dir():
                    continue
                if not path.is_file():
                    raise DataError(f"data file not found: {p}")
                builder_for([p])

    def _saved(self, spec):
        from datasets import load_from_disk

        ds = load_from_disk(spec.train)
        return ds if hasattr(ds, "keys") else {spec.split: ds}

    def columns(self, spec) -> dict[str, list[str]]:
        """Column names by split, from the schema (Parquet/Arrow/saved folders) or the first rows (JSON, CSV)."""
        if spec.train is not None and Path(spec.train).is_dir() and _is_saved(Path(spec.train)):
            return {k: list(v.column_names) for k, v in self._saved(spec).items()}
        out = {}
        for split, paths in self.files(spec).items():
            ds = self._stream(paths, split)
            first = next(iter(ds), None)
            if first is None:
                raise DataError(f"{paths[0]}: no rows")
            out[split] = list(first)
        return out

    def _stream(self, paths: list[str], split: str):
        from datasets import load_dataset

        if len(paths) == 1 and Path(paths[0]).is_dir():
            return load_dataset(paths[0], split="train", streaming=True)
        return load_dataset(builder_for(paths), data_files={split: paths}, split=split, streaming=True)

    def load(self, spec) -> dict[str, Any]:
        from datasets import load_dataset

        if spec.train is not None and Path(spec.train).is_dir():
            if _is_saved(Path(spec.train)):
                return dict(self._saved(spec))
            return {spec.split: load_dataset(spec.train, split="train")}
        files = self.files(spec)
        builder = builder_for([p for ps in files.values() for p in ps])
        return dict(load_dataset(builder, data_files=files))


class Hub:
    """``hub: <dataset id>`` with ``revision`` and ``name``: read from the datasets cache, or the hub if reachable."""

    name = "hub"

    def applies(self, spec) -> bool:
        return spec.hub is not None

    def where(self, spec) -> str:
        return f"hub dataset {spec.hub}" + (f"@{spec.revision}" if spec.revision else "")

    def check(self, spec) -> None:
        pass

    def _offline(self, spec, exc: Exception) -> DataError:
        text = f"{type(exc).__name__}: {exc}"
        if any(w in text for w in ("Offline", "offline", "ConnectionError", "Couldn't reach", "not find", "cache")):
            return DataError(f"{self.where(spec)}: not in the local cache: set HF_DATASETS_OFFLINE=0 (and "
                             "HF_HUB_OFFLINE=0) where the hub is reachable, or fetch it into the cache")
        return DataError(f"{self.where(spec)}: {text.splitlines()[0][:200]}")

    def columns(self, spec) -> dict[str, list[str]]:
        from datasets import load_dataset_builder

        try:
            info = load_dataset_builder(spec.hub, spec.name, revision=spec.revision).info
        except Exception as exc:  # datasets raises many kinds for "not reachable, not cached"
            raise self._offline(spec, exc) from None
        if info.features is None:
            return {}
        return {split: list(info.features) for split in (info.splits or {spec.split: None})}

    def load(self, spec) -> dict[str, Any]:
        from datasets import load_dataset

        try:
            return dict(load_dataset(spec.hub, spec.name, revision=spec.revision))
        except Exception as exc:
            raise self._offline(spec, exc) from None


SOURCES = (Hub(), Local())


def source_for(spec):
    return next(s for s in SOURCES if s.applies(spec))
