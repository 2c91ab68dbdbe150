"""Cluster jobs: what a submitit job runs (one run = one job), its distributed set-up, and the events that
say where every run stands.

**One run, one job, one trainer.** :class:`RunJob` is the callable a job runs (pickled by submitit;
``slurm`` and ``submitit-local`` launchers, :mod:`~opdf_torchdistill.study.launchers`). Every task of
the job calls it, and every task runs the same trainer in its own process, ``opdf-train`` or
``opdf-glue`` (their ``main(ARGV)``, the arguments the local runner passes,
:mod:`~opdf_torchdistill.study.trainers`). With more than one task (``nodes`` x ``tasks_per_node``),
:func:`torchrun_env` turns submitit's job environment (SLURM's ``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NTASKS``, ``SLURM_JOB_NODELIST``, ...) into the variables ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` = the first node, ``MASTER_PORT`` from the job id), so the
trainer's :func:`~opdf_torchdistill.cli.common.init_distributed` is the one code path for both (NCCL on
CUDA, one GPU per task by ``LOCAL_RANK``; gloo on CPU). Rank 0 writes the record.

**Preemption and time limits.** submitit catches the requeue signal (``USR2``, ``signal_delay_s`` before
the time limit, or sent by a preempting scheduler) in rank 0, calls :meth:`RunJob.checkpoint` and
requeues the job (``scontrol requeue``; at most ``max_timeouts`` time-outs). Nothing is saved then: the
trainer writes ``<dst stem>.last.pt`` after every epoch (atomically), and the requeued job, finding it,
continues with ``--resume``, bit for bit on CPU (the epoch in flight is trained again). A requeued job
whose run was already recorded (preempted between the record and the end) returns that record. A
failed attempt keeps the epoch checkpoint too, so that the next attempt (the driver submits it again,
up to ``max_failures`` failures) continues from it; a finished or diverged run's files are removed.

**No run recorded twice, none lost.** The record is written by the job itself, as the run's own file
(:func:`~opdf_torchdistill.study.records.write_run_record`): a copy of an existing record is dropped,
and the study driver never submits a run that has a record or a job in flight. If the driver is gone,
the records are still written; the next ``opdf-ablate study`` or ``status`` reads them.

**Events.** Each run has a folder ``WORKDIR/PAIR/jobs/<key>/`` of small JSON files, one per event, each
written whole under a temporary name and renamed (no file is ever shared by two writers):
``submitted`` (by the driver: job id, log files), ``started`` (by the job: attempt, host, resume or not),
``preempted`` (the requeue signal), ``finished`` (the record's status) and ``failed`` (the trainer's
error and the end of its log; written by the driver when a job ended without any word, e.g. killed for
memory). ``opdf-ablate status`` reads them (:func:`run_state`); a run that has failed
``max_failures`` times is not submitted again and is reported failed with its log tail.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import socket
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .records import DONE, load_records, write_run_record
from .trainers import failure, remove_run_files, run_files, run_result, run_stem, trainer_argv, trainer_main

__all__ = ['RunJob', 'torchrun_env', 'events_dir', 'write_event', 'read_events', 'run_state', 'TAIL_LINES']

TAIL_LINES = 20  # lines of a failed run's log kept in its event and shown by status
_HOST = socket.gethostname()


# ----------------------------------------------------------------------------------------------
# Events
# ----------------------------------------------------------------------------------------------
def events_dir(workdir: str | os.PathLike, key: str) -> Path:
    """``WORKDIR/jobs/<key>``: the event files of one run (or ``teacher-<hash>`` of a teacher)."""
    return Path(workdir) / 'jobs' / key


def write_event(folder: str | os.PathLike, kind: str, **fields: Any) -> dict:
    """Add one event (a file of its own, written whole, then renamed into place)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    event = {'kind': kind, 'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
             'host': _HOST, 'pid': os.getpid(), **fields}
    name = f'{time.time_ns():020d}-{kind}-{uuid.uuid4().hex[:8]}.json'
    tmp = folder / f'.{name}.tmp'
    tmp.write_text(json.dumps(event, sort_keys=True, default=str) + '\n')
    os.replace(tmp, folder / name)
    return event


