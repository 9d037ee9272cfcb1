"""Runs one case in a fresh Python process and turns out-of-memory errors, crashes and hangs into records."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from harness.matrix import Case
from harness.records import Record, utcnow

STAGE_MODULES = {"quant": "harness.stages.quant", "train": "harness.stages.train", "eval": "harness.stages.evaluate"}
LOG_TAIL = 2000  # characters of the worker's log kept in an error record


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc)
    return name == "OutOfMemoryError" or any(
        s in text for s in ("out of memory", "can't allocate memory", "CUDA error: out of memory",
                            "DefaultCPUAllocator", "std::bad_alloc", "Cannot allocate memory",
                            "failed to map segment")
    )


def _limit_memory(gib: float) -> None:
    """Cap the worker's address space (the CPU's stand-in for a GPU's fixed memory)."""
    import resource

    import psutil

    # the limit is on top of what the interpreter and its libraries already mapped
    cap = int(psutil.Process().memory_info().vms + gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def execute(case: Case, run_id: str, run_dir: Path, work_dir: Path) -> Record:
    """All of a case's stages in this process; the record says passed (ran), oom or error."""
    import torch

    from harness import methods, models
    from harness.measure import machine, memory
    from harness.stages import Context, Inputs, StageOutput

    work_dir.mkdir(parents=True, exist_ok=True)
    started = utcnow()
    record = Record(run_id=run_id, suite=case.suite, case_id=case.case_id, method=case.method,
                    params=case.params, status="passed", env=machine.environment(), started_at=started)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    sampler = memory.Sampler(cuda=device == "cuda").start()
    try:
        if device == "cuda":
            torch.cuda.init()
            torch.zeros(1, device="cuda")  # create the CUDA context, then read what it costs
            record.metrics["env.cuda_context_gib"] = (
                (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / memory.GIB
            )
        stage_modules = [importlib.import_module(STAGE_MODULES[s]) for s in case.stages]
        if case.settings.memory_limit_gib:
            # load the libraries before the cap, so the cap meets the model and not a library's mapping
            for name in ("transformers", "peft", *methods.get(case.method).packages):
                importlib.import_module(name)
            _limit_memory(case.settings.memory_limit_gib)
        t = time.perf_counter()
        source = models.prepare(case)
        record.timings_s["prepare"] = time.perf_counter() - t
        record.model = source.info
        ctx = Context(case=case, source=source, device=device, run_dir=run_dir, work_dir=work_dir, sampler=sampler)
        _estimate(ctx, record)
        inputs = Inputs()
        for stage, module in zip(case.stages, stage_modules, strict=False):
            print(f"[{case.case_id}] {stage} ...", flush=True)
            t = time.perf_counter()
            out: StageOutput = module.run(ctx, inputs)
            inputs = inputs.updated(out)
            record.timings_s[stage] = time.perf_counter() - t
            record.metrics.update(out.metrics)
            record.tables.update(out.tables)
            record.series.update(out.series)
            record.artifacts.update(out.artifacts)
            if out.failures and record.status == "passed":
                record.status, record.message = "failed", "; ".join(out.failures)
            print(f"[{case.case_id}] {stage} done in {record.timings_s[stage]:.1f} s", flush=True)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
        (work_dir / "traceback.txt").write_text(traceback.format_exc())
        at_failure = memory.memory_now()
        record.status = "oom" if is_oom(exc) else "error"
        where = f" (in stage {stage})" if "stage" in locals() else ""
        record.message = f"{type(exc).__name__}{where}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        record.metrics.update({f"failure.{k}": v for k, v in at_failure.items()})
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        sampler.stop()
    record.env = {**record.env, "sampler": sampler.describe(), "device": device}
    record.finished_at = utcnow()
    return record


def _estimate(ctx, record: Record) -> None:
    """The estimator's predicted peak, where the model's shape is known."""
    from harness import estimate

    est = estimate.for_case(ctx.case, ctx.device)
    if est is not None:
        record.metrics.update(est.as_metrics())


def run_isolated(case: Case, run_id: str, run_dir: Path, work_dir: Path, timeout_s: float | None = None) -> Record:
    """Run ``execute`` in a fresh interpreter; a crash or a hang becomes an error record, never an exception."""
    work_dir.mkdir(parents=True, exist_ok=True)
    case_file, result_file, log_file = work_dir / "case.json", work_dir / "result.json", work_dir / "worker.log"
    case_file.write_text(case.model_dump_json(indent=1))
    result_file.unlink(missing_ok=True)
    timeout_s = timeout_s or case.timeout_s
    cmd = [sys.executable, "-m", "harness.worker", str(case_file), str(result_file), run_id, str(run_dir)]
    started = utcnow()
    t = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
            code = proc.wait()
            hung = True
    if not hung and result_file.exists():
        return Record.model_validate_json(result_file.read_text())
    tail = log_file.read_text(errors="replace")[-LOG_TAIL:]
    if hung:
        message = f"timed out after {timeout_s:.0f} s (per-case timeout): worker killed"
    elif code < 0:
        message = f"worker died with signal {signal.Signals(-code).name}"
    else:
        message = f"worker exited with code {code} and no record"
    status = "oom" if (code == -signal.SIGKILL and not hung) or "MemoryError" in tail else "error"
    from harness.measure import machine

    return Record(run_id=run_id, suite=case.suite, case_id=case.case_id, method=case.method, params=case.params,
                  status=status, message=message, env=machine.environment(), started_at=started,
                  finished_at=utcnow(), timings_s={"total": time.perf_counter() - t},
                  artifacts={"log": str(log_file.relative_to(run_dir)) if log_file.is_relative_to(run_dir) else str(log_file)})


def main(argv: list[str] | None = None) -> int:
    case_file, result_file, run_id, run_dir = (argv or sys.argv[1:])[:4]
    case = Case.model_validate_json(Path(case_file).read_text())
    record = execute(case, run_id, Path(run_dir), Path(case_file).parent)
    tmp = Path(result_file).with_suffix(".tmp")
    tmp.write_text(record.model_dump_json(indent=1))
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
