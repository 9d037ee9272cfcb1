"""Replicate groups, intervals over seeds, paired bootstrap differences and non-inferiority verdicts.

Records only (numpy/scipy, no torch). The pieces:

* ``groups``: records that differ only by their ``seed`` form a replicate group; ``summarise`` gives each
  metric's mean, sd, n and a 95% t-interval over seeds.
* ``paired_difference``: a quality metric of a method minus the reference method's, with a 95% interval
  from a bootstrap over training seeds and eval items together. Items come from the per-item tables the
  eval stage stores (``eval.items.<variant>``, see ``item_table``); seeds are paired (seed i with seed i)
  when both groups ran the same seeds. Items are crossed with seeds (every seed scores the same items), so
  one draw of items is applied to every seed of a bootstrap replicate: resampling items afresh within each
  seed would average the item effect away and make the interval too narrow.
* ``ratio``: speed and memory as method / reference with a log-t (Welch) interval over seeds.
* ``noninferiority``: pass, fail or inconclusive from the interval of a difference and a margin (one
  pre-stated hypothesis, so a plain 95% interval).
* differences in ``run_stats`` (the report's and the README's verdicts) use intervals simultaneous over the
  methods compared with the reference (Bonferroni), so that a suite of five methods does not report a
  difference that one of its five 95% intervals found by chance.
* ``run_stats``: all of it for a run's records, as the JSON the run folder and the report hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from harness import metrics

LEVEL = 0.95
BOOTSTRAP = 2000  # bootstrap replicates; 2000 keeps the 2.5% / 97.5% quantiles within about ±0.002 of 0/1 acc
REFERENCE = "lora-bf16"
ITEMS = "eval.items"  # record.tables key prefix: eval.items.adapter, eval.items.merged, eval.items.base
LN2 = math.log(2)
# Per-document quantities lm-eval logs for loglikelihood_rolling tasks: (loglikelihood, count) pairs.
_ROLLING = {"bits_per_byte": "bytes", "byte_perplexity": "bytes", "word_perplexity": "words"}
_SEED_TOKEN = re.compile(r"seed\d+")  # how matrix.case_id writes the seed axis


# -- per-item tables from lm-eval ----------------------------------------------------------------------

def item_table(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """lm-eval's ``results["samples"]`` as compact rows: one per (task, doc_id).

    Multiple choice: ``{"task", "doc_id", "acc": 0/1, "acc_norm": 0/1}``. loglikelihood_rolling:
    ``{"task", "doc_id", "loglikelihood", "bytes", "words"}`` (natural log), from which per-item bits
    per byte and perplexities follow. Only the first filter of a task is kept (ours have one).
    """
    rows = []
    for task, samples_of_task in samples.items():
        first_filter = None
        for s in samples_of_task:
            flt = s.get("filter")
            first_filter = flt if first_filter is None else first_filter
            if flt != first_filter:
                continue
            row: dict[str, Any] = {"task": task, "doc_id": int(s["doc_id"])}
            for name in s.get("metrics", []):
                value = s.get(name)
                if isinstance(value, list | tuple) and len(value) == 2 and name in _ROLLING:
                    row["loglikelihood"] = float(value[0])
                    row[_ROLLING[name]] = int(value[1])
                elif isinstance(value, bool | int | float | np.floating | np.integer):
                    row[name] = float(value)
            rows.append(row)
    return rows


@dataclass(frozen=True)
class ItemMetric:
    """How an eval metric is rebuilt from per-item rows: ``f(sum(num) / sum(den))``."""

    variant: str  # adapter | merged | base
    task: str
    metric: str  # acc, acc_norm, bits_per_byte, ...

    @property
    def table(self) -> str:
        return f"{ITEMS}.{self.variant}"

    def arrays(self, rows: Sequence[Mapping[str, Any]]) -> dict[int, tuple[float, float]] | None:
        """doc_id -> (numerator, denominator) for this task, or None when the rows lack the metric."""
        out = {}
        for r in rows:
            if r.get("task") != self.task:
                continue
            if self.metric in _ROLLING:
                count = r.get(_ROLLING[self.metric])
                if count is None or r.get("loglikelihood") is None:
                    return None
                out[int(r["doc_id"])] = (-float(r["loglikelihood"]), float(count))
            else:
                if r.get(self.metric) is None:
                    return None
                out[int(r["doc_id"])] = (float(r[self.metric]), 1.0)
        return out or None

    def finish(self, ratio: np.ndarray) -> np.ndarray:
        if self.metric == "bits_per_byte":
            return ratio / LN2
        if self.metric in ("byte_perplexity", "word_perplexity"):
            return np.exp(ratio)
        return ratio


def item_metric(name: str) -> ItemMetric | None:
    """``eval.support_mc.acc`` -> adapter/support_mc/acc; ``eval.t.merged_bits_per_byte`` -> merged/…; else None."""
    m = re.fullmatch(r"eval\.([^.]+)\.(?:(merged|base)_)?([a-z_]+)", name)
    if not m or m.group(1) == "items":
        return None
    metric = m.group(3)
    if metric not in ("acc", "acc_norm", "exact_match", *_ROLLING):
        return None
    return ItemMetric(m.group(2) or "adapter", m.group(1), metric)


# -- replicate groups ----------------------------------------------------------------------------------

def group_id(case_id: str) -> str:
    """``smoke[qlora-nf4-seed1]`` -> ``smoke[qlora-nf4]``: the case id without its seed."""
    if "[" not in case_id or not case_id.endswith("]"):
        return case_id
    head, _, inner = case_id[:-1].partition("[")
    kept = [t for t in inner.split("-") if not _SEED_TOKEN.fullmatch(t)]
    return f"{head}[{'-'.join(kept)}]" if kept else head


def _key(rec: Any, drop: Iterable[str] = ("seed",)) -> tuple:
    drop = set(drop)
    return (rec.suite, tuple(sorted((k, repr(v)) for k, v in rec.params.items() if k not in drop)))


@dataclass
class Group:
    """Records of one suite equal in every setting but ``seed``, ordered by seed."""

    suite: str
    group_id: str
    method: str
    params: dict[str, Any]  # the shared settings (seed left out)
    records: list[Any]

    @property
    def seeds(self) -> list[int]:
        return [int(r.params.get("seed") or 0) for r in self.records]

    def values(self, name: str) -> np.ndarray:
        """The metric over seeds (records without it left out), NaN and inf kept out too."""
        vals = [r.metrics.get(name) for r in self.records]
        return np.array([v for v in vals if v is not None and math.isfinite(v)], dtype=float)


def measured(rec: Any) -> bool:
    """A record whose every stage ran: passed, or failed only on a bound checked afterwards (its expectations were
    judged, which happens only after every stage ran). Such a seed is its method's outcome: leaving it out of its
    group would keep the seeds that went well. A stage's own failure (unhealthy training, an exactness check)
    or a crash measured something else."""
    return rec.status == "passed" or (rec.status == "failed" and any(not e.ok for e in rec.expectations or []))


def bound_failures(group: Group) -> int:
    """How many of a group's seeds failed a bound (they are in its statistics all the same)."""
    return sum(r.status == "failed" for r in group.records)


