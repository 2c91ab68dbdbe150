"""Study specs: the YAML that names a study's pairs, arms, grids and seeds (``configs/fashion/study.yaml``).

A spec holds, at the top level, ``study`` (its name), ``pairs``, ``seeds`` (the final, test seeds) and
``select_seeds`` (the seeds of the selection runs), and optionally ``description``, ``workdir``
(checkpoints of runs in flight, default ``runs/STUDY/ablation``), ``device``, ``threads`` (torch threads
per run), ``baseline`` (the arm every other arm is compared with), ``select_metric`` (only
``best_val_acc1``) and ``labels`` (short column names of override keys). Keys starting with ``x-`` are
free (for YAML anchors).

Each pair has ``records`` (its JSON-lines record file), ``arms`` (``name: {config, grid, title}``; a
grid maps override keys to lists of values, and its points are their cross product in order), and
optionally ``title``, ``prepare`` (configs trained once first, e.g. the teacher), ``fixed`` (overrides
of every run), ``select_seeds``, ``seeds`` and ``baseline`` (overriding the top level's).

Selection seeds and test seeds must be disjoint in every pair. Paths are relative to the working
directory (the repository root). :func:`load_study` checks all of this and raises :class:`StudyError`
naming the file and the key (or, for a YAML syntax error, the line) that is wrong.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ['StudyError', 'Arm', 'Pair', 'Study', 'load_study', 'pick_pairs']

_STUDY_KEYS = {'study', 'description', 'workdir', 'device', 'threads', 'baseline', 'select_seeds', 'seeds',
               'select_metric', 'labels', 'pairs'}
_PAIR_KEYS = {'title', 'records', 'prepare', 'fixed', 'arms', 'select_seeds', 'seeds', 'baseline'}
_ARM_KEYS = {'config', 'grid', 'title'}
_METRICS = ('best_val_acc1',)


class StudyError(ValueError):
    """A study spec that is not well formed, or a study that cannot go on (the message names the key)."""


@dataclass
class Arm:
    name: str
    config: str
    grid: list[dict]  # grid points in order (the cross product of the grid's axes)
    axes: list[str]
    title: str = ''


@dataclass
class Pair:
    name: str
    title: str
    records: Path
    prepare: list[str]
    fixed: dict
    arms: list[Arm]
    select_seeds: list[int]
    seeds: list[int]
    baseline: str


@dataclass
class Study:
    name: str
    path: Path
    workdir: Path
    device: str
    threads: int | None
    labels: dict
    pairs: list[Pair]


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value) or len(set(value)) != len(value):
        raise StudyError(f'{where} must be a non-empty list of distinct integers, got {value!r}')
    return list(value)


def _unknown(where: str, given: Mapping, valid: set) -> None:
    extra = {k for k in given if not str(k).startswith('x-')} - valid  # x-*: free keys for YAML anchors
    if extra:
        raise StudyError(f'{where}: unknown keys {sorted(extra)}; valid keys: {sorted(valid)} (and x-* for anchors)')


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """``FILE:LINE: not valid YAML: what`` (one line) from a PyYAML error."""
    problem, context = getattr(exc, 'problem', None), getattr(exc, 'context', None)
    mark, context_mark = getattr(exc, 'problem_mark', None), getattr(exc, 'context_mark', None)
    where = f'{path}:{(mark or context_mark).line + 1}' if (mark or context_mark) is not None else str(path)
    what = str(problem or context or type(exc).__name__)
    if problem and context:
        what += f' ({context}' + (f' at line {context_mark.line + 1})' if context_mark is not None else ')')
    return f'{where}: not valid YAML: {" ".join(what.split())}'


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study spec (YAML; paths relative to the working directory, the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'study spec {path} does not exist')
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(_yaml_error(path, exc)) from None
    if not isinstance(spec, dict):
        raise StudyError(f'{path}: a study spec must be a mapping')
    _unknown(str(path), spec, _STUDY_KEYS)
    for key in ('study', 'pairs', 'seeds', 'select_seeds'):
        if key not in spec:
            raise StudyError(f'{path}: missing key {key!r}')
    if spec.get('select_metric', 'best_val_acc1') not in _METRICS:
        raise StudyError(f'{path}: select_metric must be one of {list(_METRICS)}')
    seeds, select_seeds = _seeds(spec['seeds'], f'{path}: seeds'), _seeds(spec['select_seeds'], f'{path}: select_seeds')
    if not isinstance(spec['pairs'], dict) or not spec['pairs']:
        raise StudyError(f'{path}: pairs must be a non-empty mapping of pair name -> pair')
    pairs = []
    for pair_name, p in spec['pairs'].items():
        where = f'{path}: pairs.{pair_name}'
        if not isinstance(p, dict):
            raise StudyError(f'{where} must be a mapping')
        _unknown(where, p, _PAIR_KEYS)
        if 'records' not in p or 'arms' not in p:
            raise StudyError(f'{where}: needs records (the JSON-lines file) and arms')
        if not isinstance(p['arms'], dict) or not p['arms']:
            raise StudyError(f'{where}.arms must be a non-empty mapping of arm name -> {{config, grid}}')
        arms = []
        for arm_name, a in p['arms'].items():
            w = f'{where}.arms.{arm_name}'
            if not isinstance(a, dict) or 'config' not in a:
                raise StudyError(f'{w} must be a mapping with a config')
            _unknown(w, a, _ARM_KEYS)
            if not Path(a['config']).is_file():
                raise StudyError(f'{w}.config: {a["config"]} does not exist')
            grid = a.get('grid') or {}
            if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
                raise StudyError(f'{w}.grid must map override keys to non-empty lists of values, got {grid!r}')
            axes = list(grid)
            points = [dict(zip(axes, combo)) for combo in itertools.product(*(grid[k] for k in axes))]
            arms.append(Arm(str(arm_name), str(a['config']), points, axes, str(a.get('title', ''))))
        baseline = p.get('baseline', spec.get('baseline'))
        if baseline is not None and baseline not in [a.name for a in arms]:
            raise StudyError(f'{where}: baseline {baseline!r} is not an arm (arms: {[a.name for a in arms]})')
        prepare = list(p.get('prepare') or [])
        for config in prepare:
            if not Path(config).is_file():
                raise StudyError(f'{where}.prepare: {config} does not exist')
        fixed = dict(p.get('fixed') or {})
        pair_select = _seeds(p['select_seeds'], f'{where}.select_seeds') if 'select_seeds' in p else select_seeds
        pair_seeds = _seeds(p['seeds'], f'{where}.seeds') if 'seeds' in p else seeds
        overlap = sorted(set(pair_select) & set(pair_seeds))
        if overlap:
            raise StudyError(f'{where}: select_seeds {pair_select} and seeds {pair_seeds} share {overlap}; selection '
                             f'seeds must be disjoint from the test seeds (a seed that chose a setting would also '
                             f'score it)')
        pairs.append(Pair(str(pair_name), str(p.get('title', pair_name)), Path(p['records']), prepare, fixed, arms,
                          pair_select, pair_seeds, baseline))
    threads = spec.get('threads')
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise StudyError(f'{path}: threads must be a positive integer, got {threads!r}')
    return Study(str(spec['study']), path, Path(spec.get('workdir', f'runs/{spec["study"]}/ablation')),
                 str(spec.get('device', 'cpu')), threads, dict(spec.get('labels') or {}), pairs)


def pick_pairs(study: Study, names: Sequence[str] | None) -> list[Pair]:
    """The pairs named (all of them when ``names`` is empty), in the order given; unknown names are an error."""
    if not names:
        return study.pairs
    known = {p.name: p for p in study.pairs}
    bad = [n for n in names if n not in known]
    if bad:
        raise StudyError(f'{study.path}: no pairs {bad}; pairs: {list(known)}')
    return [known[n] for n in names]
