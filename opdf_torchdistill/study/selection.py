"""Selection, the first phase of a study: per arm, the grid point with the best mean validation score.

Each point of an arm's grid is trained with the pair's selection seeds and scored on *validation*
accuracy (``best_val_acc1``, never the test set): its score is the mean over all the selection seeds.
The best point is selected once every point has all its selection seeds; ties go to the first point
in grid order, and a point with a diverged seed is never selected (a *failed* run is not a result: it
is missing, and trained again by the next ``study``). The final phase then trains the selected point
with the test seeds.

Two rules of a spec (:mod:`~opdf_torchdistill.study.spec`) extend this, each a function of the spec
and the records only (so a study resumes, and a report is reproduced, from the records alone):

edge rule ``extend_once``
    once the grid is complete, each numeric key whose winning value is the lowest or highest of its
    grid gets one point beyond that end (:func:`extension_value`; the other keys at the winner's
    values), run at the selection seeds; the selection is made again over the grid and these
    extensions (listed after the grid, so a tie keeps the grid's winner). Extensions are decided from
    the grid's points only, so no arm and key is extended twice.
``inherit``
    an arm's selection waits until the arm it inherits from has a selected setting; its points are
    then its own grid points on top of that setting (without a grid of its own it runs the inherited
    setting, no selection runs).

A selected value that is the lowest or highest of its key's (extended) numeric grid is an *edge*
selection (:func:`edge_keys`): the best value may lie beyond what was tried.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Sequence

from .spec import Arm, Pair

__all__ = ['select_settings', 'extension_value', 'edge_keys', 'inheritance_order']

_SIGNIFICANT = 6  # digits an extended float value is rounded to (so that 0.1 / 3 is one stable number)


def _numeric(values: Sequence[Any]) -> bool:
    """Numbers (not booleans), finite, at least two distinct: a grid that has ends."""
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and len(set(values)) >= 2)


def extension_value(values: Sequence[Any], winner: Any) -> int | float | None:
    """The one value beyond the end of the grid ``values`` at which ``winner`` sits, or ``None``.

    The step is geometric, the ratio of the two grid values at that end: ``[0.025, 0.05, ..., 0.4]``
    gives ``0.0125`` below and ``0.8`` above; ``[0.1, 0.3, 1.0, 3.0]`` gives ``0.0333333`` and ``9.0``.
    A float is rounded to 6 significant digits; a grid of integers stays integer (rounded). ``None``
    when the grid is not numeric, the winner is not at an end, or the end pair does not define a ratio
    (a zero, a change of sign) or the step rounds back onto the grid."""
    if not _numeric(values) or winner not in values:
        return None
    ordered = sorted(set(values))
    if winner == ordered[0]:
        end, inner = ordered[0], ordered[1]
    elif winner == ordered[-1]:
        end, inner = ordered[-1], ordered[-2]
    else:
        return None
    if end * inner <= 0:
        return None
    value = end * (end / inner)
    if all(isinstance(v, int) for v in values):
        value = int(round(value))
    else:
        value = float(f'{value:.{_SIGNIFICANT}g}')
    if value * end <= 0 or value in values:
        return None
    return value


def edge_keys(arm: Arm, extensions: Sequence[dict], chosen: dict) -> list[str]:
    """The arm's own grid keys whose chosen value is the lowest or highest of the key's numeric grid,
    extensions included."""
    keys = []
    for key in arm.axes:
        values = list(arm.values[key]) + [e['point'][key] for e in extensions if e['extension'] == key]
        if _numeric(values) and chosen.get(key) in (min(values), max(values)):
            keys.append(key)
    return keys


def inheritance_order(pair: Pair) -> list[Arm]:
    """The pair's arms, every arm after the arm it inherits from (otherwise in spec order)."""
    done: dict[str, Arm] = {}

    def visit(arm: Arm) -> None:
        if arm.name in done:
            return
        if arm.inherit is not None:
            visit(pair.arm(arm.inherit))
        done[arm.name] = arm

    for arm in pair.arms:
        visit(arm)
    return list(done.values())


def _best(points: Sequence[dict]) -> dict | None:
    best = None
    for entry in points:  # strictly greater: a tie keeps the first in order
        if entry['ok'] and (best is None or entry['val'] > best['val']):
            best = entry
    return best


