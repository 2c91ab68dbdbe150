"""Statistics of records: means with 95 % t-intervals, paired differences over seeds, Holm's correction,
and the per-config summary of an ablation (``report --out``).

Every interval is the two-sided 95 % Student t interval over seeds (``mean_ci``); a comparison of two
arms pairs their runs by seed (the same data split, initialisation and order) and uses the paired
t-test (``paired_difference``); the p-values of a table are Holm-corrected together (``holm``).
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Iterable, Sequence

from ._format import label

__all__ = ['mean_ci', 'paired_difference', 'holm', 'summarize']


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


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN and
    does not count as a comparison."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


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
