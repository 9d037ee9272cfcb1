"""N ranks through torch's own launcher (``torch.distributed.run``): gloo on the CPU, nccl on GPUs.

Each rank runs the worker (``harness.worker``) with the case; the train stage is the distributed loop
(``harness.stages.train_distributed``: FSDP2 ``fully_shard`` or DDP, driven directly, never through trl's
trainer, which on the CPU silently trains with DDP). Every rank writes its own record
(``result.rank<R>.json``); global rank 0's record carries every rank's figures (gathered in-band) and is the
case's record. When a rank crashes, hangs or runs out of memory, the case gets one status and reason: the
first rank that failed (torchrun's root cause, else the rank records), the others named.

Multi-node: ``nnodes`` > 1 with ``rdzv_endpoint: host:port`` (c10d rendezvous); start the same suite with the
same ``--run-id`` on every node; node 0's results folder holds the case's record.
"""

from __future__ import annotations

import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from harness.launchers.base import Launcher

SUPPORTED_STAGES = ("train",)
FAILED = ("oom", "error", "killed", "interrupted")
# messages of a rank that failed because another one did (a peer that died or never reached the collective)
PEER_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer",
              "nccl communicator was aborted", "socket")


CPU_RANKS = 2  # nproc "auto" without a GPU


def ranks_per_node(settings) -> int:
    """``nproc``, with ``auto`` as one rank per visible GPU (``CPU_RANKS`` without one)."""
    if settings.nproc != "auto":
        return int(settings.nproc)
    try:
        import torch

        return torch.cuda.device_count() or CPU_RANKS
    except ImportError:  # pragma: no cover
        return CPU_RANKS


def rank_file(result_file: Path, rank: int) -> Path:
    return result_file.with_name(f"{result_file.stem}.rank{rank}{result_file.suffix}")


def root_cause(log: str) -> tuple[int, int] | None:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)" in its log, if it printed one."""
    part = log.rsplit("Root Cause (first observed failure)", 1)
    if len(part) < 2:
        return None
    m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", part[1], re.S)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"died with signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died with signal {-code}"
    return f"exited with code {code}"


def merge_failure(records: dict, world: int, cause: tuple[int, int] | None) -> tuple[str, str, int | None]:
    """(status, message, rank) of a failed case: the rank that failed first, and what became of the others.

    Order of evidence: torchrun's root cause; else a rank that ended without a record (it crashed); else a rank
    whose own failure is not a peer's (a timeout or closed connection in a collective); else the first record.
    """
    missing = [r for r in range(world) if r not in records]
    bad = {r: rec for r, rec in records.items() if rec.status in FAILED}
    first: int | None = None
    if cause is not None and (cause[0] in bad or cause[0] in missing):
        first = cause[0]
    elif missing:
        first = missing[0]
    else:
        own = [r for r, rec in bad.items() if not any(w in rec.message.lower() for w in PEER_WORDS)]
        first = min(own or bad or [None], key=lambda r: -1 if r is None else r)
    if first is None:
        return "error", "no rank reported a failure, yet the case has no record", None
    if first in bad:
        status, what = bad[first].status, bad[first].message
    else:
        code = cause[1] if cause is not None and cause[0] == first else None
        status = "error"
        what = (_exit_words(code) if code is not None else "ended") + " without a record"
    others = []
    for r in range(world):
        if r == first:
            continue
        if r in bad:
            others.append(f"rank {r} {bad[r].status}: {bad[r].message[:120]}")
        elif r in missing:
            others.append(f"rank {r} ended without a record (stopped by torchrun)")
    tail = f"; then {'; '.join(others)}" if others else ""
    if first in bad and missing and any(w in what.lower() for w in PEER_WORDS):
        ranks = ", ".join(str(r) for r in missing)
        tail += f" (rank {ranks} never answered: hung or stuck, until torchrun stopped it)"
    return status, f"rank {first} of {world}: {what}{tail}", first