def read_events(folder: str | os.PathLike) -> list[dict]:
    """The events of a run, oldest first (an unreadable file is skipped: events are advisory)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(p for p in folder.iterdir() if p.name.endswith('.json') and not p.name.startswith('.')):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def run_state(events: list[dict], recorded: dict | None, max_failures: int) -> dict:
    """Where a run stands from its events and its record: ``{'state', 'job_ids', 'attempts', 'failures',
    'preempted', 'last_failure', 'live_job'}``. ``state`` is ``done`` (a finished record), ``failed``
    (``max_failures`` failures), ``submitted`` (a job in flight, as far as the events tell: the
    scheduler decides queued or running), ``retry`` (failed fewer times, no job in flight) or ``new``."""
    job_ids = list(dict.fromkeys(e['job_id'] for e in events if e.get('kind') == 'submitted' and e.get('job_id')))
    failures = [e for e in events if e.get('kind') == 'failed']
    out = {'job_ids': job_ids, 'attempts': sum(1 for e in events if e.get('kind') == 'started'),
           'failures': len(failures), 'preempted': sum(1 for e in events if e.get('kind') == 'preempted'),
           'last_failure': failures[-1] if failures else None, 'live_job': None}
    if recorded is not None and recorded.get('status') in DONE:
        return {**out, 'state': 'done'}
    if len(failures) >= max_failures:
        return {**out, 'state': 'failed'}
    last_submit = max((i for i, e in enumerate(events) if e.get('kind') == 'submitted'), default=None)
    if last_submit is not None:
        ended = any(e.get('kind') in ('failed', 'finished') for e in events[last_submit + 1:])
        if not ended:
            return {**out, 'state': 'submitted', 'live_job': events[last_submit]}
    return {**out, 'state': 'retry' if failures else 'new'}


# ----------------------------------------------------------------------------------------------
# The distributed environment of a job
# ----------------------------------------------------------------------------------------------
def torchrun_env(job_env: Any) -> dict[str, str]:
    """``torchrun``'s variables from submitit's job environment (``submitit.JobEnvironment()``): ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``, ``MASTER_ADDR`` (the job's
    first node; 127.0.0.1 for submitit's local executor) and ``MASTER_PORT`` (20000-39999, from the job id: the same in every task, and again
    after a requeue). Empty for a job of one task (the trainer then runs without a process group). A task
    that sees a single GPU (``CUDA_VISIBLE_DEVICES`` of one device: SLURM bound it) gets ``LOCAL_RANK`` 0,
    the index of that GPU in the task (the trainer picks ``cuda:LOCAL_RANK``)."""
    tasks = int(job_env.num_tasks)
    if tasks <= 1:
        return {}
    nodes = max(1, int(job_env.num_nodes))
    local_rank = str(job_env.local_rank)
    visible = [d for d in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
    if len(visible) == 1:  # SLURM bound this task to one GPU (--gpus-per-task, gpu binding): it is cuda:0 here
        local_rank = '0'
    master = '127.0.0.1' if getattr(job_env, 'cluster', None) == 'local' else str(list(job_env.hostnames)[0])
    return {'RANK': str(job_env.global_rank), 'WORLD_SIZE': str(tasks), 'LOCAL_RANK': local_rank,
            'LOCAL_WORLD_SIZE': str(tasks // nodes), 'NODE_RANK': str(job_env.node),
            'MASTER_ADDR': master,
            'MASTER_PORT': str(20000 + zlib.crc32(str(job_env.job_id).encode()) % 20000)}


class _Tee(io.TextIOBase):
    """Writes go to ``stream`` and are kept, so the end of what a trainer said can be recorded."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text):
        self.kept.write(text)
        if self.kept.tell() > 1 << 20:  # keep the last ~256 kB
            rest = self.kept.getvalue()[-(1 << 18):]
            self.kept = io.StringIO()
            self.kept.write(rest)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return self.kept.getvalue().splitlines()[-lines:]


