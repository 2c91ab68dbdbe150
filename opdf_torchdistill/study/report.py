"""Report tables, reproducible byte for byte from the records.

``report_study`` prints, per pair of a study, as Markdown on stdout:

the selection table
    every selection point's mean validation accuracy over the selection seeds, and the point selected
    (an edge extension's extended value is marked ``(ext)``; an arm waiting for the setting it
    inherits shows ``?`` for what it will inherit);
the tuning table
    (only for pairs that use an edge rule, ``inherit`` or ``contrasts``, so that the tables of a spec
    without them stay as they were) per arm: its own grid (extensions marked), the number of points it
    tuned itself (its budget; extensions counted), what it inherited from which arm, the selected
    values of its own keys with their validation accuracy, and ``edge (KEY)`` when a selected value is
    the lowest or highest of its key's grid, extensions included; a line under it says when the
    budgets differ between arms;
the final table
    test accuracy mean and 95 % t-interval over the test seeds at the selected setting, the paired
    difference to the baseline over the same seeds with its 95 % t-interval, the two-sided paired
    t-test p-value and the Holm-corrected p-value over the comparisons in that table;
the contrasts table
    (when the pair has ``contrasts``) per contrast ``a - b``: the seeds both arms have (n), the mean
    paired difference and its 95 % t-interval, the two-sided paired t-test p, the Holm-adjusted p
    within the contrast's family (in this pair), the TOST p against the margin, the minimal detectable
    effect at 80 % power and two-sided alpha 0.05 from the observed SD of the differences, and the
    verdict: ``different`` if p (Holm) < 0.05, else ``equivalent`` if p (TOST) < 0.05, else
    ``inconclusive`` (:mod:`~opdf_torchdistill.study.stats`).

``report_records`` prints the per-config summary of an ablation's record files (``report --out``),
optionally tuned on validation (``tune``) and compared with a baseline, as a plain-text table.

Everything printed is a function of the records and the spec (no time, no machine), so a committed
report is checked byte for byte against its committed records; warnings go to stderr.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import atomic_write_json
from ._format import label, short_key, short_overrides
from .records import canonical, config_hash, find_stale, load_records, record_finder, warn_stale, without_stale
from .selection import select_settings
from .spec import Arm, Pair, Study, load_study, pick_pairs
from .stats import ALPHA, POWER, contrasts, holm, mean_ci, paired_difference, summarize

__all__ = ['SECTIONS', 'study_tables', 'format_summary', 'report_study', 'report_records']


def _fmt(value: float, spec: str = '.2f') -> str:
    return 'n/a' if value is None or math.isnan(value) else format(value, spec)


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return 'n/a'
    return '<0.001' if p < 0.001 else f'{p:.3f}'


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


SECTIONS = ('selection', 'tuning', 'final', 'contrasts')


def study_tables(study: Study, records_by_pair: Mapping[str, Sequence[dict]],
                 pairs: Sequence[str] | None = None, sections: Sequence[str] = SECTIONS) -> tuple[str, list[dict]]:
    """The Markdown tables of a study (selection, tuning, final and contrasts per pair; see the module
    docstring) and their rows as data: one per arm with final results (``arm``, its setting, test
    statistics, ``vs_baseline``, and its tuning ``budget``, ``inherit`` and ``edge`` keys), then one per
    contrast (``contrast``, ``arms`` and the statistics of :func:`~opdf_torchdistill.study.stats.contrasts`).

    Records are matched by config hash (``find_stale``'s stale ones never match); everything printed is
    a function of the records and the spec, so the text is reproduced byte for byte. ``sections``: the
    tables to print, of :data:`SECTIONS` (the rows returned are always all of them); a README that quotes
    the contrasts quotes ``sections=['contrasts']``, byte for byte.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f'report sections {unknown or "(none)"}: valid are {", ".join(SECTIONS)}')
    out, summary = [], []
    marks: list[tuple[str, int]] = []  # (section, where its text starts in out)
    for pair in pick_pairs(study, pairs):
        records = records_by_pair.get(pair.name, [])
        hashes: dict[str, str | None] = {}

        def ident(arm: Arm, overrides: dict, seed: int) -> str | None:
            memo = canonical([arm.config, overrides])
            if memo not in hashes:
                try:
                    hashes[memo] = config_hash(arm.config, overrides)
                except FileNotFoundError:
                    hashes[memo] = None
            return hashes[memo]

        find = record_finder(records, 'hash')
        selection = select_settings(pair, find, ident)
        axes = list(dict.fromkeys(k for arm in pair.arms for k in arm.axes))
        labels = [study.labels.get(k, short_key(k)) for k in axes]
        seeds_txt = ', '.join(map(str, pair.select_seeds))
        marks.append(('selection', len(out)))
        out.append(f'#### {pair.title}: selection on validation (seed{"s" if len(pair.select_seeds) > 1 else ""} '
                   f'{seeds_txt})')
        out.append('')
        rows = []
        for arm in pair.arms:
            sel = selection[arm.name]
            inherited = pair.inherited_axes(arm)
            if sel['state'] == 'waiting' and not sel['points']:
                rows.append([arm.name] + ['?' if k in inherited else '-' for k in axes]
                            + [f'waiting for {arm.inherit}', ''])
            elif arm.inherit is not None and not sel['points']:
                rows.append([arm.name] + [str(sel['selected'].get(k, '-')) for k in axes]
                            + [f'inherited from {arm.inherit}', 'yes'])
            for entry in sel['points']:
                if sel['state'] == 'waiting':
                    val = f'waiting for {arm.inherit}'
                elif entry['missing']:
                    val = f'missing {entry["missing"]}/{len(pair.select_seeds)}'
                elif entry['diverged']:
                    val = f'diverged {entry["diverged"]}/{len(pair.select_seeds)}'
                else:
                    val = _fmt(entry['val'])
                cells = []
                for k in axes:
                    if sel['state'] == 'waiting' and k in inherited:
                        cells.append('?')
                    else:
                        cells.append(str(entry['point'].get(k, '-')) + (' (ext)' if entry['extension'] == k else ''))
                rows.append([arm.name] + cells + [val, 'yes' if sel['selected'] == entry['point'] else ''])
        out.append(_markdown(['arm'] + labels + ['val acc@1 (%)', 'selected'], rows))
        out.append('')
        if pair.edge_rule != 'none' or pair.contrasts or any(a.inherit for a in pair.arms):
            marks.append(('tuning', len(out)))
            out += _tuning_table(study, pair, selection)
        # final table
        per_arm: dict[str, Any] = {}
        for arm in pair.arms:
            chosen = selection[arm.name]['selected']
            if chosen is None:
                per_arm[arm.name] = None
                continue
            overrides = {**pair.fixed, **chosen}
            found = {s: find(arm.name, overrides, s, ident(arm, overrides, s)) for s in pair.seeds}
            ok = {s: r for s, r in found.items() if r is not None and r['status'] == 'ok'}
            test = {s: r['metrics']['test_acc1'] for s, r in ok.items()}
            ratios = [r['metrics']['ratio'] for r in ok.values() if r['metrics'].get('ratio')]
            per_arm[arm.name] = {'chosen': chosen, 'test': test, 'diverged': sum(
                1 for r in found.values() if r is not None and r['status'] != 'ok'),
                'missing': sum(1 for r in found.values() if r is None),
                'ratio': statistics.fmean(ratios) if ratios else 1.0 if ok else None}  # None: nothing ran yet
        base = per_arm.get(pair.baseline) if pair.baseline else None
        comparisons = {}
        for arm in pair.arms:
            entry = per_arm[arm.name]
            if base is not None and entry is not None and arm.name != pair.baseline:
                comparisons[arm.name] = paired_difference(entry['test'], base['test'])
        names = list(comparisons)
        for name, adjusted in zip(names, holm([comparisons[n]['p'] for n in names])):
            comparisons[name]['p_holm'] = adjusted
        m = sum(1 for c in comparisons.values() if not math.isnan(c['p']))
        headers = ['arm'] + labels + ['n', 'test acc@1 (%)', '95 % CI', 'params x']
        if pair.baseline:
            headers += [f'vs {pair.baseline} (paired, 95 % CI)', 'p (paired t)', 'p (Holm)']
        rows = []
        for arm in pair.arms:
            entry = per_arm[arm.name]
            if entry is None:
                rows.append([arm.name] + ['-'] * (len(headers) - 1))
                continue
            mean, std, half = mean_ci(list(entry['test'].values()))
            n = f'{len(entry["test"])}' + (f' (+{entry["diverged"]} diverged)' if entry['diverged'] else '') \
                + (f' ({entry["missing"]} missing)' if entry['missing'] else '')
            ci = f'[{_fmt(mean - half)}, {_fmt(mean + half)}]'
            row = [arm.name] + [str(entry['chosen'].get(k, '-')) for k in axes] + [n, _fmt(mean), ci,
                                                                                   _fmt(entry['ratio'])]
            if pair.baseline:
                c = comparisons.get(arm.name)
                row += ['-', '-', '-'] if c is None else [f'{_fmt(c["mean"], "+.2f")} +- {_fmt(c["ci95"])}',
                                                          _fmt_p(c['p']), _fmt_p(c['p_holm'])]
            rows.append(row)
            summary.append({'pair': pair.name, 'arm': arm.name, 'setting': entry['chosen'], 'n': len(entry['test']),
                            'diverged': entry['diverged'], 'missing': entry['missing'], 'test_mean': mean,
                            'test_std': std, 'test_ci95': half, 'ratio': entry['ratio'], 'per_seed': entry['test'],
                            'vs_baseline': comparisons.get(arm.name), 'budget': selection[arm.name]['budget'],
                            'inherit': arm.inherit, 'edge': selection[arm.name]['edge']})
        marks.append(('final', len(out)))
        out.append(f'#### {pair.title}: test accuracy at the selected setting (seeds {", ".join(map(str, pair.seeds))})')
        out.append('')
        out.append(_markdown(headers, rows))
        if pair.baseline:
            out.append('')
            out.append(f'Paired differences to {pair.baseline} over the same seeds; two-sided paired t-test; Holm '
                       f'correction over the {m} comparison{"s" if m != 1 else ""} in this table.')
        out.append('')
        if pair.contrasts:
            text, rows = _contrasts_table(pair, per_arm)
            marks.append(('contrasts', len(out)))
            out += text
            summary += rows
    ends = [start for _, start in marks[1:]] + [len(out)]
    kept = [line for (section, start), end in zip(marks, ends) if section in sections for line in out[start:end]]
    return '\n'.join(kept), summary