def groups(records: Iterable[Any]) -> list[Group]:
    """Measured records (``measured``) grouped by suite and every setting but ``seed``, in first-seen order."""
    out: dict[tuple, Group] = {}
    for rec in records:
        if not measured(rec):
            continue
        key = _key(rec)
        if key not in out:
            params = {k: v for k, v in rec.params.items() if k != "seed"}
            out[key] = Group(rec.suite, group_id(rec.case_id), rec.method, params, [])
        out[key].records.append(rec)
    for g in out.values():
        g.records.sort(key=lambda r: int(r.params.get("seed") or 0))
    return list(out.values())


@dataclass
class Summary:
    """A metric over the seeds of a group: mean, sample sd, n and a t-interval (NaN bounds when n < 2)."""

    mean: float
    sd: float
    n: int
    lo: float
    hi: float
    values: list[float] = field(default_factory=list)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def t_interval(values: Sequence[float], level: float = LEVEL) -> Summary:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan, [])
    mean = float(x.mean())
    if n < 2:
        return Summary(mean, math.nan, 1, math.nan, math.nan, x.tolist())
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(mean, sd, n, mean - half, mean + half, x.tolist())


def counted(group: Group, name: str) -> Group:
    """The group's seeds that count for metric ``name``: for a timing, those whose timing the noise guard did not
    flag (a busy host's tokens/s says nothing about the method); for any other metric, all."""
    from harness.measure.noise import is_timing_metric, timing_noisy

    if not is_timing_metric(name):
        return group
    return Group(group.suite, group.group_id, group.method, group.params,
                 [r for r in group.records if not timing_noisy(r.metrics)])


def summarise(group: Group) -> dict[str, Summary]:
    """Every numeric metric of a group over the seeds that count for it (``counted``: the summary's ``n`` says how
    many)."""
    names = dict.fromkeys(k for r in group.records for k in r.metrics)
    out = {}
    for n in names:
        values = counted(group, n).values(n)
        if len(values):
            out[n] = t_interval(values)
    return out


# -- differences and ratios against a reference -------------------------------------------------------

@dataclass
class Difference:
    """``method - reference`` of one metric: point estimate, interval and how it was obtained."""

    metric: str
    group: str
    reference: str
    estimate: float
    lo: float
    hi: float
    n_seeds: tuple[int, int]  # (method, reference)
    n_items: int  # 0 when the interval is over seeds only
    paired_seeds: bool
    how: str  # "bootstrap seeds x items" | "t over seeds" | "none"


