"""Statistics of records: means with 95 % t-intervals, paired differences over seeds, Holm's correction,
pre-registered contrasts (equivalence tests, detectable effects, verdicts), and the per-config summary
of an ablation (``report --out``).

Every interval is the two-sided 95 % Student t interval over seeds (``mean_ci``); a comparison of two
arms pairs their runs by seed (the same data split, initialisation and order) and uses the paired
t-test (``paired_difference``); the p-values of a table, or of a family of contrasts, are
Holm-corrected together (``holm``). A contrast (``contrasts``) adds the TOST equivalence test against
a margin (``tost_paired``), the minimal detectable effect (``mde_paired``) and a verdict (``verdict``).

References: S. Holm, "A simple sequentially rejective multiple test procedure", Scandinavian Journal of
Statistics 6 (1979) 65-70. D. J. Schuirmann, "A comparison of the two one-sided tests procedure and the
power approach for assessing the equivalence of average bioavailability", Journal of Pharmacokinetics
and Biopharmaceutics 15 (1987) 657-680. H. S. Bloom, "Minimum detectable effects: a simple way to
report the statistical power of experimental designs", Evaluation Review 19 (1995) 547-556 (the MDE
as a multiple of the standard error: the sum of two t quantiles).
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Iterable, Sequence

from ._format import label

__all__ = ['ALPHA', 'POWER', 'mean_ci', 'paired_difference', 'holm', 'tost_paired', 'mde_paired', 'verdict',
           'contrasts', 'summarize']

ALPHA = 0.05  # two-sided level of every test and of each TOST one-sided test
POWER = 0.80  # of the minimal detectable effect


def _t_quantile(df: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of the 95 % t confidence interval."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    return mean, std, _t_quantile(n - 1) * std / math.sqrt(n)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` over the seeds both have: mean, 95 % CI half-width, two-sided paired t-test p-value."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, _, half = mean_ci(diffs)
    p = math.nan
    if len(diffs) >= 2:
        from scipy import stats
        if any(d != diffs[0] for d in diffs):
            p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
        else:
            p = 1.0 if diffs[0] == 0 else 0.0
    return {'n': len(seeds), 'mean': mean, 'ci95': half, 'p': p}


def holm(pvalues: Sequence[float], family_size: int | None = None) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN.

    ``family_size`` is the number of comparisons declared in the family, when some of them have no
    p-value yet (NaN): they count as comparisons not rejected, so a partly run family is corrected as
    strictly as the whole one. Without it, NaN does not count as a comparison."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(indexed)
    if family_size is not None:
        if family_size < m:
            raise ValueError(f'family_size {family_size} is smaller than the {m} p-values given')
        m = family_size
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _paired_diffs(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def tost_paired(diffs: Sequence[float], margin: float) -> float:
    """TOST p-value of equivalence within ``+-margin`` from paired differences (Schuirmann 1987).

    The larger p of the two one-sided paired t-tests, H0: mean <= -margin (against mean > -margin) and
    H0: mean >= +margin (against mean < +margin); equivalence at level alpha when it is below alpha,
    which is when the 1 - 2 alpha (90 %) t interval of the mean difference lies inside the margins.
    NaN with fewer than two differences; with differences all equal (no spread), 0 inside the margins
    and 1 otherwise."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if -margin < mean < margin else 1.0
    from scipy import stats
    se = sd / math.sqrt(n)
    p_lower = float(stats.t.sf((mean + margin) / se, n - 1))  # H0: mean <= -margin
    p_upper = float(stats.t.cdf((mean - margin) / se, n - 1))  # H0: mean >= +margin
    return max(p_lower, p_upper)