class Torchrun(Launcher):
    name = "torchrun"
    label = "torchrun, N ranks"

    def check(self, settings, stages):
        bad = [s for s in stages if s not in SUPPORTED_STAGES]
        if bad:
            return (f"launcher 'torchrun' runs stage {', '.join(SUPPORTED_STAGES)} only (got {', '.join(bad)}): "
                    "score the adapter in a one-process suite")
        if settings.strategy == "none":
            return "launcher 'torchrun' needs strategy: fsdp2 or ddp"
        if settings.optimizer != "adamw_torch":
            return f"launcher 'torchrun' trains with adamw_torch (got optimizer {settings.optimizer!r})"
        if settings.nnodes > 1 and not settings.rdzv_endpoint:
            return f"nnodes {settings.nnodes} needs rdzv_endpoint: host:port (the c10d rendezvous every node joins)"
        if settings.grad_accum != 1:
            return "launcher 'torchrun' steps once per micro-batch: set grad_accum: 1"
        return None

    def resolve(self, case):
        if case.settings.nproc != "auto":
            return case
        return case.model_copy(update={"settings": case.settings.model_copy(
            update={"nproc": ranks_per_node(case.settings)})})

    def command(self, case, case_file, result_file, run_id, run_dir):
        s = case.settings
        args = [sys.executable, "-m", "harness.launchers.agent", f"--nproc-per-node={ranks_per_node(s)}",
                f"--nnodes={s.nnodes}", "--max-restarts=0", "--monitor-interval=0.5",
                # torchrun's per-rank log folders: with the case's other files, not in a /tmp/torchelastic_* that
                # it never removes
                f"--log-dir={Path(case_file).parent / 'torchelastic'}"]
        if s.nnodes == 1 and not s.rdzv_endpoint:
            args.append("--standalone")  # a local c10d store on a free port
        else:
            job = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{run_id}-{case.case_id}")[:120]
            args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={s.rdzv_endpoint}", f"--rdzv-id={job}"]
        return args + ["-m", "harness.worker", str(case_file), str(result_file), run_id, str(run_dir)]

    def stage_module(self, stage):
        return "harness.stages.train_distributed" if stage == "train" else super().stage_module(stage)

    def collect(self, case, result_file, log_tail):
        from harness.records import Record

        s = case.settings
        world = ranks_per_node(s) * s.nnodes
        records = {}
        for r in range(world):
            f = rank_file(result_file, r)
            if f.exists():
                records[r] = Record.model_validate_json(f.read_text())
        zero = records.get(0)
        if zero is not None and zero.status not in FAILED and all(
                rec.status not in FAILED for rec in records.values()):
            if len(records) == world or s.nnodes > 1:  # other nodes' ranks write on their own machines
                return zero
        if not records and root_cause(log_tail) is None:
            return None  # nothing ran: the worker's exit code and log say why
        status, message, first = merge_failure(records, world, root_cause(log_tail))
        base = zero or (records.get(first) if first is not None else None) or next(iter(records.values()), None)
        if base is None:
            return None  # no rank wrote anything: ``explain`` adds torchrun's root cause to the exit's message
        return base.model_copy(update={"status": status, "message": message[:800],
                                       "env": {**base.env, "failed_rank": first,
                                               "ranks_with_record": sorted(records)}})

    def clear(self, result_file):
        super().clear(result_file)
        for f in result_file.parent.glob(f"{result_file.stem}.rank*{result_file.suffix}"):
            f.unlink()

    def result_path(self, result_file, rank):
        return rank_file(result_file, rank)

    def exit_code(self, record):
        # a rank that failed exits non-zero, so that torchrun stops the others at once (not at a collective's
        # timeout); a case that ran but failed a check ('failed') failed on every rank alike
        return 1 if record.status in FAILED else 0

    def explain(self, log_tail):
        cause = root_cause(log_tail)
        if cause is None:
            return None
        return f"rank {cause[0]}: {_exit_words(cause[1])} without a record (torchrun's first observed failure)"

    @contextmanager
    def rank(self, case):
        """One rank's process: it sees only its own GPU, so that every per-process figure (NVML, torch's
        allocator, the CUDA context) is this rank's; its process group (``process_group``) ends with it."""
        import os

        # before anything initializes CUDA (which reads the variable once): local rank i gets the i-th device
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        nproc = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks on this node (torchrun sets it)
        if nproc > 1 and visible != "":
            ids = visible.split(",") if visible else [str(i) for i in range(nproc)]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[local % len(ids)]
        try:
            yield int(os.environ["RANK"])
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def process_group(settings, startup_s: float) -> None:
    """Join this rank's process group (gloo on the CPU, nccl on a GPU), waiting up to ``startup_s`` for the others.

    Called by the distributed stage once its model is prepared: while a group exists, transformers'
    ``save_pretrained`` writes on rank 0 only, so a synthetic base another rank built would be left empty."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    kw = {"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=startup_s), **kw)


def all_ready(settings) -> None:
    """Wait until every rank has its model (loading can take one rank far longer than another on a busy host),
    then give every later collective ``dist_timeout_s``: a rank that hangs, crashes or leaves makes the others
    fail after that long, not at the case's timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=settings.dist_timeout_s))

LAUNCHERS = (Torchrun(),)
