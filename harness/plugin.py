"""pytest plugin (entry point ``pytest11``): suite YAML files become test items, one per case.

A thin adapter: the work is done by harness.spec, harness.matrix, harness.runner and harness.report.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from harness.records import check_name, one_line, slug
from harness.spec import TIERS, NonInferiorityExpectation, RatioExpectation, SpecError

RUN_KEY = pytest.StashKey["object"]()
SEEN_KEY = pytest.StashKey[dict]()  # case id -> the suite file that has it
NAMES_KEY = pytest.StashKey[dict]()  # suite name -> the suite file that defined it first
SKIP_DIRS = {"tasks", "data"}  # lm-eval task files and data live beside suites; they are not suites


def pytest_addoption(parser):
    group = parser.getgroup("qlora-harness")
    group.addoption("--tier", default="auto",
                    help=f"hardware tier whose cases run: auto (from the GPU's memory) or one of {', '.join(TIERS)}")
    group.addoption("--baseline", default=None,
                    help="a run id, run folder or results/baselines/<tier> folder to compare each case with")
    group.addoption("--run-id", default=None, help="name of the run folder under results/ (default: time-host)")
    group.addoption("--results-dir", default="results", help="where run folders are written")
    group.addoption("--extends", default=None, metavar="RUN",
                    help="pool this run with an earlier run (its id under --results-dir) of the same suites on the "
                         "same kind of machine: only the cases it lacks run (more seeds, or cases it lost to an "
                         "error or interruption), and the stats, report and headline cover both")
    group.addoption("--seeds", default="auto", metavar="N|all",
                    help="seeds of each replicated suite to run: all, or the first N (default auto: 1 on the cpu tier, "
                         "so that a first run ends in about 20 minutes; all on a GPU tier); add the others later "
                         "with --extends RUN --seeds all")
    group.addoption("--reports-dir", default="reports", help="where HTML reports are written")
    group.addoption("--no-report", action="store_true", help="do not render HTML at the end of the session")
    group.addoption("--require-idle-gpu", action="store_true",
                    help="refuse to start when another process is computing on a GPU the cases would use")


def pin_worker_gpu(workerid: str, gpu_count: int, environ) -> str | None:
    """Pin an xdist worker (gw0, gw1, …) to one GPU, round robin: over every GPU, or over the devices the user
    listed in ``CUDA_VISIBLE_DEVICES`` (each worker gets one of them; one listed device: left alone)."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    n = int(workerid.removeprefix("gw"))
    if listed is not None:
        entries = [e.strip() for e in listed.split(",") if e.strip()]
        if len(entries) < 2:
            return None
        environ["CUDA_VISIBLE_DEVICES"] = entries[n % len(entries)]
        return environ["CUDA_VISIBLE_DEVICES"]
    if gpu_count < 2:
        return None
    environ["CUDA_VISIBLE_DEVICES"] = str(n % gpu_count)
    return environ["CUDA_VISIBLE_DEVICES"]


def _nvml_gpu_count() -> int:
    """GPUs on this machine, counted without initialising CUDA in this process."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:  # no NVML: no GPU to spread over
        return 0


def check_results_dir(path: Path) -> None:
    """A one-line ValueError unless ``path`` is (or can be made) a writable folder."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--results-dir {path}: exists and is not a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--results-dir {path}: cannot write to {existing or path}")


BENCHMARK_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default: a folder in the user's working directory


def runs_suites(config) -> bool:
    """Does this session collect suite files (an argument that is, or lies in, a ``suites`` folder)?"""
    for arg in config.args:
        path = Path(config.invocation_params.dir, str(arg).split("::", 1)[0]).resolve()
        if path.name == "suites" or "suites" in (p.name for p in path.parents) or is_suite_file(path):
            return True
    return False


