"""Running ablations and studies: train every planned run that has no record yet, one record per run.

``run_ablation``
    configs x seeds x override grid; trains every run whose key the record file does not hold yet and
    appends one record per finished run (so an interrupted ablation resumes where it stopped).
``run_study``
    the two-phase protocol of a study spec (:mod:`~opdf_torchdistill.study.spec`): the teachers the
    pairs name under ``prepare`` are trained (or resumed) first; then for every arm, each point of its
    grid is trained with the selection seeds and scored on validation accuracy, and the selected point
    (:mod:`~opdf_torchdistill.study.selection`) is trained with the final seeds. With an edge rule or
    arms that inherit, the selection runs come in rounds (grid, edge extensions, the grids of arms that
    inherit a selected setting), each planned from the records when the previous one is done.
    Resumable across sessions; ``jobs=2`` trains two runs at a time (one subprocess each, the spec's
    ``threads`` each).

**How a run is trained.** The runner drives the trainer only through its command line (``opdf-train``'s
arguments, built here as a list): with ``jobs > 1`` or ``isolate`` as ``python -m
opdf_torchdistill.cli.train ARGS`` in a subprocess, otherwise by calling that program's ``main(ARGS)``
in this process (imported inside the function that does it, so that this package never imports the
command-line layer at import time). Either way the result is read back from ``--metrics_json``, a
non-zero exit status is a failed (or, when the trainer said so, diverged) run whose last error line is
recorded, and the same arguments give the same run. Each run writes its checkpoints under the
workdir with a hash-named stem and deletes them when it ends; it passes ``--force``, so that files a
killed earlier attempt left there are replaced (the trainer refuses to start a fresh run onto an
existing checkpoint otherwise). A teacher (``prepare``) is never forced: an interrupted one is resumed
(``--resume``), a finished one reused, and anything else left at its path is the trainer's to refuse.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ._format import short_key, short_overrides
from .records import RunIdentity, append_record, canonical, load_records, read_config_data, record_finder, run_identity
from .selection import select_settings
from .spec import Arm, Launcher, Pair, Study, StudyError, pick_pairs
from .trainers import (DIVERGED, TRAINER_MODULES, failure, remove_run_files, run_files, run_result, run_stem,
                       trainer_argv, trainer_main)

__all__ = ['Task', 'Progress', 'run_ablation', 'study_plan', 'teacher_state', 'prepare_teachers', 'run_study',
           'task_record', 'run_tasks']

TRAINER = TRAINER_MODULES['train']  # the program every run is (``python -m TRAINER ARGS``; opdf-glue for GLUE)
_DIVERGED = DIVERGED


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return 'unknown'
    return str(datetime.timedelta(seconds=int(round(seconds))))


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def _train_in_process(argv: list[str], trainer: str = 'train') -> tuple[int, str]:
    """``opdf-train ARGV`` (or ``opdf-glue``) in this process: (exit status, what it printed on stderr).

    The one place the study package calls into the command-line layer, and only as a program (its
    ``main``), imported here rather than at module level."""
    from torchdistill.misc.log import set_basic_log_config
    main = trainer_main(trainer)
    set_basic_log_config()  # what the trainer does first anyway: its log handler keeps the real stderr
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _execute(config: str, seed: int, overrides: dict, workdir: Path, device: str, isolate: bool,
             threads: int | None = None, trainer: str = 'train') -> dict:
    """Train one run through the trainer; returns its record fields (status, metrics, error)."""
    files = run_files(workdir, run_stem(config, seed, overrides, device), trainer)
    # --force: the workdir files are this run's own (hash-named, deleted when it ends); ones left there by a
    # killed attempt are replaced, not refused
    argv = trainer_argv(trainer, config, seed, overrides, device, files, threads)
    try:
        if isolate:
            import subprocess
            module = TRAINER if trainer == 'train' else TRAINER_MODULES[trainer]
            proc = subprocess.run([sys.executable, '-m', module] + argv, capture_output=True, text=True)
            code, err = proc.returncode, proc.stderr
        else:
            code, err = _train_in_process(argv) if trainer == 'train' else _train_in_process(argv, trainer)
        if code != 0:  # the trainer's last stderr line is its one-line error
            return failure(code, err)
        metrics = json.loads(files['metrics'].read_text())
    except FloatingPointError as exc:
        return {'status': 'diverged', 'metrics': {}, 'error': str(exc)}
    except Exception as exc:  # a failed run is recorded, not fatal: the rest of the ablation goes on
        text = str(exc)
        status = 'diverged' if any(s in text for s in _DIVERGED) else 'failed'
        return {'status': status, 'metrics': {}, 'error': f'{type(exc).__name__}: {exc}'}
    finally:
        remove_run_files(files)
    return run_result(trainer, metrics)


@dataclass
class Task:
    """One planned run."""
    config: str
    seed: int
    overrides: dict
    identity: RunIdentity
    out: Path
    extra: dict = field(default_factory=dict)  # record fields of a study (pair, phase)


class Progress:
    """Runs done / total, mean run time and an ETA over everything planned (all pairs and phases).

    The time of a remaining run is estimated by the mean wall time of its arm's recorded runs, else of
    every recorded run; the ETA divides their sum by ``jobs`` (runs trained at a time).
    """

    def __init__(self, total: int, done: int, times: Mapping[str, Sequence[float]] | None = None,
                 stream=None, jobs: int = 1):
        self.total, self.done, self.jobs = total, done, max(1, jobs)
        self.times: dict[str, list[float]] = defaultdict(list, {k: list(v) for k, v in (times or {}).items()})
        self.stream = stream if stream is not None else sys.stdout
        self.session: list[float] = []

    def mean(self, name: str | None = None) -> float | None:
        values = self.times.get(name) if name is not None else None
        if not values:
            values = [t for ts in self.times.values() for t in ts]
        return statistics.fmean(values) if values else None

    def eta(self, remaining: Iterable[str]) -> float | None:
        total = 0.0
        for name in remaining:
            m = self.mean(name)
            if m is None:
                return None
            total += m
        return total / self.jobs

    def line(self, remaining: Iterable[str]) -> str:
        m = self.mean()
        return (f'{self.done}/{self.total} runs done, mean run {_fmt_duration(m) if m is not None else "unknown"}, '
                f'ETA {_fmt_duration(self.eta(remaining))}')

    def finished(self, record: dict, remaining: Iterable[str]) -> None:
        self.done += 1
        self.times[record['name']].append(record['wall_seconds'])
        self.session.append(record['wall_seconds'])
        acc = record['metrics'].get('test_acc1')
        val = record['metrics'].get('best_val_acc1')
        phase = f' {record["phase"]}' if record.get('phase') else ''
        result = (f' val {val:.2f} test {acc:.2f}' if acc is not None and val is not None else
                  f' ({record["error"]})')
        print(f'[{self.line(remaining)}]{phase} {record["name"]} seed={record["seed"]} '
              f'{short_overrides(record["overrides"])}: {record["status"]}{result} ({record["wall_seconds"]:.1f} s)',
              file=self.stream, flush=True)


def _times_by_name(records: Iterable[dict]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get('status') == 'ok' and r.get('wall_seconds') is not None:
            times[r['name']].append(float(r['wall_seconds']))
    return times


def task_record(task: Task, device: str, result: dict, wall_seconds: float) -> dict:
    """The record of a finished run: its identity, the study's fields, timing and the result."""
    return {'key': task.identity.key, 'config': task.config, 'name': task.identity.name, 'seed': task.seed,
            'overrides': task.overrides, 'device': device, 'config_hash': task.identity.config_hash,
            'versions': task.identity.versions, 'inputs': task.identity.inputs, **task.extra,
            'wall_seconds': round(wall_seconds, 3),
            'finished': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'), **result}


def run_tasks(tasks: Sequence[Task], device: str, workdir: Path, progress: Progress, jobs: int = 1,
              threads: int | None = None, isolate: bool = False, later: Sequence[str] = (),
              trainer: str = 'train') -> list[dict]:
    """Train ``tasks`` (``jobs`` at a time, each in its own subprocess when ``jobs > 1``), appending each
    record as it finishes; ``later`` names runs still to come after these (for the ETA)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pending = [t.identity.name for t in tasks]

    def one(task: Task) -> dict:
        start = time.perf_counter()
        args = (task.config, task.seed, task.overrides, workdir, device, isolate or jobs > 1, threads)
        result = _execute(*args) if trainer == 'train' else _execute(*args, trainer=trainer)
        return task_record(task, device, result, time.perf_counter() - start)

    records = []

    def finish(task: Task, record: dict) -> None:
        append_record(record, task.out)
        records.append(record)
        pending.remove(task.identity.name)
        progress.finished(record, list(pending) + list(later))

    if jobs <= 1:
        for task in tasks:
            finish(task, one(task))
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(one, task): task for task in tasks}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    return records


# ----------------------------------------------------------------------------------------------
# Ablations: configs x seeds x grid
# ----------------------------------------------------------------------------------------------
def run_ablation(configs: Sequence[str], seeds: Sequence[int], grid: Sequence[dict], fixed: dict, out: str,
                 device: str = 'cpu', isolate: bool = False, jobs: int = 1, threads: int | None = None,
                 workdir: str | None = None) -> list[dict]:
    """Train every (config, grid point, seed) that ``out`` holds no finished record of; returns all records."""
    records = load_records(out)
    find = record_finder(records, 'key')
    legacy = sum(1 for r in records if 'config_hash' not in r)
    plan = []
    for c, g, s in itertools.product(configs, grid, seeds):
        overrides = {**fixed, **g}
        plan.append(Task(c, s, overrides, run_identity(c, s, overrides, device), Path(out)))
    todo = [t for t in plan if find(t.identity.name, t.overrides, t.seed, t.identity) is None]
    print(f'{len(plan)} runs planned, {len(plan) - len(todo)} already recorded in {out}, {len(todo)} to go'
          + (f' ({legacy} older records without a config hash are not reused)' if legacy else ''), flush=True)
    progress = Progress(len(plan), len(plan) - len(todo), _times_by_name(records), jobs=jobs)
    run_tasks(todo, device, Path(workdir) if workdir else Path(out).with_suffix('.runs'), progress, jobs, threads,
              isolate)
    return load_records(out)


# ----------------------------------------------------------------------------------------------
# Studies: teachers, selection on validation, then seeds at the selected setting
# ----------------------------------------------------------------------------------------------
def study_plan(study: Study, pair: Pair, records: Sequence[dict]) -> dict:
    """What a pair's records let run now (:func:`~opdf_torchdistill.study.selection.select_settings`).

    ``select``: the selection tasks planned (every point of the arms not waiting, edge extensions once
    decided); ``final``: the final tasks of the arms with a selected setting; ``selection``: per arm;
    ``waiting``: arm names, one per selection run not plannable yet (an arm waiting for the setting
    it inherits); ``unplanned``: one per final run of an arm not selected yet (both for the ETA);
    ``done``: the keys of the planned tasks that have a record."""
    cache: dict[str, RunIdentity] = {}

    def ident(arm: Arm, overrides: dict, seed: int) -> RunIdentity:
        memo = canonical([arm.name, overrides, seed])
        if memo not in cache:
            cache[memo] = run_identity(arm.config, seed, overrides, study.device, arm.name)
        return cache[memo]

    find = record_finder(records, 'key')
    selection = select_settings(pair, find, ident)
    select, final, waiting, unplanned = [], [], [], []
    for arm in pair.arms:
        sel = selection[arm.name]
        if sel['state'] == 'waiting':
            waiting += [arm.name] * (len(sel['points']) * len(pair.select_seeds))
        else:
            for entry in sel['points']:
                overrides = {**pair.fixed, **entry['point']}
                select += [Task(arm.config, s, overrides, ident(arm, overrides, s), pair.records,
                                {'pair': pair.name, 'phase': 'select'}) for s in pair.select_seeds]
        chosen = sel['selected']
        if chosen is None:
            unplanned += [arm.name] * len(pair.seeds)
            continue
        overrides = {**pair.fixed, **chosen}
        final += [Task(arm.config, s, overrides, ident(arm, overrides, s), pair.records,
                       {'pair': pair.name, 'phase': 'final'}) for s in pair.seeds]
    done = {t.identity.key for t in select + final if find(t.identity.name, t.overrides, t.seed, t.identity)}
    return {'select': select, 'final': final, 'selection': selection, 'waiting': waiting, 'unplanned': unplanned,
            'done': done}


def _arm_lines(study: Study, pair: Pair, plan: dict) -> list[str]:
    """One line per arm of a plan: where its selection stands and what its final runs wait for."""
    lines = []
    n_sel = len(pair.select_seeds)
    for arm in pair.arms:
        sel = plan['selection'][arm.name]
        tasks = [t for t in plan['select'] if t.identity.name == arm.name]
        togo = sum(1 for t in tasks if t.identity.key not in plan['done'])
        points = f'{len(arm.grid)} point{"s" if len(arm.grid) != 1 else ""} x {n_sel} seed{"s" if n_sel != 1 else ""}'
        own = (' x '.join(f'{study.labels.get(k, short_key(k))} ({len(arm.values[k])})' for k in arm.axes)
               + f' = {points}') if arm.axes else ''
        source = arm.inherit
        keys = ', '.join(study.labels.get(k, short_key(k)) for k in pair.inherited_axes(arm)) if source else ''
        state = sel['state']
        if state == 'waiting':
            text = (f'waiting for {source}\'s selected setting ({keys}); then '
                    + (f'selection {own} = {len(arm.grid) * n_sel} runs' if arm.axes else 'no tuning of its own'))
        elif source and not arm.axes:
            text = f'runs {source}\'s setting {short_overrides(sel["selected"], study.labels)} (no tuning of its own)'
        else:
            prefix = (f'at {source}\'s {short_overrides(sel["inherited"], study.labels)}, ' if source else '')
            text = f'{prefix}selection {own or "1 point (no grid)"}: {len(tasks)} runs ({togo} to go)'
            if sel['extensions']:
                text += ('; edge extension ' + '; '.join(short_overrides(e['own'], study.labels)
                                                          for e in sel['extensions']))
            if state == 'selecting' and pair.edge_rule == 'extend_once' and arm.axes:
                text += '; edge extensions decided when the grid is done'
            if state == 'selected':
                text += (f'; selected {short_overrides(sel["selected"], study.labels)}'
                         + (' (edge)' if sel['edge'] else ''))
            elif state == 'diverged':
                text += '; every point has a diverged seed: nothing selected'
        finals = [t for t in plan['final'] if t.identity.name == arm.name]
        if finals:
            text += f'; final {len(finals)} runs ({sum(1 for t in finals if t.identity.key not in plan["done"])} to go)'
        else:
            text += f'; final {len(pair.seeds)} runs waiting'
        lines.append(f'    {arm.name}: {text}')
    return lines


def _total_epochs(config: dict) -> int | None:
    """Epochs a training config runs in all (the sum over ``stage*`` blocks), ``None`` if it does not say."""
    train = config.get('train') or {}
    try:
        if 'num_epochs' in train:
            return int(train['num_epochs'])
        stages = [v for k, v in train.items() if k.startswith('stage') and isinstance(v, dict)]
        return sum(int(v.get('num_epochs', 0)) for v in stages) if stages else None
    except (TypeError, ValueError):  # a tagged value (read as data, not run): the config does not say plainly
        return None


def _path_value(value: Any, where: str) -> str:
    """A path in a config read as data: a string, or one of torchdistill's path tags over strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {'__tag__', 'value'}:
        tag, parts = value['__tag__'], value['value']
        if tag in ('!join', '!pathjoin') and isinstance(parts, list):
            parts = [_path_value(p, where) for p in parts]
            return ''.join(parts) if tag == '!join' else os.path.join(*parts)
        if tag in ('!expanduser', '!abspath'):
            inner = _path_value(parts, where)
            return os.path.expanduser(inner) if tag == '!expanduser' else os.path.abspath(inner)
    raise StudyError(f'{where} must be a path (a string, or !join/!pathjoin/!expanduser/!abspath of strings), '
                     f'got {value!r}')


def _last_ckpt_path(dst: str) -> Path:
    """Where the trainer writes its resume checkpoint: ``NAME.last.SUFFIX`` beside ``dst_ckpt`` (the
    trainer's rule, ``opdf_torchdistill.cli.train.last_ckpt_path``; a test checks they agree)."""
    path = Path(os.path.expanduser(dst))
    return path.with_name(path.stem + '.last' + path.suffix)


def teacher_state(config: str) -> tuple[str, str]:
    """``('done' | 'resume' | 'missing', dst_ckpt)`` of a ``prepare`` config.

    The config is read as data (nothing in it is imported or run). A best checkpoint exists from the
    first epoch on, so its presence alone does not mean the run finished: when the ``.last.pt`` beside
    it says fewer epochs than the config asks for, the run was interrupted and is resumed (reusing a
    half-trained teacher would silently change every record), with or without a best checkpoint."""
    from ..io import load_checkpoint
    data = read_config_data(config)
    models = data.get('models') if isinstance(data, dict) else None
    student = None
    if isinstance(models, dict):
        student = models.get('student_model', models.get('model'))
    if not isinstance(student, dict) or 'dst_ckpt' not in student:
        raise StudyError(f'{config}: a prepare config needs models.student_model.dst_ckpt (or models.model.dst_ckpt): '
                         f'where the trained model is written')
    dst = os.path.expanduser(_path_value(student['dst_ckpt'], f'{config}: dst_ckpt'))
    last = _last_ckpt_path(dst)
    if last.exists():
        epoch = load_checkpoint(last, trusted=False).get('epoch')
        total = _total_epochs(data)
        if total is not None and epoch is not None and epoch < total:
            return 'resume', dst
    return ('done' if os.path.exists(dst) else 'missing'), dst


def prepare_teachers(configs: Sequence[str], device: str, threads: int | None = None, jobs: int = 1) -> None:
    """Train the teachers a study needs, ``jobs`` at a time (one subprocess each, log beside the checkpoint).

    A finished teacher is reused, an interrupted one resumed from its ``.last.pt``; a failure stops the
    study with the end of the teacher's log."""
    import subprocess
    pending = []
    for config in configs:
        state, dst = teacher_state(config)
        if state == 'done':
            print(f'{config}: {dst} exists (training finished), reused', flush=True)
        else:
            pending.append((config, state, dst))

    def train(item: tuple[str, str, str]) -> str:
        config, state, dst = item
        log = Path(dst).with_suffix('.train.log')
        os.makedirs(log.parent, exist_ok=True)
        metrics = log.with_suffix('.metrics.json')
        argv = [sys.executable, '-m', TRAINER, '--config', config, '--device', device,
                '--seed', '0', '--metrics_json', str(metrics)] + (['--threads', str(threads)] if threads else [])
        argv += ['--resume'] if state == 'resume' else []
        print(f'{config}: {"resuming" if state == "resume" else "training"} ({dst} '
              f'{"unfinished" if state == "resume" else "missing"}); log {log}', flush=True)
        start = time.perf_counter()
        with open(log, 'a') as out:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = '\n'.join(log.read_text().splitlines()[-15:])
            raise StudyError(f'{config}: teacher training failed (exit status {code}); end of {log}:\n{tail}')
        acc = json.loads(metrics.read_text()).get('test', {}).get('acc1', math.nan)
        return f'{config}: test acc@1 {acc:.2f} ({_fmt_duration(time.perf_counter() - start)})'

    with ThreadPoolExecutor(max(1, min(jobs, len(pending)))) as pool:
        for line in pool.map(train, pending):
            print(line, flush=True)


def run_study(study: Study, pairs: Sequence[str] | None = None, phase: str = 'all', jobs: int = 1,
              dry_run: bool = False, stream=None, launcher: Launcher | None = None, wait: bool = True) -> None:
    """Prepare the teachers, then per pair, until nothing is left that can run: the selection runs
    planned (the grid; then edge extensions and the selection of arms that inherit, as they become
    known), then the final runs of the selected arms (see the module docstring). ``phase``: ``select``
    runs only selection runs, ``final`` only final runs. A run that fails is not tried again in the same
    call (the next ``study`` retries it); everything is planned from the records, so an interrupted
    study continues where it stopped.

    ``launcher`` (default: the spec's): ``slurm`` and ``submitit-local`` train every run as a job
    (:func:`~opdf_torchdistill.study.launchers.run_study_jobs`; ``wait``: until the study is done);
    with ``dry_run`` the plan is followed by the launcher's estimate and parameters."""
    stream = stream if stream is not None else sys.stdout
    chosen = pick_pairs(study, pairs)
    launcher = launcher if launcher is not None else study.launcher
    if launcher.name != 'local' and not dry_run:
        from .launchers import run_study_jobs
        run_study_jobs(study, launcher, pairs, phase, wait, stream)
        return
    if not dry_run:
        teachers = list(dict.fromkeys(c for pair in chosen for c in pair.prepare))  # pairs may share one
        prepare_teachers(teachers, study.device, study.threads, jobs)
    plans = {pair.name: study_plan(study, pair, load_records(pair.records)) for pair in chosen}
    all_records = [r for pair in chosen for r in load_records(pair.records)]
    attempted: set[str] = set()  # keys tried in this call (a failed run is not retried until the next)

    def todo(plan: dict, step: str) -> list[Task]:
        return [t for t in plan[step] if t.identity.key not in plan['done'] and t.identity.key not in attempted]

    def remaining() -> list[str]:
        """Names of the runs not done yet (for the ETA), in the phases asked for."""
        names = []
        for pair in chosen:
            plan = plans[pair.name]
            if phase != 'final':
                names += [t.identity.name for t in todo(plan, 'select')] + plan['waiting']
            if phase != 'select':
                names += [t.identity.name for t in todo(plan, 'final')] + plan['unplanned']
        return names

    total_planned = sum((len(p['select']) + len(p['waiting'])) * (phase != 'final')
                        + (len(p['final']) + len(p['unplanned'])) * (phase != 'select') for p in plans.values())
    rest = remaining()
    progress = Progress(total_planned, total_planned - len(rest), _times_by_name(all_records), stream, jobs)
    print(f'study {study.name} ({study.path}), pairs {[p.name for p in chosen]}, phase {phase}: '
          f'{progress.line(rest)}', file=stream, flush=True)
    for pair in chosen:
        plan = plans[pair.name]
        n_select = len(todo(plan, 'select'))
        n_final = len(todo(plan, 'final'))
        print(f'  {pair.name}: {len(pair.arms)} arms, selection {len(plan["select"])} runs planned ({n_select} to go)'
              + (f' + {len(plan["waiting"])} waiting' if plan['waiting'] else '')
              + f', final {len(plan["final"])} runs planned ({n_final} to go)'
              + (f' + {len(plan["unplanned"])} waiting' if plan['unplanned'] else '')
              + (f', edge rule {pair.edge_rule}' if pair.edge_rule != 'none' else '')
              + f'; records {pair.records}', file=stream, flush=True)
        for line in _arm_lines(study, pair, plan):
            print(line, file=stream, flush=True)
    if dry_run:
        for config in dict.fromkeys(c for pair in chosen for c in pair.prepare):
            state, dst = teacher_state(config)
            print(f'  teacher {config}: ' + {'done': f'{dst} exists (reused)', 'resume': f'{dst} unfinished (resumed)',
                                              'missing': f'{dst} missing (trained first)'}[state],
                  file=stream, flush=True)
        if launcher.name != 'local' or launcher.hours_per_run is not None or any(
                p.hours_per_run is not None for p in chosen):
            from .launchers import describe_launch
            describe_launch(study, chosen, plans, launcher, phase, stream)
        return
    for pair in chosen:
        workdir = study.workdir / pair.name
        while True:  # selection (grid, extensions, inherited), re-planned after each batch; then finals
            plan = plans[pair.name] = study_plan(study, pair, load_records(pair.records))
            batch = todo(plan, 'select') if phase != 'final' else []
            if not batch and phase != 'select':
                batch = todo(plan, 'final')
            if not batch:
                break
            attempted.update(t.identity.key for t in batch)
            later = remaining()
            progress.total = progress.done + len(later) + len(batch)
            run_tasks(batch, study.device, workdir, progress, jobs, study.threads, later=later, trainer=pair.trainer)
        plans[pair.name] = plan = study_plan(study, pair, load_records(pair.records))
        unselected = {a: s for a, s in plan['selection'].items() if s['selected'] is None}
        if unselected and phase != 'select':
            why = {'waiting': 'waits for the arm it inherits from', 'diverged': 'every grid point diverged',
                   'selecting': 'selection runs missing (failed runs are retried by the next study)',
                   'extending': 'edge extension runs missing (failed runs are retried by the next study)'}
            print(f'{pair.name}: no selected setting yet, final runs wait: '
                  + '; '.join(f'{a} ({why[s["state"]]})' for a, s in unselected.items()), file=stream, flush=True)
    print(f'study {study.name}: {progress.line(remaining())}', file=stream, flush=True)
