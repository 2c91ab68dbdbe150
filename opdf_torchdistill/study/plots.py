"""Figures of ablations and studies (matplotlib, imported only when a plot is asked for; the ``study``
extra). Every figure is written through a temporary file and a rename, so a plot is never half written."""
from __future__ import annotations

import json
import math
import os
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ._format import label

__all__ = ['plot_methods', 'plot_ratio', 'plot_lr', 'plot_study']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write a figure through a temporary file and a rename (never a half-written plot), then close it."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp.png')
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _accuracy_panel(ax, labels: Sequence[str], means: Sequence[float], cis: Sequence[float],
                    per_seed: Sequence[Iterable[float]]) -> None:
    """Test accuracy per method: mean with its 95 % interval, each seed as a grey dot."""
    xs = list(range(len(labels)))
    ax.errorbar(xs, means, yerr=cis, fmt='o', capsize=4)
    for x, seeds in zip(xs, per_seed):
        seeds = list(seeds)
        ax.scatter([x] * len(seeds), seeds, s=10, alpha=0.4, color='gray')
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha='right')
    ax.set_ylabel('test accuracy (%)')
    ax.grid(axis='y', alpha=0.3)


def plot_methods(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Test accuracy of every summary row (:func:`~opdf_torchdistill.study.stats.summarize`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 4))
    _accuracy_panel(ax, [r['name'] for r in rows], [r['test_mean'] for r in rows], [r['test_ci95'] for r in rows],
                    [r['per_seed'].values() for r in rows])
    ax.set_title(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_ratio(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """Test accuracy against the over-parameterization ratio per config (``None``: no config varies it)."""
    plt = _pyplot()
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
    return _save_figure(fig, path)


def plot_lr(rows: Sequence[dict], lr_key: str, path: Path, title: str) -> Path | None:
    """Test accuracy against the learning rate (override ``lr_key``) per config (``None``: no lr grid)."""
    plt = _pyplot()
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
        text = f'{label(name, rest)} (x{ratio:.2f} params)'
        xs = [r['overrides'][lr_key] for r in members]
        ys = [r['test_mean'] if r['n'] else math.nan for r in members]
        line = ax.plot(xs, ys, marker='o', label=text)[0]
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
    return _save_figure(fig, path)


def _contrast_panel(ax, rows: Sequence[dict], pair: str) -> None:
    """A forest plot of a pair's declared contrasts: mean paired difference with its 95 % interval,
    the equivalence band +-margin shaded behind each, the verdict in the label."""
    ys = list(range(len(rows)))[::-1]  # the first contrast on top
    for y, r in zip(ys, rows):
        if r.get('margin') is not None:
            ax.fill_betweenx([y - 0.35, y + 0.35], -r['margin'], r['margin'], color='C2', alpha=0.15, lw=0)
        if not math.isnan(r['mean']):
            ax.errorbar([r['mean']], [y], xerr=[[0.0 if math.isnan(r['ci95']) else r['ci95']]] * 2, fmt='o',
                        capsize=4, color='C3' if r['family'] != 'primary' else 'C0')
    ax.axvline(0.0, color='gray', lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([f'{r["contrast"]}\n{r["arms"][0]} - {r["arms"][1]} (n {r["n"]}): {r["verdict"]}'
                        for r in rows], fontsize=7)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel('paired difference in test accuracy (points)')
    ax.set_title(f'{pair}: declared contrasts, 95 % CI; shaded: equivalence margin', fontsize=8)
    ax.grid(axis='x', alpha=0.3)


def plot_study(summary: Sequence[dict], titles: Mapping[str, str], baselines: Mapping[str, str | None],
               path: Path) -> Path:
    """One row per pair: test accuracy per arm (mean, 95 % interval, seeds as dots) and, where the pair
    declares contrasts (rows with ``contrast``), a forest plot of them; else, where it has a baseline,
    each arm's paired difference to it over the same seeds (mean and 95 % interval)."""
    plt = _pyplot()
    pairs = list(dict.fromkeys(r['pair'] for r in summary))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 3.9 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        declared = [r for r in summary if r['pair'] == pair and 'contrast' in r]
        rows = [r for r in summary if r['pair'] == pair and 'arm' in r]
        xs = list(range(len(rows)))
        labels = [r['arm'] for r in rows]
        _accuracy_panel(row[0], labels, [r['test_mean'] for r in rows], [r['test_ci95'] for r in rows],
                        [r['per_seed'].values() for r in rows])
        row[0].set_title(textwrap.fill(titles.get(pair, pair), 60), fontsize=8)
        baseline, ax = baselines.get(pair), row[1]
        if declared:
            _contrast_panel(ax, declared, pair)
            continue
        if not baseline:
            ax.axis('off')
            continue
        diffs = [(x, r['vs_baseline']) for x, r in zip(xs, rows) if r['vs_baseline']]
        ax.axhline(0.0, color='gray', lw=1)
        ax.errorbar([x for x, _ in diffs], [d['mean'] for _, d in diffs], yerr=[d['ci95'] for _, d in diffs],
                    fmt='o', capsize=4, color='C1')
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, ha='right')
        ax.set_xlim(row[0].get_xlim())  # the same arm under the same tick in both panels
        ax.set_ylabel(f'paired difference to {baseline} (points)')
        ax.set_title(f'{pair}: each arm minus {baseline} over the same seeds, 95 % CI', fontsize=8)
        ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=100)