def select_settings(pair: Pair, find: Callable[[str, dict, int, Any], dict | None],
                    ident: Callable[[Arm, dict, int], Any]) -> dict[str, dict]:
    """Per arm (in the pair's order), what selection knows from the records.

    ``find(name, overrides, seed, ident(arm, overrides, seed))`` returns a run's record or ``None``
    (:func:`~opdf_torchdistill.study.records.record_finder`). Each arm's entry holds

    ``points``
        one entry per selection point, the grid's then the extensions': ``point`` (the setting: what
        the arm inherited and its own keys), ``own`` (its own keys), ``extension`` (the key it extends,
        or ``None``), ``scores``, ``diverged``, ``missing``, ``val`` (the mean over the selection seeds,
        NaN unless every seed finished and none diverged) and ``ok``;
    ``selected``
        the winning setting (inherited and own keys), ``None`` until the selection is complete;
    ``state``
        ``selected``; ``selecting`` (grid runs missing); ``extending`` (extension runs missing);
        ``waiting`` (the arm it inherits from has no selected setting yet: its points carry only its
        own keys, and nothing of it is planned); ``diverged`` (every point has a diverged seed);
    ``inherit``, ``inherited``
        the arm it inherits from and that arm's selected setting (``None``: no inheritance, or waiting);
    ``extensions``, ``budget``, ``edge``
        its extension points, the number of points it tunes itself (grid and extensions), and the
        keys of an edge selection (:func:`edge_keys`);
    ``complete``
        every planned point has all its selection seeds.
    """
    result: dict[str, dict] = {}
    for arm in inheritance_order(pair):
        result[arm.name] = _select_arm(pair, arm, result, find, ident)
    return {arm.name: result[arm.name] for arm in pair.arms}


def _select_arm(pair: Pair, arm: Arm, known: dict[str, dict], find: Callable, ident: Callable) -> dict:
    tuned = bool(arm.axes) or arm.inherit is None  # an arm without a grid or a source: one point, no overrides
    entry: dict[str, Any] = {'points': [], 'selected': None, 'complete': False, 'state': 'selecting',
                             'inherit': arm.inherit, 'inherited': None, 'extensions': [],
                             'budget': len(arm.grid) if tuned else 0, 'edge': []}
    inherited: dict = {}
    if arm.inherit is not None:
        source = known[arm.inherit]
        if source['selected'] is None:
            entry['state'] = 'waiting'
            entry['points'] = [_pending(own) for own in arm.grid] if tuned else []
            return entry
        inherited = dict(source['selected'])
        entry['inherited'] = inherited
        if not tuned:
            entry.update(selected=inherited, complete=True, state='selected')
            return entry

    def score(own: dict, extension: str | None = None) -> dict:
        point = {**inherited, **own}
        overrides = {**pair.fixed, **point}
        found = [find(arm.name, overrides, s, ident(arm, overrides, s)) for s in pair.select_seeds]
        scores = [r['metrics'].get('best_val_acc1') for r in found if r is not None and r['status'] == 'ok']
        diverged = sum(1 for r in found if r is not None and r['status'] != 'ok')
        missing = sum(1 for r in found if r is None)
        ok = missing == 0 and diverged == 0 and all(s is not None for s in scores)
        return {'point': point, 'own': own, 'extension': extension, 'scores': scores, 'diverged': diverged,
                'missing': missing, 'val': statistics.fmean(scores) if ok else math.nan, 'ok': ok}

    points = [score(own) for own in arm.grid]
    grid_complete = all(p['missing'] == 0 for p in points)
    best = _best(points)
    if pair.edge_rule == 'extend_once' and grid_complete and best is not None:
        for key in arm.axes:  # each key at an end: one point beyond it, the other keys at the winner's values
            value = extension_value(arm.values[key], best['own'][key])
            if value is not None:
                points.append(score({**best['own'], key: value}, extension=key))
    extensions = [p for p in points if p['extension'] is not None]
    complete = all(p['missing'] == 0 for p in points)
    best = _best(points)
    entry.update(points=points, extensions=extensions, complete=complete, budget=len(points))
    if complete and best is not None:
        entry.update(selected=best['point'], state='selected', edge=edge_keys(arm, extensions, best['own']))
    else:
        entry['state'] = 'diverged' if complete else 'selecting' if not grid_complete else 'extending'
    return entry


def _pending(own: dict) -> dict:
    return {'point': dict(own), 'own': dict(own), 'extension': None, 'scores': [], 'diverged': 0, 'missing': 0,
            'val': math.nan, 'ok': False}
