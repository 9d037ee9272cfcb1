"""Runs one case in a fresh Python process and turns out-of-memory errors, crashes and hangs into records."""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from harness import sources
from harness.launchers.base import STAGE_MODULES  # noqa: F401 - the one-process stages (launchers choose)
from harness.matrix import Case
from harness.records import Record, one_line, utcnow, write_text_atomic

LOG_TAIL = 2000  # characters of the worker's log kept in an error record


# Messages of failed allocations once the worker's address space is capped (memory_limit_gib): the cap makes
# mmap fail, and each library words that differently. Without a cap they are not evidence of running out.
CAP_MESSAGES = ("cannot allocate memory", "failed to map segment", "could not create a primitive",
                "std::bad_alloc", "can't allocate memory", "out of memory")
# Messages that mean out of memory wherever they come from
# (cuBLAS reports a failed workspace or handle allocation as CUBLAS_STATUS_ALLOC_FAILED, not as torch's OOM)
OOM_MESSAGES = ("cuda out of memory", "cuda error: out of memory", "defaultcpuallocator: can't allocate memory",
                "cublas_status_alloc_failed")


def _chain(exc: BaseException):
    """The exception and every exception it was raised from or during (``__cause__``, ``__context__``)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def is_oom(exc: BaseException, capped: bool = False) -> bool:
    """True on evidence of running out of memory anywhere in the exception's chain.

    Evidence: a MemoryError (often wrapped, e.g. in datasets' DatasetGenerationError), torch's
    OutOfMemoryError or a CUDA/CPU allocator's out-of-memory message, and, when the worker's address space is
    capped (``capped``), the failed allocations that cap causes ("Cannot allocate memory", "failed to map
    segment", oneDNN's "could not create a primitive", ``std::bad_alloc``).
    """
    for e in _chain(exc):
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        text = str(e).lower()
        # a MemoryError raised where the exception could not travel (a datasets or dataloader worker process)
        # comes back as another exception whose message names it
        if "memoryerror" in text or any(m in text for m in OOM_MESSAGES) or (
                capped and any(m in text for m in CAP_MESSAGES)):
            return True
    return False


def reason(exc: BaseException, where: str = "") -> str:
    """``Type<where>: first line``, and the exception at the root of its chain when another one wraps it: a
    library's wrapper (``DatasetGenerationError: An error occurred while generating the dataset``) hides the cause."""
    def text(e: BaseException, at: str = "") -> str:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}{at}: {first}"

    root = exc
    seen = {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    return text(exc, where) if root is exc else f"{text(exc, where)} (caused by {text(root)})"


def _cgroup_files() -> list[Path]:
    """Where this process's cgroup counts OOM kills: v2 ``memory.events`` or v1 ``memory.oom_control``."""
    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files.append(Path("/sys/fs/cgroup" + path.rstrip("/")) / "memory.events")
        elif "memory" in controllers.split(","):
            files.append(Path("/sys/fs/cgroup/memory" + path.rstrip("/")) / "memory.oom_control")
    files += [Path("/sys/fs/cgroup/memory.events"), Path("/sys/fs/cgroup/memory/memory.oom_control")]
    return files


def oom_kill_count(files: list[Path] | None = None) -> int | None:
    """The kernel's count of OOM kills in this cgroup (``oom_kill`` line), or None where it cannot be read."""
    for f in files if files is not None else _cgroup_files():
        try:
            for line in f.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def classify_exit(code: int, tail: str, capped: bool, oom_kills: int | None) -> tuple[str, str]:
    """(status, message) of a worker that ended without writing its record.

    ``oom_kills``: how many OOM kills the kernel counted in this cgroup while the worker ran (None: unknown).
    A SIGKILL is ``oom`` only when the kernel counted one; otherwise it came from outside: ``killed``.
    """
    lower = tail.lower()
    memory_words = "MemoryError" in tail or any(m in lower for m in OOM_MESSAGES) or (
        capped and any(m in lower for m in CAP_MESSAGES))
    if code == -signal.SIGKILL:
        if oom_kills:
            return "oom", f"worker killed by the kernel's OOM killer (cgroup oom_kill +{oom_kills})"
        unknown = " (the cgroup's OOM counter cannot be read)" if oom_kills is None else ""
        return "killed", f"worker killed with SIGKILL from outside; no OOM kill was counted{unknown}"
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    said = f" (its log ends: {one_line(last, 200)})" if last else ""
    if code < 0:
        name = _signal_name(-code)
        if -code not in CRASH_SIGNALS and not memory_words:  # SIGTERM, SIGINT, SIGHUP…: sent by someone else
            return "killed", f"worker killed with {name} from outside{said}"
        message = f"worker crashed with signal {name}"
    else:
        message = f"worker exited with code {code} and no record"
    if memory_words:
        return "oom", message + f" after a failed allocation{said}"
    return "error", message + said


# signals a process gets from its own fault, not from another process
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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

    from harness import launchers, methods, models
    from harness.measure import machine, memory
    from harness.stages import Context, Inputs, StageOutput, between_stages

    work_dir.mkdir(parents=True, exist_ok=True)
    started = utcnow()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # compute_dtype "auto" becomes what this device computes natively; the record keeps the resolved dtype
    case = case.model_copy(update={"settings": machine.resolve_compute_dtype(case.settings, device)})
    record = Record(run_id=run_id, suite=case.suite, case_id=case.case_id, method=case.method,
                    params=case.params, status="passed", env=machine.environment(), started_at=started)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    # the devices the case uses: the context is created, and NVML sampled, on those only
    devices = memory.case_devices(case, torch.cuda.device_count()) if device == "cuda" else None
    sampler = memory.Sampler(cuda=device == "cuda", devices=devices).start()
    try:
        if device == "cuda":
            record.env = {**record.env, "cuda_context": memory.create_cuda_context(sampler, record.metrics),
                          "cuda_devices": devices}
        launcher = launchers.get(case.settings.launcher)
        stage_modules = [importlib.import_module(launcher.stage_module(s)) for s in case.stages]
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
            between_stages(device)  # the last stage's cached blocks out of this stage's peaks
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
        rank = f".rank{os.environ['RANK']}" if case.settings.launcher != "process" and "RANK" in os.environ else ""
        (work_dir / f"traceback{rank}.txt").write_text(traceback.format_exc())
        try:
            at_failure = memory.memory_now()
        except MemoryError:  # under a memory cap the failed allocation can leave no room to read /proc
            at_failure = {}
        record.status = "oom" if is_oom(exc, capped=bool(case.settings.memory_limit_gib)) else "error"
        where = f" (in stage {stage})" if "stage" in locals() else ""
        record.message = one_line(reason(exc, where), 500)
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
    if est is None and ctx.case.settings.strategy == "none":  # a real checkpoint: its config.json has the shape
        from harness import models
        from harness.measure.machine import resolve_compute_dtype

        shape = models.shape(ctx.source)
        if shape is not None:
            est = estimate.estimate(shape, resolve_compute_dtype(ctx.case.settings, ctx.device), device=ctx.device)
    if est is not None:
        record.metrics.update(est.as_metrics())


# Set in the worker's environment unless the user set them: no host is looked up during a run (datasets'
# download counter, the hub's and trl's telemetry, which honours HF_HUB_DISABLE_TELEMETRY and HF_HUB_OFFLINE).
# A case whose model comes from the hub keeps the hub reachable and only turns telemetry off.
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1"}
PARENT_ENV = "QLORA_HARNESS_PARENT_PID"  # the worker ends itself when this process is gone
_live: dict[int, subprocess.Popen] = {}  # worker process groups to end if this process exits


def worker_env(case: Case, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the user's, plus the offline and cache defaults the user did not set."""
    from harness.cache import cache_dir

    env = dict(os.environ if environ is None else environ)
    defaults = {"HF_HUB_DISABLE_TELEMETRY": "1"} if sources.needs_network(case.model) else OFFLINE_DEFAULTS
    # the datasets library caches every JSONL it loads (under ~/.cache/huggingface/datasets, growing each run):
    # in the harness's cache instead, unless the user chose a place
    defaults = {**defaults, "HF_DATASETS_CACHE": str(cache_dir(env) / "datasets"),
                # torch makes /tmp/torchinductor_<user> on importing its compiler (distributed imports it), and
                # leaves it: in the harness's cache instead
                "TORCHINDUCTOR_CACHE_DIR": str(cache_dir(env) / "torchinductor")}
    for key, value in defaults.items():
        env.setdefault(key, value)
    env[PARENT_ENV] = str(os.getpid())
    return env


def _end_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (the worker and anything it started), every process under the worker
    that made a session of its own (torchrun starts each rank in one), and reap the worker."""
    import psutil

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        below = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in below:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.wait()
    _live.pop(proc.pid, None)


@atexit.register
def _end_all() -> None:
    """At the interpreter's exit no worker outlives it."""
    for proc in list(_live.values()):
        _end_group(proc)


class _TermAsInterrupt:
    """While a worker runs, SIGTERM interrupts the wait like Ctrl-C (only in the main thread, where signals land)."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def run_isolated(case: Case, run_id: str, run_dir: Path, work_dir: Path, timeout_s: float | None = None) -> Record:
    """Run ``execute`` in a fresh interpreter; a crash, a kill or a hang becomes a record, never an exception.

    The worker runs in a process group of its own (a Ctrl-C in the terminal reaches pytest, not the worker);
    this process ends that group on a timeout, on Ctrl-C or SIGTERM (then re-raised, so the caller can record
    the case as interrupted) and at exit; the worker ends itself if this process dies (see ``_guard_parent``).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    case_file, result_file, log_file = work_dir / "case.json", work_dir / "result.json", work_dir / "worker.log"
    from harness import launchers

    launcher = launchers.get(case.settings.launcher)
    case = launcher.resolve(case)  # e.g. nproc "auto": one rank per GPU of this machine
    case_file.write_text(case.model_dump_json(indent=1))
    timeout_s = timeout_s or case.timeout_s
    capped = bool(case.settings.memory_limit_gib)
    launcher.clear(result_file)
    cmd = launcher.command(case, case_file, result_file, run_id, run_dir)
    started = utcnow()
    t = time.perf_counter()
    kills_before = oom_kill_count()
    with open(log_file, "w") as log, _TermAsInterrupt():
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=worker_env(case))
        _live[proc.pid] = proc
        try:
            code = proc.wait(timeout=timeout_s)
            hung = False
        except subprocess.TimeoutExpired:
            _end_group(proc)
            code, hung = proc.returncode, True
        except BaseException:
            _end_group(proc)
            raise
        _end_group(proc)  # anything the worker left behind in its group
    kills_after = oom_kill_count()
    log = log_file.read_text(errors="replace")[-20 * LOG_TAIL:]
    record = None if hung else launcher.collect(case, result_file, log)
    if record is not None:
        return record
    tail = log[-LOG_TAIL:]
    if hung:
        status, message = "error", f"timed out after {timeout_s:.0f} s (per-case timeout): worker killed"
    else:
        delta = None if kills_before is None or kills_after is None else kills_after - kills_before
        status, message = classify_exit(code, tail, capped, delta)
        why = launcher.explain(log)
        message = f"{why}; {message}" if why else message
    from harness.measure import machine

    return Record(run_id=run_id, suite=case.suite, case_id=case.case_id, method=case.method, params=case.params,
                  status=status, message=message, env=machine.environment(), started_at=started,
                  finished_at=utcnow(), timings_s={"total": time.perf_counter() - t},
                  artifacts={"log": str(log_file.relative_to(run_dir)) if log_file.is_relative_to(run_dir) else str(log_file)})


def _guard_parent() -> None:
    """End this worker's process group when the process that started it dies (kill -9 included).

    Linux: the kernel sends SIGTERM on the parent's death (``PR_SET_PDEATHSIG``); elsewhere, and as a
    second line, a thread polls the parent's pid. Either ends the whole group, children included.
    """
    parent = int(os.environ.get(PARENT_ENV) or 0)
    if not parent:
        return

    me = os.getpid()

    def end_group(*_):
        if os.getpid() != me:  # a forked child (a library's process pool) inherited this handler: a pool ends its
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # workers with SIGTERM, which must end that child alone,
            os.kill(os.getpid(), signal.SIGTERM)  # not the whole group, the worker included
            return
        os.killpg(os.getpgid(0), signal.SIGKILL)

    signal.signal(signal.SIGTERM, end_group)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        end_group()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                end_group()

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    _guard_parent()
    case_file, result_file, run_id, run_dir = (argv or sys.argv[1:])[:4]
    case = Case.model_validate_json(Path(case_file).read_text())
    from harness import launchers

    launcher = launchers.get(case.settings.launcher)
    with launcher.rank(case) as rank:
        record = execute(case, run_id, Path(run_dir), Path(case_file).parent)
        write_text_atomic(launcher.result_path(Path(result_file), rank), record.model_dump_json(indent=1))
    return launcher.exit_code(record)

if __name__ == "__main__":
    sys.exit(main())