def keep_caches_in_harness_cache(config) -> None:
    """A ``pytest suites/`` session writes pytest's cache and pytest-benchmark's storage into the harness cache
    (harness.cache), not as ``.pytest_cache/`` and ``.benchmarks/`` in the user's folder, unless the user chose
    where they go. Runs before the cache and benchmark plugins read their settings."""
    if hasattr(config, "workerinput") or not runs_suites(config):
        return
    import hashlib

    from harness.cache import cache_dir

    key = hashlib.sha256(str(config.rootpath).encode()).hexdigest()[:12]  # one pytest cache per project folder
    if getattr(config.option, "benchmark_storage", None) == BENCHMARK_STORAGE:
        config.option.benchmark_storage = f"file://{cache_dir() / 'benchmarks' / key}"
    try:
        if config.pluginmanager.has_plugin("cacheprovider") and config.getini("cache_dir") == ".pytest_cache":
            config._inicache["cache_dir"] = str(cache_dir() / "pytest" / key)  # getini's memo: read from here on
    except (AttributeError, TypeError, ValueError):  # another pytest: its cache stays where it puts it
        pass


@pytest.hookimpl(tryfirst=True)  # before the cache provider and pytest-benchmark read their folders
def pytest_configure(config):
    from harness.runner import Run, resolve_seeds, resolve_tier

    keep_caches_in_harness_cache(config)

    if hasattr(config, "workerinput"):  # before anything touches CUDA: the case workers inherit the pin
        pin_worker_gpu(config.workerinput["workerid"], _nvml_gpu_count(), os.environ)
    elif config.getoption("require_idle_gpu", False):
        from harness.measure.noise import busy_gpu_message

        if message := busy_gpu_message():
            raise pytest.UsageError(message)

    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier.replace('-', '_')}: cases of suites in the {tier} tier")
    config.addinivalue_line("markers", "suite(name): a case of the named harness suite")
    worker = hasattr(config, "workerinput")
    run_id = config.workerinput["harness_run_id"] if worker else config.getoption("run_id")
    results = Path(config.getoption("results_dir")).resolve()
    try:
        tier, budget, why = resolve_tier(config.getoption("tier"))
        seeds = resolve_seeds(config.getoption("seeds"), tier)
        if run_id:
            check_name(run_id, "--run-id")
        check_results_dir(results)
        if run_id and not worker and (results / run_id).exists():
            raise ValueError(f"--run-id {run_id}: {results / run_id} already exists (a run folder is never reused)")
        baseline = _load_baseline(config.getoption("baseline"), results)
        extends, extended = _load_extended(config.getoption("extends"), results)
    except ValueError as exc:
        raise pytest.UsageError(one_line(exc, 400)) from None
    run = Run(results_dir=results, run_id=run_id or "", tier=tier, budget_gib=budget, tier_why=why,
              joined=worker, baseline=baseline, extends=extends, extended=extended)
    from harness.measure.machine import memory_budget_gib

    gpu_mem = memory_budget_gib()
    if TIERS[tier] is not None and (gpu_mem is None or gpu_mem < TIERS[tier] * 0.9):
        run.machine_fits = False
    run.on_cpu = gpu_mem is None  # the workers compute on the CPU
    run.seeds = seeds
    config.stash[RUN_KEY] = run
    config.stash[SEEN_KEY] = {}
    config.stash[NAMES_KEY] = {}
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(run), "harness-xdist")
    if not worker:
        config.pluginmanager.register(_ProgressHooks(config), "harness-progress")


def _load_baseline(ref: str | None, results: Path):
    """The baseline's records by case id, read once at startup; a bad reference is a one-line ValueError."""
    if ref is None:
        return None
    from harness.compare import load_baseline

    try:
        return load_baseline(ref, results)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:  # RecordError is a ValueError
        raise ValueError(f"--baseline {one_line(ref, 100)}: {one_line(exc, 300)}") from None


