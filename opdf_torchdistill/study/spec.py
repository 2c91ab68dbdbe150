"""Study specs: the YAML that names a study's pairs, arms, grids and seeds (``configs/fashion/study.yaml``).

A spec holds, at the top level, ``study`` (its name), ``pairs``, ``seeds`` (the final, test seeds) and
``select_seeds`` (the seeds of the selection runs), and optionally ``description``, ``workdir``
(checkpoints of runs in flight, default ``runs/STUDY/ablation``), ``device``, ``threads`` (torch threads
per run), ``baseline`` (the arm every other arm is compared with), ``select_metric`` (only
``best_val_acc1``), ``labels`` (short column names of override keys) and ``edge_rule`` (below). Keys
starting with ``x-`` are free (for YAML anchors).

Each pair has ``records`` (its JSON-lines record file), ``arms`` (``name: {config, grid, title,
inherit}``; a grid maps override keys to lists of values, and its points are their cross product in
order), and optionally ``title``, ``prepare`` (configs trained once first, e.g. the teacher), ``fixed``
(overrides of every run), ``select_seeds``, ``seeds`` and ``baseline`` (overriding the top level's) and
``contrasts`` (below).

Selection (:mod:`~opdf_torchdistill.study.selection`): every grid point of an arm runs at every
selection seed; the point with the highest *mean* validation accuracy over them wins (ties: the first
in grid order; a point with a diverged seed is never chosen).

``edge_rule``: ``none`` (the default) or ``extend_once``. With ``extend_once``, when an arm's winner
sits at the lowest or highest value of a numeric grid key, one more point beyond that end is run at
the selection seeds (a geometric step: the ratio of the two grid values at that end, e.g.
``[0.025, ..., 0.4]`` -> ``0.0125`` or ``0.8``; integer grids stay integers; floats are rounded to 6
significant digits), before any final run of that arm, and the selection is made again over the
grid and its extensions. For an arm with several grid keys each key whose winning value sits at an
end gets its own extra point, the other keys held at the winner's values. An arm and key is
extended at most once (an extension is decided from the grid's own points only). Keys whose values
are not numbers, or whose two end values do not define a ratio (a zero, a change of sign), are not
extended. Which points are extensions follows from the spec and the records (no record field says so).

``inherit: OTHER_ARM`` (an arm of the same pair): the arm's runs use OTHER_ARM's *selected* setting
(all its grid keys and values, including what OTHER_ARM inherited itself) plus the arm's own
``grid``, which may not repeat an inherited key. Its selection waits until OTHER_ARM has a selected
setting; without a grid of its own it is not tuned at all and its final runs use the inherited
setting. Unknown arms and cycles are errors.

``contrasts``: a list of ``{name, arms: [a, b], family, margin}`` (``margin`` optional, a positive
number in accuracy points): the pre-registered comparisons ``a - b`` of the report
(:mod:`~opdf_torchdistill.study.report`), paired over the test seeds, Holm-corrected within the
``family`` (a free string, e.g. ``primary`` or ``check``) of the pair; with a margin the TOST
equivalence test is reported too. Names are unique within a pair, and both arms must be arms of it.

``trainer`` (top level, or per pair): the program every run is, ``train`` (``opdf-train``, image
classification; the default) or ``glue`` (``opdf-glue``; its records hold the task's metric, the mean of
GLUE's metrics for the task in percent, under ``best_val_acc1`` and ``test_acc1``).

``launcher`` (top level): where the runs train (:class:`Launcher`; ``opdf-ablate study --launcher`` and
``--launcher_set KEY=VALUE`` override it): ``{name: local | slurm | submitit-local, partition, account,
qos, nodes, gpus_per_node, tasks_per_node, cpus_per_task, mem_gb, timeout_min, constraint, sbatch (extra
sbatch lines), setup (shell lines run before the job), array_parallelism, max_failures, max_timeouts,
signal_delay_s, folder, poll_s, grace_s, hours_per_run, python}``. ``hours_per_run`` (also per pair,
overriding it) is the expected wall time of one run in hours, from which ``--dry_run`` estimates
GPU-hours. See :mod:`~opdf_torchdistill.study.launchers`.

Selection seeds and test seeds must be disjoint in every pair. Paths are relative to the working
directory (the repository root). :func:`load_study` checks all of this and raises :class:`StudyError`
naming the file and the key (or, for a YAML syntax error, the line) that is wrong.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ['StudyError', 'Arm', 'Contrast', 'Pair', 'Study', 'EDGE_RULES', 'TRAINERS', 'LAUNCHERS', 'Launcher',
           'parse_launcher', 'load_study', 'pick_pairs']

_STUDY_KEYS = {'study', 'description', 'workdir', 'device', 'threads', 'baseline', 'select_seeds', 'seeds',
               'select_metric', 'labels', 'pairs', 'edge_rule', 'trainer', 'launcher'}
_PAIR_KEYS = {'title', 'records', 'prepare', 'fixed', 'arms', 'select_seeds', 'seeds', 'baseline', 'contrasts',
              'trainer', 'hours_per_run'}
_ARM_KEYS = {'config', 'grid', 'title', 'inherit'}
_CONTRAST_KEYS = {'name', 'arms', 'family', 'margin'}
_METRICS = ('best_val_acc1',)
EDGE_RULES = ('none', 'extend_once')
TRAINERS = ('train', 'glue')  # opdf-train (opdf_torchdistill.cli.train), opdf-glue (opdf_torchdistill.cli.glue)
LAUNCHERS = ('local', 'slurm', 'submitit-local')


class StudyError(ValueError):
    """A study spec that is not well formed, or a study that cannot go on (the message names the key)."""


@dataclass
class Launcher:
    """Where and how runs train (a spec's ``launcher:`` block; :mod:`~opdf_torchdistill.study.launchers`).

    ``local``: subprocesses on this machine (``--jobs N``), as always. ``slurm``: one SLURM job per run,
    submitted by submitit as job arrays (at most ``array_parallelism`` running at a time), each job
    ``nodes`` x ``tasks_per_node`` tasks (one per GPU: ``tasks_per_node`` = ``gpus_per_node``), every task
    the same trainer (DDP). ``submitit-local``: the same jobs as processes of this machine (submitit's
    LocalExecutor; one node). A job that fails is submitted again until the run has failed
    ``max_failures`` times; a job preempted or timed out requeues itself (``max_timeouts`` time-outs at
    most) and continues with ``--resume``. ``sbatch``: extra sbatch options (``--exclusive``,
    ``--mail-type=END``); ``setup``: shell lines before the job (``module load ...``)."""
    name: str = 'local'
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 60
    constraint: str | None = None
    sbatch: list = field(default_factory=list)
    setup: list = field(default_factory=list)
    array_parallelism: int | None = None
    max_failures: int = 3
    max_timeouts: int = 3
    signal_delay_s: int = 120
    folder: str | None = None
    poll_s: float = 30.0
    grace_s: float = 120.0
    hours_per_run: float | None = None
    python: str | None = None

    @property
    def gpus_per_run(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


_LAUNCHER_TYPES = {'name': str, 'partition': str, 'account': str, 'qos': str, 'nodes': int, 'gpus_per_node': int,
                   'tasks_per_node': int, 'cpus_per_task': int, 'mem_gb': float, 'timeout_min': int,
                   'constraint': str, 'sbatch': list, 'setup': list, 'array_parallelism': int, 'max_failures': int,
                   'max_timeouts': int, 'signal_delay_s': int, 'folder': str, 'poll_s': float, 'grace_s': float,
                   'hours_per_run': float, 'python': str}
_AT_LEAST = {'nodes': 1, 'tasks_per_node': 1, 'gpus_per_node': 0, 'cpus_per_task': 1, 'mem_gb': 0, 'timeout_min': 1,
             'array_parallelism': 1, 'max_failures': 1, 'max_timeouts': 0, 'signal_delay_s': 0, 'poll_s': 0,
             'grace_s': 0, 'hours_per_run': 0}


def parse_launcher(block: Any, where: str, base: Launcher | None = None) -> Launcher:
    """A :class:`Launcher` from a spec's ``launcher:`` mapping (or ``--launcher_set`` pairs), on top of
    ``base``; a wrong key, type or value is a :class:`StudyError` naming ``where`` and the key."""
    out = Launcher(**{k: (list(v) if isinstance(v, list) else v) for k, v in vars(base or Launcher()).items()})
    if block is None:
        return out
    if not isinstance(block, dict):
        raise StudyError(f'{where} must be a mapping {{name: local | slurm | submitit-local, partition, ...}}, '
                         f'got {block!r}')
    _unknown(where, block, set(_LAUNCHER_TYPES))
    for key, value in block.items():
        if str(key).startswith('x-'):
            continue
        kind = _LAUNCHER_TYPES[key]
        if value is None and key not in ('name', 'nodes', 'tasks_per_node', 'gpus_per_node', 'timeout_min',
                                         'max_failures', 'max_timeouts', 'signal_delay_s', 'poll_s', 'grace_s',
                                         'sbatch', 'setup'):
            setattr(out, key, None)
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list and isinstance(value, str):
            value = [value]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(v, str) for v in value)):
            what = {int: 'an integer', float: 'a number', str: 'a string', list: 'a list of strings'}[kind]
            raise StudyError(f'{where}.{key} must be {what}, got {value!r}')
        if key in _AT_LEAST and value < _AT_LEAST[key]:
            raise StudyError(f'{where}.{key} must be >= {_AT_LEAST[key]}, got {value!r}')
        if key == 'name' and value not in LAUNCHERS:
            raise StudyError(f'{where}.name must be one of {list(LAUNCHERS)}, got {value!r}')
        setattr(out, key, value)
    if out.name == 'submitit-local' and out.nodes > 1:
        raise StudyError(f'{where}: submitit-local runs on this machine only (nodes: 1), got nodes {out.nodes}')
    return out


@dataclass
class Arm:
    name: str
    config: str
    grid: list[dict]  # its own grid points in order (the cross product of the grid's axes)
    axes: list[str]
    title: str = ''
    inherit: str | None = None  # the arm whose selected setting this arm's runs start from
    values: dict = field(default_factory=dict)  # its own grid: key -> values, in order


@dataclass(frozen=True)
class Contrast:
    """A pre-registered comparison ``arms[0] - arms[1]`` over the test seeds."""
    name: str
    arms: tuple
    family: str
    margin: float | None = None


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
    contrasts: list = field(default_factory=list)  # Contrast, in the spec's order
    edge_rule: str = 'none'  # the study's
    trainer: str = 'train'  # TRAINERS
    hours_per_run: float | None = None  # expected wall hours of one run (the launcher's when None)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def inherited_axes(self, arm: Arm) -> list[str]:
        """The grid keys an arm inherits (its source's, and what its source inherits), in order."""
        if arm.inherit is None:
            return []
        source = self.arm(arm.inherit)
        return list(dict.fromkeys(self.inherited_axes(source) + list(source.axes)))


@dataclass
class Study:
    name: str
    path: Path
    workdir: Path
    device: str
    threads: int | None
    labels: dict
    pairs: list[Pair]
    edge_rule: str = 'none'
    trainer: str = 'train'
    launcher: Launcher = field(default_factory=Launcher)


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


def _check_inheritance(where: str, arms: Sequence[Arm]) -> None:
    """``inherit`` names another arm of the pair, without cycles, and an arm's own grid repeats no key it inherits."""
    by_name = {a.name: a for a in arms}
    for arm in arms:
        if arm.inherit is None:
            continue
        if arm.inherit == arm.name or arm.inherit not in by_name:
            others = [a.name for a in arms if a.name != arm.name]
            raise StudyError(f'{where}.arms.{arm.name}.inherit: {arm.inherit!r} is not another arm of the pair '
                             f'(arms: {others})')
        chain, current = [arm.name], arm
        while current.inherit is not None:
            current = by_name[current.inherit]
            if current.name in chain:
                cycle = ' -> '.join(chain[chain.index(current.name):] + [current.name])
                raise StudyError(f'{where}.arms.{arm.name}.inherit: an inheritance cycle ({cycle})')
            chain.append(current.name)
    for arm in arms:
        inherited, source = {}, arm
        while source.inherit is not None:
            source = by_name[source.inherit]
            inherited.update({k: source.name for k in source.axes if k not in inherited})
        repeated = [k for k in arm.axes if k in inherited]
        if repeated:
            raise StudyError(f'{where}.arms.{arm.name}.grid: {repeated} {"is" if len(repeated) == 1 else "are"} '
                             f'inherited (from {sorted({inherited[k] for k in repeated})}); an inheriting arm '
                             f'tunes only keys its source does not set')


def _contrasts(where: str, given: Any, arm_names: Sequence[str]) -> list[Contrast]:
    """A pair's ``contrasts``: ``{name, arms: [a, b], family, margin}`` each, names unique, arms of the pair."""
    if given is None:
        return []
    if not isinstance(given, list):
        raise StudyError(f'{where}.contrasts must be a list of {{name, arms: [a, b], family, margin}}, got {given!r}')
    out, names = [], set()
    for i, c in enumerate(given):
        w = f'{where}.contrasts[{i}]'
        if not isinstance(c, dict):
            raise StudyError(f'{w} must be a mapping {{name, arms: [a, b], family, margin}}, got {c!r}')
        _unknown(w, c, _CONTRAST_KEYS)
        missing = [k for k in ('name', 'arms', 'family') if k not in c]
        if missing:
            raise StudyError(f'{w}: missing {missing} (a contrast has name, arms: [a, b], family and optionally '
                             f'margin)')
        name, pair_arms, family, margin = c['name'], c['arms'], c['family'], c.get('margin')
        if not isinstance(name, str) or not name.strip():
            raise StudyError(f'{w}.name must be a non-empty string, got {name!r}')
        if name in names:
            raise StudyError(f'{w}.name: {name!r} names two contrasts of the pair')
        names.add(name)
        if (not isinstance(pair_arms, list) or len(pair_arms) != 2 or pair_arms[0] == pair_arms[1]
                or not all(isinstance(a, str) for a in pair_arms)):
            raise StudyError(f'{w}.arms must be two different arm names [a, b] (the contrast is a - b), '
                             f'got {pair_arms!r}')
        unknown = [a for a in pair_arms if a not in arm_names]
        if unknown:
            raise StudyError(f'{w}.arms: {unknown} {"is not an arm" if len(unknown) == 1 else "are not arms"} of '
                             f'the pair (arms: {list(arm_names)})')
        if not isinstance(family, str) or not family.strip():
            raise StudyError(f'{w}.family must be a non-empty string (e.g. primary or check), got {family!r}')
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not 0 < margin < float('inf')):
            raise StudyError(f'{w}.margin must be a positive number (accuracy points), got {margin!r}')
        out.append(Contrast(name, tuple(pair_arms), family, None if margin is None else float(margin)))
    return out


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
    edge_rule = spec.get('edge_rule', 'none')
    if edge_rule not in EDGE_RULES:
        raise StudyError(f'{path}: edge_rule must be one of {list(EDGE_RULES)}, got {edge_rule!r}')
    if not isinstance(spec['pairs'], dict) or not spec['pairs']:
        raise StudyError(f'{path}: pairs must be a non-empty mapping of pair name -> pair')
    trainer = spec.get('trainer', 'train')
    if trainer not in TRAINERS:
        raise StudyError(f'{path}: trainer must be one of {list(TRAINERS)}, got {trainer!r}')
    launcher = parse_launcher(spec.get('launcher'), f'{path}: launcher')
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
            inherit = a.get('inherit')
            if inherit is not None and not isinstance(inherit, str):
                raise StudyError(f'{w}.inherit must name another arm of the pair, got {inherit!r}')
            arms.append(Arm(str(arm_name), str(a['config']), points, axes, str(a.get('title', '')), inherit,
                            {k: list(v) for k, v in grid.items()}))
        _check_inheritance(where, arms)
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
        contrasts = _contrasts(where, p.get('contrasts'), [a.name for a in arms])
        pair_trainer = p.get('trainer', trainer)
        if pair_trainer not in TRAINERS:
            raise StudyError(f'{where}.trainer must be one of {list(TRAINERS)}, got {pair_trainer!r}')
        hours = p.get('hours_per_run')
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float)) or hours < 0):
            raise StudyError(f'{where}.hours_per_run must be a number of hours >= 0, got {hours!r}')
        pairs.append(Pair(str(pair_name), str(p.get('title', pair_name)), Path(p['records']), prepare, fixed, arms,
                          pair_select, pair_seeds, baseline, contrasts, edge_rule, pair_trainer,
                          None if hours is None else float(hours)))
    threads = spec.get('threads')
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise StudyError(f'{path}: threads must be a positive integer, got {threads!r}')
    return Study(str(spec['study']), path, Path(spec.get('workdir', f'runs/{spec["study"]}/ablation')),
                 str(spec.get('device', 'cpu')), threads, dict(spec.get('labels') or {}), pairs, edge_rule, trainer,
                 launcher)


def pick_pairs(study: Study, names: Sequence[str] | None) -> list[Pair]:
    """The pairs named (all of them when ``names`` is empty), in the order given; unknown names are an error."""
    if not names:
        return study.pairs
    known = {p.name: p for p in study.pairs}
    bad = [n for n in names if n not in known]
    if bad:
        raise StudyError(f'{study.path}: no pairs {bad}; pairs: {list(known)}')
    return [known[n] for n in names]