def _tuning_table(study: Study, pair: Pair, selection: Mapping[str, dict]) -> list[str]:
    """Per arm: its own grid (extensions marked), budget, what it inherited, its selection and edge flag;
    and a line when the budgets differ."""
    labels = study.labels
    rows, budgets = [], {}
    for arm in pair.arms:
        sel = selection[arm.name]
        grid = []
        for k in arm.axes:
            values = [str(v) for v in arm.values[k]] + [f'{e["own"][k]} (ext)' for e in sel['extensions']
                                                         if e['extension'] == k]
            grid.append(f'{labels.get(k, short_key(k))}: {", ".join(values)}')
        n_ext = len(sel['extensions'])
        budget = str(sel['budget']) + (f' ({len(sel["points"]) - n_ext} + {n_ext} ext)' if n_ext else '')
        if arm.inherit is None:
            inherited = '-'
        elif sel['inherited'] is None:
            keys = ', '.join(labels.get(k, short_key(k)) for k in pair.inherited_axes(arm))
            inherited = f'{keys} from {arm.inherit} (waiting)'
        else:
            inherited = f'{short_overrides(sel["inherited"], labels)} from {arm.inherit}'
        if sel['selected'] is None:
            chosen, val = {'waiting': 'waiting', 'diverged': 'none (every point diverged)'}.get(
                sel['state'], sel['state']), '-'
        elif not arm.axes:
            chosen, val = '-', '-'
        else:
            best = next(e for e in sel['points'] if e['point'] == sel['selected'])
            chosen, val = short_overrides(best['own'], labels), _fmt(best['val'])
        edge = f'edge ({", ".join(labels.get(k, short_key(k)) for k in sel["edge"])})' if sel['edge'] else ''
        rows.append([arm.name, '; '.join(grid) or '-', budget, inherited, chosen, val, edge])
        budgets[arm.name] = sel['budget']
    out = [f'#### {pair.title}: tuning budget per arm', '',
           _markdown(['arm', 'grid', 'points tuned', 'inherited', 'selected', 'val acc@1 (%)', 'edge'], rows), '']
    notes = []
    if len(set(budgets.values())) > 1:
        parts = []
        for arm in pair.arms:
            extra = ''
            if arm.inherit is not None:
                keys = ', '.join(labels.get(k, short_key(k)) for k in pair.inherited_axes(arm))
                extra = f' (+ {keys} from {arm.inherit})'
            parts.append(f'{arm.name} {budgets[arm.name]}{extra}')
        notes.append(f'Tuning budgets differ between arms (validation points each arm tuned itself, edge '
                     f'extensions included): {", ".join(parts)}.')
    if any(selection[a.name]['edge'] for a in pair.arms):
        notes.append('edge: the selected value is the lowest or highest of its grid (extensions included); a '
                     'better value may lie beyond it.')
    for note in notes:
        out += [note, '']
    return out