def _seed_weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """Bootstrap counts of ``n`` seeds for ``b`` replicates, shape (b, n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)


def _stack(group: Group, im: ItemMetric, docs: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(numerator, denominator), each (seeds, items), of a group's per-item rows over ``docs``."""
    nums, dens = [], []
    for r in group.records:
        a = im.arrays(r.tables.get(im.table) or [])
        if a is None or any(d not in a for d in docs):
            return None
        nums.append([a[d][0] for d in docs])
        dens.append([a[d][1] for d in docs])
    return np.array(nums), np.array(dens)


def _common_docs(*parts: tuple[Group, ItemMetric]) -> list[int]:
    """The doc ids every record of each (group, item metric) holds per-item rows for; [] if one lacks them."""
    sets = []
    for group, im in parts:
        for r in group.records:
            arr = im.arrays(r.tables.get(im.table) or [])
            if arr is None:
                return []
            sets.append(set(arr))
    return sorted(set.intersection(*sets)) if sets else []


def _linearised(num: np.ndarray, den: np.ndarray, finish) -> tuple[float, np.ndarray]:
    """The statistic ``finish(Σnum/Σden)`` and each (seed, item)'s first-order contribution to it."""
    r = num.sum() / den.sum()
    eps = 1e-6 * max(abs(r), 1e-12)
    slope = (finish(np.float64(r + eps)) - finish(np.float64(r - eps))) / (2 * eps)
    return float(finish(np.float64(r))), slope * (num - r * den) / den.mean()


def _two_way(z: np.ndarray) -> tuple[float, float]:
    """Seed component of the variance of a (seeds, items) table's grand mean, and its degrees of freedom."""
    n_s, n_i = z.shape
    if n_s < 2:
        return 0.0, math.inf  # one seed: seed-to-seed variation is not estimable (and not included)
    rows, cols, g = z.mean(1), z.mean(0), z.mean()
    ms_seeds = n_i * ((rows - g) ** 2).sum() / (n_s - 1)
    ms_resid = ((z - rows[:, None] - cols[None, :] + g) ** 2).sum() / ((n_s - 1) * (n_i - 1)) if n_i > 1 else 0.0
    return max(ms_seeds - ms_resid, 0.0) / (n_s * n_i), n_s - 1


def crossed_variance(za: np.ndarray, zr: np.ndarray, paired_seeds: bool) -> tuple[float, float]:
    """Unbiased variance of ``mean(za) - mean(zr)`` for items crossed with seeds, and Satterthwaite df.

    Random-effects model d = item + seed + residual: Var = σ²_item/n_i + σ²_seed/n_s + σ²_resid/(n_s·n_i).
    The item part is the variance of the per-item means of the difference (residual included); the seed
    part is (MS_seeds - MS_resid)/(n_s·n_i) of a two-way table without replication (truncated at 0), per
    method when seeds are not paired. (Taking the residual off the item part instead covered worse.)
    """
    n_i = za.shape[1]
    item_means = za.mean(0) - zr.mean(0)
    parts = [(item_means.var(ddof=1) / n_i if n_i > 1 else 0.0, n_i - 1)]
    parts += [_two_way(za - zr)] if paired_seeds else [_two_way(za), _two_way(zr)]
    v = sum(p for p, _ in parts)
    den = sum(p**2 / df for p, df in parts if p > 0 and df > 0)
    return v, (v**2 / den if den > 0 else math.inf)


def bootstrap_difference(
    a_num: np.ndarray, a_den: np.ndarray, b_num: np.ndarray, b_den: np.ndarray, *,
    finish=lambda x: x, paired_seeds: bool, n_boot: int = BOOTSTRAP, seed: int = 0, level: float = LEVEL,
) -> tuple[float, float, float]:
    """Estimate and interval of ``finish(ΣA_num/ΣA_den) - finish(ΣB_num/ΣB_den)``; arrays are (seeds, items).

    Each bootstrap replicate draws item counts once (shared by both methods and every seed: paired and
    crossed) and seed counts (shared by both methods when ``paired_seeds``, else drawn for each); weighted
    sums make every replicate two einsums. The crossed ("pigeonhole") bootstrap counts the residual
    (seed x item) variance about three times and the seed variance (n-1)/n times, so on its own it covers
    98-99% where 95% is asked: its draws give the shape of the interval, which is rescaled to the unbiased
    random-effects variance (``crossed_variance``) with a t quantile at Satterthwaite's degrees of freedom.
    """
    rng = np.random.default_rng(seed)
    n_items = a_num.shape[1]
    w = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot).astype(float)  # (B, items)
    ca = _seed_weights(rng, a_num.shape[0], n_boot)
    cb = ca if paired_seeds else _seed_weights(rng, b_num.shape[0], n_boot)

    def stat(c, num, den):
        return finish(np.einsum("bs,si,bi->b", c, num, w) / np.einsum("bs,si,bi->b", c, den, w))

    fa, za = _linearised(a_num, a_den, finish)
    fb, zb = _linearised(b_num, b_den, finish)
    est = fa - fb
    draws = stat(ca, a_num, a_den) - stat(cb, b_num, b_den)
    var, df = crossed_variance(za, zb, paired_seeds)
    spread = draws.std()
    if spread == 0 or var == 0:
        return est, est, est
    z = float(sps.norm.ppf(0.5 + level / 2))
    scale = math.sqrt(var) / spread * float(sps.t.ppf(0.5 + level / 2, df)) / z
    q_lo, q_hi = np.quantile(draws - draws.mean(), [(1 - level) / 2, (1 + level) / 2])
    return est, est + scale * float(q_lo), est + scale * float(q_hi)