def _load_extended(ref: str | None, results: Path) -> tuple[str, dict]:
    """(run id, records by case id) of the run ``--extends`` names, pooled with the runs it extends itself.

    One-line ValueError unless it is a run folder under ``results`` measured on this kind of machine (processor,
    instruction set, GPU, numeric libraries: ``compare.build_kind``), since seeds pooled across kernels mix
    two machines' numbers.
    """
    if ref is None:
        return "", {}
    from harness.compare import kind_apart
    from harness.measure.machine import environment
    from harness.records import read_run_records

    try:
        folder = results / check_name(str(ref), "--extends")
        if not (folder / "run.json").is_file():
            raise ValueError(f"no run folder {folder}")
        records = {r.case_id: r for r in read_run_records(folder)}
    except ValueError as exc:  # RecordError is a ValueError
        raise ValueError(f"--extends {one_line(ref, 100)}: {one_line(exc, 300)}") from None
    here = environment()
    for rec in records.values():
        if apart := kind_apart(here, rec):
            raise ValueError(f"--extends {ref}: {rec.case_id} was measured on another kind of machine "
                             f"({'; '.join(apart)}): seeds from both cannot be pooled")
    return folder.name, records


def _first_seeds(items, n: int | None) -> None:
    """``--seeds N``: deselect the cases of a replicated suite past its first N seeds, and those outside a suite's
    ``slice:`` (in place)."""
    if n is None:
        return
    from harness.matrix import in_slice

    later = [i for i in items if isinstance(i, CaseItem) and (("seed" in i.case.axes
             and i.case.axes["seed"] - int(i.suite.settings.get("seed") or 0) >= n) or not in_slice(i.case, i.suite))]
    if later:
        gone = set(later)
        items[:] = [i for i in items if i not in gone]
        later[0].config.hook.pytest_deselected(items=later)


def pytest_collection_modifyitems(session, config, items):
    """``--seeds``: only the first seeds of replicated suites. With ``--extends``: deselect the cases the earlier
    run measured, after checking they are the same cases. In a suite run in blocks, a case measured again takes
    its seed's whole block with it, so that the block's cases still run side by side."""
    run = config.stash.get(RUN_KEY, None)
    if run is None:
        return
    _first_seeds(items, run.seeds)
    if not run.extended:
        return

    ours = {i.suite.name for i in items if isinstance(i, CaseItem)}
    theirs = {r.suite for r in run.extended.values()}
    if ours and not ours & theirs:  # pooling another suite's records would carry it into this run's stats and report
        raise pytest.UsageError(f"--extends {run.extends}: a run of suite {', '.join(sorted(theirs))[:200]}, not of "
                                f"{', '.join(sorted(ours))[:200]}: a run extends only a run of the same suites")

    def block(item) -> tuple | None:
        s = item.suite
        return (s.name, item.case.axes["seed"]) if s.order == "blocks" and "seed" in item.case.axes else None

    def measured(item):  # the earlier record, unless the case runs again
        return run.already_measured(item.case, keep_noisy=item.suite.noisy_timing == "keep")

    again = {block(i) for i in items if isinstance(i, CaseItem) and measured(i) is None} - {None}
    kept, done = [], []
    for item in items:
        old = measured(item) if isinstance(item, CaseItem) else None
        if old is None or block(item) in again:
            kept.append(item)
            continue
        differ = differing_settings(item.case.params, old.params)
        if differ:
            raise pytest.UsageError(f"--extends {run.extends}: {item.case.case_id} ran there with other settings "
                                    f"({', '.join(differ)[:200]}): a run extends only the same suites")
        done.append(item)
    if done:
        config.hook.pytest_deselected(items=done)
        items[:] = kept


def differing_settings(now: dict, then: dict) -> list[str]:
    """Settings in which a case (``now``) differs from an earlier run's record of it (``then``). An ``auto`` setting
    is resolved by the worker on this kind of machine, and the record keeps what it became; a setting added to the
    harness since the earlier run was recorded ran there at its default."""
    import json

    from harness.spec import Settings

    now, then = (json.loads(json.dumps(p, sort_keys=True, default=str)) for p in (now, then))
    defaults = json.loads(Settings().model_dump_json())
    then = {**{k: v for k, v in defaults.items() if k not in then}, **then}
    return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k) and now.get(k) != "auto")


class _XdistHooks:
    def __init__(self, run):
        self.run = run

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        try:  # the workers join one run folder: make it (exclusively) before the first is started
            self.run.claim()
        except (FileExistsError, OSError) as exc:
            raise pytest.UsageError(one_line(exc, 400)) from None
        node.workerinput["harness_run_id"] = self.run.run_id


