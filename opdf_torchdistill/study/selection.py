"""Selection, the first phase of a study: per arm, the grid point with the best mean validation score.

Each point of an arm's grid is trained with the pair's selection seeds and scored on *validation*
accuracy (``best_val_acc1``, never the test set). The best point is selected once every point has all
its selection seeds; ties go to the first point in grid order, and a point with a diverged (or failed)
seed is never selected. The final phase then trains the selected point with the test seeds.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable

from .spec import Arm, Pair

__all__ = ['select_settings']


def select_settings(pair: Pair, find: Callable[[str, dict, int, Any], dict | None],
                    ident: Callable[[Arm, dict, int], Any]) -> dict[str, dict]:
    """Per arm: every grid point's validation scores and the selected point (``None`` until every
    point has all its selection seeds; a point with a diverged seed is never selected).

    ``find(name, overrides, seed, ident(arm, overrides, seed))`` returns a run's record or ``None``
    (:func:`~opdf_torchdistill.study.records.record_finder`)."""
    result = {}
    for arm in pair.arms:
        points, complete, best = [], True, None
        for point in arm.grid:
            overrides = {**pair.fixed, **point}
            found = [find(arm.name, overrides, s, ident(arm, overrides, s)) for s in pair.select_seeds]
            scores = [r['metrics'].get('best_val_acc1') for r in found if r is not None and r['status'] == 'ok']
            diverged = sum(1 for r in found if r is not None and r['status'] != 'ok')
            missing = sum(1 for r in found if r is None)
            complete &= missing == 0
            ok = missing == 0 and diverged == 0 and all(s is not None for s in scores)
            mean = statistics.fmean(scores) if ok else math.nan
            points.append({'point': point, 'scores': scores, 'diverged': diverged, 'missing': missing, 'val': mean})
            if ok and (best is None or mean > best['val']):
                best = points[-1]
        result[arm.name] = {'points': points, 'selected': best['point'] if complete and best else None,
                            'complete': complete}
    return result
