"""The environment record: GPU, driver, CUDA, package versions, CPU, git commit and dirty flag."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "trl", "lm_eval", "datasets", "accelerate", "nvidia-ml-py",
            "qlora-harness")  # and every package a registered method loads (harness.methods.packages())


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    from harness.methods import packages

    for name in (*PACKAGES[:3], *packages(), *PACKAGES[3:]):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    """Commit of the working tree and whether it had uncommitted changes (None outside a checkout)."""
    def git(*args: str) -> str | None:
        # --no-optional-locks: 'git status' would otherwise refresh the index under .git/index.lock, which can
        # clash with the user's own git in that checkout; reading never needs it
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=10, check=True, env=env).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_info() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    out: dict[str, Any] = {"name": name, "cores": os.cpu_count(),
                           "memory_gib": round(psutil.virtual_memory().total / 2**30, 2)}
    try:  # the instruction set torch's CPU kernels dispatch to: float results differ between AVX2 and AVX512
        import torch

        out["isa"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        pass
    return out


def gpu_info() -> dict[str, Any] | None:
    """Name, count, memory and driver of the visible CUDA devices, or None on a CPU-only machine."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 2),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "driver": None,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        pynvml.nvmlShutdown()
    except Exception:  # NVML missing or not permitted: the driver stays unknown
        pass
    return info


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Everything a reader needs to place a number: machine, accelerator, versions and code state."""
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_info(),
        "gpu": gpu_info(),
        "versions": versions(),
        "git": git_info(Path(__file__).resolve().parent),
    }


def memory_budget_gib() -> float | None:
    """Total memory of the first visible GPU in GiB, or None without one."""
    gpu = gpu_info()
    return None if gpu is None else gpu["memory_gib"]


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (a CUDA GPU that supports it; a CPU with the
    avx512_bf16 or amx_bf16 instructions). Elsewhere torch emulates bf16, far slower than fp32."""
    if device == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(settings, device: str):
    """``settings`` with ``compute_dtype: auto`` resolved for ``device`` (unchanged otherwise)."""
    if settings.compute_dtype != "auto":
        return settings
    return settings.model_copy(update={"compute_dtype": "bf16" if native_bf16(device) else "fp32"})