def seed_difference(a: np.ndarray, b: np.ndarray, paired: bool, level: float = LEVEL) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` with a paired t (matched seeds) or Welch interval over seeds; NaN bounds if too few."""
    est = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if paired and len(a) == len(b) and len(a) >= 2:
        s = t_interval(a - b, level)
        return est, s.lo, s.hi
    if len(a) < 2 and len(b) < 2:
        return est, math.nan, math.nan
    va = a.var(ddof=1) / len(a) if len(a) >= 2 else 0.0
    vb = b.var(ddof=1) / len(b) if len(b) >= 2 else 0.0
    se = math.sqrt(va + vb)
    if se == 0:
        return est, est, est
    df = (va + vb) ** 2 / ((va**2 / (len(a) - 1) if len(a) >= 2 else 0) + (vb**2 / (len(b) - 1) if len(b) >= 2 else 0))
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    return est, est - half, est + half


def paired_difference(a: Group, ref: Group, name: str, *, n_boot: int = BOOTSTRAP, seed: int = 0,
                      level: float = LEVEL) -> Difference:
    """``name`` of ``a`` minus ``ref``: bootstrap over seeds and items when both hold the per-item rows."""
    paired = a.seeds == ref.seeds
    im = item_metric(name)
    if im is not None:
        docs = _common_docs((a, im), (ref, im))
        sa, sb = (_stack(a, im, docs), _stack(ref, im, docs)) if docs else (None, None)
        if sa is not None and sb is not None:
            est, lo, hi = bootstrap_difference(*sa, *sb, finish=im.finish, paired_seeds=paired, n_boot=n_boot,
                                               seed=seed, level=level)
            return Difference(name, a.group_id, ref.group_id, est, lo, hi, (len(a.records), len(ref.records)),
                              len(docs), paired, "bootstrap seeds x items")
    va, vb = a.values(name), ref.values(name)
    if paired and len(va) != len(vb):
        paired = False
    est, lo, hi = seed_difference(va, vb, paired, level)
    how = "t over seeds" if math.isfinite(lo) else "none"
    return Difference(name, a.group_id, ref.group_id, est, lo, hi, (len(va), len(vb)), 0, paired, how)


def simultaneous_level(comparisons: int, level: float = LEVEL) -> float:
    """Per-comparison level that keeps ``comparisons`` intervals at ``level`` jointly (Bonferroni)."""
    return 1 - (1 - level) / max(comparisons, 1)


def reference_gain(ref: Group, name: str, *, n_boot: int = BOOTSTRAP, seed: int = 0) -> Difference | None:
    """What the reference's adapter gained over its own untrained base in ``name`` (adapter minus base),
    bootstrapped over seeds and items like a difference; None without both per-item tables.

    A metric the reference did not improve on cannot show what another method costs: an eval at chance
    gives "no detectable difference" and passes any non-inferiority margin whatever the methods learned.
    """
    im = item_metric(name)
    if im is None or im.variant != "adapter":
        return None
    base = ItemMetric("base", im.task, im.metric)
    docs = _common_docs((ref, im), (ref, base))
    sa, sb = (_stack(ref, im, docs), _stack(ref, base, docs)) if docs else (None, None)
    if sa is None or sb is None:
        return None
    est, lo, hi = bootstrap_difference(*sa, *sb, finish=im.finish, paired_seeds=True, n_boot=n_boot, seed=seed)
    n = len(ref.records)
    return Difference(name, ref.group_id, f"{ref.group_id} base", est, lo, hi, (n, n), len(docs), True,
                      "bootstrap seeds x items")


def informative(gain: Difference | None) -> bool | None:
    """Did the reference improve on its base (interval clear of zero, in the metric's good direction)? None: unknown."""
    if gain is None or not (math.isfinite(gain.lo) and math.isfinite(gain.hi)):
        return None
    direction = metrics.direction(gain.metric)
    return bool(gain.lo > 0) if direction == "higher" else bool(gain.hi < 0) if direction == "lower" else None


def gain_text(gain: Difference) -> str:
    k = digits_for((gain.hi - gain.lo) / 2)
    return f"{gain.estimate:+.{k}f} [{gain.lo:+.{k}f}, {gain.hi:+.{k}f}]"


@dataclass
class Ratio:
    """``method / reference`` of one speed or memory metric over seeds, with an interval on the log scale.

    How the cases ran decides the interval. ``blocks``: every seed's two cases ran next to each other (no case of
    another seed between them), so a drift of the machine over the session cancels in each seed's ratio: a paired
    t-interval over the seeds' log ratios. ``sequential``: they ran apart (method after method, or in other
    runs), so time and method are confounded: a Welch interval over seeds, and ``apart_min`` says how far apart
    (median minutes between the starts of a seed's two cases, or of any two cases where no seed is shared)."""

    metric: str
    group: str
    reference: str
    estimate: float  # blocks: geometric mean of the seeds' ratios; sequential: ratio of geometric means
    lo: float
    hi: float
    n_seeds: tuple[int, int]
    design: str = ""  # "blocks" or "sequential" ("" when the records carry no start times)
    apart_min: float = math.nan
    noisy_left_out: int = 0  # a timing metric: cases whose timing the noise guard flagged, not counted


def _start_s(rec: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(rec.started_at).timestamp() if rec.started_at else None
    except (TypeError, ValueError):
        return None


def _seed(rec: Any) -> int:
    return int(rec.params.get("seed") or 0)


def ran_together(a: Any, b: Any, timeline: Sequence[Any]) -> bool:
    """Did records ``a`` and ``b`` run next to each other: one run, and no case of its suite with another seed
    than theirs started between them (``timeline``: every record of the session, whatever its status)?"""
    ta, tb = _start_s(a), _start_s(b)
    if a.run_id != b.run_id or ta is None or tb is None:
        return False
    lo, hi = min(ta, tb), max(ta, tb)
    seeds = {_seed(a), _seed(b)}
    for r in timeline:
        if r.run_id == a.run_id and r.suite == a.suite and _seed(r) not in seeds:
            t = _start_s(r)
            if t is not None and lo < t < hi:
                return False
    return True


def ratio(a: Group, ref: Group, name: str, level: float = LEVEL, timeline: Sequence[Any] | None = None) -> Ratio | None:
    from harness.measure.noise import is_timing_metric, timing_noisy

    noisy = {id(r) for g in (a, ref) for r in g.records if is_timing_metric(name) and timing_noisy(r.metrics)}

    def by_seed(g: Group) -> dict[int, tuple[float, Any]]:
        return {_seed(r): (float(r.metrics[name]), r) for r in g.records if id(r) not in noisy
                and isinstance(r.metrics.get(name), (int, float)) and math.isfinite(r.metrics[name]) and r.metrics[name] > 0}

    sa, sr = by_seed(a), by_seed(ref)
    if not sa or not sr:
        return None
    common = sorted(set(sa) & set(sr))
    timeline = list(a.records) + list(ref.records) if timeline is None else timeline
    starts = [(_start_s(sa[k][1]), _start_s(sr[k][1])) for k in common] or [
        (_start_s(x), _start_s(y)) for _, x in sa.values() for _, y in sr.values()]
    gaps = [abs(x - y) / 60 for x, y in starts if x is not None and y is not None]
    apart = float(np.median(gaps)) if gaps else math.nan
    blocked = len(common) >= 2 and all(ran_together(sa[k][1], sr[k][1], timeline) for k in common)
    if blocked:
        logs = np.log([sa[k][0] for k in common]) - np.log([sr[k][0] for k in common])
        s = t_interval(logs, level)
        est, lo, hi = s.mean, s.lo, s.hi
    else:
        est, lo, hi = seed_difference(np.log([v for v, _ in sa.values()]), np.log([v for v, _ in sr.values()]),
                                      paired=False, level=level)
    design = "" if not gaps else "blocks" if blocked else "sequential"
    return Ratio(name, a.group_id, ref.group_id, math.exp(est), math.exp(lo) if math.isfinite(lo) else math.nan,
                 math.exp(hi) if math.isfinite(hi) else math.nan, (len(sa), len(sr)), design, apart, len(noisy))


def ratio_basis(r: Mapping[str, Any]) -> str:
    """How a ratio (``run_stats``'s dict) was measured, in words: its seeds, and whether time was ruled out."""
    n = f"{r['n_seeds'][0]}+{r['n_seeds'][1]} seeds" + (
        f" ({r['noisy_left_out']} case{'s' if r['noisy_left_out'] > 1 else ''} with a noisy timing left out)"
        if r.get("noisy_left_out") else "")
    from harness.measure.noise import is_timing_metric

    if r.get("design") == "blocks":
        return f"{n}, paired: each seed's cases ran side by side"
    if r.get("design") == "sequential" and is_timing_metric(r["metric"]):  # a drift of load moves no memory figure
        apart = r.get("apart_min")
        when = f", {apart:.0f} min apart (median)" if apart is not None and apart >= 1 else ""
        return f"{n}, method after method{when}: a drift of the machine in that time counts as the method's"
    return n


# -- verdicts ------------------------------------------------------------------------------------------

Outcome = Literal["pass", "fail", "inconclusive"]


MIN_ITEMS = 10  # fewer eval items: a bootstrap over them has few distinct resamples (4 items: 35), no pass or fail


def thin_evidence(d: Difference) -> str:
    """Why an interval cannot carry a verdict ('' when it can): one training seed (seed-to-seed variation left
    out), or fewer than MIN_ITEMS eval items behind a per-item interval."""
    reasons = []
    if min(d.n_seeds) < 2:
        reasons.append("it rests on one training seed and leaves out seed-to-seed variation (add replicates:)")
    if 0 < d.n_items < MIN_ITEMS:
        reasons.append(f"it rests on {d.n_items} eval items (fewer than {MIN_ITEMS})")
    return " and ".join(reasons)


def noninferiority(d: Difference, margin: float, direction: str) -> tuple[Outcome, str]:
    """Is ``method`` at most ``margin`` worse than the reference? Judged on the interval of the difference.

    Higher-is-better: pass when lo > -margin, fail when hi < -margin. Lower-is-better: pass when hi < margin,
    fail when lo > margin. Anything else (or no interval) is inconclusive.
    """
    if direction not in ("higher", "lower"):
        raise ValueError(f"{d.metric} has no direction: a margin of non-inferiority needs one")
    interval = f"{d.metric} {d.group} - {d.reference} = {d.estimate:+.4g} [{d.lo:+.4g}, {d.hi:+.4g}]"
    if not (math.isfinite(d.lo) and math.isfinite(d.hi)):
        return "inconclusive", f"{interval}: no interval (a single seed without per-item results)"
    worse_lo, worse_hi = (-d.hi, -d.lo) if direction == "higher" else (d.lo, d.hi)  # how much worse, as an interval
    thin = thin_evidence(d)
    if thin:  # an interval that cannot carry a verdict: say what it would have said, and why it does not count
        side = ("within the margin" if worse_hi < margin else "beyond the margin" if worse_lo > margin
                else "straddling the margin")
        return "inconclusive", f"{interval}: {side} {margin:g}, but {thin}"
    if worse_hi < margin:
        return "pass", f"{interval}: worse by at most {max(worse_hi, 0):.4g} < margin {margin:g}"
    if worse_lo > margin:
        return "fail", f"{interval}: worse by at least {worse_lo:.4g} > margin {margin:g}"
    return "inconclusive", f"{interval}: the interval straddles the margin {margin:g}"


def check_noninferiority(records: Iterable[Any], method: str, against: str, compare: str, margin: float,
                         *, seed: int = 0) -> list[dict[str, Any]]:
    """Each (method group, ``against`` group) pair of these records judged on ``compare`` with ``margin``.

    One dict per pair: outcome, message, margin, direction and the difference with its interval.
    """
    direction = metrics.direction(compare)
    out = []
    for g, ref in reference_pairs(groups(records), against):
        if g.method != method:
            continue
        d = paired_difference(g, ref, compare, seed=seed)
        outcome, message = noninferiority(d, margin, direction)
        gain = reference_gain(ref, compare, seed=seed)
        if informative(gain) is False:
            outcome = "inconclusive"
            message += (f"; but {against} did not improve on its untrained base here ({gain_text(gain)}), so no "
                        f"difference to it can show what {method} costs")
        out.append({"outcome": outcome, "message": message, "margin": margin, "direction": direction,
                    **_clean(asdict(d))})
    return out


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def digits_for(*values: float) -> int:
    """Decimals enough to show the narrowest of these half-widths with two significant digits."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return 3
    return max(2, min(6, 1 - math.floor(math.log10(min(finite)))))


def verdict(d: Difference, gain: Difference | None = None) -> str:
    """One sentence from the interval: ``no detectable difference within ±0.03``, ``worse by 0.05 [0.02, 0.08]``.

    With ``gain`` (the reference's own gain over its base, ``reference_gain``) showing no improvement, the
    sentence says the metric is uninformative first: "no difference" on an eval nobody learned means nothing.
    """
    plain = _verdict(d)
    thin = thin_evidence(d)
    if thin and math.isfinite(d.lo) and math.isfinite(d.hi):
        # one training seed (the interval covers eval items only, not how another seed would have trained) or a
        # handful of items: what the interval shows, said as inconclusive
        plain = f"inconclusive: {plain}, but {thin}"
    if informative(gain) is False:
        ref = d.reference.partition("[")[2].rstrip("]") or d.reference
        head = f"uninformative: {ref} did not improve on its untrained base ({gain_text(gain)})"
        return head if plain.startswith("no detectable") else f"{head}; {plain}"
    return plain


def _detected(d: Difference) -> bool:
    """Does the interval exclude zero (for a metric with a direction)?"""
    return (math.isfinite(d.lo) and math.isfinite(d.hi) and not d.lo <= 0 <= d.hi
            and metrics.direction(d.metric) != "none")


def _verdict(d: Difference) -> str:
    if not (math.isfinite(d.lo) and math.isfinite(d.hi)):
        return f"difference {d.estimate:+.3g}, no interval (needs replicates or per-item results)"
    k = digits_for((d.hi - d.lo) / 2)
    direction = metrics.direction(d.metric)
    if not _detected(d):
        return f"no detectable difference within ±{_num(max(abs(d.lo), abs(d.hi)), k)}"
    better = (d.lo > 0) == (direction == "higher")
    mag = sorted((abs(d.lo), abs(d.hi)))
    return f"{'better' if better else 'worse'} by {_num(abs(d.estimate), k)} [{_num(mag[0], k)}, {_num(mag[1], k)}]"


# -- against a baseline --------------------------------------------------------------------------------

@dataclass
class GroupChange:
    """One metric of one replicate group, baseline seeds against new seeds, as a relative change with interval."""

    group: str
    metric: str
    old: float  # mean over the baseline's seeds
    new: float
    rel: float  # (new - old) / |old|
    lo: float  # 95% interval of rel (NaN without replicates on either side)
    hi: float
    tolerance: float
    n: tuple[int, int]  # (baseline seeds, new seeds)
    regressed: bool
    improved: bool

    @property
    def message(self) -> str:
        verdict = "regressed" if self.regressed else "improved" if self.improved else "within tolerance"
        interval = f" [{self.lo * 100:+.1f}%, {self.hi * 100:+.1f}%]" if math.isfinite(self.lo) else ""
        return (f"{self.metric} of {self.group} {verdict}: {self.old:.4g} -> {self.new:.4g} "
                f"({self.rel * 100:+.1f}%{interval} over {self.n[0]} -> {self.n[1]} seeds, "
                f"tolerance {self.tolerance * 100:g}%)")


def compare_groups(new: Iterable[Any], base: Iterable[Any], tolerances: Mapping[str, float] | None = None,
                   ) -> list[GroupChange]:
    """Replicate groups of ``new`` against the baseline's groups of the same settings, metric by metric.

    A regression needs the whole 95% interval of the relative change (Welch, over seeds) beyond the
    tolerance on the worse side; where neither side has replicates the point change decides, as a
    per-case comparison would.
    """
    from harness.compare import tolerance_for

    old_groups = {_params_key(g.params) + (g.suite,): g for g in groups(base)}
    out = []
    for g in groups(new):
        old = old_groups.get(_params_key(g.params) + (g.suite,))
        if old is None:
            continue
        for name in dict.fromkeys(k for r in g.records for k in r.metrics):
            direction = metrics.direction(name)
            vn, vo = g.values(name), old.values(name)
            if direction == "none" or not len(vn) or not len(vo) or vo.mean() == 0:
                continue
            est, lo, hi = seed_difference(vn, vo, paired=False)
            scale = abs(float(vo.mean()))
            rel, rlo, rhi = est / scale, lo / scale, hi / scale
            tol = tolerance_for(name, tolerances)
            worse_lo, worse_hi = (rlo, rhi) if direction == "lower" else (-rhi, -rlo)
            point_worse = rel if direction == "lower" else -rel
            if math.isfinite(rlo):
                regressed, improved = bool(worse_lo > tol), bool(worse_hi < 0)
            else:
                regressed, improved = bool(point_worse > tol), bool(point_worse < 0)
            out.append(GroupChange(g.group_id, name, float(vo.mean()), float(vn.mean()), rel, rlo, rhi, tol,
                                   (len(vo), len(vn)), regressed, improved))
    return out


# -- a whole run ---------------------------------------------------------------------------------------

SPEED_MEMORY = ("*tokens_per_s", "*samples_per_s", "*_gib", "*_ms", "*.mfu")


def _is_speed_memory(name: str) -> bool:
    import fnmatch

    return name.startswith("train.") and any(fnmatch.fnmatchcase(name, p) for p in SPEED_MEMORY)


def quality_metrics(group: Group) -> list[str]:
    """Eval metrics rebuilt from per-item rows, plus any eval score (seed-level interval)."""
    names = dict.fromkeys(k for r in group.records for k in r.metrics)
    return [n for n in names if item_metric(n) is not None]


def reference_pairs(gs: list[Group], reference: str = REFERENCE) -> list[tuple[Group, Group]]:
    """(method group, reference group) pairs of one suite that agree on every setting but method and seed."""
    out = []
    refs = {_params_key(g.params, "method"): g for g in gs if g.method == reference}
    for g in gs:
        if g.method == reference:
            continue
        ref = refs.get(_params_key(g.params, "method"))
        if ref is not None and ref.suite == g.suite:
            out.append((g, ref))
    return out


def _params_key(params: Mapping[str, Any], *drop: str) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items() if k not in drop))


def run_stats(records: Iterable[Any], references: Mapping[str, str] | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Per suite: group summaries, paired quality differences and speed/memory ratios against the reference.

    ``references`` maps a suite to its reference method (default lora-bf16). JSON-ready.
    """
    records = list(records)
    out: dict[str, Any] = {"level": LEVEL, "bootstrap": BOOTSTRAP, "suites": {}}
    by_suite: dict[str, list[Group]] = {}
    for g in groups(records):
        by_suite.setdefault(g.suite, []).append(g)
    for suite, gs in by_suite.items():
        ref_method = (references or {}).get(suite, REFERENCE)
        suite_out: dict[str, Any] = {"reference": ref_method, "groups": {}, "differences": [], "ratios": [],
                                     "reference_gains": []}
        for g in gs:
            summ = summarise(g)
            suite_out["groups"][g.group_id] = {
                "method": g.method, "seeds": g.seeds, "case_ids": [r.case_id for r in g.records],
                "metrics": {n: _clean(asdict(s)) for n, s in summ.items()},
            }
        gains: dict[tuple[str, str], Difference | None] = {}
        pairs = reference_pairs(gs, ref_method)
        family = simultaneous_level(len(pairs))
        suite_out["family_size"], suite_out["family_level"] = len(pairs), family
        for g, ref in pairs:
            for name in quality_metrics(g):
                # the verdict's interval is simultaneous over the methods compared on this metric (Bonferroni):
                # among five methods one per-comparison 95% interval misses zero by luck about one time in five
                d = paired_difference(g, ref, name, seed=seed, level=family)
                key = (ref.group_id, name)
                if key not in gains:
                    gains[key] = reference_gain(ref, name, seed=seed)
                    if gains[key] is not None:
                        suite_out["reference_gains"].append(
                            {**_clean(asdict(gains[key])), "informative": informative(gains[key])})
                suite_out["differences"].append({**_clean(asdict(d)), "method": g.method,
                                                 "informative": informative(gains[key]),
                                                 "verdict": verdict(d, gains[key])})
            for name in dict.fromkeys(k for r in g.records for k in r.metrics):
                if _is_speed_memory(name):
                    rt = ratio(g, ref, name, level=family, timeline=records)  # simultaneous, like the differences
                    if rt is not None:
                        suite_out["ratios"].append({**_clean(asdict(rt)), "method": g.method})
        out["suites"][suite] = suite_out
    return out


def run_by_run(records: Iterable[Any], suite: str, reference: str = REFERENCE) -> dict[str, dict[tuple[str, str], dict]]:
    """For records pooled from several runs (``--extends``): each run's differences to the reference computed from
    its own seeds alone, ``{run id: {(group id, metric): difference}}`` (``run_stats``'s dicts, verdict included);
    {} for the records of one run. Independent seeds that repeat a finding are the check a pooled table needs."""
    by_run: dict[str, list[Any]] = {}
    for r in records:
        if r.suite == suite:
            by_run.setdefault(r.run_id, []).append(r)
    if len(by_run) < 2:
        return {}
    return {run: {(d["group"], d["metric"]): d for d in
                  run_stats(rs, {suite: reference}).get("suites", {}).get(suite, {}).get("differences", [])}
            for run, rs in sorted(by_run.items())}


def as_json(value: Any) -> dict[str, Any]:
    """A result dataclass (Difference, Ratio, GroupChange) as a JSON-ready dict."""
    return _clean(asdict(value))


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf as None (JSON has neither); tuples as lists."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, list):
            v = [None if isinstance(x, float) and not math.isfinite(x) else x for x in v]
        out[k] = v
    return out


def write_run_stats(run_dir, records: Iterable[Any] | None = None, references: Mapping[str, str] | None = None) -> list:
    """``stats/<suite>.json`` of a run folder from its records (the end of a session, or ``python -m harness
    stats RUN`` after the statistics improved): references noted by the session's processes are honoured."""

    from harness.records import (
        check_run_dir,
        read_references,
        read_run_records,
        slug,
        warn,
        write_json_atomic,
    )

    folder = check_run_dir(run_dir) / "stats"
    records = list(records) if records is not None else list(read_run_records(run_dir))
    refs, bad = read_references(run_dir)
    for line in bad:
        warn(f"{line} (its reference methods not used)")
    refs.update(references or {})
    written = []
    for suite, data in run_stats(records, refs).get("suites", {}).items():
        path = folder / f"{slug(suite)}.json"
        write_json_atomic(path, data, overwrite=True)
        written.append(path)
    return written