_CROSS_CASE = re.compile(r"\[(ratio|noninferior):.*\]$|\[baseline\]$")


def case_of(nodeid: str) -> str | None:
    """The case id of a suite case's node id (``suites/smoke.yaml::smoke[qlora-nf4-seed0]``); None for any other
    item (a cross-case check, a plain test function): what the controller of an xdist session can tell."""
    path, _, name = nodeid.partition("::")
    if not path.endswith((".yaml", ".yml")) or not name or _CROSS_CASE.search(name):
        return None
    return name


class _ProgressHooks:
    """A line per case as it starts, ``[n/N] case: about 2.1 min; about 14 min left``, through pytest's terminal
    (the controller's, under xdist too, where workers report each start), and a first line with the plan."""

    def __init__(self, config):
        self.config = config
        self.progress = None
        self._tiers: dict[Path, tuple[str, ...]] = {}

    def _plan(self, nodeids: list[str]) -> None:
        from harness.progress import Progress

        run = self.config.stash[RUN_KEY]
        cases = {n: c for n in nodeids if (c := case_of(n)) is not None and self._for_this_tier(n)}
        numprocesses = getattr(self.config.option, "numprocesses", None)
        workers = numprocesses if isinstance(numprocesses, int) and numprocesses > 0 else 1
        from harness.measure.machine import environment

        self.progress = Progress.plan(cases, run.results_dir, lambda cid: cid.split("[", 1)[0], workers,
                                      environment())  # earlier records of this kind of machine first
        auto = self.config.getoption("seeds") == "auto"
        seeds = ("every seed of replicated suites" if run.seeds is None else
                 f"{'the first ' if run.seeds > 1 else ''}{run.seeds} seed{'s' if run.seeds > 1 else ''} of each "
                 f"replicated suite, the slice: of a suite that has one ({'the ' + run.tier + ' tier' + chr(39) + 's default' if auto else '--seeds'}; "
                 "--seeds all runs every seed and case)")
        if cases:
            self._write(f"{self.progress.headline()}; {seeds}")

    def _for_this_tier(self, nodeid: str) -> bool:
        """Does the case's suite run on this session's tier (cases of other tiers skip at once: no time to count)?"""
        from harness.spec import load_suite

        path = Path(self.config.rootpath) / nodeid.partition("::")[0]
        if path not in self._tiers:
            try:
                self._tiers[path] = tuple(load_suite(path).tiers)
            except (SpecError, OSError):
                self._tiers[path] = ()
        run = self.config.stash[RUN_KEY]
        return run.tier in self._tiers[path] and run.machine_fits

    def _write(self, line: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(line)
            if tr.verbosity <= 0:
                tr.currentfspath = None  # the file's name again before its next result

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        if not self.config.pluginmanager.hasplugin("dsession"):  # an xdist controller collects nothing itself
            self._plan([i.nodeid for i in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if self.progress is None:
            self._plan(list(ids))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid, location):
        line = self.progress.start(nodeid) if self.progress is not None else None
        if line:
            self._write(line)

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.progress is not None:
            self.progress.finish(nodeid)


def is_suite_file(path: Path) -> bool:
    """A YAML file under a folder named ``suites`` (not in its tasks/ or data/ folders)."""
    if path.suffix not in (".yaml", ".yml") or path.name.startswith("_"):
        return False
    parents = [p.name for p in path.parents]
    if "suites" not in parents:
        return False
    inside = parents[: parents.index("suites")]
    return not (set(inside) & SKIP_DIRS)


def pytest_collect_file(file_path: Path, parent):
    if is_suite_file(file_path):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


def _display(path: Path, config) -> str:
    try:
        return str(path.relative_to(config.rootpath))
    except ValueError:
        return str(path)


class SuiteFile(pytest.File):
    def collect(self):
        from harness.matrix import expand, run_order
        from harness.spec import load_suite

        shown = _display(self.path, self.config)
        try:
            suite = load_suite(self.path)
            cases = expand(suite, self.path)
        except SpecError as exc:
            where = f"{one_line(exc.where, 120)}: " if exc.where else ""
            raise self.CollectError(f"{one_line(shown, 300)}: {where}{one_line(exc.what, 400)}") from None
        run = self.config.stash.get(RUN_KEY, None)
        if run is not None and run.on_cpu and run.tier in suite.tiers:
            if why := cannot_run_on_cpu(suite, cases):
                raise self.CollectError(f"{one_line(shown, 300)}: {why}")
        seen = self.config.stash[SEEN_KEY]
        names = self.config.stash[NAMES_KEY]
        if names.setdefault(suite.name, shown) != shown:
            raise self.CollectError(f"{one_line(shown, 300)}: name: suite {suite.name!r} is also the name of "
                                    f"{one_line(names[suite.name], 300)}: give each suite file its own name "
                                    "(their records would mix under one name)")
        for case in cases:
            if case.case_id in seen and seen[case.case_id] != shown:
                raise self.CollectError(f"{shown}: name: duplicate case id {case.case_id} (also in {seen[case.case_id]})")
            seen[case.case_id] = shown
        self.suite = suite
        for case in run_order(suite, cases):  # with replicates: seed by seed, shuffled within each seed
            item = CaseItem.from_parent(self, name=case.case_id, case=case, suite=suite)
            for tier in case.tiers:
                item.add_marker(getattr(pytest.mark, tier.replace("-", "_")))
            item.add_marker(pytest.mark.suite(suite.name))
            yield item
        for exp in suite.expectations:
            if isinstance(exp, RatioExpectation):
                yield RatioItem.from_parent(self, name=f"{suite.name}[ratio:{exp.label}]", exp=exp, cases=cases)
            elif isinstance(exp, NonInferiorityExpectation):
                yield NonInferiorityItem.from_parent(self, name=f"{suite.name}[noninferior:{exp.label(suite.reference)}]",
                                                     exp=exp, cases=cases, suite=suite)
        if suite.replicates > 1 and self.config.getoption("baseline"):
            yield BaselineGroupItem.from_parent(self, name=f"{suite.name}[baseline]", cases=cases, suite=suite)


def cannot_run_on_cpu(suite, cases) -> str | None:
    """Why a suite's cases cannot run on this CPU, or None. fp16 training: on the CPU torch's trainer does not cast
    the activations (a 16-bit base failed in its first matmul, 'expected m1 and m2 to have the same dtype, but got:
    float != c10::Half') and a 4-bit base's loss collapsed to 0 with a NaN adapter at the second step."""
    if "train" not in suite.stages:
        return None
    for case in cases:
        if case.settings.compute_dtype == "fp16":
            axis = case.axes.get("compute_dtype")
            where = (f"matrix.compute_dtype[{suite.matrix['compute_dtype'].index(axis)}]" if axis is not None
                     else "settings.compute_dtype")
            return (f"{where}: fp16 cannot train on the CPU (a 16-bit base fails in its first matmul, a 4-bit base's "
                    "loss collapses to 0): use bf16, fp32 or auto here, fp16 on a GPU")
    return None


class HarnessItem(pytest.Item):
    """What the harness's items share: a failure is its message (no traceback), and cross-case items find
    the cases of theirs that this session runs."""

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CaseFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, self.name

    def ran_cases(self):
        """(the run, this item's cases selected in this session for this machine); skips when there are none."""
        run = self.config.stash[RUN_KEY]
        selected = {i.case.case_id for i in self.session.items if isinstance(i, CaseItem)} | set(run.extended)
        cases = [c for c in self.cases if c.case_id in selected and run.not_selected(c) is None]
        if not cases:
            pytest.skip("none of its cases ran in this session")
        return run, cases

    def wait_s(self, cases) -> float:
        """How long to wait for cases other xdist workers run (0 without xdist: they ran before this item)."""
        return sum(c.timeout_s for c in cases) if hasattr(self.config, "workerinput") else 0


class CaseItem(HarnessItem):
    def __init__(self, *, case, suite, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.suite = suite

    def runtest(self):
        run = self.config.stash[RUN_KEY]
        why = run.not_selected(self.case)
        if why:
            pytest.skip(why)
        record = run.run_case(self.case, self.suite)
        self.user_properties.append(("record", str(run.dir)))
        if record.status == "skipped":
            pytest.skip(record.message)
        if record.status != "passed":
            raise CaseFailed(f"{record.status}: {record.message}")


class RatioItem(HarnessItem):
    """A ratio between cases of one suite, checked after those cases ran (in this session)."""

    def __init__(self, *, exp, cases, **kwargs):
        super().__init__(**kwargs)
        self.exp = exp
        self.cases = cases

    def runtest(self):
        run, cases = self.ran_cases()
        results = run.check_ratio(self.exp, cases, wait_s=self.wait_s(cases))
        if not results:
            pytest.skip("no pair of numerator and denominator cases ran in this session")
        bad = [r.message for r in results if not r.ok]
        if bad:
            raise CaseFailed("; ".join(bad))


class NonInferiorityItem(HarnessItem):
    """``method`` at most ``margin`` worse than ``against``, judged once every seed of both groups ran.

    Outcomes: pass; fail (the interval lies beyond the margin); inconclusive, reported as a skip whose
    reason holds the interval. An inconclusive comparison is evidence neither way: failing it would break
    CI on noise, passing it would claim what the data cannot show; a skip is visible in the summary
    (``-rs``) and leaves the suite green. Every outcome is stored under ``stats/expectations/`` of the run.
    """

    def __init__(self, *, exp, cases, suite, **kwargs):
        super().__init__(**kwargs)
        self.exp = exp
        self.suite = suite
        against = exp.against or suite.reference
        from harness.matrix import matches

        self.cases = [c for c in cases if c.method in (exp.method, against) and matches(c, exp.where)]

    def runtest(self):
        from harness import stats
        from harness.records import write_json_atomic

        run, cases = self.ran_cases()
        wait_s = self.wait_s(cases)
        records = _wait_records(run, cases[0].suite, {c.case_id for c in cases}, wait_s)
        against = self.exp.against or self.suite.reference
        ran = [records[c.case_id] for c in cases if c.case_id in records]
        results = stats.check_noninferiority(ran, self.exp.method, against, self.exp.compare, self.exp.margin)
        if not results:
            pytest.skip(f"no passed cases of both {self.exp.method} and {against} to compare")
        label = self.exp.label(self.suite.reference)
        write_json_atomic(run.dir / "stats" / "expectations" / f"{slug(self.suite.name + '.' + label)}.json",
                          {"suite": self.suite.name, "name": label, "results": results}, overwrite=True)
        failed = [r["message"] for r in results if r["outcome"] == "fail"]
        if failed:
            raise CaseFailed("; ".join(failed))
        unclear = [r["message"] for r in results if r["outcome"] == "inconclusive"]
        if unclear:
            pytest.skip("inconclusive: " + "; ".join(unclear))


class BaselineGroupItem(HarnessItem):
    """Replicated cases against ``--baseline`` by group: a regression only when the interval over seeds of the
    relative change lies beyond the tolerance (single cases of a replicated suite are not compared alone)."""

    def __init__(self, *, cases, suite, **kwargs):
        super().__init__(**kwargs)
        self.cases = cases
        self.suite = suite

    def runtest(self):
        from harness import stats
        from harness.records import write_json_atomic

        run, cases = self.ran_cases()
        wait_s = self.wait_s(cases)
        records = _wait_records(run, self.suite.name, {c.case_id for c in cases}, wait_s)
        base = [r for r in (run.baseline or {}).values() if r.suite == self.suite.name]
        changes = stats.compare_groups([records[c.case_id] for c in cases if c.case_id in records], base,
                                       self.suite.tolerances)
        if not changes:
            pytest.skip("the baseline has no group of these settings")
        write_json_atomic(run.dir / "stats" / "baseline" / f"{slug(self.suite.name)}.json",
                          [{**stats.as_json(c), "message": c.message} for c in changes], overwrite=True)
        bad = [c.message for c in changes if c.regressed]
        if bad:
            raise CaseFailed("; ".join(bad))


def _wait_records(run, suite: str, wanted: set[str], wait_s: float) -> dict:
    """This run's records of ``suite`` by case id, waiting up to ``wait_s`` (xdist) for ``wanted`` to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        records = run.records(suite) if run.dir.exists() else {}
        if wanted <= set(records) or time.monotonic() > deadline:
            return records
        time.sleep(2)


class CaseFailed(Exception):
    """A case whose record is failed, oom or error: the message is the report (no traceback)."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    run = config.stash.get(RUN_KEY, None)
    if run is None or hasattr(config, "workerinput") or not run.claimed or not run.dir.exists():
        return
    from harness.records import read_records, take_problems

    tr = terminalreporter
    records = read_records(run.dir, skip_bad=True)  # a file that is not a record is named below, not fatal
    problems = take_problems()
    if not records and not problems:
        return
    tr.section("qlora-harness")
    for line in problems:  # files of this or earlier runs that were left out, one line each
        tr.write_line(f"warning: {line}")
    if not records:
        return
    try:
        from harness.report import summary_table

        tr.write_line(summary_table(records))
    except ImportError:
        pass
    if run.baseline is not None:
        from harness.compare import compare_runs

        cmp = compare_runs(records, run.baseline)
        for cid, old, new in cmp.status:
            tr.write_line(f"baseline: {cid} was {old}, now {new}")
        for cid, metric in cmp.vanished:
            tr.write_line(f"baseline: {cid} no longer measures {metric}")
        if cmp.missing:
            tr.write_line(f"baseline: {len(cmp.missing)} case(s) of these suites not in this run: "
                          f"{one_line(', '.join(cmp.missing), 300)}")
    tr.write_line(f"records: {run.dir}")
    report = getattr(config, "_harness_report", None)
    if report:
        tr.write_line(f"report:  {report}")
    for warning in getattr(config, "_harness_report_errors", []):
        tr.write_line(f"report not written: {warning}")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    run = config.stash.get(RUN_KEY, None)
    if run is None or not run.claimed or not run.dir.exists():
        return
    _write_stats(session, run)
    if hasattr(config, "workerinput") or config.getoption("no_report"):
        return
    from harness.records import RecordError

    reports = Path(config.getoption("reports_dir")).resolve()
    baseline = config.getoption("baseline")
    config._harness_report_errors = []
    # a report problem is reported, it does not end the session in a traceback; the index is written either way
    try:
        from harness.report import render_index, render_run
    except ImportError as exc:  # plotly or Jinja2 missing (a GPU image): the records stand, render them elsewhere
        config._harness_report_errors.append(one_line(
            f"{exc} (install the report's packages, or pass --no-report and run "
            f"`python -m harness report {run.dir}` where they are)", 400))
        return
    try:
        config._harness_report = render_run(run.dir, reports, baseline=baseline)
    except (RecordError, OSError) as exc:
        config._harness_report_errors.append(one_line(exc, 400))
    try:
        render_index(run.results_dir, reports)
    except (RecordError, OSError) as exc:
        config._harness_report_errors.append(one_line(exc, 400))

def pytest_unconfigure(config):
    """A run folder reserved for xdist workers that ran no case is removed again (only when still empty)."""
    run = config.stash.get(RUN_KEY, None)
    if run is not None and not hasattr(config, "workerinput") and run.claimed:
        try:
            run.dir.rmdir()
        except OSError:  # not empty: a real run
            pass


def _write_stats(session, run) -> None:
    """Replicate groups, paired differences and ratios of every suite of the run: ``stats/<suite>.json``.

    Each process notes the reference method of the suites it collected (``stats/references.<worker>.json``,
    as an xdist controller collects nothing); the controller, last to finish, computes the statistics.
    """
    from harness.records import write_json_atomic

    records = list(run.records().values())
    if not records:  # nothing ran: leave no stats behind (an empty run folder is removed at unconfigure)
        return
    refs = {i.suite.name: i.suite.reference for i in session.items if isinstance(i, CaseItem)}
    folder = run.dir / "stats"
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if refs:
        write_json_atomic(folder / f"references.{worker or 'main'}.json", refs, overwrite=True)
    if worker is not None:
        return
    from harness import stats

    stats.write_run_stats(run.dir, records, refs)
