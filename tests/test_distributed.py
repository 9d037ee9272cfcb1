"""Cases over ranks (torchrun, 2 gloo processes on the CPU): FSDP2 and DDP train exactly the adapters one process
replaying both ranks' batches trains; a run whose sharding is silently off fails; a rank that crashes or hangs
ends the whole case with one status and no process left behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from harness import launchers, spec
from harness.launchers.torchrun import merge_failure, root_cause
from harness.matrix import Case, expand
from harness.records import Record
from harness.worker import run_isolated

DATA = Path(__file__).resolve().parents[1] / "suites" / "data" / "support_train.jsonl"
SUITE = f"""\
name: dist
tiers: [cpu]
model: {{source: synthetic, preset: tiny-llama, num_layers: 1}}
data: {{train: {DATA}}}
stages: [train]
settings: {{launcher: torchrun, nproc: 2, seq_len: 32, batch_size: 2, max_steps: 3, warmup_steps: 1,
           learning_rate: 0.002, compute_dtype: auto, lora_dropout: 0.0, dist_timeout_s: 20}}
matrix:
  method: [qlora-nf4-dq]
  strategy: [fsdp2, ddp]
timeout_s: 300
"""
# Adapters after 3 steps against one process replaying both ranks' batches (loss = mean of the ranks' mean token
# losses) on one thread, as each rank runs (torchrun sets OMP_NUM_THREADS=1). DDP all-reduces the same two
# gradients: measured equal bit for bit. FSDP2 reduce-scatters them and sums the clipping norm shard by shard,
# in another order: measured 1.6e-5 of an adapter's largest value (a bf16 last bit of a small element). The
# bound is one bf16 ulp of that largest value (2**-8); a rank that trains on its own batches alone is off by far more.
REL_TOL = 2**-8


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("suites")
    (folder / "dist.yaml").write_text(SUITE)
    return {c.settings.strategy: c for c in expand(spec.load_suite(folder / "dist.yaml"), folder / "dist.yaml")}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QLORA_HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(case: Case, run_dir: Path) -> tuple[Record, Path]:
    work = run_dir / "work" / case.settings.strategy
    return run_isolated(case, "t", run_dir, work), work


def _left_behind(work: Path) -> list[psutil.Process]:
    """Processes still running this case (the agent or a rank: their command lines name its case file)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(work) in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def replay(case: Case, work: Path):
    """The adapters one process trains on both ranks' batches, step by step (independent of any process group)."""
    import torch
    from datasets import load_dataset

    from harness import models, precision
    from harness.measure.machine import resolve_compute_dtype
    from harness.stages import Context, load_for_training
    from harness.stages.train_distributed import MAX_GRAD_NORM, collate, fused_head, loss_of, optimizer_for

    case = case.model_copy(update={"settings": resolve_compute_dtype(case.settings, "cpu")})
    s = case.settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = models.prepare(case)
        ctx = Context(case=case, source=source, device="cpu", run_dir=work, work_dir=work)
        torch.manual_seed(s.seed)
        model = load_for_training(ctx)
        fused_head(model)
        precision.apply(model, s.precision, s.compute_dtype)
        model.train()
        optimizer = optimizer_for(model, s)
        tokenizer = models.load_tokenizer(source)
        data = load_dataset("json", data_files=case.data.train, split="train")
        rows = [json.loads((work / f"batches.rank{r}.json").read_text()) for r in range(2)]
        for t in range(s.max_steps):
            losses = [loss_of(model, collate(tokenizer, [data[i]["text"] for i in rows[r][t]], s.seq_len), "cpu",
                              s.compute_dtype) for r in range(2)]
            (sum(losses) / 2).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {n.replace(".default", ""): p.detach().float() for n, p in model.named_parameters() if "lora_" in n}
    finally:
        torch.set_num_threads(threads)


