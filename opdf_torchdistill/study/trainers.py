"""The programs a run is, and how a run's arguments, files and result are made from and for them.

A study's ``trainer`` (:mod:`~opdf_torchdistill.study.spec`) names the program every run of a pair is:

``train``
    ``opdf-train`` (``python -m opdf_torchdistill.cli.train``): image classification; the best student
    goes to ``--dst_ckpt WORKDIR/STEM.pt`` and the epoch checkpoint to ``WORKDIR/STEM.last.pt``.
``glue``
    ``opdf-glue`` (``python -m opdf_torchdistill.cli.glue``): GLUE; the student folder is
    ``WORKDIR/STEM`` (``--set models.student_model.dst_ckpt=...``), its epoch checkpoint
    ``WORKDIR/STEM.last.pt``. Its record holds the task's metric, the mean of GLUE's metrics for the task
    (accuracy; accuracy and F1 for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman for
    STS-B) in percent, under ``best_val_acc1`` (the best validation epoch) and ``test_acc1`` (the test
    loader, with the best student), so that selection, tables and statistics are the same code.

``STEM`` is a hash of the run (config, seed, overrides, device), so that an attempt that follows a
killed, preempted or failed one finds the files it left: the local runner starts afresh over them
(``--force``); a cluster job continues from ``STEM.last.pt`` (``--resume``).

Nothing here imports the command-line layer: the trainers are started as programs (their ``main``).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping

from .records import canonical

__all__ = ['TRAINER_MODULES', 'DIVERGED', 'run_stem', 'run_files', 'trainer_argv', 'run_result', 'failure',
           'remove_run_files', 'trainer_main']

TRAINER_MODULES = {'train': 'opdf_torchdistill.cli.train', 'glue': 'opdf_torchdistill.cli.glue'}
DIVERGED = ('loss is nan', 'loss is inf', 'FloatingPointError', 'DivergedError', 'non-finite', 'training diverged')


def run_stem(config: str, seed: int, overrides: Mapping[str, Any], device: str) -> str:
    """The hash that names a run's files in the workdir (the same for every attempt of the run)."""
    return hashlib.sha1(canonical([config, seed, overrides, device]).encode()).hexdigest()[:16]


def run_files(workdir: Path, stem: str, trainer: str = 'train') -> dict[str, Path]:
    """``{'dst': best checkpoint (file or GLUE student folder), 'last': epoch checkpoint, 'metrics': ...}``."""
    workdir = Path(workdir)
    dst = workdir / (f'{stem}.pt' if trainer == 'train' else stem)
    last = workdir / f'{stem}.last.pt'
    return {'dst': dst, 'last': last, 'metrics': workdir / f'{stem}.metrics.json'}


def trainer_argv(trainer: str, config: str, seed: int, overrides: Mapping[str, Any], device: str,
                 files: Mapping[str, Path], threads: int | None = None, resume: bool = False) -> list[str]:
    """The trainer's arguments for one run: a fresh start over any earlier attempt's files (``--force``),
    or, with ``resume``, a continuation from its epoch checkpoint (``--resume``)."""
    start = ['--resume'] if resume else ['--force']
    if trainer == 'train':
        # -student_only: the teacher's test accuracy is not recorded
        argv = ['--config', config, '--device', device, '--seed', str(seed), '--metrics_json', str(files['metrics']),
                '--dst_ckpt', str(files['dst']), '-student_only'] + start
    elif trainer == 'glue':
        argv = ['--config', config, '--device', device, '--seed', str(seed), '--metrics_json', str(files['metrics']),
                '-student_only'] + start + ['--set', f'models.student_model.dst_ckpt={json.dumps(str(files["dst"]))}']
    else:
        raise ValueError(f'unknown trainer {trainer!r}; valid: {sorted(TRAINER_MODULES)}')
    if threads:
        argv += ['--threads', str(threads)]
    for k, v in overrides.items():
        argv += ['--set', f'{k}={json.dumps(v)}']
    return argv


def trainer_main(trainer: str):
    """The trainer program's ``main(argv) -> exit status`` (imported here, when a run starts)."""
    import importlib
    return importlib.import_module(TRAINER_MODULES[trainer]).main


def failure(code: int, err: str) -> dict:
    """Record fields of a trainer that exited with ``code``: its last stderr line is its one-line error."""
    line = (err.strip().splitlines() or ['failed'])[-1]
    line = line[len('error: '):] if line.startswith('error: ') else line
    status = 'diverged' if any(s in line for s in DIVERGED) else 'failed'
    return {'status': status, 'metrics': {}, 'error': f'exit status {code}: {line}'}


def _glue_score(values: Any) -> float | None:
    """100 x the mean of a GLUE metrics mapping (``{'accuracy': .9, 'f1': .8}``), None without metrics."""
    if not isinstance(values, Mapping):
        return None
    numbers = [v for k, v in values.items() if k not in ('epoch', 'train_loss', 'seconds', 'loss', 'samples')
               and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return 100.0 * sum(numbers) / len(numbers) if numbers else None


def run_result(trainer: str, metrics: Mapping[str, Any]) -> dict:
    """Record fields (``status``, ``error``, ``metrics``) of a finished run from its ``--metrics_json``."""
    if trainer == 'glue':
        history = metrics.get('validation') or []
        best = max((_glue_score(h) for h in history if _glue_score(h) is not None), default=None)
        out = {'test_acc1': _glue_score(metrics.get('student')), 'test_acc5': None, 'test_loss': None,
               'best_val_acc1': best, 'task': metrics.get('task')}
    else:
        test = metrics.get('test', {})
        out = {'test_acc1': test.get('acc1'), 'test_acc5': test.get('acc5'), 'test_loss': test.get('loss'),
               'best_val_acc1': metrics.get('best_val_acc1')}
    out.update({'train_params': metrics.get('train_params'), 'inference_params': metrics.get('inference_params'),
                'ratio': metrics['train_params'] / metrics['inference_params'] if metrics.get('inference_params')
                else None,
                'train_seconds': metrics.get('train_seconds')})
    if trainer == 'glue' and out.get('task') is None:
        out.pop('task')
    for extra in ('alignment', 'grad_norms'):  # coverage and first-step gradient norms, when the runner logs them
        if metrics.get(extra) is not None:
            out[extra] = metrics[extra]
    bad = [f'{k} {v}' for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # a record file refuses non-finite metrics: such a run is diverged, with no metrics
        return {'status': 'diverged', 'metrics': {}, 'error': f'non-finite metrics: {", ".join(bad)}'}
    return {'status': 'ok', 'error': None, 'metrics': out}


def remove_run_files(files: Mapping[str, Path]) -> None:
    """Delete a run's files in the workdir (when it ended: finished, diverged or failed)."""
    for path in files.values():
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
