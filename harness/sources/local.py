"""A checkpoint folder on disk (config.json + safetensors, and its tokenizer unless the suite names another)."""

from __future__ import annotations

from pathlib import Path

from harness.sources.base import ModelSource, Source, fingerprint


class Local(ModelSource):
    """``model: {source: local, path: <folder>}``: used as it is; its fingerprint covers tensors, config, tokenizer."""

    name = "local"
    requires = ("path",)
    path_fields = ("path",)

    def check_files(self, spec, base: Path):
        folder = base / spec.path
        if not folder.is_dir():
            return "model.path", f"checkpoint folder not found: {folder}"
        if not (folder / "config.json").is_file():
            return "model.path", f"no config.json in {folder}: not a transformers checkpoint folder"
        return None

    def prepare(self, case) -> Source:
        folder = Path(case.model.path)
        return Source(folder, folder, None, {"source": "local", "path": str(folder),
                                             "fingerprint": fingerprint(folder, folder)})


SOURCES = (Local(),)
