"""``opdf-ablate`` (``tools/ablate.py``): the command line of :mod:`opdf_torchdistill.study`.

Six commands:

``run``
    trains every (config, seed, grid point) that ``--out`` does not hold yet and appends one record
    per finished run (so an interrupted ablation resumes where it stopped).
``study SPEC``
    the two-phase protocol of a study spec (``configs/fashion/study.yaml``): selection on validation
    accuracy with the selection seeds (with the spec's edge rule and inherited settings, in rounds),
    then the selected setting with the final seeds. Resumable across sessions; ``--jobs 2`` trains two
    runs at a time; ``--dry_run`` prints the plan per arm, including what waits, and with a launcher
    the GPU-hour estimate and the sbatch parameters. ``--launcher slurm`` (or ``submitit-local``, or
    the spec's ``launcher:`` block; ``--launcher_set KEY=VALUE`` overrides a setting) trains every run
    as a submitit job; ``--no_wait`` submits what can run now and returns.
``status SPEC``
    every planned run as done, queued, running, failed or not submitted, with job ids and attempts,
    and the end of the log of a failed run.
``reproduce SPEC``
    trains recorded runs again (``--key KEY...`` or ``--each``: the first record of every arm) the way the
    study trained them, and compares every metric but timing with the record, exactly; exit status 1
    when one differs. Records are never written.
``compact FILE...``
    folds the per-run record files (``FILE.d/``, written by cluster jobs) into ``FILE``.
``report``
    prints the tables: with ``--study SPEC`` the selection, tuning, final and contrasts tables per
    pair (Markdown, reproducible byte for byte from the records; ``--tables`` picks some); with ``--out FILES`` the per-config
    summary (``--tune``, ``--baseline``, plots).

What a record key hashes, the spec format, the statistics and the tables are documented in the
package's modules (``opdf_torchdistill/study/``). Errors a user can fix (a wrong path, spec key, pair
name or record line) are one line ``error: ...`` on stderr and exit status 1.

Examples::

    python tools/ablate.py study configs/fashion/study.yaml --jobs 2
    python tools/ablate.py study configs/ilsvrc2012/study.yaml --launcher slurm --dry_run
    python tools/ablate.py study configs/ilsvrc2012/study.yaml --launcher slurm --launcher_set partition=gpu
    python tools/ablate.py status configs/ilsvrc2012/study.yaml
    python tools/ablate.py report --study configs/fashion/study.yaml
    python tools/ablate.py reproduce configs/fashion/confirm/study.yaml --each --pairs cnn
    python tools/ablate.py run --configs configs/digits/kd.yaml configs/digits/kd_opdf.yaml \\
        --seeds 0 1 2 3 4 --grid train.optimizer.kwargs.lr=0.05,0.1,0.2 --out runs/ablation/digits.jsonl
    python tools/ablate.py report --out runs/ablation/digits.jsonl --tune train.optimizer.kwargs.lr \\
        --baseline kd --plots runs/ablation
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
from typing import Sequence

from .. import study
from .common import parse_value

__all__ = ['main', 'get_parser']


def _parse_grid(items: Sequence[str]) -> list[dict]:
    axes = []
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--grid {item!r} must look like dotted.key=v1,v2,...')
        key, values = item.split('=', 1)
        axes.append([(key, parse_value(v)) for v in values.split(',')])  # 1e-3 is a float, as in --set
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _parse_sets(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--set {item!r} must look like dotted.key=value')
        key, value = item.split('=', 1)
        out[key] = parse_value(value)
    return out


def _common_report_args(q: argparse.ArgumentParser) -> None:
    q.add_argument('--tune', nargs='*', default=[],
                   help='override keys to select per config on validation accuracy (e.g. the lr)')
    q.add_argument('--baseline', help='config name (file stem) to compare every group with')
    q.add_argument('--only', nargs='*', help='report only these config names (in this order)')
    q.add_argument('--where', action='append', default=[], metavar='KEY=VALUE',
                   help='report only records whose override KEY is VALUE (or that do not set KEY)')
    q.add_argument('--plots', help='directory for PNG plots (with --study: SPEC_NAME.png there)')
    q.add_argument('--lr_key', default='train.optimizer.kwargs.lr', help='override key of the learning rate')
    q.add_argument('--title', default='', help='prefix of plot titles')
    q.add_argument('--summary_json', '--json', dest='summary_json', help='write the summary rows here')


def _launcher_args(q: argparse.ArgumentParser) -> None:
    q.add_argument('--launcher', choices=['local', 'slurm', 'submitit-local'],
                   help='where runs train (default: the spec\'s launcher block, else local)')
    q.add_argument('--launcher_set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a launcher setting, e.g. partition=gpu, nodes=2, gpus_per_node=8, timeout_min=1440 '
                        '(repeat)')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Run ablations and studies (configs x seeds x grids) and summarise them')
    sub = p.add_subparsers(dest='command', required=True)
    q = sub.add_parser('run', help='configs x seeds x grid, resumable')
    q.add_argument('--out', required=True, help='JSON-lines record file (resumable)')
    _common_report_args(q)
    q.add_argument('--configs', nargs='+', required=True)
    q.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    q.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2',
                   help='a grid axis over an override (repeat for a cross product)')
    q.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    q.add_argument('--prepare', nargs='*', default=[],
                   help='configs to train once first if their dst_ckpt is missing (e.g. the teacher)')
    q.add_argument('--device', default='cpu')
    q.add_argument('--threads', type=int, default=None, help='torch threads per run')
    q.add_argument('--jobs', type=int, default=1, help='runs at a time (each in a subprocess when > 1)')
    q.add_argument('--isolate', action='store_true', help='one subprocess per run')
    q.add_argument('--workdir', help='checkpoints of runs in flight (default: OUT with suffix .runs)')

    q = sub.add_parser('study', help='selection on validation, then seeds at the selected setting (a study spec)')
    q.add_argument('spec', help='study spec (YAML), e.g. configs/fashion/study.yaml')
    q.add_argument('--pairs', nargs='*', help='only these pairs of the spec (default: all)')
    q.add_argument('--phase', choices=['all', 'select', 'final'], default='all')
    q.add_argument('--jobs', type=int, default=1, help='runs at a time (each in a subprocess when > 1)')
    q.add_argument('--dry_run', action='store_true',
                   help='print the plan, progress and ETA (with a launcher: GPU-hours, sbatch parameters); train '
                        'nothing')
    _launcher_args(q)
    q.add_argument('--no_wait', action='store_true',
                   help='slurm, submitit-local: submit the runs that can run now and return (run again to continue)')

    q = sub.add_parser('status', help='every run of a study: done, queued, running or failed, with job ids')
    q.add_argument('spec', help='study spec (YAML)')
    q.add_argument('--pairs', nargs='*', help='only these pairs of the spec (default: all)')
    _launcher_args(q)
    q.add_argument('--tail', type=int, default=20, help='lines of a failed run\'s log to show')

    q = sub.add_parser('reproduce', help='train recorded runs of a study again and compare every metric with the '
                                         'record, exactly (records are never written)')
    q.add_argument('spec', help='study spec (YAML)')
    q.add_argument('--pairs', nargs='*', help='only these pairs of the spec (default: all)')
    q.add_argument('--key', dest='keys', nargs='+', default=[], metavar='KEY',
                   help='record keys (or unique prefixes) of the runs to train again')
    q.add_argument('--each', action='store_true', help='the earliest finished record of every arm')
    q.add_argument('--jobs', type=int, default=1, help='runs at a time (each in a subprocess)')

    q = sub.add_parser('compact', help='fold per-run record files (FILE.d/, from cluster jobs) into FILE')
    q.add_argument('records', nargs='+', help='record files (JSON lines)')

    q = sub.add_parser('report', help='tables from record files (--out) or of a study (--study)')
    q.add_argument('--out', nargs='+', help='one or more JSON-lines record files')
    q.add_argument('--study', help='a study spec: print its selection and final tables (Markdown)')
    q.add_argument('--pairs', nargs='*', help='with --study: only these pairs')
    q.add_argument('--tables', nargs='+', choices=study.SECTIONS, default=list(study.SECTIONS),
                   help='with --study: only these tables (default: all), e.g. --tables contrasts for a README')
    _common_report_args(q)
    return p


@contextlib.contextmanager
def _quiet_training_logs():
    quiet = [logging.getLogger(name) for name in ('torchdistill', 'opdf_torchdistill')]
    levels = [log.level for log in quiet]
    for log in quiet:  # one progress line per run instead of every run's training log
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is written for the user: a wrong path, spec key, pair name, override, or a
    record line or checkpoint that cannot be read (the message names the file and line or key)."""
    from ..io import CheckpointError
    return (study.StudyError, ValueError, KeyError, OSError, CheckpointError)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (0: done, 1: a clear error was printed)."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return _main(args)
    except _user_errors() as exc:  # the message says what is wrong and where: one line, no traceback
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f'error: {message}', file=sys.stderr)
        return 1


