"""Launchers: where the runs of a study (or one ``opdf-train`` run) train.

``local``
    this machine: ``--jobs N`` subprocesses, records appended to the record file
    (:mod:`~opdf_torchdistill.study.runner`; the default, unchanged).
``slurm``
    a SLURM cluster, through submitit's ``SlurmExecutor``: one job per run, the runs of a round
    submitted as one job array (``--array=0-N%array_parallelism``), each job ``nodes`` x
    ``tasks_per_node`` tasks running the same trainer (:mod:`~opdf_torchdistill.study.jobs`).
``submitit-local``
    the same jobs as processes of this machine (submitit's ``LocalExecutor``): a workstation, and the
    tests. At most ``array_parallelism`` (default: the number of CPUs) at a time.

The settings (:class:`~opdf_torchdistill.study.spec.Launcher`) come from the spec's ``launcher:``
block, ``--launcher NAME`` and ``--launcher_set KEY=VALUE``. :func:`slurm_parameters` maps them onto
sbatch's: ``partition``, ``account``, ``qos``, ``nodes``, ``gpus_per_node``, ``ntasks_per_node``
(``tasks_per_node``), ``cpus_per_task``, ``mem`` (``mem_gb``), ``time`` (``timeout_min``),
``constraint``, ``signal=USR2@signal_delay_s`` (the requeue signal), ``--requeue``, and ``sbatch``'s
extra options; :func:`render_sbatch` is the batch script exactly as submitit writes it.

**The driver** (:func:`run_study_jobs`, ``opdf-ablate study SPEC --launcher slurm``) plans rounds as the
local runner does (teachers first, then per pair the selection runs, re-planned as edge extensions and
inherited settings become known, then the final runs), from the records only. Each round submits the
runs that have neither a record nor a job in flight; a run whose job failed is submitted again until it
has failed ``max_failures`` times, and is then reported failed with the end of its log. With ``wait``
(the default) it polls every ``poll_s`` seconds until the round is done, prints a progress line per
finished run, and goes on; with ``--no_wait`` it submits what can be submitted now and returns (run
the same command again later: nothing is submitted twice). ``opdf-ablate status SPEC``
(:func:`study_status`) lists every run as done, queued, running or failed, with job ids and attempts.
``--dry_run`` (:func:`describe_launch`) prints the GPU-hour estimate (runs x ``hours_per_run`` x
GPUs per run) and the sbatch parameters.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..io import pid_alive
from ._format import short_overrides
from .jobs import TAIL_LINES, RunJob, events_dir, read_events, run_state, write_event
from .records import DONE, load_records
from .spec import LAUNCHERS, Launcher, Pair, Study, StudyError, parse_launcher, pick_pairs

__all__ = ['LAUNCHERS', 'launcher_for', 'parse_sets', 'slurm_parameters', 'render_sbatch', 'make_executor',
           'scheduler_states', 'run_study_jobs', 'study_status', 'describe_launch', 'estimate', 'submit_single']

_ALIVE = {'PENDING': 'queued', 'REQUEUED': 'queued', 'REQUEUE_HOLD': 'queued', 'REQUEUE_FED': 'queued',
          'CONFIGURING': 'queued', 'SUSPENDED': 'queued', 'RESV_DEL_HOLD': 'queued', 'RUNNING': 'running',
          'COMPLETING': 'running', 'RESIZING': 'running', 'SIGNALING': 'running', 'STAGE_OUT': 'running'}


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
def parse_sets(items: Iterable[str], where: str = '--launcher_set') -> dict:
    """``['nodes=2', 'partition=gpu', 'sbatch=--exclusive']`` -> a ``launcher:`` mapping (values as YAML)."""
    from ..cli.common import parse_value  # a value parser, not the command line
    out: dict[str, Any] = {}
    for item in items or ():
        if '=' not in item:
            raise StudyError(f'{where} {item!r} must look like KEY=VALUE (e.g. partition=gpu, nodes=2)')
        key, value = item.split('=', 1)
        parsed = parse_value(value) if key not in ('partition', 'account', 'qos', 'constraint', 'folder', 'python') \
            else value
        if key in ('sbatch', 'setup') and not isinstance(parsed, list):
            out.setdefault(key, []).append(value)
            continue
        out[key] = parsed
    return out


def launcher_for(study: Study | None, name: str | None = None, sets: Iterable[str] = ()) -> Launcher:
    """The study's launcher settings, with ``--launcher NAME`` and ``--launcher_set`` applied on top."""
    base = study.launcher if study is not None else Launcher()
    block = parse_sets(sets)
    if name is not None:
        block['name'] = name
    return parse_launcher(block, '--launcher_set' if sets else '--launcher', base)