def _contrasts_table(pair: Pair, per_arm: Mapping[str, Any]) -> tuple[list[str], list[dict]]:
    """The pre-registered contrasts of a pair: tests, Holm within each family, TOST, MDE and verdicts."""
    def missing(arm: str) -> int:  # declared final runs of the arm not recorded (all while it waits)
        return len(pair.seeds) if per_arm.get(arm) is None else per_arm[arm]['missing']

    items = []
    for c in pair.contrasts:
        a, b = (per_arm.get(name) for name in c.arms)
        items.append({'name': c.name, 'family': c.family, 'margin': c.margin,
                      'pending': sum(missing(name) for name in c.arms),
                      'a': a['test'] if a else {}, 'b': b['test'] if b else {}})
    results = contrasts(items)
    rows, summary = [], []
    for c, r in zip(pair.contrasts, results):
        lo, hi = r['mean'] - r['ci95'], r['mean'] + r['ci95']
        ci = '-' if math.isnan(r['ci95']) else f'[{_fmt(lo, "+.2f")}, {_fmt(hi, "+.2f")}]'
        rows.append([c.name, f'{c.arms[0]} - {c.arms[1]}', c.family, str(r['n']), _fmt(r['mean'], '+.2f'), ci,
                     _fmt_p(r['p']), _fmt_p(r['p_holm']), '-' if c.margin is None else f'+-{c.margin:g}',
                     '-' if r['p_tost'] is None else _fmt_p(r['p_tost']), _fmt(r['mde']), r['verdict']])
        summary.append({'pair': pair.name, 'contrast': c.name, 'arms': list(c.arms), **r})
    families = list(dict.fromkeys(c.family for c in pair.contrasts))
    family_sizes = []
    for f in families:
        members = [r for r in results if r['family'] == f]
        tested = sum(1 for r in members if not math.isnan(r['p']))
        family_sizes.append(f'{f}: {len(members)}' + (f' ({tested} tested so far)' if tested < len(members) else ''))
    sizes = ', '.join(family_sizes)
    pending = sum(missing(name) for name in dict.fromkeys(n for c in pair.contrasts for n in c.arms))
    seeds = ', '.join(map(str, pair.seeds))
    out = [f'#### {pair.title}: contrasts (paired over the test seeds {seeds})', '',
           _markdown(['contrast', 'a - b', 'family', 'n', 'mean diff', '95 % CI', 'p (paired t)', 'p (Holm)',
                      'margin', 'p (TOST)', f'MDE ({POWER * 100:.0f} % power)', 'verdict'], rows), '',
           f'Differences a - b in test accuracy points over the seeds both arms have; two-sided paired t-test; Holm '
           f'correction within each family of this pair (comparisons per family: {sizes}). TOST: the larger p of '
           f'the two one-sided paired t-tests against -margin and +margin (Schuirmann 1987). Verdict: different if '
           f'p (Holm) < {ALPHA:g}, else equivalent if p (TOST) < {ALPHA:g}, else inconclusive. MDE: the true '
           f'difference the paired t-test detects with {POWER * 100:.0f} % power at two-sided alpha {ALPHA:g}, '
           f'(t_{1 - ALPHA / 2:g},n-1 + t_{POWER:g},n-1) x SD / sqrt(n), from the observed SD of the differences.'
           + (f' incomplete: {pending} declared final run(s) of these arms not recorded yet; no verdict until they are '
              f'(the Holm correction already counts every declared contrast).' if pending else ''), '']
    return out, summary


