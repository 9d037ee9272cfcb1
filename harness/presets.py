"""Synthetic model presets: real architectures' published shapes, filled with random weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str  # "llama" | "mistral"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # for "tiny-*" the locally trained tokenizer's size
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    source: str  # where the shape comes from
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config_dict(self, vocab_size: int | None = None, num_layers: int | None = None) -> dict:
        d = asdict(self)
        for k in ("name", "source", "model_type"):
            d.pop(k)
        if vocab_size is not None:
            d["vocab_size"] = vocab_size
        if num_layers is not None:
            d["num_hidden_layers"] = num_layers
        return d

    def hf_config(self, vocab_size: int | None = None, num_layers: int | None = None):
        from transformers import LlamaConfig, MistralConfig

        cls = {"llama": LlamaConfig, "mistral": MistralConfig}[self.model_type]
        return cls(**self.config_dict(vocab_size, num_layers))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # CPU tier: Llama architecture, every linear dim a multiple of 64 (the 4-bit CPU inference path
        # asserts it), head_dim 64 like the real models.
        Preset("tiny-llama", "llama", 256, 768, 4, 4, 4, 2048, 512, 10000.0, 1e-5, "this project (CPU tier)"),
        Preset("llama-2-7b", "llama", 4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, 1e-5,
               "meta-llama/Llama-2-7b-hf config.json"),
        Preset("llama-2-13b", "llama", 5120, 13824, 40, 40, 40, 32000, 4096, 10000.0, 1e-5,
               "meta-llama/Llama-2-13b-hf config.json"),
        Preset("codellama-34b", "llama", 8192, 22016, 48, 64, 8, 32000, 16384, 1000000.0, 1e-5,
               "codellama/CodeLlama-34b-hf config.json"),
        Preset("llama-2-70b", "llama", 8192, 28672, 80, 64, 8, 32000, 4096, 10000.0, 1e-5,
               "meta-llama/Llama-2-70b-hf config.json"),
        Preset("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0, 1e-5,
               "meta-llama/Meta-Llama-3-8B config.json"),
        Preset("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32000, 32768, 10000.0, 1e-5,
               "mistralai/Mistral-7B-v0.1 config.json"),
    )
}


def linear_shapes(p: Preset, num_layers: int | None = None) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every projection of one decoder layer, keyed by its short name."""
    h, i, kv = p.hidden_size, p.intermediate_size, p.num_key_value_heads * p.head_dim
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}


def param_count(p: Preset, vocab_size: int | None = None, num_layers: int | None = None) -> dict[str, int]:
    """Parameters by kind: the quantizable linears, and what stays 16-bit (embeddings, norms, lm_head)."""
    layers = num_layers or p.num_hidden_layers
    vocab = vocab_size or p.vocab_size
    linear = sum(o * i for o, i in linear_shapes(p).values()) * layers
    norms = (2 * layers + 1) * p.hidden_size
    embed = vocab * p.hidden_size
    head = 0 if p.tie_word_embeddings else vocab * p.hidden_size
    return {"linear": linear, "embed": embed, "lm_head": head, "norm": norms, "total": linear + embed + head + norms}


def from_hf_config(folder) -> Preset:
    """The shape of a local or hub checkpoint, read from its config.json (for FLOPs and the estimator)."""
    import json
    from pathlib import Path

    c = json.loads((Path(folder) / "config.json").read_text())
    heads = c["num_attention_heads"]
    return Preset(
        name=c.get("_name_or_path") or Path(folder).name, model_type=c.get("model_type", "llama"),
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads, vocab_size=c["vocab_size"],
        max_position_embeddings=c.get("max_position_embeddings", 4096), rope_theta=c.get("rope_theta", 10000.0),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5), source=str(folder),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
    )
