"""Paper-scale studies on a cluster (issue 20), without a cluster: per-run records under 32 concurrent
writers, launcher settings, the rendered batch script of a 2-node x 8-GPU job, SLURM's environment as
torchrun's, the digits smoke study through ``submitit-local`` and through fake SLURM commands (with a
preemption) giving the records of a local run, ``status``, and the ImageNet and GLUE specs' dry runs."""
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml

from opdf_torchdistill import study
from opdf_torchdistill.cli import ablate
from opdf_torchdistill.study import jobs, launchers, trainers
from conftest import ROOT

pytest.importorskip('submitit')

FAKE_SLURM = ROOT / 'tests' / 'fake_slurm'
SMOKE = ROOT / 'configs' / 'digits' / 'study' / 'smoke.yaml'
LR = 'train.optimizer.kwargs.lr'


# -- records on a shared filesystem ------------------------------------------------------------------
def _writer(path, i, barrier, errors):
    try:
        barrier.wait()
        for j in range(4):
            study.write_run_record({'key': f'k{i:02d}{j}', 'status': 'ok', 'metrics': {'test_acc1': float(i)}}, path)
        # every writer records the same run: copies (timings aside) collapse into one record
        study.write_run_record({'key': 'shared', 'status': 'ok', 'metrics': {'test_acc1': 1.0},
                                'wall_seconds': float(i)}, path)
        study.write_run_record({'key': f'r{i:02d}', 'status': 'failed', 'metrics': {}, 'error': 'x'}, path)
        study.write_run_record({'key': f'r{i:02d}', 'status': 'ok', 'metrics': {'test_acc1': 2.0}}, path)  # retry
        study.write_run_record({'key': f'r{i:02d}', 'status': 'failed', 'metrics': {}}, path)  # never over a result
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        errors.put(f'writer {i}: {type(exc).__name__}: {exc}')


def _reader(path, stop, errors):
    try:
        while not stop.is_set():
            for r in study.load_records(path):  # never a torn record, never an error while writers write
                assert r['status'] in ('ok', 'failed') and isinstance(r['metrics'], dict)
    except BaseException as exc:  # noqa: BLE001
        errors.put(f'reader: {type(exc).__name__}: {exc}')


def test_per_run_records_hold_under_32_concurrent_writer_processes(tmp_path):
    path = tmp_path / 'r.jsonl'
    study.append_record({'key': 'local', 'status': 'ok', 'metrics': {'test_acc1': 3.0}}, path)  # a local run
    ctx = multiprocessing.get_context('fork')
    barrier, errors, stop = ctx.Barrier(32), ctx.Queue(), ctx.Event()
    reader = ctx.Process(target=_reader, args=(path, stop, errors))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(path, i, barrier, errors)) for i in range(32)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    reader.join(60)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems
    assert all(w.exitcode == 0 for w in writers) and reader.exitcode == 0
    records = study.load_records(path)
    assert len(records) == 1 + 32 * 4 + 1 + 32  # nothing lost, one record per run
    by_key = {r['key']: r for r in records}
    assert all(by_key[f'r{i:02d}']['status'] == 'ok' for i in range(32))  # the retry replaced the failure
    run_dir = study.run_dir(path)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(f'{k}.json' for k in by_key if k != 'local')
    # a writer killed while writing leaves a temporary file: never read as a record
    (run_dir / '.k000.json.host.1.ab.tmp').write_text('{"key": "k000", "status": "ok", "metr')
    assert study.load_records(path) == records
    with pytest.raises(study.RecordError, match=r'k000.json: run k000 .* another result'):
        study.write_run_record({'key': 'k000', 'status': 'ok', 'metrics': {'test_acc1': 99.0}}, path)
    with pytest.raises(study.RecordError, match=r'r.jsonl:1: run local .* another result'):
        study.write_run_record({'key': 'local', 'status': 'diverged', 'metrics': {}}, path)
    (run_dir / '.k000.json.host.1.ab.tmp').unlink()
    assert study.compact_records(path) == len(by_key) - 1  # folded into the file, the folder removed
    assert not run_dir.exists() and study.load_records(path) == records