def _extra_sbatch(lines: Sequence[str]) -> dict[str, Any]:
    """``['--exclusive', '--mail-type=END', '#SBATCH --comment x']`` -> submitit's additional_parameters."""
    out: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        if text.startswith('#SBATCH'):
            text = text[len('#SBATCH'):].strip()
        if not text.startswith('--'):
            raise StudyError(f'launcher.sbatch: {line!r} is not a long sbatch option (--name=value or --flag)')
        text = text[2:]
        if '=' in text:
            key, value = text.split('=', 1)
        elif ' ' in text:
            key, value = text.split(None, 1)
        else:
            key, value = text, True
        out[key.strip()] = value.strip() if isinstance(value, str) else value
    return out


def _submitit():
    """submitit, or a one-line error saying how to install it (the ``study`` extra)."""
    try:
        import submitit
    except ImportError:
        raise StudyError('the slurm and submitit-local launchers need submitit: pip install '
                         '"opdf-torchdistill[study]" (or pip install submitit)') from None
    return submitit


def _hours(x: float) -> str:
    return f'{x:,.0f}' if x >= 100 else f'{x:.3g}'


def _mem(mem_gb: float) -> str:
    return f'{int(mem_gb)}GB' if float(mem_gb) == int(mem_gb) else f'{int(mem_gb * 1024)}MB'


def slurm_parameters(launcher: Launcher, job_name: str) -> dict[str, Any]:
    """The launcher's settings as ``submitit.SlurmExecutor.update_parameters`` arguments."""
    params: dict[str, Any] = {'job_name': job_name, 'time': int(launcher.timeout_min), 'nodes': launcher.nodes,
                              'ntasks_per_node': launcher.tasks_per_node,
                              'signal_delay_s': int(launcher.signal_delay_s)}
    if launcher.gpus_per_node:
        params['gpus_per_node'] = launcher.gpus_per_node
    for key in ('partition', 'account', 'qos', 'constraint', 'cpus_per_task'):
        if getattr(launcher, key) is not None:
            params[key] = getattr(launcher, key)
    if launcher.mem_gb is not None:
        params['mem'] = _mem(launcher.mem_gb)
    if launcher.array_parallelism is not None:
        params['array_parallelism'] = launcher.array_parallelism
    if launcher.setup:
        params['setup'] = list(launcher.setup)
    # --requeue: a job the scheduler preempts is put back in the queue (and so is ours, by scontrol requeue)
    params['additional_parameters'] = {'requeue': True, **_extra_sbatch(launcher.sbatch)}
    return params


def _python(launcher: Launcher) -> str:
    return launcher.python or shlex.quote(sys.executable)