def _plain_path(value: Any) -> str | None:
    """A path in a config snapshot (tags as ``{'!join': [...]}``), or None if it is not a plain one."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (tag, parts), = value.items()
        if tag in ('!join', '!pathjoin') and isinstance(parts, list):
            parts = [_plain_path(p) for p in parts]
            if None in parts:
                return None
            return ''.join(parts) if tag == '!join' else os.path.join(*parts)
        if tag in ('!expanduser', '!abspath'):
            inner = _plain_path(parts)
            return None if inner is None else os.path.expanduser(inner) if tag == '!expanduser' \
                else os.path.abspath(inner)
    return None


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
@dataclass
class RunJob:
    """One run as a submitit job (see the module docstring).

    Three kinds: a study run (``record`` holds its identity and the study's fields, ``records`` the
    record file; the arguments are the local runner's, the files hash-named in ``workdir``); a teacher
    (``teacher``: its config, trained into its own ``dst_ckpt``, resumed when unfinished, never
    forced, no record); a single run of ``opdf-train --launcher`` (``argv``: the trainer's arguments
    as given; after a requeue ``--resume`` replaces ``--force``)."""
    trainer: str
    config: str | None
    seed: int | None
    overrides: dict
    device: str
    workdir: str
    events: str
    threads: int | None = None
    record: dict | None = None
    records: str | None = None
    teacher: bool = False
    argv: list | None = None
    elapsed: float = 0.0  # seconds of earlier attempts (carried through requeues)
    attempt: int = 0
    _start: float = field(default=0.0, repr=False, compare=False)

    # -- submitit's interface -------------------------------------------------------------------
    def __call__(self) -> dict | None:
        import submitit
        job_env = submitit.JobEnvironment()
        env = torchrun_env(job_env)
        if 'MASTER_PORT' in os.environ and env:
            env.pop('MASTER_PORT')  # set by the user (the launcher's setup lines)
        os.environ.update(env)
        rank = int(env.get('RANK', 0))
        self._start = time.time()
        if self.record is not None:
            done = self._recorded()
            if done is not None:
                if rank == 0:
                    write_event(self.events, 'finished', job_id=job_env.job_id, status=done['status'], recorded=True)
                return done
        argv, files, resume = self._arguments()
        if argv is None:  # a teacher that is finished already
            return None
        if rank == 0:
            self._clear_own_stale_lock(files)
            write_event(self.events, 'started', job_id=job_env.job_id, attempt=self.attempt, resume=resume,
                        tasks=int(job_env.num_tasks), log=str(job_env.paths.stderr))
        code, tail = self._train(argv)
        if rank != 0:
            return None
        return self._finish(code, tail, files, job_env)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """The requeue signal (rank 0): the trainer's last epoch checkpoint is on disk already; the job
        is requeued with this same run, which continues from it (see :meth:`_arguments`)."""
        import submitit
        try:
            job_id = submitit.JobEnvironment().job_id
        except Exception:  # noqa: BLE001 - only informative
            job_id = None
        write_event(self.events, 'preempted', job_id=job_id, attempt=self.attempt)
        spent = time.time() - self._start if self._start else 0.0
        return submitit.helpers.DelayedSubmission(replace(self, elapsed=self.elapsed + spent, attempt=self.attempt + 1))

    # -- the pieces -----------------------------------------------------------------------------
    def _recorded(self) -> dict | None:
        """The run's finished record, if it has one (a requeued job preempted after recording)."""
        key = self.record['key']
        for r in load_records(self.records):
            if r.get('key') == key and r.get('status') in DONE:
                return r
        return None

    def _arguments(self) -> tuple[list[str] | None, dict, bool]:
        """``(argv, files, resume)`` of this attempt (``argv`` None: nothing to train)."""
        if self.argv is not None:
            argv = [str(a) for a in self.argv]
            last = self._single_run_last(argv)
            resume = self.attempt > 0 and last is not None and last.exists()
            if resume:
                argv = [a for a in argv if a != '--force'] + ([] if '--resume' in argv else ['--resume'])
            return argv, {}, resume
        if self.teacher:
            from .runner import teacher_state  # the teacher's state, as prepare decides
            state, dst = teacher_state(self.config)
            if state == 'done':
                return None, {}, False
            argv = ['--config', self.config, '--device', self.device, '--seed', '0']
            argv += ['--threads', str(self.threads)] if self.threads else []
            argv += ['--resume'] if state == 'resume' else []
            return argv, {'dst': Path(dst)}, state == 'resume'
        stem = run_stem(self.config, self.seed, self.overrides, self.device)
        files = run_files(Path(self.workdir), stem, self.trainer)
        resume = files['last'].exists()
        return trainer_argv(self.trainer, self.config, self.seed, self.overrides, self.device, files, self.threads,
                            resume=resume), files, resume

    def _single_run_last(self, argv: list[str]) -> Path | None:
        """The epoch checkpoint of a single run's ``dst_ckpt`` (``--dst_ckpt`` or the config's)."""
        from ..runfiles import last_ckpt_path
        if '--dst_ckpt' in argv and argv.index('--dst_ckpt') + 1 < len(argv):
            return last_ckpt_path(argv[argv.index('--dst_ckpt') + 1])
        from ..cli.common import config_snapshot, student_config_of
        from ..cli.train import get_parser
        args, _ = get_parser().parse_known_args(argv)
        try:
            dst = _plain_path(student_config_of(config_snapshot(args.config, args.overrides)).get('dst_ckpt'))
        except Exception:  # noqa: BLE001 - the trainer reports a bad config itself
            return None
        return None if dst is None else last_ckpt_path(dst)

    def _clear_own_stale_lock(self, files: Mapping[str, Path]) -> None:
        """Remove ``<dst>.lock`` when an earlier attempt of this very run holds it (a job killed without
        its ``finally``, e.g. on a node that failed: another host, so the trainer cannot tell it is
        stale). This run is trained by one job at a time, so that attempt is over."""
        dst = files.get('dst')
        if dst is None:
            return
        lock = Path(str(dst) + '.lock')
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            return
        earlier = {(e.get('host'), e.get('pid')) for e in read_events(self.events) if e.get('kind') == 'started'}
        if isinstance(holder, dict) and (holder.get('host'), holder.get('pid')) in earlier \
                and (holder.get('host'), holder.get('pid')) != (_HOST, os.getpid()):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def _train(self, argv: list[str]) -> tuple[int, list[str]]:
        """The trainer's ``main(argv)`` in this process, its stderr kept as well as written to the job's log."""
        from torchdistill.misc.log import set_basic_log_config
        main = trainer_main(self.trainer)
        set_basic_log_config()  # before the trainer's own: init_distributed's line reaches the job's log
        tee = _Tee(sys.stderr)
        with contextlib.redirect_stderr(tee):
            code = main(argv)
        sys.stderr.flush()
        return code, tee.tail()

    def _finish(self, code: int, tail: list[str], files: Mapping[str, Path], job_env: Any) -> dict | None:
        """Rank 0 after the trainer returned: the record (a study run), the events, the run's files removed."""
        wall = self.elapsed + time.time() - self._start
        if self.record is None:  # a teacher or a single run: the trainer's own outputs are the result
            if code != 0:
                write_event(self.events, 'failed', job_id=job_env.job_id, attempt=self.attempt,
                            error=failure(code, '\n'.join(tail))['error'], tail=tail)
                raise RuntimeError(f'the trainer exited with status {code}: ' + (tail[-1] if tail else ''))
            write_event(self.events, 'finished', job_id=job_env.job_id, status='ok', wall_seconds=round(wall, 3))
            return {'status': 'ok', 'wall_seconds': round(wall, 3)}
        try:
            if code != 0:
                result = failure(code, '\n'.join(tail))
            else:
                result = run_result(self.trainer, json.loads(files['metrics'].read_text()))
        except Exception as exc:  # noqa: BLE001 - recorded as a failed run, not a crash
            result = {'status': 'failed', 'metrics': {}, 'error': f'{type(exc).__name__}: {exc}'}
        record = {**self.record, 'wall_seconds': round(wall, 3),
                  'finished': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'), **result}
        write_run_record(record, self.records)
        if record['status'] == 'failed':  # its epoch checkpoint stays: the next attempt continues from it
            write_event(self.events, 'failed', job_id=job_env.job_id, attempt=self.attempt, error=record['error'],
                        tail=tail)
        else:
            write_event(self.events, 'finished', job_id=job_env.job_id, status=record['status'],
                        wall_seconds=record['wall_seconds'])
            remove_run_files(files)
        return record
