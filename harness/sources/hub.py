"""A hub model id: the hub's own cache (``HF_HUB_CACHE``), downloading only where the hub is reachable."""

from __future__ import annotations

from pathlib import Path

from harness.sources.base import ModelSource, Source, SourceError, fingerprint

# What a checkpoint and its tokenizer keep: weights, configs, SentencePiece / tiktoken vocabularies and the chat
# template, which transformers 5 writes to chat_template.jinja (not into tokenizer_config.json)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja",
                  "chat_template.jinja"]
TOKENIZER_PATTERNS = ["*.json", "*.model", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def snapshot(repo_id: str, revision: str | None, patterns: list[str], where: str) -> Path:
    """The snapshot folder of ``repo_id`` from the hub's cache (downloaded first where the hub is reachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        at = f"@{revision}" if revision else ""
        raise SourceError(f"{where} {repo_id}{at}: not in the local cache: set HF_HUB_OFFLINE=0 or fetch it") from None


class Hub(ModelSource):
    """``model: {source: hub, hub_id: org/name, revision: ...}``; the record keeps the commit it resolved to."""

    name = "hub"
    requires = ("hub_id",)
    network = True

    def prepare(self, case) -> Source:
        spec = case.model
        folder = snapshot(spec.hub_id, spec.revision, ALLOW_PATTERNS, "model.hub_id")
        if not list(folder.glob("*.safetensors")):
            raise SourceError(f"model.hub_id {spec.hub_id}: the snapshot {folder} holds no *.safetensors "
                              f"(only safetensors checkpoints are loaded)")
        return Source(folder, folder, None, {"source": "hub", "hub_id": spec.hub_id, "revision": spec.revision,
                                             "commit": folder.name, "fingerprint": fingerprint(folder, folder)})


SOURCES = (Hub(),)