def render_sbatch(launcher: Launcher, folder: str | os.PathLike, job_name: str = 'opdf',
                  array: int | None = None) -> str:
    """The batch script submitit writes for one job (``array``: a job array of that many runs)."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string
    command = ' '.join([_python(launcher), '-u -m submitit.core._submit', shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder), map_count=array,
                               **slurm_parameters(launcher, job_name))


def make_executor(launcher: Launcher, folder: str | os.PathLike, job_name: str = 'opdf'):
    """A submitit executor for the ``slurm`` or ``submitit-local`` launcher."""
    submitit = _submitit()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if launcher.name == 'slurm':
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher.max_timeouts,
                                          python=launcher.python)
        executor.update_parameters(**slurm_parameters(launcher, job_name))
        return executor
    if launcher.name == 'submitit-local':
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=launcher.max_timeouts, python=launcher.python)
        params: dict[str, Any] = {'timeout_min': launcher.timeout_min, 'tasks_per_node': launcher.tasks_per_node,
                                  'gpus_per_node': launcher.gpus_per_node, 'signal_delay_s': launcher.signal_delay_s}
        if launcher.setup:
            params['setup'] = list(launcher.setup)
        executor.update_parameters(**params)
        return executor
    raise StudyError(f'launcher {launcher.name!r} does not submit jobs (one of {list(LAUNCHERS[1:])} does)')


def _folder(study: Study, launcher: Launcher) -> Path:
    return Path(launcher.folder) if launcher.folder else study.workdir / 'submitit'


# ----------------------------------------------------------------------------------------------
# The scheduler's view
# ----------------------------------------------------------------------------------------------
def scheduler_states(launcher: str, jobs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{job id: 'queued' | 'running' | 'ended' | 'unknown'}`` of ``submitted`` events.

    ``slurm``: ``sacct`` (``squeue`` when accounting is off); ``submitit-local``: whether the job's
    controller process (its id) is alive on this host."""
    ids = [str(j['job_id']) for j in jobs if j.get('job_id')]
    if not ids:
        return {}
    if launcher == 'submitit-local':
        out = {}
        for j in jobs:
            if j.get('host') not in (None, _host()):
                out[str(j['job_id'])] = 'unknown'
            else:
                out[str(j['job_id'])] = 'running' if pid_alive(int(j['job_id'])) else 'ended'
        return out
    _submitit()
    from submitit.slurm.slurm import SlurmInfoWatcher, read_job_id
    mains = sorted({i.split('_')[0] for i in ids})
    command = ['sacct', '-o', 'JobID,State', '--parsable2'] + [a for m in mains for a in ('-j', m)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is not None and done.returncode == 0 and len(done.stdout.splitlines()) > 1:
        info = SlurmInfoWatcher().read_info(done.stdout)
        out = {}
        for i in ids:
            state = (info.get(i) or {}).get('State', '').split(' ')[0]
            out[i] = _ALIVE.get(state, 'ended' if state else 'unknown')
        return out
    try:  # no accounting: squeue lists the jobs still in the queue
        done = subprocess.run(['squeue', '-h', '-o', '%i|%T', '-j', ','.join(mains)], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return {i: 'unknown' for i in ids}
    if done.returncode != 0:
        return {i: 'unknown' for i in ids}
    listed: dict[str, str] = {}
    for line in done.stdout.splitlines():
        if '|' not in line:
            continue
        job, state = line.split('|', 1)
        for parts in read_job_id(job.strip()):
            if len(parts) >= 3:
                for index in range(int(parts[1]), int(parts[2]) + 1):
                    listed[f'{parts[0]}_{index}'] = state.strip()
            listed['_'.join(parts[:2])] = state.strip()
    return {i: _ALIVE.get(listed.get(i, listed.get(i.split('_')[0], '')), 'ended') for i in ids}


def _host() -> str:
    import socket
    return socket.gethostname()


def _log_tail(path: str | None, lines: int = TAIL_LINES) -> list[str]:
    if not path:
        return []
    try:
        with open(path, errors='replace') as f:
            return f.read()[-65536:].splitlines()[-lines:]
    except OSError:
        return []


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
@dataclass
class _Flight:
    """A job in flight for one run (or teacher)."""
    key: str
    events: Path
    event: dict  # its 'submitted' event
    job: Any = None  # the submitit Job (this process submitted it), else None
    task: Any = None
    seen_end: float | None = None  # when the scheduler first said it ended


def _teacher_key(config: str) -> str:
    return 'teacher-' + hashlib.sha1(str(config).encode()).hexdigest()[:12]


def _run_job(study: Study, pair: Pair, task: Any, workdir: Path) -> RunJob:
    record = {'key': task.identity.key, 'config': task.config, 'name': task.identity.name, 'seed': task.seed,
              'overrides': task.overrides, 'device': study.device, 'config_hash': task.identity.config_hash,
              'versions': task.identity.versions, 'inputs': task.identity.inputs, **task.extra}
    return RunJob(pair.trainer, task.config, task.seed, dict(task.overrides), study.device, str(workdir),
                  str(events_dir(workdir, task.identity.key)), study.threads, record, str(pair.records))


class _Driver:
    def __init__(self, study: Study, launcher: Launcher, stream, wait: bool):
        self.study, self.launcher, self.stream, self.wait = study, launcher, stream, wait
        self.folder = _folder(study, launcher)
        self.executor = None
        self.flights: dict[str, _Flight] = {}

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _executor(self):
        if self.executor is None:
            self.executor = make_executor(self.launcher, self.folder, f'opdf-{self.study.name}')
        return self.executor

    def cap(self) -> int:
        if self.launcher.name == 'submitit-local':
            return self.launcher.array_parallelism or os.cpu_count() or 1
        return 1 << 30  # SLURM runs at most array_parallelism of an array at a time itself

    def submit(self, items: Sequence[tuple[str, Path, RunJob, Any]]) -> None:
        """Submit ``(key, events folder, job, task)`` items, as one job array (slurm)."""
        if not items:
            return
        executor = self._executor()
        with executor.batch():
            jobs = [executor.submit(job) for _, _, job, _ in items]
        for (key, events, _, task), job in zip(items, jobs):
            event = write_event(events, 'submitted', job_id=str(job.job_id), launcher=self.launcher.name,
                                log=str(job.paths.stderr), out=str(job.paths.stdout), submitit_folder=str(self.folder))
            self.flights[key] = _Flight(key, events, event, job, task)
        ids = [str(j.job_id) for j in jobs]
        self.say(f'  submitted {len(jobs)} job{"s" if len(jobs) != 1 else ""} ({self.launcher.name}): '
                 f'{ids[0] if len(ids) == 1 else ids[0] + " ... " + ids[-1]}')

    def adopt(self, key: str, events: Path, state: dict, task: Any) -> None:
        """A job in flight submitted by an earlier driver (``--no_wait``, or a driver that was stopped)."""
        if key not in self.flights:
            self.flights[key] = _Flight(key, events, state['live_job'], None, task)

    def ended(self, flight: _Flight, states: Mapping[str, str], finished: bool) -> str | None:
        """``'done'``, ``'failed'`` or None (still in flight) for one flight."""
        events = read_events(flight.events)
        after = False
        for e in events:
            if e == flight.event:
                after = True
                continue
            if after and e.get('kind') == 'failed':
                return 'failed'
            if after and e.get('kind') == 'finished':
                return 'done'
        if finished:
            return 'done'
        if flight.job is not None and self.launcher.name == 'submitit-local':
            state = 'running' if flight.job.state == 'RUNNING' else 'ended'
        else:
            state = states.get(str(flight.event.get('job_id')), 'unknown')
        if state == 'unknown':
            submitted = datetime.datetime.fromisoformat(flight.event['time']).timestamp()
            state = 'ended' if time.time() - submitted > max(self.launcher.grace_s, 600) else 'queued'
        if state != 'ended':
            flight.seen_end = None
            return None
        if flight.seen_end is None:  # the job's files may reach this host a little later (NFS caches)
            flight.seen_end = time.time()
        if time.time() - flight.seen_end < self.launcher.grace_s:
            return None
        tail = _log_tail(flight.event.get('log')) or _log_tail(flight.event.get('out'))
        write_event(flight.events, 'failed', job_id=flight.event.get('job_id'), by='driver',
                    error=f'job {flight.event.get("job_id")} ended without a result (killed? see its log '
                          f'{flight.event.get("log")})', tail=tail)
        return 'failed'

    def poll(self, is_done) -> list[tuple[_Flight, str]]:
        """The flights that ended since the last poll (``is_done(key)``: the run has its record)."""
        live = [f for f in self.flights.values()]
        states = scheduler_states(self.launcher.name, [f.event for f in live if f.job is None
                                                       or self.launcher.name != 'submitit-local'])
        out = []
        for f in live:
            outcome = self.ended(f, states, is_done(f.key))
            if outcome is not None:
                out.append((f, outcome))
                del self.flights[f.key]
        return out


def _events_state(workdir: Path, key: str, recorded: dict | None, launcher: Launcher) -> tuple[Path, dict]:
    folder = events_dir(workdir, key)
    return folder, run_state(read_events(folder), recorded, launcher.max_failures)


def _failure_lines(state: dict, indent: str = '      | ') -> list[str]:
    last = state.get('last_failure') or {}
    lines = [f'{indent}{last.get("error", "")}'] if last.get('error') else []
    return lines + [f'{indent}{line}' for line in (last.get('tail') or [])]


def _prepare_on_cluster(driver: _Driver, configs: Sequence[str]) -> bool:
    """Teachers as jobs (one each, resumed when unfinished, never forced); True when every teacher is
    trained (with ``wait``, after waiting; a teacher that fails ``max_failures`` times stops the study)."""
    from .runner import teacher_state
    workdir = driver.study.workdir / 'teachers'
    while True:
        pending = []
        for config in configs:
            state, dst = teacher_state(config)
            if state == 'done':
                continue
            key = _teacher_key(config)
            folder, st = _events_state(workdir, key, None, driver.launcher)
            if st['state'] == 'failed':
                raise StudyError(f'{config}: teacher training failed {st["failures"]} times (max_failures '
                                 f'{driver.launcher.max_failures}); end of its log:\n'
                                 + '\n'.join(_failure_lines(st, '  ')))
            if key in driver.flights:
                continue
            if st['state'] == 'submitted':
                driver.adopt(key, folder, st, config)
                driver.say(f'{config}: teacher job {st["live_job"].get("job_id")} in flight')
                continue
            job = RunJob('train', config, 0, {}, driver.study.device, str(workdir), str(folder), driver.study.threads,
                         teacher=True)
            pending.append((key, folder, job, config))
            driver.say(f'{config}: {"resuming" if state == "resume" else "training"} the teacher ({dst} '
                       f'{"unfinished" if state == "resume" else "missing"}) as a job')
        driver.submit(pending)
        if not driver.flights:
            for config in configs:
                state, dst = teacher_state(config)
                driver.say(f'{config}: {dst} exists (training finished), reused')
            return True
        if not driver.wait:
            driver.flights.clear()
            return False
        ended: list = []
        while not ended:
            time.sleep(driver.launcher.poll_s)
            ended = driver.poll(lambda key: False)
        for flight, outcome in ended:
            _, st = _events_state(workdir, flight.key, None, driver.launcher)
            driver.say(f'{flight.task}: teacher job {flight.event.get("job_id")} '
                       + ('done' if outcome == 'done' else
                          f'failed ({st["failures"]}/{driver.launcher.max_failures})'))


def run_study_jobs(study: Study, launcher: Launcher, pairs: Sequence[str] | None = None, phase: str = 'all',
                   wait: bool = True, stream=None) -> None:
    """Run a study through the ``slurm`` or ``submitit-local`` launcher (see the module docstring): all
    pairs at once, each round of each pair as soon as the records allow it."""
    from .runner import Progress, _times_by_name, study_plan
    stream = stream if stream is not None else sys.stdout
    chosen = pick_pairs(study, pairs)
    driver = _Driver(study, launcher, stream, wait)
    driver.say(f'study {study.name} ({study.path}), launcher {launcher.name}, pairs {[p.name for p in chosen]}, '
               f'phase {phase}; job logs in {driver.folder}')
    if not _prepare_on_cluster(driver, list(dict.fromkeys(c for p in chosen for c in p.prepare))):
        driver.say('teachers are training (--no_wait): run the same command again when they are done')
        return
    all_records = [r for pair in chosen for r in load_records(pair.records)]
    progress = Progress(0, 0, _times_by_name(all_records), stream, min(driver.cap(), 1 << 10))
    announced: set[str] = set()
    steps = (['select'] if phase != 'final' else []) + (['final'] if phase != 'select' else [])
    while True:
        submit, failed, todo_total = [], [], 0
        for pair in chosen:
            workdir = study.workdir / pair.name
            plan = study_plan(study, pair, load_records(pair.records))
            if pair.name not in announced:
                announced.add(pair.name)
                n_sel = sum(1 for t in plan['select'] if t.identity.key not in plan['done'])
                n_fin = sum(1 for t in plan['final'] if t.identity.key not in plan['done'])
                driver.say(f'  {pair.name}: selection {len(plan["select"])} runs planned ({n_sel} to go)'
                           + (f' + {len(plan["waiting"])} waiting' if plan['waiting'] else '')
                           + f', final {len(plan["final"])} runs planned ({n_fin} to go)'
                           + (f' + {len(plan["unplanned"])} waiting' if plan['unplanned'] else '')
                           + f'; records {pair.records}')
            candidates = []
            for step in steps:
                if step == 'final' and candidates:
                    break  # a pair's finals wait for its selection round, as in the local runner
                for t in plan[step]:
                    if t.identity.key in plan['done']:
                        continue
                    folder, st = _events_state(workdir, t.identity.key, None, launcher)
                    if st['state'] == 'failed':
                        failed.append((pair, t, st))
                    else:
                        candidates.append((t, folder, st))
            todo_total += len(candidates) + len(plan['waiting']) * (phase != 'final') \
                + len(plan['unplanned']) * (phase != 'select')
            for t, folder, st in candidates:
                key = t.identity.key
                if key in driver.flights:
                    continue
                if st['state'] == 'submitted':
                    driver.adopt(key, folder, st, t)
                else:
                    submit.append((key, folder, _run_job(study, pair, t, workdir), t))
        room = max(0, driver.cap() - len(driver.flights))
        driver.submit(submit[:room])
        progress.total = progress.done + todo_total
        if not driver.flights:
            for pair, t, st in failed:
                driver.say(f'  {pair.name}: {t.identity.name} seed={t.seed} {short_overrides(t.overrides)}: failed '
                           f'{st["failures"]} times (max_failures {launcher.max_failures}), not submitted again; '
                           f'the end of its log:')
                for line in _failure_lines(st):
                    driver.say(line)
            break
        if not wait:
            driver.say(f'{len(driver.flights)} job(s) in flight (--no_wait): run the same command again to go on '
                       f'when they are done (nothing is submitted twice); progress: opdf-ablate status {study.path}')
            driver.flights.clear()
            return
        _wait_round(driver, {p.name: p for p in chosen}, progress)
    print(f'study {study.name}: {progress.done} runs finished in this session', file=stream, flush=True)


def _wait_round(driver: _Driver, pairs: Mapping[str, Pair], progress) -> None:
    """Poll until a job ends (then the caller re-plans and fills free slots); a progress line for each
    finished run, the error and log end for each failed job."""
    files = sorted({str(p.records) for p in pairs.values()})
    while True:
        time.sleep(driver.launcher.poll_s)
        records = {r['key']: r for r in load_records(*files) if r.get('key')}
        ended = driver.poll(lambda key: key in records and records[key].get('status') in DONE)
        if any(outcome == 'done' and flight.key not in records for flight, outcome in ended):
            records = {r['key']: r for r in load_records(*files) if r.get('key')}  # written meanwhile
        for flight, outcome in ended:
            record = records.get(flight.key)
            if outcome == 'done' and record is not None:
                progress.finished(record, [])
            elif outcome == 'done':
                driver.say(f'  job {flight.event.get("job_id")} ended; its record is not readable here yet')
            else:
                st = run_state(read_events(flight.events), None, driver.launcher.max_failures)
                task = flight.task
                driver.say(f'  {task.identity.name} seed={task.seed} {short_overrides(task.overrides)}: job '
                           f'{flight.event.get("job_id")} failed ({st["failures"]}/{driver.launcher.max_failures})'
                           + ('; submitted again' if st['failures'] < driver.launcher.max_failures else ''))
                for line in _failure_lines(st):
                    driver.say(line)
        if ended:
            return


# ----------------------------------------------------------------------------------------------
# Status, estimates
# ----------------------------------------------------------------------------------------------
def _flight_label(events: list[dict], live: dict, scheduled: str) -> str:
    """queued, running or 'ended (no record yet)' of a run with a job in flight."""
    after = events[events.index(live) + 1:] if live in events else []
    started = any(e.get('kind') == 'started' for e in after)
    preempted = bool(after) and after[-1].get('kind') == 'preempted'
    if scheduled == 'ended':
        return 'ended (no record yet)'
    if scheduled == 'unknown':
        return 'running' if started and not preempted else 'queued'
    return 'running' if scheduled == 'running' and not preempted else 'queued'


def study_status(study: Study, pairs: Sequence[str] | None = None, launcher: Launcher | None = None,
                 stream=None, tail: int = TAIL_LINES) -> dict[str, int]:
    """Print every planned run of the study as done, queued, running, failed (``max_failures`` failures),
    retry (failed fewer times, no job in flight) or not submitted, with its job ids and attempts, and the
    end of the log of a failed run; returns the counts (runs of arms not selected yet: ``waiting``)."""
    from .runner import study_plan
    stream = stream if stream is not None else sys.stdout
    launcher = launcher or study.launcher
    counts: dict[str, int] = {}
    print(f'study {study.name} ({study.path}), launcher {launcher.name}', file=stream)
    for pair in pick_pairs(study, pairs):
        plan = study_plan(study, pair, load_records(pair.records))
        workdir = study.workdir / pair.name
        tasks = plan['select'] + plan['final']
        found = []
        for t in tasks:
            recorded = {'status': 'ok'} if t.identity.key in plan['done'] else None
            events = read_events(events_dir(workdir, t.identity.key))
            found.append((events, run_state(events, recorded, launcher.max_failures)))
        sched: dict[str, str] = {}
        for name in LAUNCHERS[1:]:
            mine = [st['live_job'] for _, st in found if st['state'] == 'submitted'
                    and st['live_job'].get('launcher') == name]
            if mine:
                sched.update(scheduler_states(name, mine))
        rows, pair_counts = [], {}
        for t, (events, st) in zip(tasks, found):
            state = st['state']
            if state == 'submitted':
                state = _flight_label(events, st['live_job'], sched.get(str(st['live_job'].get('job_id')), 'unknown'))
            label = {'new': 'not run' if launcher.name == 'local' else 'not submitted'}.get(state, state)
            pair_counts[label] = pair_counts.get(label, 0) + 1
            attempts = str(st['attempts']) + (f' ({st["preempted"]} preempted)' if st['preempted'] else '') \
                + (f', {st["failures"]} failed' if st['failures'] else '')
            rows.append(((t.extra.get('phase', ''), t.identity.name, str(t.seed),
                          short_overrides(t.overrides, study.labels), label, ','.join(st['job_ids']) or '-',
                          attempts), st))
        waiting = len(plan['waiting']) + len(plan['unplanned'])
        summary = ', '.join(f'{n} {k}' for k, n in sorted(pair_counts.items()))
        print(f'pair {pair.name}: {len(tasks)} runs planned ({summary})'
              + (f'; {waiting} more wait for a selected setting' if waiting else ''), file=stream)
        header = ('phase', 'arm', 'seed', 'setting', 'state', 'job ids', 'attempts')
        widths = [max([len(header[i])] + [len(r[0][i]) for r in rows]) for i in range(len(header))]
        print('  ' + '  '.join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), file=stream)
        for cells, st in rows:
            print('  ' + '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=stream)
            if cells[4] in ('failed', 'retry'):
                last = st.get('last_failure') or {}
                if last.get('error'):
                    print(f'      | {last["error"]}', file=stream)
                for line in (last.get('tail') or [])[-tail:]:
                    print(f'      | {line}', file=stream)
        for k, n in pair_counts.items():
            counts[k] = counts.get(k, 0) + n
        if waiting:
            counts['waiting'] = counts.get('waiting', 0) + waiting
    return counts


def estimate(study: Study, pair: Pair, plan: Mapping[str, Any], launcher: Launcher, phase: str = 'all') -> dict:
    """Runs still to train in a pair (planned, waiting and the most edge extensions the rule may add) and
    their hours: ``{'runs', 'extensions', 'hours_per_run', 'gpus_per_run', 'gpu_hours', 'max_gpu_hours'}``."""
    runs = 0
    if phase != 'final':
        runs += sum(1 for t in plan['select'] if t.identity.key not in plan['done']) + len(plan['waiting'])
    if phase != 'select':
        runs += sum(1 for t in plan['final'] if t.identity.key not in plan['done']) + len(plan['unplanned'])
    extensions = 0
    if pair.edge_rule == 'extend_once' and phase != 'final':
        from .selection import _numeric
        for arm in pair.arms:
            sel = plan['selection'][arm.name]
            if sel.get('extensions') or sel['state'] == 'selected':
                continue
            extensions += sum(1 for k in arm.axes if _numeric(arm.values[k])) * len(pair.select_seeds)
    hours = pair.hours_per_run if pair.hours_per_run is not None else launcher.hours_per_run
    gpus = launcher.gpus_per_run
    out = {'runs': runs, 'extensions': extensions, 'hours_per_run': hours, 'gpus_per_run': gpus,
           'gpu_hours': None, 'max_gpu_hours': None}
    if hours is not None:
        out['gpu_hours'] = runs * hours * max(gpus, 1) if gpus else None
        out['max_gpu_hours'] = (runs + extensions) * hours * gpus if gpus else None
        out['hours'] = runs * hours
    return out


def describe_launch(study: Study, chosen: Sequence[Pair], plans: Mapping[str, Mapping], launcher: Launcher,
                    phase: str = 'all', stream=None) -> None:
    """``--dry_run`` with a launcher: the GPU-hour estimate per pair and in all, and the sbatch parameters."""
    stream = stream if stream is not None else sys.stdout
    total_runs, total, top, unknown = 0, 0.0, 0.0, []
    print(f'launcher {launcher.name}: {launcher.nodes} node(s) x {launcher.tasks_per_node} task(s), '
          f'{launcher.gpus_per_node} GPU(s) per node = {launcher.gpus_per_run} GPU(s) per run, time limit '
          f'{launcher.timeout_min} min, at most {launcher.max_failures} failures per run', file=stream)
    for pair in chosen:
        e = estimate(study, pair, plans[pair.name], launcher, phase)
        total_runs += e['runs']
        ext = f' (+ at most {e["extensions"]} edge-extension runs)' if e['extensions'] else ''
        if e['hours_per_run'] is None:
            unknown.append(pair.name)
            print(f'  {pair.name}: {e["runs"]} runs to train{ext}; no hours_per_run in the spec: no estimate',
                  file=stream)
            continue
        if e['gpus_per_run']:
            total += e['gpu_hours']
            top += e['max_gpu_hours']
            print(f'  {pair.name}: {e["runs"]} runs{ext} x {e["hours_per_run"]:g} h x {e["gpus_per_run"]} '
                  f'GPU{"s" if e["gpus_per_run"] != 1 else ""} = '
                  f'{_hours(e["gpu_hours"])} GPU-hours'
                  + (f' (at most {_hours(e["max_gpu_hours"])})' if e['extensions'] else ''), file=stream)
        else:
            total += e['hours']
            print(f'  {pair.name}: {e["runs"]} runs{ext} x {e["hours_per_run"]:g} h = {_hours(e["hours"])} hours '
                  f'(no GPUs)', file=stream)
    unit = 'GPU-hours' if launcher.gpus_per_run else 'hours of runs'
    print(f'estimate: {total_runs} runs, {_hours(total)} {unit}'
          + (f' (at most {_hours(top)} with every edge extension)' if top > total else '')
          + (f'; pairs without an estimate: {unknown}' if unknown else ''), file=stream)
    if launcher.name == 'slurm':
        first = max((sum(1 for t in plans[p.name]['select'] if t.identity.key not in plans[p.name]['done'])
                     for p in chosen), default=0)
        script = render_sbatch(launcher, _folder(study, launcher), f'opdf-{study.name}', array=first if first > 1
                               else None)
        print('sbatch parameters (first round' + (f', an array of {first} runs' if first > 1 else '') + '):',
              file=stream)
        for line in script.splitlines():
            if line.startswith('#SBATCH'):
                print(f'  {line}', file=stream)
    elif launcher.name == 'submitit-local':
        print(f'submitit-local: at most {launcher.array_parallelism or os.cpu_count()} jobs at a time on this machine, '
              f'{launcher.tasks_per_node} task(s) each', file=stream)


# ----------------------------------------------------------------------------------------------
# One run: opdf-train --launcher slurm
# ----------------------------------------------------------------------------------------------
def submit_single(argv: Sequence[str], launcher: Launcher, folder: str | os.PathLike | None = None,
                  wait: bool = False, stream=None, device: str = 'cpu') -> int:
    """Submit one ``opdf-train`` run (its arguments without the launcher flags) as one job; with
    ``wait``, wait for it and return 0 on success, 1 otherwise."""
    stream = stream if stream is not None else sys.stdout
    folder = Path(folder or launcher.folder or 'runs/submitit')
    events = folder / 'events' / hashlib.sha1(' '.join(argv).encode()).hexdigest()[:12]
    job = RunJob('train', None, None, {}, device, str(folder), str(events), argv=list(argv))
    executor = make_executor(launcher, folder, 'opdf-train')
    submitted = executor.submit(job)
    write_event(events, 'submitted', job_id=str(submitted.job_id), launcher=launcher.name,
                log=str(submitted.paths.stderr), out=str(submitted.paths.stdout), submitit_folder=str(folder))
    print(f'submitted job {submitted.job_id} ({launcher.name}); log {submitted.paths.stderr}; events {events}',
          file=stream, flush=True)
    if launcher.name == 'slurm':
        print(render_sbatch(launcher, folder, 'opdf-train').split('\n# command')[0], file=stream, flush=True)
    if not wait:
        return 0
    try:
        result = submitted.results()[0]  # rank 0's (every task of a DDP job returns; only rank 0 says more)
    except Exception as exc:  # noqa: BLE001 - the job's error, as the user reads it
        print(f'error: job {submitted.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}',
              file=sys.stderr)
        return 1
    print(f'job {submitted.job_id} done: {result}', file=stream, flush=True)
    return 0