def _report_args(args) -> dict:
    return {'tune': args.tune, 'baseline': args.baseline, 'only': args.only, 'where': _parse_sets(args.where),
            'summary_json': args.summary_json, 'plots': args.plots, 'title': args.title, 'lr_key': args.lr_key}


def _main(args) -> int:
    if args.command == 'study':
        from ..study.launchers import launcher_for
        spec = study.load_study(args.spec)
        launcher = launcher_for(spec, args.launcher, args.launcher_set)
        if args.jobs < 1:
            raise SystemExit('--jobs must be >= 1')
        if spec.threads and args.jobs == 1 and launcher.name == 'local':
            import torch
            torch.set_num_threads(spec.threads)
        with _quiet_training_logs():
            study.run_study(spec, args.pairs, args.phase, args.jobs, args.dry_run, launcher=launcher,
                            wait=not args.no_wait)
        if not args.dry_run and not (args.no_wait and launcher.name != 'local'):
            study.report_study(args.spec, args.pairs)
        return 0
    if args.command == 'status':
        from ..study.launchers import launcher_for, study_status
        spec = study.load_study(args.spec)
        study_status(spec, args.pairs, launcher_for(spec, args.launcher, args.launcher_set), tail=args.tail)
        return 0
    if args.command == 'reproduce':
        if args.jobs < 1:
            raise SystemExit('--jobs must be >= 1')
        from ..study.reproduce import reproduce_study
        outcomes = reproduce_study(study.load_study(args.spec), args.pairs, args.keys, args.each, args.jobs)
        return 0 if all(o.status == 'same' for o in outcomes) else 1
    if args.command == 'compact':
        for path in args.records:
            n = study.compact_records(path)
            print(f'{path}: {n} per-run record file(s) folded in from {study.run_dir(path)}')
        return 0
    if args.command == 'run':
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        with _quiet_training_logs():
            study.prepare_teachers(args.prepare, args.device, args.threads, args.jobs)
            records = study.run_ablation(args.configs, args.seeds, _parse_grid(args.grid), _parse_sets(args.sets),
                                         args.out, args.device, args.isolate, args.jobs, args.threads, args.workdir)
        study.report_records(records, **_report_args(args))
        return 0
    if args.study:
        if args.out:
            raise SystemExit('report: give --study SPEC or --out FILES, not both')
        ignored = [flag for flag, value in (('--tune', args.tune), ('--baseline', args.baseline), ('--only', args.only),
                                            ('--where', args.where), ('--title', args.title),
                                            ('--lr_key', args.lr_key != 'train.optimizer.kwargs.lr')) if value]
        if ignored:
            raise SystemExit(f'report --study: {", ".join(ignored)} appl{"y" if len(ignored) > 1 else "ies"} to '
                             f'--out reports only (a study spec sets its own baseline and grids); with --study give '
                             f'--pairs, --summary_json, --plots')
        study.report_study(args.study, args.pairs, args.summary_json, args.plots, args.tables)
        return 0
    if not args.out:
        raise SystemExit('report: give --study SPEC or --out FILES')
    if args.pairs:
        raise SystemExit('report: --pairs applies to --study reports only')
    if list(args.tables) != list(study.SECTIONS):
        raise SystemExit('report: --tables applies to --study reports only')
    study.report_records(study.load_records(*args.out), **_report_args(args))
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