# -- launcher settings, the batch script, SLURM's environment ------------------------------------------
TWO_BY_EIGHT = {'name': 'slurm', 'partition': 'gpu', 'account': 'opdf', 'qos': 'normal', 'nodes': 2,
                'gpus_per_node': 8, 'tasks_per_node': 8, 'cpus_per_task': 10, 'mem_gb': 480, 'timeout_min': 1440,
                'constraint': 'a100', 'sbatch': ['--exclusive', '--mail-type=END'], 'array_parallelism': 4,
                'signal_delay_s': 300}


def test_the_batch_script_of_a_2_node_8_gpu_job(tmp_path, monkeypatch):
    launcher = study.parse_launcher(TWO_BY_EIGHT, 'test')
    script = launchers.render_sbatch(launcher, '/shared/runs/submitit', 'opdf-ilsvrc2012')
    for line in ('#SBATCH --nodes=2', '#SBATCH --gpus-per-node=8', '#SBATCH --ntasks-per-node=8',
                 '#SBATCH --cpus-per-task=10', '#SBATCH --mem=480GB', '#SBATCH --time=1440',
                 '#SBATCH --signal=USR2@300', '#SBATCH --requeue', '#SBATCH --partition=gpu', '#SBATCH --account=opdf',
                 '#SBATCH --qos=normal', '#SBATCH --constraint=a100', '#SBATCH --exclusive',
                 '#SBATCH --mail-type=END', '#SBATCH --job-name=opdf-ilsvrc2012'):
        assert line in script.splitlines(), line
    assert 'srun --unbuffered' in script and '-u -m submitit.core._submit /shared/runs/submitit' in script
    array = launchers.render_sbatch(launcher, '/shared/runs/submitit', 'x', array=6)
    assert '#SBATCH --array=0-5%4' in array and '%A_%a_0_log.out' in array

    # submitted through submitit to the fake sbatch (not run): the options it receives are those
    monkeypatch.setenv('PATH', f'{FAKE_SLURM}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('FAKE_SLURM_DIR', str(tmp_path / 'slurm'))
    monkeypatch.setenv('FAKE_SLURM_NORUN', '1')
    executor = launchers.make_executor(launcher, tmp_path / 'submitit', 'opdf-ilsvrc2012')
    job = executor.submit(print, 'never runs')
    (submission,) = [json.loads(line) for line in (tmp_path / 'slurm' / 'submissions.jsonl').read_text().splitlines()]
    assert submission['job_id'] == job.job_id == '1'
    options = submission['options']
    assert (options['nodes'], options['gpus-per-node'], options['ntasks-per-node'], options['time'],
            options['signal'], options['requeue']) == ('2', '8', '8', '1440', 'USR2@300', True)
    assert launchers.scheduler_states('slurm', [{'job_id': '1'}]) == {'1': 'queued'}  # through the fake sacct


def test_slurm_tasks_get_torchruns_variables_and_the_trainers_distributed_set_up(monkeypatch):
    import submitit
    from torch import distributed as dist
    from opdf_torchdistill.cli.common import init_distributed
    env = {'SUBMITIT_EXECUTOR': 'slurm', 'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '16', 'SLURM_JOB_NUM_NODES': '2',
           'SLURM_NODEID': '1', 'SLURM_PROCID': '9', 'SLURM_LOCALID': '1', 'SLURM_JOB_NODELIST': 'gpu[017-018]'}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3,4,5,6,7')  # every GPU of the node visible to each task
    got = jobs.torchrun_env(submitit.JobEnvironment())
    assert {k: got[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR')} \
        == {'RANK': '9', 'WORLD_SIZE': '16', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '8', 'NODE_RANK': '1',
            'MASTER_ADDR': 'gpu017'}
    assert 20000 <= int(got['MASTER_PORT']) < 40000
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3')  # a task bound to one GPU: that GPU is its cuda:0
    assert jobs.torchrun_env(submitit.JobEnvironment())['LOCAL_RANK'] == '0'
    monkeypatch.setenv('SLURM_PROCID', '0')
    assert jobs.torchrun_env(submitit.JobEnvironment())['MASTER_PORT'] == got['MASTER_PORT']  # every task agrees
    monkeypatch.setenv('SLURM_NTASKS', '1')
    assert jobs.torchrun_env(submitit.JobEnvironment()) == {}  # one task: no process group
    seen = {}
    monkeypatch.setattr(dist, 'init_process_group', lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, 'barrier', lambda: None)
    for k, v in got.items():
        monkeypatch.setenv(k, v)
    distributed, world, _, device = init_distributed('cpu')  # the one code path torchrun uses
    assert distributed and world == 16 and device.type == 'cpu'
    assert seen == {'backend': 'gloo', 'init_method': 'env://', 'world_size': 16, 'rank': 9}


@pytest.mark.parametrize('block,message', [
    ({'name': 'pbs'}, r"launcher.name must be one of \['local', 'slurm', 'submitit-local'\]"),
    ({'gpus': 8}, r"launcher: unknown keys \['gpus'\]"),
    ({'nodes': 0}, r'launcher.nodes must be >= 1'),
    ({'timeout_min': '1d'}, r'launcher.timeout_min must be an integer'),
    ({'name': 'submitit-local', 'nodes': 2}, r'submitit-local runs on this machine only'),
])
def test_launcher_settings_are_checked(block, message):
    with pytest.raises(study.StudyError, match=message):
        study.parse_launcher(block, 'spec.yaml: launcher')


# -- the digits smoke study: local, submitit-local, fake SLURM with a preemption ---------------------------
def _smoke_spec(tmp, name):
    spec = yaml.safe_load(SMOKE.read_text())
    spec['workdir'] = str(tmp / name / 'work')
    spec['pairs']['digits']['records'] = str(tmp / name / 'records.jsonl')
    spec['launcher'].update(poll_s=0.2, grace_s=5)
    path = tmp / f'{name}.yaml'
    path.write_text(yaml.safe_dump(spec))
    return path


def _result(records):
    """Records without their timing fields, by key."""
    out = {}
    for r in records:
        r = {k: v for k, v in r.items() if k not in ('wall_seconds', 'finished')}
        r['metrics'] = {k: v for k, v in r['metrics'].items() if k != 'train_seconds'}
        out[r['key']] = r
    return out


def _report(spec, capsys):
    capsys.readouterr()
    assert ablate.main(['report', '--study', str(spec)]) == 0
    return capsys.readouterr().out


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f'timed out waiting for {what}')


def _ddp_argv(tmp):
    return ['--config', 'configs/digits/student_ce.yaml', '--device', 'cpu', '--seed', '0', '--threads', '1',
            '--set', 'train.num_epochs=2', '--set', 'train.scheduler.kwargs.T_max=2', '--dst_ckpt', str(tmp / 'ddp.pt'),
            '--metrics_json', str(tmp / 'm.json'), '--launcher', 'submitit-local',
            '--launcher_set', 'tasks_per_node=2', '--launcher_set', f'folder={tmp / "jobs"}', '--wait']


@pytest.fixture(scope='module')
def gpu_check_run(tmp_path_factory):
    """``tools/gpu_check.py --device cpu`` in a subprocess, started first (it runs while the launchers'
    tests wait for their jobs): ``(process, its JSON file)``."""
    tmp = tmp_path_factory.mktemp('gpu_check')
    proc = subprocess.Popen([sys.executable, str(ROOT / 'tools' / 'gpu_check.py'), '--device', 'cpu', '--json',
                             str(tmp / 'check.json')], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    yield proc, tmp / 'check.json'
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope='module')
def launched(tmp_path_factory, gpu_check_run):
    """The smoke study trained three ways, and one opdf-train run as a job (the jobs at the same time, to
    keep the tests short): here (local launcher, in this process), through ``submitit-local``, and through
    ``--launcher slurm`` with the fake SLURM commands on PATH, whose selection job is preempted (USR2)
    after its first epoch; ``opdf-train --launcher submitit-local`` with two tasks (DDP over gloo).
    Returns ``{name: (spec, exit status or None)}``, the tmp folder and what was printed."""
    from opdf_torchdistill.cli import train
    tmp = tmp_path_factory.mktemp('launched')
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setenv('PATH', f'{FAKE_SLURM}{os.pathsep}{os.environ["PATH"]}')
        mp.setenv('FAKE_SLURM_DIR', str(tmp / 'slurm'))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            specs = {name: _smoke_spec(tmp, name) for name in ('local', 'sl', 'slurm')}
            (tmp / 'single').mkdir()
            runs = {'sl': lambda: ablate.main(['study', str(specs['sl']), '--launcher', 'submitit-local']),
                    'slurm': lambda: ablate.main(['study', str(specs['slurm']), '--launcher', 'slurm']),
                    'single': lambda: train.main(_ddp_argv(tmp / 'single'))}
            spec = study.load_study(specs['local'])
            (select,) = study.study_plan(spec, spec.pairs[0], [])['select']
            stem = trainers.run_stem(select.config, select.seed, select.overrides, spec.device)

            def preempt():
                _wait_for(lambda: (tmp / 'slurm' / 'work' / 'digits' / f'{stem}.last.pt').exists(), 300,
                          'the first epoch of the selection run on the fake SLURM')
                out['preempted'] = subprocess.run(['scancel', '--signal', 'USR2', '1']).returncode  # job 1

            runs['preempt'] = preempt
            threads = {name: threading.Thread(target=lambda n=name, f=run: out.update({n: f()}))
                       for name, run in runs.items()}
            for t in threads.values():
                t.start()
            study.run_study(spec, stream=io.StringIO())  # meanwhile, here
            local = study.load_records(tmp / 'local' / 'records.jsonl')
            for t in threads.values():
                t.join(600)
        assert not any(t.is_alive() for t in threads.values()) and out['preempted'] == 0
        yield {'specs': specs, 'codes': out, 'tmp': tmp, 'printed': printed.getvalue(), 'local': local,
               'select': next(r for r in local if r['key'] == select.identity.key)}


def test_the_smoke_study_through_submitit_local_gives_the_local_records(launched, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    tmp, specs = launched['tmp'], launched['specs']
    assert launched['codes']['sl'] == 0 and len(launched['local']) == 3
    assert 'launcher submitit-local' in launched['printed']
    records = study.load_records(tmp / 'sl' / 'records.jsonl')
    assert _result(records) == _result(launched['local'])  # the same runs, the same results, timing aside
    assert not (tmp / 'sl' / 'records.jsonl').exists()  # written by the jobs, as one file per run
    assert _report(specs['sl'], capsys) == _report(specs['local'], capsys)
    assert ablate.main(['status', str(specs['sl']), '--launcher', 'submitit-local']) == 0
    status = capsys.readouterr().out
    assert 'pair digits: 3 runs planned (3 done)' in status and status.count(' done ') == 3


def test_the_smoke_study_on_fake_slurm_survives_a_preemption(launched, monkeypatch, capsys):
    """``opdf-ablate study SPEC --launcher slurm`` with fake sbatch/srun/sacct/scancel/scontrol on PATH:
    the selection job, preempted (USR2) after its first epoch, requeues itself, continues from its
    ``.last.pt`` and ends with the result of the uninterrupted local run; the report is the local one."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('PATH', f'{FAKE_SLURM}{os.pathsep}{os.environ["PATH"]}')
    tmp, specs, select = launched['tmp'], launched['specs'], launched['select']
    monkeypatch.setenv('FAKE_SLURM_DIR', str(tmp / 'slurm'))
    assert launched['codes']['slurm'] == 0
    requeues = [json.loads(line) for line in (tmp / 'slurm' / 'requeues.jsonl').read_text().splitlines()]
    assert requeues == [{'job_id': '1', 'task': 'x', 'restart': 1}]  # requeued by submitit through scontrol
    work = tmp / 'slurm' / 'work' / 'digits'
    events = jobs.read_events(jobs.events_dir(work, select['key']))
    kinds = [e['kind'] for e in events]
    assert kinds == ['submitted', 'started', 'preempted', 'started', 'finished'], kinds
    assert [e['resume'] for e in events if e['kind'] == 'started'] == [False, True]  # continued from .last.pt
    records = study.load_records(tmp / 'slurm' / 'records.jsonl')
    assert _result(records) == _result(launched['local'])  # the same final accuracy as the uninterrupted run
    submissions = [json.loads(line) for line in (tmp / 'slurm' / 'submissions.jsonl').read_text().splitlines()]
    assert [s['options'].get('array') for s in submissions] == [None, '0-1%2']  # selection, then the finals
    assert all(s['options']['signal'] == 'USR2@120' and s['options']['requeue'] is True for s in submissions)
    assert not list(work.glob('*.pt'))  # the runs' checkpoints are removed when they end
    assert _report(specs['slurm'], capsys) == _report(specs['local'], capsys)
    assert ablate.main(['status', str(specs['slurm']), '--launcher', 'slurm']) == 0
    status = capsys.readouterr().out
    assert 'pair digits: 3 runs planned (3 done)' in status and '2 (1 preempted)' in status
    assert ablate.main(['study', str(specs['slurm']), '--launcher', 'slurm']) == 0  # all recorded: nothing to submit
    assert len((tmp / 'slurm' / 'submissions.jsonl').read_text().splitlines()) == 2


def test_opdf_train_submits_one_run_as_a_two_task_ddp_job(launched):
    """``opdf-train --launcher submitit-local``: one job, two tasks, each the trainer, joined by gloo from
    the job environment (RANK, WORLD_SIZE, MASTER_ADDR), as under torchrun."""
    single = launched['tmp'] / 'single'
    assert launched['codes']['single'] == 0
    assert 'submitted job' in launched['printed'] and "'status': 'ok'" in launched['printed']
    logs = '\n'.join(p.read_text() for p in (single / 'jobs').glob('*_log.err'))
    assert 'distributed: 2 processes, backend gloo' in logs
    assert (single / 'ddp.pt').is_file() and json.loads((single / 'm.json').read_text())['test']['acc1'] > 0


def test_reproduce_trains_a_recorded_run_again_and_names_every_metric_that_differs(launched, monkeypatch, capsys):
    """``opdf-ablate reproduce``: the smoke study's first run, trained again, is identical in every metric
    but timing (exit 0); a record whose test accuracy was edited is named as different, metric by metric
    (exit 1); a record whose config hash no longer matches is not trained (changed); the records are not
    written."""
    monkeypatch.chdir(ROOT)
    tmp, local = launched['tmp'], launched['local']
    records = tmp / 'local' / 'records.jsonl'
    before = records.read_bytes()
    capsys.readouterr()
    assert ablate.main(['reproduce', str(launched['specs']['local']), '--each']) == 0
    out = capsys.readouterr().out
    first = min(local, key=lambda r: (r['finished'], r['key']))
    assert f'[key {first["key"]}]: same, ' in out and '1 of 1 run(s) reproduced exactly' in out, out
    assert records.read_bytes() == before and not list((tmp / 'local' / 'work').glob('reproduce-*'))

    edited_spec = _smoke_spec(tmp, 'edited')
    edited = [dict(r, metrics=dict(r['metrics'])) for r in local]
    target = next(r for r in edited if r['phase'] == 'final')
    target['metrics']['test_acc1'] = round(target['metrics']['test_acc1'] + 0.5, 2)
    moved = next(r for r in edited if r is not target)
    moved['config_hash'] = '0' * 16  # as if the config had been edited since
    (tmp / 'edited').mkdir(exist_ok=True)
    (tmp / 'edited' / 'records.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in edited))
    assert ablate.main(['reproduce', str(edited_spec), '--key', target['key'][:6], moved['key']]) == 1
    out = capsys.readouterr().out
    assert f'[key {target["key"]}]: DIFFERENT in 1 of ' in out, out
    assert f'      test_acc1: recorded {target["metrics"]["test_acc1"]!r}, now ' in out
    assert f'[key {moved["key"]}]: CHANGED, not trained: config hash {"0" * 16} then, ' in out
    assert '0 of 2 run(s) reproduced exactly, 1 different, 1 changed' in out
    assert ablate.main(['reproduce', str(edited_spec)]) == 1
    assert ablate.main(['reproduce', str(edited_spec), '--key', 'zzzz']) == 1
    err = capsys.readouterr().err
    assert 'name the runs: --key KEY' in err and "has a key starting with 'zzzz'" in err


def test_a_run_that_failed_k_times_is_reported_failed_with_its_log_and_not_submitted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    spec_path = _smoke_spec(tmp_path, 'failing')
    spec = study.load_study(spec_path)
    pair = spec.pairs[0]
    plan = study.study_plan(spec, pair, [])
    (task,) = plan['select']
    folder = jobs.events_dir(spec.workdir / pair.name, task.identity.key)
    for attempt in range(spec.launcher.max_failures):
        jobs.write_event(folder, 'submitted', job_id=str(10 + attempt), launcher='slurm')
        jobs.write_event(folder, 'failed', job_id=str(10 + attempt), error='exit status 1: CUDA out of memory',
                         tail=['Traceback (most recent call last):', 'torch.OutOfMemoryError: CUDA out of memory'])
    assert ablate.main(['status', str(spec_path), '--launcher', 'slurm']) == 0
    out = capsys.readouterr().out
    assert re.search(r'select +ce +100 +lr=0.1 +failed +10,11,12 +0, 3 failed\n', out), out
    assert '      | exit status 1: CUDA out of memory' in out and '| torch.OutOfMemoryError: CUDA out of memory' in out
    assert '2 more wait for a selected setting' in out
    monkeypatch.setattr(launchers, 'make_executor', lambda *a, **k: pytest.fail('nothing may be submitted'))
    stream = io.StringIO()
    launchers.run_study_jobs(spec, study.parse_launcher({'name': 'slurm'}, 'x', spec.launcher), stream=stream)
    assert 'failed 3 times (max_failures 3), not submitted again' in stream.getvalue()
    assert 'CUDA out of memory' in stream.getvalue()


def test_a_job_that_ends_without_a_word_is_a_failure_with_its_log_tail(tmp_path):
    log = tmp_path / '7_0_log.err'
    log.write_text('epoch 3\nKilled\n')
    folder = tmp_path / 'events'
    event = jobs.write_event(folder, 'submitted', job_id='7', launcher='slurm', log=str(log))
    spec_launcher = study.parse_launcher({'name': 'slurm', 'grace_s': 0, 'folder': str(tmp_path)}, 'x')
    driver = launchers._Driver(None, spec_launcher, io.StringIO(), True)
    flight = launchers._Flight('k', folder, event)
    assert driver.ended(flight, {'7': 'running'}, False) is None
    assert driver.ended(flight, {'7': 'ended'}, False) == 'failed'
    state = jobs.run_state(jobs.read_events(folder), None, 3)
    assert state['state'] == 'retry' and state['failures'] == 1
    assert state['last_failure']['tail'] == ['epoch 3', 'Killed'] and 'ended without a result' in \
        state['last_failure']['error']


# -- the paper-scale specs ----------------------------------------------------------------------------------
@pytest.mark.parametrize('spec,runs,gpu_hours,first', [
    ('configs/ilsvrc2012/study.yaml', 36, 'estimate: 36 runs, 2,592 GPU-hours (at most 3,024 with every edge '
                                          'extension)', '#SBATCH --array=0-17%8'),
    ('configs/glue/study.yaml', 192, 'estimate: 192 runs, 180 GPU-hours', '#SBATCH --array=0-8%9'),
])
def test_the_imagenet_and_glue_studies_dry_run_with_a_gpu_hour_estimate(spec, runs, gpu_hours, first, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(ROOT)
    assert ablate.main(['study', spec, '--dry_run']) == 0
    out = capsys.readouterr().out
    assert f'0/{runs} runs done' in out and gpu_hours in out and first in out
    for line in ('#SBATCH --requeue', '#SBATCH --nodes=1', '#SBATCH --signal=USR2@'):
        assert line in out
    loaded = study.load_study(spec)
    assert loaded.launcher.name == 'slurm' and loaded.device == 'cuda'
    if 'glue' in spec:
        assert loaded.trainer == 'glue' and len(loaded.pairs) == 8 and loaded.pairs[0].seeds == [0, 1, 2, 3, 4]
        assert {tuple(a.name for a in p.arms) for p in loaded.pairs} == {('kd', 'kd_mpo', 'kd_opdf')}
        for pair in loaded.pairs:  # selection on the dev set's first half, the report on its second
            dev = 'validation_matched' if pair.name == 'mnli' else 'validation'
            assert pair.fixed[f'+datasets.glue.dataset_id_map.{dev}[1/2]'] == pair.fixed[
                'train.val_data_loader.dataset_id'] == f'{pair.name}/dev_select'
            assert pair.fixed[f'+datasets.glue.dataset_id_map.{dev}[2/2]'] == pair.fixed[
                'test.test_data_loader.dataset_id'] == f'{pair.name}/dev_report'
    else:
        assert [a.name for a in loaded.pairs[0].arms] == ['kd', 'kd_opdf', 'at', 'at_opdf', 'crd', 'crd_opdf']
        for arm in loaded.pairs[0].arms:  # selection on the held-out training images, the report on ImageNet val
            data = study.resolved_config(arm.config)
            assert data['train']['val_data_loader']['dataset_id'] == 'ilsvrc2012/holdout'
            assert data['test']['test_data_loader']['dataset_id'] == 'ilsvrc2012/val'
            assert data['datasets']['ilsvrc2012/holdout']['value']['init']['kwargs']['part'] == 'holdout'
            assert data['datasets']['ilsvrc2012/train']['value']['init']['kwargs']['part'] == 'fit'
        check = subprocess.run([sys.executable, 'tools/ilsvrc2012_study_configs.py', '--check'], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr


def test_held_out_parts_and_dev_halves_are_fixed_disjoint_and_complete():
    import numpy as np
    from opdf_torchdistill.data import HeldOut

    class Labelled:
        targets = [i % 10 for i in range(1000)]
        classes = [str(c) for c in range(10)]

        def __getitem__(self, i):
            return i

        def __len__(self):
            return 1000

    holdout, fit = HeldOut(Labelled(), 'holdout', per_class=5), HeldOut(Labelled(), 'fit', per_class=5)
    assert len(holdout) == 50 and len(fit) == 950 and np.bincount(holdout.targets).tolist() == [5] * 10
    assert sorted(set(holdout.indices) | set(fit.indices)) == list(range(1000)) and holdout[0] == holdout.indices[0]
    assert set(HeldOut(Labelled(), 'holdout', per_class=3).indices) < set(holdout.indices)  # nested, fixed
    datasets = pytest.importorskip('datasets')
    from opdf_torchdistill.cli.glue import dev_half, split_half
    dev = datasets.Dataset.from_dict({'i': list(range(11))})
    first, second = dev_half(dev, 1)['i'], dev_half(dev, 2)['i']
    assert len(first) == 6 and len(second) == 5 and sorted(list(first) + list(second)) == list(range(11))
    assert list(first) == sorted(first) and list(dev_half(dev, 1)['i']) == list(first)
    assert split_half('validation_matched[2/2]') == ('validation_matched', 2) and split_half('test') == ('test', None)


def test_the_gpu_readiness_check_runs_on_the_cpu(gpu_check_run):
    """``tools/gpu_check.py --device cpu``: the same code as on a CUDA device, with small models and shapes."""
    proc, json_path = gpu_check_run
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert 'READY: steps finite True, contraction True, digits True' in out
    figures = json.loads(json_path.read_text())
    assert figures['ok'] and figures['contraction']['max_rel_error'] < 1e-4 and figures['digits']['ok']
    assert {(r['dtype'], r['variant']) for r in figures['steps']} == {
        (d, v) for d in ('float32', 'bf16 autocast') for v in ('KD', 'KD+OPDF')}
    assert len(figures['steps']) == 8 and all(r['finite'] and r['step_s'] > 0 for r in figures['steps'])