def mde_paired(diffs: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> float:
    """The minimal detectable effect of a paired t-test over these differences:
    ``(t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)``, with ``sd`` the observed standard deviation
    of the differences (the true difference a two-sided test at ``alpha`` finds with probability about
    ``power``). NaN with fewer than two differences."""
    n = len(diffs)
    if n < 2:
        return math.nan
    from scipy import stats
    sd = statistics.stdev(diffs)
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def verdict(p_holm: float, p_tost: float | None, alpha: float = ALPHA, pending: int = 0) -> str:
    """``different`` if the Holm-adjusted p < alpha; else ``equivalent`` if the TOST p < alpha (only with
    a margin: ``p_tost`` not ``None``); else ``inconclusive``; ``n/a`` without a test (NaN p), and
    ``incomplete`` while ``pending`` declared runs of the contrast have not been recorded (a verdict on
    part of the seeds would be a peek at an unfinished study)."""
    if p_holm is None or math.isnan(p_holm):
        return 'n/a'
    if pending:
        return 'incomplete'
    if p_holm < alpha:
        return 'different'
    if p_tost is not None and not math.isnan(p_tost) and p_tost < alpha:
        return 'equivalent'
    return 'inconclusive'


def contrasts(items: Sequence[dict], alpha: float = ALPHA) -> list[dict]:
    """Pre-registered contrasts ``a - b`` over the seeds both have, tested and judged.

    Each item holds ``name``, ``family``, ``a`` and ``b`` (seed -> value) and ``margin`` (``None``: no
    equivalence test), and optionally ``pending`` (declared runs of either arm not recorded yet: the
    verdict is ``incomplete``). Holm counts every item of a family, tested or not yet. Returns, in order,
    each item's ``name``, ``family``, ``margin``, ``pending`` and ``n``, ``mean``, ``sd``, ``ci95``
    (half-width), ``p`` (two-sided paired t), ``p_holm`` (Holm within the item's family), ``p_tost``
    (``None`` without a margin), ``mde`` and ``verdict``."""
    out = []
    for item in items:
        diffs = _paired_diffs(item['a'], item['b'])
        test = paired_difference(item['a'], item['b'])
        margin = item.get('margin')
        out.append({'name': item['name'], 'family': item['family'], 'margin': margin,
                    'pending': int(item.get('pending', 0)), 'n': test['n'],
                    'mean': test['mean'], 'sd': statistics.stdev(diffs) if len(diffs) >= 2 else math.nan,
                    'ci95': test['ci95'], 'p': test['p'],
                    'p_tost': None if margin is None else tost_paired(diffs, margin), 'mde': mde_paired(diffs)})
    for family in dict.fromkeys(c['family'] for c in out):
        members = [c for c in out if c['family'] == family]
        for c, adjusted in zip(members, holm([c['p'] for c in members], family_size=len(members))):
            c['p_holm'] = adjusted
    for c in out:
        c['verdict'] = verdict(c['p_holm'], c['p_tost'], alpha, c['pending'])
    return out


def _group_key(record: dict, drop: str | None = None) -> tuple:
    overrides = {k: v for k, v in record['overrides'].items() if k != drop}
    return record['name'], json.dumps(sorted(overrides.items()), default=str)


def summarize(records: Iterable[dict], tune: Sequence[str] = (), baseline: str | None = None) -> list[dict]:
    """One row per group (config name + overrides). With ``tune`` (override keys), each (name, other
    overrides) keeps only the values of those keys with the best mean *validation* accuracy (groups
    with a diverged seed are never selected)."""
    tune = [tune] if isinstance(tune, str) else list(tune or ())
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get('status') in ('ok', 'diverged'):
            groups[_group_key(r)].append(r)
    rows = []
    for (name, overrides_json), members in groups.items():
        ok = [r for r in members if r['status'] == 'ok']
        test = {r['seed']: r['metrics']['test_acc1'] for r in ok}
        val = [r['metrics']['best_val_acc1'] for r in ok]
        mean, std, ci = mean_ci(list(test.values()))
        ratios = [r['metrics']['ratio'] for r in ok if r['metrics'].get('ratio')]
        rows.append({'name': name, 'overrides': dict(json.loads(overrides_json)), 'label': label(name, overrides_json),
                     'n': len(ok), 'diverged': len(members) - len(ok), 'test_mean': mean, 'test_std': std,
                     'test_ci95': ci, 'val_mean': statistics.fmean(val) if val else math.nan,
                     'ratio': statistics.fmean(ratios) if ratios else math.nan, 'per_seed': test,
                     'seconds': statistics.fmean([r['wall_seconds'] for r in members])})
    if tune:
        best: dict[tuple, dict] = {}
        for row in rows:
            rest = {k: v for k, v in row['overrides'].items() if k not in tune}
            key = (row['name'], json.dumps(sorted(rest.items()), default=str))
            score = row['val_mean'] if row['diverged'] == 0 and row['n'] else -math.inf
            if key not in best or score > best[key][0]:
                best[key] = (score, row)
        rows = [row for _, row in best.values()]
    if baseline:
        bases = [r for r in rows if r['name'] == baseline]
        if not bases:
            raise ValueError(f'baseline {baseline!r} has no records; names: {sorted({r["name"] for r in rows})}')
        base = bases[0]
        for row in rows:
            row['vs_baseline'] = paired_difference(row['per_seed'], base['per_seed']) if row is not base else None
    return rows