def format_summary(rows: Sequence[dict], tune: Sequence[str] = (), baseline: str | None = None) -> str:
    """The plain-text table of :func:`~opdf_torchdistill.study.stats.summarize`'s rows."""
    from ..tables import format_table
    tune = [tune] if isinstance(tune, str) else list(tune or ())
    headers = ['method', 'n', 'test acc@1', 'std', '95% CI', 'val acc@1', 'ratio']
    for k, key in enumerate(tune):
        headers.insert(1 + k, 'tuned ' + '.'.join(key.split('.')[-2:]))
    if baseline:
        headers += [f'diff vs {baseline}', 'p (paired t)']
    table = []
    for row in rows:
        cells = [label(row['name'], json.dumps(sorted(
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


def report_study(spec: str, pairs: Sequence[str] | None = None, summary_json: str | None = None,
                 plots: str | None = None, sections: Sequence[str] = SECTIONS) -> str:
    """Print a study's tables (``sections`` of them) on stdout (stale records are left out and listed on
    stderr); optionally write the rows as JSON and the plot ``PLOTS/STUDY.png``. Returns the text printed."""
    study = load_study(spec)
    chosen = pick_pairs(study, pairs)
    by_pair = {}
    for pair in chosen:
        records = load_records(pair.records)
        warn_stale(find_stale(records))
        by_pair[pair.name] = records
    text, rows = study_tables(study, by_pair, [p.name for p in chosen], sections)
    sys.stdout.write(text)
    sys.stdout.flush()
    if summary_json:
        atomic_write_json(rows, summary_json)
    if plots:
        from .plots import plot_study
        written = plot_study(rows, {p.name: p.title for p in chosen}, {p.name: p.baseline for p in chosen},
                             Path(plots) / f'{study.name}.png')
        print(f'wrote {written}', file=sys.stderr)  # stdout is the tables (README, tests)
    return text


def report_records(records: list[dict], tune: Sequence[str] = (), baseline: str | None = None,
                   only: Sequence[str] | None = None, where: Mapping[str, Any] | None = None,
                   summary_json: str | None = None, plots: str | None = None, title: str = '',
                   lr_key: str = 'train.optimizer.kwargs.lr') -> list[dict]:
    """Print the summary table of an ablation's records on stdout (stale ones left out, listed on stderr).

    ``only``: these config names, in this order; ``where``: records whose override KEY is VALUE (or that do
    not set KEY); ``plots``: a directory for ``methods.png``, ``ratio.png`` and ``lr.png``. Returns the rows.
    """
    records = without_stale(records)
    if only:
        records = [r for r in records if r['name'] in only]
    for key, value in (where or {}).items():
        records = [r for r in records if r['overrides'].get(key, value) == value]
    rows = summarize(records, tune, baseline)
    if only:
        rows.sort(key=lambda r: list(only).index(r['name']))
    print(format_summary(rows, tune, baseline))
    if summary_json:
        atomic_write_json(rows, summary_json)
    if plots:
        from .plots import plot_lr, plot_methods, plot_ratio
        out = Path(plots)
        out.mkdir(parents=True, exist_ok=True)
        prefix = (title + ': ') if title else ''
        written = [plot_methods(rows, out / 'methods.png', f'{prefix}test accuracy, mean and 95% CI')]
        all_rows = summarize(records)
        written.append(plot_ratio(all_rows if not tune else rows, out / 'ratio.png',
                                  f'{prefix}accuracy vs over-parameterization'))
        written.append(plot_lr(all_rows, lr_key, out / 'lr.png', f'{prefix}accuracy vs learning rate'))
        for path in written:
            if path is not None:
                print(f'wrote {path}', file=sys.stderr)  # stdout is the table (README, tests)
    return rows