def check_exact(record: Record, work: Path, replayed: dict, strategy: str) -> float:
    """The case trained what ``strategy`` promises: read back from the wrapped model, and adapters equal to the
    replay's. Returns the largest relative difference."""
    from safetensors.torch import load_file

    assert record.status == "passed", record.message
    wrapped = record.tables["train.strategy"][0]
    assert wrapped["in_force"] == strategy, f"wrapped as {wrapped['in_force']}, not {strategy}"
    if strategy == "fsdp2":
        assert record.metrics["train.dtensor_param_share"] == 1.0 and record.metrics["train.fsdp_modules"] >= 2
    saved = {k: v.float() for k, v in load_file(work / "adapter" / "adapter_model.safetensors").items()}
    assert sorted(saved) == sorted(replayed)
    worst = max(float((saved[k] - replayed[k]).abs().max() / replayed[k].abs().max()) for k in saved)
    assert worst <= REL_TOL, f"adapters differ from the one-process replay by {worst:.3g} (relative)"
    return worst


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_adapters_equal_a_one_process_replay_of_both_ranks_batches(cases, strategy, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"  # the case's processes' temporary folder: torchrun's own logs went there, never removed
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    record, work = _run(cases[strategy], tmp_path)
    assert not sorted(p.name for p in tmp.iterdir()), "the case left files in the temporary folder"
    worst = check_exact(record, work, replay(cases[strategy], work), strategy)
    print(f"{strategy}: largest relative difference to the replay {worst:.3g}")
    ranks = record.tables["train.ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:  # each rank measured itself, and the estimator predicted it, like with like
        assert r["peak_rss_gib"] > r["tensor_peak_gib"] > 0
        # what the step starts with (sharded or replicated weights, adapters, AdamW state): measured 0.00233 GiB
        # under FSDP2 and 0.00463 under DDP per rank, predicted 0.00262 and 0.00523
        assert 0.8 < r["estimate_held_gib"] / r["tensor_start_gib"] < 1.3, r
        # the step's peak: measured 0.0138-0.0141 (FSDP2) and 0.0114-0.0118 (DDP), predicted 1.17-1.18x that,
        # the one-process estimator's own margin on this model
        assert 0.8 < r["estimate_gib"] / r["tensor_peak_gib"] < 1.6, r
    m = record.metrics
    assert m["train.ranks_sum.tensor_peak_gib"] == pytest.approx(sum(r["tensor_peak_gib"] for r in ranks))
    assert m["train.ranks_max.peak_rss_gib"] == max(r["peak_rss_gib"] for r in ranks)
    assert m["train.tokens_per_s"] > 0 and m["train.world_size"] == 2
    if strategy == "fsdp2":  # each rank starts its step with half of what a replica holds
        start = [m[f"train.rank{r}.tensor_start_gib"] for r in range(2)]
        assert max(start) < 0.75 * sum(start)


@pytest.mark.parametrize("swap", ["ddp", "none"])
def test_silently_unsharded_fsdp2_fails_the_case_and_the_exactness_check(cases, swap, tmp_path, monkeypatch):
    """The knob (QLORA_HARNESS_FAULT=wrap=...) makes the fsdp2 strategy wrap with DDP or with nothing and say
    nothing, as trl's trainer on the CPU does: the strategy read back from the model fails the case, and the
    exactness check fails too (with nothing, each rank trains on its own batches only)."""
    monkeypatch.setenv("QLORA_HARNESS_FAULT", f"wrap={swap}")
    record, work = _run(cases["fsdp2"], tmp_path)
    assert record.status == "failed" and f"wrapped as {swap}" in record.message, record.message
    replayed = replay(cases["fsdp2"], work)
    with pytest.raises(AssertionError, match=f"wrapped as {swap}, not fsdp2"):
        check_exact(record.model_copy(update={"status": "passed"}), work, replayed, "fsdp2")
    if swap == "none":  # the adapters themselves differ from the replay's, not only the strategy read back
        with pytest.raises(AssertionError, match="differ from the one-process replay"):
            rec = record.model_copy(update={"status": "passed", "tables": {
                **record.tables, "train.strategy": [{"in_force": "fsdp2"}]}, "metrics": {
                **record.metrics, "train.dtensor_param_share": 1.0, "train.fsdp_modules": 2.0}})
            check_exact(rec, work, replayed, "fsdp2")


@pytest.mark.parametrize("fault, words", [
    ("crash@1:1", "rank 1"),
    ("hang@1:1", "rank 0 of 2"),
])
def test_a_rank_that_crashes_or_hangs_ends_the_case_with_one_status(cases, fault, words, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_HARNESS_FAULT", fault)
    t = time.perf_counter()
    record, work = _run(cases["ddp"], tmp_path)
    took = time.perf_counter() - t
    assert record.status == "error" and record.message.startswith(words), record.message
    if "crash" in fault:  # whether rank 0 saw the closed connection and wrote a record before torchrun stopped it
        assert "died with signal SIGSEGV" in record.message.split(";")[0], record.message
    if "hang" in fault:  # rank 0 gave up at the process group's timeout, long before the case's
        assert record.env["failed_rank"] == 0 and "rank 1 never answered" in record.message, record.message
        assert "timed out" in record.message.lower() or "timeout" in record.message.lower(), record.message
        assert took < cases["ddp"].timeout_s
    assert _left_behind(work) == []


def test_failure_merging_names_the_first_rank_and_the_others():
    """The harness's handling of rank records (hand-made records): root cause first, then the rest."""
    def rec(status, message):
        return Record(run_id="r", suite="s", case_id="s[x]", method="qlora-nf4", params={}, status=status,
                      message=message)

    log = ("Root Cause (first observed failure):\n[0]:\n  time      : x\n  host      : h\n"
           "  rank      : 2 (local_rank: 0)\n  exitcode  : -9 (pid: 12) Signal 9\n")
    assert root_cause(log) == (2, -9)
    peer = rec("error", "RuntimeError: Connection closed by peer")
    status, message, first = merge_failure({0: peer, 1: rec("oom", "MemoryError: injected")}, 2, None)
    assert (status, first) == ("oom", 1) and message.startswith("rank 1 of 2: MemoryError")
    assert "rank 0 error: RuntimeError: Connection closed" in message
    status, message, first = merge_failure({0: peer, 1: peer}, 3, root_cause(log))
    assert (status, first) == ("error", 2) and message.startswith("rank 2 of 3: died with signal SIGKILL")


@pytest.mark.parametrize("settings, stages, words", [
    ({"nproc": 2}, ["train"], "launcher 'process' runs one process"),
    ({"strategy": "fsdp2"}, ["train"], "needs several ranks"),
    ({"launcher": "torchrun", "nproc": 2}, ["train"], "needs strategy: fsdp2 or ddp"),
    ({"launcher": "torchrun", "nproc": 2, "strategy": "ddp"}, ["train", "eval"], "runs stage train only"),
    ({"launcher": "torchrun", "nnodes": 2, "strategy": "ddp"}, ["train"], "needs rdzv_endpoint"),
    ({"launcher": "torchrun", "strategy": "ddp", "optimizer": "paged_adamw_8bit"}, ["train"], "adamw_torch"),
])
def test_launcher_settings_it_cannot_run_fail_collection_in_one_line(settings, stages, words):
    s = spec.Settings(**settings)
    why = launchers.get(s.launcher).check(s, stages)
    assert why is not None and words in why and "\n" not in why


def test_torchrun_command_passes_rendezvous_options_through(cases):
    case = cases["ddp"]
    multi = case.model_copy(update={"settings": case.settings.model_copy(
        update={"nnodes": 2, "rdzv_endpoint": "node0:29400"})})
    cmd = launchers.get("torchrun").command(multi, Path("c.json"), Path("r.json"), "run1", Path("."))
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=node0:29400" in cmd and "--rdzv-backend=c10d" in cmd
    assert "--standalone" not in cmd and cmd[cmd.index("-m", 3):][:2] == ["-m", "harness.worker"]
    single = launchers.get("torchrun").command(case, Path("c.json"), Path("r.json"), "run1", Path("."))
    assert "--standalone" in single and "--nproc-per-node=2" in single and "--max-restarts=0" in single


def _rec(method: str, strategy: str, status: str = "passed", in_force: str | None = None, message: str = "",
         metrics: dict | None = None) -> Record:
    return Record(run_id="20261201T000000Z-x", suite="distributed", case_id=f"distributed[{method}-{strategy}]",
                  method=method, params={"method": method, "strategy": strategy, "launcher": "torchrun"},
                  status=status, message=message, metrics=metrics or {},
                  tables={"train.strategy": [{"setting": strategy, "in_force": in_force or strategy}]})


def test_the_compatibility_table_and_per_rank_table_come_from_the_records(tmp_path):
    """The report's handling of hand-made records: a cell works only where the case passed and the wrapped model
    had the strategy set; otherwise the record's own failure."""
    from harness.records import write_json_atomic, write_record
    from harness.report.distributed import compat_table, ranks_table
    from harness.report.render import render_run

    per_rank = {"train.world_size": 2.0, "train.rank0.tensor_peak_gib": 0.0166, "train.rank1.tensor_peak_gib": 0.016,
                "train.rank0.estimate_gib": 0.018, "train.rank1.estimate_gib": 0.017,
                "train.ranks_max.tensor_peak_gib": 0.0166, "train.ranks_sum.tensor_peak_gib": 0.0326}
    records = [_rec("qlora-nf4-dq", "fsdp2", metrics=per_rank), _rec("qlora-nf4-dq", "ddp"),
               _rec("qlora-fp4", "fsdp2", "failed", "ddp", "strategy fsdp2 was set but the model is wrapped as ddp"),
               _rec("qlora-fp4", "ddp", "error", None, "rank 1 of 2: RuntimeError: Cannot flatten integer dtype")]
    table = compat_table(records)
    assert table.strategies == ["fsdp2", "ddp"]
    cells = {r["method"]: r["cells"] for r in table.rows}
    assert cells["qlora-nf4-dq"] == ["works", "works"]
    assert cells["qlora-fp4"] == ["fails: wrapped as ddp, not fsdp2",
                                  "fails (error): rank 1 of 2: RuntimeError: Cannot flatten integer dtype"]
    assert "| qlora-fp4 | fails: wrapped as ddp" in table.markdown()
    ranks = ranks_table(records)
    assert [r["rank"] for r in ranks.rows] == ["0", "1", "max", "sum"]
    assert ranks.rows[0]["cells"][:2] == ["0.01660", "0.01800"]
    assert compat_table([r.model_copy(update={"params": {"method": "x"}}) for r in records]) is None

    run = tmp_path / "results" / "20261201T000000Z-x"
    write_json_atomic(run / "run.json", {"run_id": run.name, "started_at": "2026-12-01T00:00:00+00:00", "env": {},
                                         "suites": ["distributed"]})
    for r in records:
        write_record(run, r)
    html = render_run(run, tmp_path / "reports").read_text()
    assert 'class="comparison compat"' in html and 'class="comparison ranks"' in html
    assert "fails: wrapped as ddp, not fsdp2" in html


@pytest.mark.parametrize("change, words", [
    ("launcher: torchrun", "settings.launcher: unknown launcher 'mpirun' (expected one of process, torchrun)"),
    ("launcher: torchrun, nproc: 2", "matrix: dist[qlora-nf4-dq-fsdp2]: launcher 'process' runs one process (nproc 2, nnodes 1): "
                 "set launcher: torchrun"),
])
def test_a_suite_whose_launcher_cannot_run_it_fails_collection_in_one_line(tmp_path, change, words):
    text = SUITE.replace(change, "launcher: mpirun" if "unknown" in words else "launcher: process, nproc: 2")
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(spec.SpecError) as err:
        expand(spec.load_suite(tmp_path / "x.yaml"), tmp_path / "x.yaml")
    assert str(err.value) == f"{tmp_path / 'x.yaml'}: {words}"


def test_a_run_recorded_before_the_launcher_settings_existed_can_still_be_extended():
    """Records written before ``launcher``, ``nproc``, ``strategy``… existed lack them: they ran at the defaults."""
    from harness.plugin import differing_settings

    now = spec.Settings(method="qlora-nf4").model_dump()
    old = {k: v for k, v in now.items() if k not in ("launcher", "nproc", "nnodes", "strategy", "rdzv_endpoint",
                                                     "dist_timeout_s")}
    assert differing_settings(now, old) == []
    assert differing_settings({**now, "strategy": "ddp"}, old) == ["strategy"]
