"""Ablations: configs x seeds x override grids -> one JSON record per run, then statistics and plots.

``run`` trains every (config, seed, grid point) that is not in ``--out`` yet (so an interrupted
ablation resumes where it stopped) and rewrites the record file atomically after each run.
``report`` (also printed after ``run``) groups records by config and overrides and prints the mean,
standard deviation and 95 % confidence interval (Student's t) of test accuracy, optionally tunes one
override per config on *validation* accuracy (``--tune``), and compares every group with a baseline
by the paired difference over common seeds (95 % CI and paired t-test). ``--plots`` writes PNGs:
accuracy per method, accuracy vs over-parameterization ratio, accuracy vs learning rate per ratio.

Examples::

    python tools/ablate.py run --configs configs/digits/kd.yaml configs/digits/kd_opdf.yaml \\
        --seeds 0 1 2 3 4 --grid train.optimizer.kwargs.lr=0.05,0.1,0.2 --out runs/ablation/digits.jsonl
    python tools/ablate.py report --out runs/ablation/digits.jsonl --tune train.optimizer.kwargs.lr \\
        --baseline kd --plots runs/ablation
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from ..io import atomic_write_json, atomic_write_text

__all__ = ['main', 'run_key', 'load_records', 'summarize', 'format_summary', 'mean_ci', 'paired_difference']

logger = logging.getLogger('opdf_torchdistill.ablate')


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def run_key(config: str, seed: int, overrides: dict) -> str:
    blob = json.dumps([str(Path(config).as_posix()), seed, sorted(overrides.items())], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_records(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f'{path}:{number}: not a JSON record ({exc})') from None
    return records


def _save_records(records: Sequence[dict], path: str | os.PathLike) -> None:
    atomic_write_text(''.join(json.dumps(r, sort_keys=True, default=str) + '\n' for r in records), path)


def _parse_grid(items: Sequence[str]) -> list[dict]:
    axes = []
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--grid {item!r} must look like dotted.key=v1,v2,...')
        key, values = item.split('=', 1)
        axes.append([(key, yaml.safe_load(v)) for v in values.split(',')])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _parse_sets(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--set {item!r} must look like dotted.key=value')
        key, value = item.split('=', 1)
        out[key] = yaml.safe_load(value)
    return out


def _execute(config: str, seed: int, overrides: dict, workdir: Path, device: str, isolate: bool) -> dict:
    """Train one run through the runner; returns its record fields (status, metrics, error)."""
    key = run_key(config, seed, overrides)
    ckpt = workdir / f'{key}.pt'
    metrics_path = workdir / f'{key}.metrics.json'
    sets = [f'{k}={json.dumps(v)}' for k, v in overrides.items()]
    argv = ['--config', config, '--device', device, '--seed', str(seed), '--metrics_json', str(metrics_path),
            '--dst_ckpt', str(ckpt)]
    for s in sets:
        argv += ['--set', s]
    try:
        if isolate:
            import subprocess
            proc = subprocess.run([sys.executable, '-m', 'opdf_torchdistill.cli.train'] + argv, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ['failed']
                raise RuntimeError(tail[0])
            metrics = json.loads(metrics_path.read_text())
        else:
            from .train import get_parser, run
            metrics = run(get_parser().parse_args(argv))[0]
    except FloatingPointError as exc:
        return {'status': 'diverged', 'metrics': {}, 'error': str(exc)}
    except Exception as exc:  # a failed run is recorded, not fatal: the rest of the ablation goes on
        status = 'diverged' if 'loss is nan' in str(exc) or 'loss is inf' in str(exc) else 'failed'
        return {'status': status, 'metrics': {}, 'error': f'{type(exc).__name__}: {exc}'}
    finally:
        for path in (ckpt, ckpt.with_name(ckpt.stem + '.last.pt'), metrics_path):
            if path.exists():
                path.unlink()
    test = metrics.get('test', {})
    return {'status': 'ok', 'error': None, 'metrics': {
        'test_acc1': test.get('acc1'), 'test_acc5': test.get('acc5'), 'test_loss': test.get('loss'),
        'best_val_acc1': metrics.get('best_val_acc1'), 'train_params': metrics.get('train_params'),
        'inference_params': metrics.get('inference_params'),
        'ratio': metrics['train_params'] / metrics['inference_params'] if metrics.get('inference_params') else None,
        'train_seconds': metrics.get('train_seconds')}}


def run_ablation(configs: Sequence[str], seeds: Sequence[int], grid: Sequence[dict], fixed: dict, out: str,
                 device: str = 'cpu', isolate: bool = False) -> list[dict]:
    records = load_records(out)
    done = {r['key'] for r in records if r.get('status') in ('ok', 'diverged')}
    records = [r for r in records if r['key'] in done]  # failed runs are retried
    workdir = Path(out).with_suffix('.runs')
    workdir.mkdir(parents=True, exist_ok=True)
    plan = [(c, s, {**fixed, **g}) for c in configs for g in grid for s in seeds]
    todo = [(c, s, o) for c, s, o in plan if run_key(c, s, o) not in done]
    print(f'{len(plan)} runs planned, {len(plan) - len(todo)} already recorded in {out}, {len(todo)} to go',
          flush=True)
    for number, (config, seed, overrides) in enumerate(todo, 1):
        start = time.perf_counter()
        result = _execute(config, seed, overrides, workdir, device, isolate)
        record = {'key': run_key(config, seed, overrides), 'config': config, 'name': Path(config).stem, 'seed': seed,
                  'overrides': overrides, 'wall_seconds': round(time.perf_counter() - start, 3), **result}
        records.append(record)
        _save_records(records, out)
        acc = record['metrics'].get('test_acc1')
        print(f'[{number}/{len(todo)}] {record["name"]} seed={seed} {overrides or ""}: {record["status"]}'
              + (f' test acc@1 {acc:.2f}' if acc is not None else f' ({record["error"]})')
              + f' ({record["wall_seconds"]:.1f} s)', flush=True)
    return records


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
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
    """``a - b`` over the seeds both have: mean, 95 % CI half-width, paired t-test p-value."""
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


def _group_key(record: dict, drop: str | None = None) -> tuple:
    overrides = {k: v for k, v in record['overrides'].items() if k != drop}
    return record['name'], json.dumps(sorted(overrides.items()), default=str)


def _label(name: str, overrides_json: str) -> str:
    overrides = dict(json.loads(overrides_json))
    if not overrides:
        return name
    short = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in overrides.items())
    return f'{name} [{short}]'


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
        rows.append({'name': name, 'overrides': dict(json.loads(overrides_json)), 'label': _label(name, overrides_json),
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


def format_summary(rows: Sequence[dict], tune: Sequence[str] = (), baseline: str | None = None) -> str:
    from ..report import format_table
    tune = [tune] if isinstance(tune, str) else list(tune or ())
    headers = ['method', 'n', 'test acc@1', 'std', '95% CI', 'val acc@1', 'ratio']
    for k, key in enumerate(tune):
        headers.insert(1 + k, 'tuned ' + '.'.join(key.split('.')[-2:]))
    if baseline:
        headers += [f'diff vs {baseline}', 'p (paired t)']
    table = []
    for row in rows:
        cells = [_label(row['name'], json.dumps(sorted(
            (k, v) for k, v in row['overrides'].items() if k not in tune)))]
        cells += [row['overrides'].get(key, '-') for key in tune]
        cells += [f'{row["n"]}' + (f' (+{row["diverged"]} diverged)' if row['diverged'] else ''),
                  f'{row["test_mean"]:.2f}', f'{row["test_std"]:.2f}',
                  f'[{row["test_mean"] - row["test_ci95"]:.2f}, {row["test_mean"] + row["test_ci95"]:.2f}]',
                  f'{row["val_mean"]:.2f}', f'{row["ratio"]:.2f}' if not math.isnan(row['ratio']) else '1.00']
        if baseline:
            d = row.get('vs_baseline')
            cells += ['-', '-'] if d is None else [f'{d["mean"]:+.2f} +- {d["ci95"]:.2f}', f'{d["p"]:.3f}']
        table.append(cells)
    return format_table(headers, table)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def plot_methods(rows: Sequence[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 4))
    xs = range(len(rows))
    ax.errorbar(xs, [r['test_mean'] for r in rows], yerr=[r['test_ci95'] for r in rows], fmt='o', capsize=4)
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r['per_seed']), list(r['per_seed'].values()), s=10, alpha=0.4, color='gray')
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r['name'] for r in rows], rotation=30, ha='right')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ratio(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    series = defaultdict(list)
    for r in rows:
        if r['n']:
            series[r['name']].append(r)
    series = {k: sorted(v, key=lambda r: 1.0 if math.isnan(r['ratio']) else r['ratio']) for k, v in series.items()}
    if not any(len({round(r['ratio'], 3) for r in v}) > 1 for v in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, members in series.items():
        xs = [1.0 if math.isnan(r['ratio']) else r['ratio'] for r in members]
        ax.errorbar(xs, [r['test_mean'] for r in members], yerr=[r['test_ci95'] for r in members], marker='o',
                    capsize=3, label=name)
    ax.set_xlabel('parameters while training / inference parameters')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lr(rows: Sequence[dict], lr_key: str, path: Path, title: str) -> Path | None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    series = defaultdict(list)
    for r in rows:
        if lr_key in r['overrides']:
            rest = {k: v for k, v in r['overrides'].items() if k != lr_key}
            series[(r['name'], json.dumps(sorted(rest.items()), default=str))].append(r)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, rest), members in sorted(series.items()):
        members.sort(key=lambda r: r['overrides'][lr_key])
        ratio = next((r['ratio'] for r in members if not math.isnan(r['ratio'])), 1.0)
        label = f'{_label(name, rest)} (x{ratio:.2f} params)'
        xs = [r['overrides'][lr_key] for r in members]
        ys = [r['test_mean'] if r['n'] else math.nan for r in members]
        line = ax.plot(xs, ys, marker='o', label=label)[0]
        bad = [(x, r) for x, r in zip(xs, members) if r['diverged']]
        if bad:
            ax.scatter([x for x, _ in bad], [10.0] * len(bad), marker='x', color=line.get_color())
    ax.set_xscale('log')
    ticks = sorted({r['overrides'][lr_key] for members in series.values() for r in members})
    ax.minorticks_off()
    ax.set_xticks(ticks)
    ax.set_xticklabels([f'{t:g}' for t in ticks])
    ax.set_xlabel(f'learning rate ({lr_key.split(".")[-1]})')
    ax.set_ylabel('test accuracy (%)  (x: a seed diverged)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Run ablations (configs x seeds x grids) and summarise them')
    sub = p.add_subparsers(dest='command', required=True)
    for name in ('run', 'report'):
        q = sub.add_parser(name)
        if name == 'run':
            q.add_argument('--out', required=True, help='JSON-lines record file (resumable)')
        else:
            q.add_argument('--out', required=True, nargs='+', help='one or more JSON-lines record files')
        q.add_argument('--tune', nargs='*', default=[],
                       help='override keys to select per config on validation accuracy (e.g. the lr)')
        q.add_argument('--baseline', help='config name (file stem) to compare every group with')
        q.add_argument('--only', nargs='*', help='report only these config names (in this order)')
        q.add_argument('--where', action='append', default=[], metavar='KEY=VALUE',
                       help='report only records whose override KEY is VALUE (or that do not set KEY)')
        q.add_argument('--plots', help='directory for PNG plots')
        q.add_argument('--lr_key', default='train.optimizer.kwargs.lr', help='override key of the learning rate')
        q.add_argument('--title', default='', help='prefix of plot titles')
        q.add_argument('--summary_json', help='write the summary rows here')
        if name == 'run':
            q.add_argument('--configs', nargs='+', required=True)
            q.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
            q.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2',
                           help='a grid axis over an override (repeat for a cross product)')
            q.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
            q.add_argument('--prepare', nargs='*', default=[],
                           help='configs to train once first if their dst_ckpt is missing (e.g. the teacher)')
            q.add_argument('--device', default='cpu')
            q.add_argument('--threads', type=int, default=None, help='torch threads per run')
            q.add_argument('--isolate', action='store_true', help='one subprocess per run')
    return p


def _prepare(configs: Sequence[str], device: str) -> None:
    from .common import load_config, student_config_of
    from .train import get_parser as train_parser, run
    for config in configs:
        dst = os.path.expanduser(student_config_of(load_config(config))['dst_ckpt'])
        if os.path.exists(dst):
            print(f'{config}: {dst} exists, reused', flush=True)
            continue
        print(f'{config}: training (its checkpoint {dst} is missing)', flush=True)
        run(train_parser().parse_args(['--config', config, '--device', device, '--seed', '0']))


def report(args, records: list[dict]) -> list[dict]:
    if args.only:
        records = [r for r in records if r['name'] in args.only]
    for key, value in _parse_sets(args.where).items():
        records = [r for r in records if r['overrides'].get(key, value) == value]
    rows = summarize(records, args.tune, args.baseline)
    if args.only:
        rows.sort(key=lambda r: args.only.index(r['name']))
    print(format_summary(rows, args.tune, args.baseline))
    if args.summary_json:
        atomic_write_json(rows, args.summary_json)
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        title = (args.title + ': ') if args.title else ''
        written = [plot_methods(rows, out / 'methods.png', f'{title}test accuracy, mean and 95% CI')]
        all_rows = summarize(records)
        written.append(plot_ratio(all_rows if not args.tune else rows, out / 'ratio.png',
                                  f'{title}accuracy vs over-parameterization'))
        written.append(plot_lr(all_rows, args.lr_key, out / 'lr.png', f'{title}accuracy vs learning rate'))
        for path in written:
            if path is not None:
                print(f'wrote {path}')
    return rows


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == 'run':
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        quiet = [logging.getLogger(name) for name in ('torchdistill', 'opdf_torchdistill')]
        levels = [log.level for log in quiet]
        for log in quiet:  # one progress line per run instead of every run's training log
            log.setLevel(logging.WARNING)
        try:
            _prepare(args.prepare, args.device)
            records = run_ablation(args.configs, args.seeds, _parse_grid(args.grid), _parse_sets(args.sets),
                                   args.out, args.device, args.isolate)
        finally:
            for log, level in zip(quiet, levels):
                log.setLevel(level)
    else:
        records = [r for path in args.out for r in load_records(path)]
    report(args, records)
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
