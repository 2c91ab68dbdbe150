"""A fake SLURM for tests: ``sbatch``, ``srun``, ``squeue``, ``sacct``, ``scancel`` and ``scontrol`` on this
machine, with their state in ``$FAKE_SLURM_DIR``.

``sbatch SCRIPT`` records the submission (``submissions.jsonl``: job id, the ``#SBATCH`` options, a copy of
the script) and, unless ``$FAKE_SLURM_NORUN`` is set, runs it in the background: every array task (all at
once, or ``%N`` at a time) as ``bash SCRIPT`` with the variables SLURM sets (``SLURM_JOB_ID``,
``SLURM_ARRAY_JOB_ID``/``SLURM_ARRAY_TASK_ID``, ``SLURM_NTASKS``, ``SLURM_JOB_NUM_NODES``,
``SLURM_JOB_NODELIST`` = ``localhost`` per node, ``SLURM_RESTART_COUNT``). ``srun CMD`` starts the job's
``nodes x ntasks-per-node`` tasks of CMD here (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``),
with ``--output``/``--error`` patterns (``%j %A %a %t %N``). ``scontrol requeue ID`` marks the job to run
again (same id) when its tasks have exited; ``scancel --signal SIG ID`` sends SIG to the job's tasks,
``scancel ID`` cancels it; ``sacct -o JobID,State[,NodeList] --parsable2 -j ID`` and ``squeue -h -o
'%i|%T' -j IDS`` report PENDING, RUNNING, REQUEUED, COMPLETED, FAILED or CANCELLED.

Only the standard library: the scripts run with any ``python3``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DIR = Path(os.environ.get('FAKE_SLURM_DIR', '/tmp/fake_slurm'))
TERMINAL = ('COMPLETED', 'FAILED', 'CANCELLED')


def _job_dir(job: str) -> Path:
    return DIR / 'jobs' / job


def _next_id() -> int:
    DIR.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        n = len(list((DIR / 'ids').glob('*'))) + 1 if (DIR / 'ids').is_dir() else 1
        (DIR / 'ids').mkdir(exist_ok=True)
        try:
            os.close(os.open(DIR / 'ids' / str(n), os.O_CREAT | os.O_EXCL))
            return n
        except FileExistsError:
            continue
    raise RuntimeError('no job id')


def _sbatch_options(text: str) -> dict:
    options = {}
    for line in text.splitlines():
        if not line.startswith('#SBATCH'):
            continue
        item = line[len('#SBATCH'):].strip()
        item = item[2:] if item.startswith('--') else item
        key, _, value = item.partition('=')
        options[key] = value.strip("'") if value else True
    return options


def _array(options: dict) -> tuple[list[int] | None, int]:
    spec = options.get('array')
    if not spec:
        return None, 1
    rng, _, limit = str(spec).partition('%')
    first, _, last = rng.partition('-')
    indices = list(range(int(first), int(last or first) + 1))
    return indices, int(limit) if limit else len(indices)


def _set_state(job: str, task: str, state: str) -> None:
    path = _job_dir(job) / f'state_{task}'
    tmp = path.with_suffix('.tmp')
    tmp.write_text(state)
    os.replace(tmp, path)


def _state(job: str, task: str) -> str:
    try:
        return (_job_dir(job) / f'state_{task}').read_text()
    except OSError:
        return 'PENDING'


def sbatch(argv: list[str]) -> int:
    script = Path(argv[-1])
    text = script.read_text()
    options = _sbatch_options(text)
    job = str(_next_id())
    folder = _job_dir(job)
    folder.mkdir(parents=True)
    (folder / 'script.sh').write_text(text)
    (folder / 'options.json').write_text(json.dumps(options))
    indices, _ = _array(options)
    for task in (indices if indices is not None else [None]):
        _set_state(job, 'x' if task is None else str(task), 'PENDING')
    with open(DIR / 'submissions.jsonl', 'a') as f:
        f.write(json.dumps({'job_id': job, 'script': str(folder / 'script.sh'), 'options': options}) + '\n')
    if not os.environ.get('FAKE_SLURM_NORUN'):
        with open(folder / 'runner.log', 'a') as log:
            subprocess.Popen([sys.executable, __file__, '_run', job], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env=dict(os.environ))
    print(f'Submitted batch job {job}')
    return 0


def _run_task(job: str, task: int | None, options: dict) -> None:
    name = 'x' if task is None else str(task)
    folder = _job_dir(job)
    nodes = int(options.get('nodes', 1))
    per_node = int(options.get('ntasks-per-node', 1))
    restarts = 0
    while True:
        if (folder / f'cancel_{name}').exists():
            _set_state(job, name, 'CANCELLED')
            return
        _set_state(job, name, 'RUNNING')
        env = dict(os.environ)
        env.update(SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes), SLURM_NTASKS=str(nodes * per_node),
                   SLURM_NTASKS_PER_NODE=str(per_node), SLURM_JOB_NODELIST=','.join(['localhost'] * nodes),
                   SLURM_RESTART_COUNT=str(restarts), FAKE_SLURM_TASK=name, FAKE_SLURM_JOB=job)
        if task is None:
            env['SLURM_JOB_ID'] = job
        else:
            env.update(SLURM_JOB_ID=str(100000 + int(job) * 1000 + task), SLURM_ARRAY_JOB_ID=job,
                       SLURM_ARRAY_TASK_ID=str(task))
        code = subprocess.run(['bash', str(folder / 'script.sh')], env=env).returncode
        flag = folder / f'requeue_{name}'
        if flag.exists() and not (folder / f'cancel_{name}').exists():
            flag.unlink()
            restarts += 1
            _set_state(job, name, 'REQUEUED')
            with open(DIR / 'requeues.jsonl', 'a') as f:
                f.write(json.dumps({'job_id': job, 'task': name, 'restart': restarts}) + '\n')
            time.sleep(0.2)
            continue
        if (folder / f'cancel_{name}').exists():
            _set_state(job, name, 'CANCELLED')
        else:
            _set_state(job, name, 'COMPLETED' if code == 0 else 'FAILED')
        return


def _runner(job: str) -> int:
    options = json.loads((_job_dir(job) / 'options.json').read_text())
    indices, limit = _array(options)
    slots = threading.Semaphore(limit)

    def one(task):
        with slots:
            _run_task(job, task, options)

    threads = [threading.Thread(target=one, args=(t,)) for t in (indices if indices is not None else [None])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def _pattern(text: str, env: dict, task: int, node: int) -> str:
    return (text.replace('%A', env.get('SLURM_ARRAY_JOB_ID', env['SLURM_JOB_ID']))
            .replace('%a', env.get('SLURM_ARRAY_TASK_ID', '0')).replace('%j', env['SLURM_JOB_ID'])
            .replace('%t', str(task)).replace('%N', f'localhost{node}'))


def srun(argv: list[str]) -> int:
    output = error = None
    i = 0
    while i < len(argv) and argv[i].startswith('-'):
        flag = argv[i]
        if flag in ('--output', '-o'):
            output, i = argv[i + 1], i + 2
        elif flag in ('--error', '-e'):
            error, i = argv[i + 1], i + 2
        elif flag.startswith('--output='):
            output, i = flag.split('=', 1)[1], i + 1
        elif flag.startswith('--error='):
            error, i = flag.split('=', 1)[1], i + 1
        else:
            i += 1
    command = argv[i:]
    env = dict(os.environ)
    nodes, per_node = int(env.get('SLURM_JOB_NUM_NODES', 1)), int(env.get('SLURM_NTASKS_PER_NODE', 1))
    procs, files = [], []
    for rank in range(nodes * per_node):
        node, local = divmod(rank, per_node)
        task_env = dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(local), SLURM_NODEID=str(node))
        out = open(_pattern(output, env, rank, node), 'a') if output else None
        err = open(_pattern(error, env, rank, node), 'a') if error else out
        files += [f for f in (out, err) if f is not None]
        procs.append(subprocess.Popen(command, env=task_env, stdout=out, stderr=err))
    job, name = env.get('FAKE_SLURM_JOB'), env.get('FAKE_SLURM_TASK')
    if job:
        (_job_dir(job) / f'pids_{name}').write_text(' '.join(str(p.pid) for p in procs))
    codes = [p.wait() for p in procs]
    for f in set(files):
        f.close()
    return max((abs(c) for c in codes), default=0)


def _split_id(text: str) -> tuple[str, str | None]:
    main, _, task = text.partition('_')
    return main, task or None


def _tasks(job: str) -> list[str]:
    return sorted((p.name[len('state_'):] for p in _job_dir(job).glob('state_*') if not p.name.endswith('.tmp')),
                  key=lambda t: (t != 'x', int(t) if t.isdigit() else -1))


def scontrol(argv: list[str]) -> int:
    if argv[:1] != ['requeue']:
        print(f'fake scontrol: {argv} not supported', file=sys.stderr)
        return 1
    for ident in argv[1].split(','):
        job, task = _split_id(ident)
        (_job_dir(job) / f'requeue_{task or "x"}').write_text('1')
    return 0


def scancel(argv: list[str]) -> int:
    sig = None
    ids = []
    i = 0
    while i < len(argv):
        if argv[i] in ('--signal', '-s'):
            sig, i = argv[i + 1], i + 2
        elif argv[i].startswith('--signal='):
            sig, i = argv[i].split('=', 1)[1], i + 1
        else:
            ids.append(argv[i])
            i += 1
    for ident in ids:
        job, task = _split_id(ident)
        for name in ([task] if task else _tasks(job)):
            pids_file = _job_dir(job) / f'pids_{name}'
            pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
            if sig is None:
                (_job_dir(job) / f'cancel_{name}').write_text('1')
            number = getattr(signal, sig if str(sig).startswith('SIG') else f'SIG{sig}') if sig else signal.SIGKILL
            for pid in pids:
                try:
                    os.kill(pid, number)
                except ProcessLookupError:
                    pass
    return 0


def sacct(argv: list[str]) -> int:
    fields = ['JobID', 'State']
    ids = []
    i = 0
    while i < len(argv):
        if argv[i] in ('-o', '--format'):
            fields, i = argv[i + 1].split(','), i + 2
        elif argv[i] in ('-j', '--jobs'):
            ids += argv[i + 1].split(',')
            i += 2
        else:
            i += 1
    print('|'.join(fields))
    for ident in ids:
        job, only = _split_id(ident)
        if not _job_dir(job).is_dir():
            continue
        for name in _tasks(job):
            if only is not None and name != only:
                continue
            row = {'JobID': job if name == 'x' else f'{job}_{name}', 'State': _state(job, name),
                   'NodeList': 'localhost'}
            print('|'.join(row.get(f, '') for f in fields))
    return 0


def squeue(argv: list[str]) -> int:
    ids = []
    for i, a in enumerate(argv):
        if a in ('-j', '--jobs'):
            ids += argv[i + 1].split(',')
    for ident in ids:
        job, _ = _split_id(ident)
        if not _job_dir(job).is_dir():
            continue
        for name in _tasks(job):
            state = _state(job, name)
            if state not in TERMINAL:
                print(f'{job if name == "x" else f"{job}_{name}"}|{state}')
    return 0


COMMANDS = {'sbatch': sbatch, 'srun': srun, 'scontrol': scontrol, 'scancel': scancel, 'sacct': sacct,
            'squeue': squeue}

if __name__ == '__main__':
    if sys.argv[1] == '_run':
        sys.exit(_runner(sys.argv[2]))
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
