"""Nothing lost, second pass (issue 23): each test is a hostile user's case that used to exit 0 or crash.

Every refusal is checked twice: the error names the problem in one line, and the file that was at
stake is byte for byte what it was (its SHA-256 unchanged)."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from opdf_torchdistill import overparameterize
from opdf_torchdistill.cli import export as export_cli
from opdf_torchdistill.cli import train as train_cli
from opdf_torchdistill.cli.config_guard import UnsafeConfigError
from opdf_torchdistill.io import CheckpointError, load_checkpoint
from opdf_torchdistill.options import OptionError
from opdf_torchdistill.runfiles import OutputError, RunLock, RunLockedError, run_state
from conftest import FAKE_KD_OPDF, ROOT, fake_run_args

CONFIG = FAKE_KD_OPDF
ONE_EPOCH = ['--set', 'train.num_epochs=1']


def sha(path) -> str:
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def cli(capsys, argv, module=train_cli) -> tuple[int, str]:
    """Exit status and stderr of a console main; the stderr of a refusal must be one ``error:`` line."""
    status = module.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return status, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and err.splitlines()[-1].startswith('error:'), err
    return lines[0]


@pytest.fixture(scope='module')
def earlier(tmp_path_factory):
    """An earlier run's files: ``best.pt``, ``best.last.pt`` and ``best.json`` (one epoch)."""
    tmp = tmp_path_factory.mktemp('earlier')
    train_cli.run(fake_run_args(tmp, 'best', *ONE_EPOCH, '--metrics_json', str(tmp / 'best.json')))
    return tmp


def base_argv(dst, *extra):
    return ['--config', CONFIG, '--device', 'cpu', '--seed', '3', *ONE_EPOCH, '--dst_ckpt', dst, *extra]


# -- 1-5: outputs never destroy inputs or an earlier run -------------------------------------------
def test_a_fresh_run_onto_an_existing_checkpoint_is_refused(earlier, capsys):
    before = {p: sha(earlier / p) for p in ('best.pt', 'best.last.pt')}
    status, err = cli(capsys, base_argv(earlier / 'best.pt'))
    assert status == 1 and 'already exist' in one_line(err) and '--resume' in err and '--force' in err
    assert {p: sha(earlier / p) for p in before} == before


def test_force_replaces_and_resume_continues(tmp_path, capsys):
    dst = tmp_path / 'r.pt'
    assert cli(capsys, base_argv(dst, '--set', 'train.num_epochs=2', '--stop_after', '1'))[0] == 0
    assert cli(capsys, base_argv(dst, '--set', 'train.num_epochs=2', '--resume'))[0] == 0
    assert load_checkpoint(tmp_path / 'r.last.pt')['epoch'] == 2
    assert cli(capsys, base_argv(dst, '--force'))[0] == 0
    assert load_checkpoint(tmp_path / 'r.last.pt')['epoch'] == 1


@pytest.mark.parametrize('role', ['--dst_ckpt', '--metrics_json', '--run_log'])
def test_no_output_may_be_the_teacher_checkpoint(tmp_path, capsys, role):
    teacher = tmp_path / 'teacher.pt'
    torch.save({'model': train_cli.build_model({'key': 'resnet32', 'kwargs': {'num_classes': 10}},
                                               torch.device('cpu')).state_dict()}, teacher)
    before = sha(teacher)
    dst = teacher if role == '--dst_ckpt' else tmp_path / 'student.pt'
    argv = base_argv(dst, '--set', f'+models.teacher_model.src_ckpt={teacher}')
    argv += [role, teacher] if role != '--dst_ckpt' else []
    status, err = cli(capsys, argv)
    assert status == 1 and 'models.teacher_model.src_ckpt' in one_line(err) and 'destroy' in err
    assert sha(teacher) == before


def test_a_symlink_or_hard_link_to_an_input_is_the_input(tmp_path, capsys):
    config = tmp_path / 'config.yaml'
    config.write_text(CONFIG.read_text())
    os.symlink(config, tmp_path / 'link.pt')
    os.link(config, tmp_path / 'hard.pt')
    before = sha(config)
    for dst in ('link.pt', 'hard.pt'):
        status, err = cli(capsys, ['--config', config, '--device', 'cpu', '--dst_ckpt', tmp_path / dst])
        assert status == 1 and 'is also --config' in one_line(err)
    assert sha(config) == before


def test_metrics_json_onto_another_checkpoint_is_refused(earlier, tmp_path, capsys):
    before = sha(earlier / 'best.pt')
    status, err = cli(capsys, base_argv(tmp_path / 'x.pt', '--metrics_json', earlier / 'best.pt'))
    assert status == 1 and 'not a JSON file' in one_line(err)
    assert sha(earlier / 'best.pt') == before and not (tmp_path / 'x.pt').exists()


def test_outputs_must_differ_from_each_other(tmp_path, capsys):
    status, err = cli(capsys, base_argv(tmp_path / 'a.pt', '--metrics_json', tmp_path / 'a.last.pt'))
    assert status == 1 and 'are the same file' in one_line(err)


def test_the_log_is_not_opened_before_the_checks(tmp_path, capsys):
    """The run log used to be opened first: the teacher became a 1.6 KB log before the check failed."""
    config = tmp_path / 'config.yaml'
    config.write_text(CONFIG.read_text())
    before = sha(config)
    status, err = cli(capsys, ['--config', config, '--device', 'cpu', '--dst_ckpt', tmp_path / 'a.pt',
                               '--run_log', config])
    assert status == 1 and '--run_log' in one_line(err) and sha(config) == before


# -- 6: one run per checkpoint ----------------------------------------------------------------------
def test_a_second_run_on_a_locked_checkpoint_is_refused_with_the_holder(tmp_path, capsys):
    dst = tmp_path / 'locked.pt'
    with RunLock(dst, ['first run']):
        status, err = cli(capsys, base_argv(dst))
        line = one_line(err)
        assert status == 1 and f'pid {os.getpid()} on {socket.gethostname()}' in line and 'locked.pt.lock' in line
        assert not dst.exists()
    assert not (tmp_path / 'locked.pt.lock').exists()  # released
    assert cli(capsys, base_argv(dst))[0] == 0  # and the checkpoint is free again
    assert not (tmp_path / 'locked.pt.lock').exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    lock = tmp_path / 'a.pt.lock'
    lock.write_text(json.dumps({'pid': int(dead.stdout), 'host': socket.gethostname(), 'started': 'then'}))
    with RunLock(tmp_path / 'a.pt') as held:
        assert json.loads(lock.read_text())['pid'] == os.getpid() == held.record['pid']
    lock.write_text(json.dumps({'pid': 1, 'host': 'another-host', 'started': 'then'}))
    with pytest.raises(RunLockedError, match='another-host.*remove'):
        RunLock(tmp_path / 'a.pt').acquire()
    assert json.loads(lock.read_text())['host'] == 'another-host'  # never broken from here


def test_two_concurrent_runs_on_one_checkpoint_one_wins(tmp_path):
    """Two processes start at once on one dst_ckpt: exactly one trains, the other is refused."""
    argv = [sys.executable, '-m', 'opdf_torchdistill.cli.train', *map(str, base_argv(tmp_path / 'c.pt',
                                                                                      '--threads', '1'))]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    runs = [subprocess.Popen(argv + ['--seed', str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT) for s in (0, 1)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code != 0)
    # overlapping: the loser is told who holds the checkpoint; if it started after the winner had
    # finished, it is refused as a fresh run onto an existing checkpoint
    assert 'in use by another run' in loser or 'already exist' in loser, loser


# -- 7: an unfinished teacher is not a finished one -----------------------------------------------
def test_the_demo_resumes_an_unfinished_teacher(tmp_path, capsys):
    from opdf_torchdistill.cli import demo
    teacher = ROOT / 'configs' / 'digits' / 'teacher.yaml'
    sets = ['--set', 'train.num_epochs=2', '--set', 'train.scheduler.kwargs.T_max=2']
    assert cli(capsys, ['--config', teacher, '--device', 'cpu', '--seed', '0', *sets, '--stop_after', '1',
                        '--dst_ckpt', tmp_path / 'teacher.pt'])[0] == 0
    assert run_state(tmp_path / 'teacher.pt', 2) == ('resume', 1)
    assert demo.main(['--out', str(tmp_path), '--epochs', '2']) == 0
    out = capsys.readouterr().out
    assert 'teacher.pt is unfinished (epoch 1 of 2); resuming it' in out
    assert run_state(tmp_path / 'teacher.pt', 2) == ('done', 2)
    assert demo.main(['--out', str(tmp_path), '--epochs', '2']) == 0  # a rerun replaces its own students
    assert 'reusing' in capsys.readouterr().out


# -- 8: bounds --------------------------------------------------------------------------------------
@pytest.mark.parametrize('value', ['-1', '0', 'abc', '2.5', 'true'])
def test_num_epochs_must_be_a_positive_integer(tmp_path, capsys, value):
    status, err = cli(capsys, base_argv(tmp_path / 'e.pt', '--set', f'train.num_epochs={value}'))
    assert status == 1 and 'train.num_epochs must be a positive integer' in one_line(err)
    assert not (tmp_path / 'e.pt').exists()


@pytest.mark.parametrize('value', ['-1', '0'])
def test_stop_after_must_be_positive(tmp_path, value):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in base_argv(tmp_path / 'e.pt', '--stop_after', value)])
    assert exc.value.code == 2


def test_a_huge_num_dummy_is_refused_before_any_allocation():
    import time
    start = time.perf_counter()
    for value in (10 ** 6, 10 ** 12):
        with pytest.raises(OptionError, match=r'48x64 weight with num_dummy=\d+ would get .* \(the limit is 64x'):
            overparameterize(nn.Linear(64, 48), num_dummy=value)
    from opdf_torchdistill import plan
    with pytest.raises(OptionError, match='the limit is 64x'):
        plan(nn.Sequential(nn.Linear(64, 48)), num_dummy=10 ** 6)
    assert time.perf_counter() - start < 30  # seconds, not minutes; the limit is generous for slow machines
    overparameterize(nn.Linear(64, 48), num_dummy=4)  # the useful range stays open


def test_a_zip_bomb_checkpoint_is_refused_before_it_is_inflated(tmp_path, capsys):
    """A checkpoint that declares far more tensor bytes than the model has: refused from its table of
    contents (the declared sizes), before anything is inflated."""
    honest = tmp_path / 'honest.pt'
    torch.save({'w': torch.zeros(4)}, honest)
    bomb = tmp_path / 'bomb.pt'
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if '/data/' in info.filename:
                data = bytes(256 * 2 ** 20)  # 256 MiB of zeros: a few hundred KB compressed
            dst.writestr(info.filename, data)
    assert bomb.stat().st_size < 2 ** 20
    status, err = cli(capsys, base_argv(tmp_path / 's.pt', '--set', f'+models.teacher_model.src_ckpt={bomb}'))
    assert status == 1 and 'declares 256.0 MiB of tensors' in one_line(err) and 'refusing to inflate' in err


# -- configs are code -----------------------------------------------------------------------------
PAYLOAD = """
log_probe: !import_call
  key: 'os.system'
  init:
    args: ['touch {marker}']
"""


@pytest.mark.parametrize('variant', ['plain', 'dependencies', 'package_field', 'torch_hub'])
def test_a_config_that_runs_code_is_refused_by_train_and_export(tmp_path, capsys, variant):
    marker = tmp_path / 'pwned'
    text = CONFIG.read_text() + PAYLOAD.format(marker=marker)
    if variant == 'dependencies':
        text = text.replace("dependencies:\n  - 'opdf_torchdistill'", "dependencies:\n  - 'opdf_torchdistill'\n  - 'os'")
    elif variant == 'package_field':
        text = text.replace("key: 'os.system'", "key: 'system'\n  package: 'os'")
    elif variant == 'torch_hub':
        text = text.replace("key: 'os.system'", "key: 'torch.hub.load'")
    config = tmp_path / 'shared_recipe.yaml'
    config.write_text(text)
    status, err = cli(capsys, ['--config', config, '--device', 'cpu', '--dst_ckpt', tmp_path / 'a.pt'])
    line = one_line(err)
    assert status == 1 and '!import_call' in line and f'{config}:' in line and '--trust_config' in line
    status, err = cli(capsys, ['--config', config, '--ckpt', tmp_path / 'a.pt', '--output', tmp_path / 'o.pt'],
                      export_cli)
    assert status != 0 and not marker.exists() and not (tmp_path / 'o.pt').exists()


def test_trust_config_runs_what_the_config_says(tmp_path, capsys):
    """The guard can be turned off, and then the config is code (docs/reliability.md says so)."""
    marker = tmp_path / 'ran'
    config = tmp_path / 'mine.yaml'
    config.write_text(CONFIG.read_text() + PAYLOAD.format(marker=marker))
    argv = ['--config', config, '--device', 'cpu', *ONE_EPOCH, '--dst_ckpt', tmp_path / 'a.pt', '--trust_config']
    assert cli(capsys, argv)[0] == 0
    assert marker.exists()


@pytest.mark.parametrize('snippet, match', [
    ("x: !setattr [1, 'a', 2]", '!setattr'),
    ("x: !getattr [1, '__class__']", 'private name'),
    ("x: {trust_remote_code: true}", 'trust_remote_code'),
    ("x: !import_get {key: 'torch.load'}", 'loads or runs code'),
    ("x: !import_get {key: 'numpy.load'}", 'outside the allowed packages'),
])
def test_other_code_paths_in_a_config_are_refused(tmp_path, snippet, match):
    config = tmp_path / 'c.yaml'
    config.write_text(CONFIG.read_text() + '\n' + snippet + '\n')
    with pytest.raises(UnsafeConfigError, match=match):
        train_cli.load_config(str(config))


def test_every_shipped_recipe_passes_the_config_guard():
    from opdf_torchdistill.cli.config_guard import check_config_tags
    recipes = sorted((ROOT / 'configs').rglob('*.yaml')) + sorted((ROOT / 'tests' / 'configs').rglob('*.yaml'))
    assert len(recipes) > 50
    for path in recipes:
        check_config_tags(str(path))


# -- one-line errors ------------------------------------------------------------------------------
def test_a_teacher_checkpoint_of_another_model_names_the_keys(tmp_path, capsys):
    wrong = tmp_path / 'wrong.pt'
    torch.save({'model': {'fc.weight': torch.zeros(3, 3), 'extra.bias': torch.zeros(2)}}, wrong)
    status, err = cli(capsys, base_argv(tmp_path / 's.pt', '--set', f'+models.teacher_model.src_ckpt={wrong}'))
    line = one_line(err)
    assert status == 1 and 'missing keys' in line and 'unexpected keys extra.bias' in line
    assert 'size mismatch fc.weight (3, 3) vs (10, 64)' in line


@pytest.mark.parametrize('content, match', [(os.urandom(200), 'not a PyTorch checkpoint'), (None, 'is a directory')])
def test_garbage_and_directories_as_checkpoints(tmp_path, capsys, content, match):
    path = tmp_path / 'ckpt.pt'
    path.mkdir() if content is None else path.write_bytes(b'Z' + content)
    status, err = cli(capsys, base_argv(tmp_path / 's.pt', '--set', f'+models.teacher_model.src_ckpt={path}'))
    assert status == 1 and match in one_line(err) and 'could run code' not in err


def test_a_missing_device_and_a_full_disk_are_one_line(tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        status, err = cli(capsys, base_argv(tmp_path / 'd.pt', '--device', 'cuda:7'))
        assert status == 1 and 'no CUDA device' in one_line(err)
    import opdf_torchdistill.io as io

    def full(obj, f, *a, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(io.torch, 'save', full)
    status, err = cli(capsys, base_argv(tmp_path / 'full.pt'))
    line = one_line(err)
    assert status == 1 and 'No space left on device while writing' in line and 'full.pt' in line
    assert not (tmp_path / 'full.pt').exists()


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError('something internal\nwith a second line')
    monkeypatch.setattr(train_cli, 'train', broken)
    status, err = cli(capsys, base_argv(tmp_path / 'x.pt'))
    assert status == 1 and one_line(err) == 'error: TypeError: something internal (run with --debug for the traceback)'
    status, err = cli(capsys, base_argv(tmp_path / 'y.pt', '--debug'))
    assert status == 1 and 'Traceback' in err and err.splitlines()[-1].startswith('error: TypeError')


def test_export_num_inputs_must_be_positive(tmp_path):
    with pytest.raises(SystemExit) as exc:
        export_cli.main(['--config', str(CONFIG), '--output', str(tmp_path / 'o.pt'), '--num_inputs', '0'])
    assert exc.value.code == 2


def test_a_yaml_syntax_error_is_one_line_with_its_line(tmp_path, capsys):
    config = tmp_path / 'broken.yaml'
    config.write_text('train:\n  num_epochs: [1, 2\nmodels: {}\n')
    status, err = cli(capsys, ['--config', config, '--device', 'cpu', '--dst_ckpt', tmp_path / 'a.pt'])
    assert status == 1 and one_line(err).startswith(f'error: {config}:') and 'not valid YAML' in err


# -- the GLUE runner: the same rules ----------------------------------------------------------------
def _glue_args(*extra):
    from opdf_torchdistill.cli import glue
    return glue.get_parser().parse_args(['--config', str(CONFIG), *map(str, extra)])


def test_glue_never_saves_the_student_into_the_teacher_folder(tmp_path):
    from opdf_torchdistill.cli import glue
    teacher = tmp_path / 'bert-teacher'
    teacher.mkdir()
    (teacher / 'model.safetensors').write_bytes(b'weights')
    plain = {'models': {'teacher_model': {'kwargs': {'pretrained_model_name_or_path': str(teacher)}},
                        'student_model': {'kwargs': {'pretrained_model_name_or_path': str(teacher)},
                                          'dst_ckpt': str(teacher)}}}
    with pytest.raises(OutputError, match='is also the config.s models.teacher_model.kwargs.pretrained_model_name'):
        glue._guard_outputs(_glue_args(), plain, str(teacher))
    plain['models']['student_model']['dst_ckpt'] = str(tmp_path / 'student')
    (tmp_path / 'student').mkdir()
    (tmp_path / 'student' / 'config.json').write_text('{}')
    with pytest.raises(OutputError, match='earlier run.s model.*--force'):
        glue._guard_outputs(_glue_args(), plain, str(tmp_path / 'student'))
    glue._guard_outputs(_glue_args('--force'), plain, str(tmp_path / 'student'))
    with pytest.raises(OutputError, match='--run_log'):
        glue._guard_outputs(_glue_args('--force', '--run_log', teacher / 'model.safetensors'), plain,
                            str(tmp_path / 'student'))
    assert (teacher / 'model.safetensors').read_bytes() == b'weights'


def test_glue_errors_are_one_line(tmp_path, capsys):
    from opdf_torchdistill.cli import glue
    status, err = cli(capsys, ['--config', tmp_path / 'missing.yaml'], glue)
    assert status == 1 and 'no such config file' in one_line(err)


def test_glue_saves_the_student_folder_atomically(tmp_path, monkeypatch):
    from opdf_torchdistill.cli.glue import save_pretrained_atomic

    class Saver:
        def __init__(self, files, fail=False):
            self.files, self.fail = files, fail

        def save_pretrained(self, folder):
            os.makedirs(folder, exist_ok=True)
            for name, data in self.files.items():
                with open(os.path.join(folder, name), 'wb') as f:
                    f.write(data)
                os.chmod(os.path.join(folder, name), 0o600)  # as transformers' safetensors writer leaves it
                if self.fail:
                    raise OSError(28, 'No space left on device')

    dst = tmp_path / 'student'
    save_pretrained_atomic(dst, Saver({'model.safetensors': b'v1', 'config.json': b'{}'}))
    old = os.umask(0o022)
    try:
        with pytest.raises(OSError):
            save_pretrained_atomic(dst, Saver({'model.safetensors': b'v2-partial'}, fail=True))
        assert (dst / 'model.safetensors').read_bytes() == b'v1'  # the earlier best is whole
        save_pretrained_atomic(dst, Saver({'model.safetensors': b'v2'}))
    finally:
        os.umask(old)
    assert sorted(p.name for p in dst.iterdir()) == ['model.safetensors']
    assert (dst / 'model.safetensors').read_bytes() == b'v2' and (dst / 'model.safetensors').stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ['student']  # no temporary folder left behind


def test_teacher_ckpt_and_timm_weights_go_through_the_safe_loader(tmp_path):
    """A pickled payload as a model factory's ``teacher_ckpt``/``weights``: refused naming the file (it used
    to be a raw UnpicklingError), loaded when the command line trusts that file."""
    import argparse
    from opdf_torchdistill.io import UnsafeCheckpointError, trusted_checkpoints
    from opdf_torchdistill.zoo import FashionViT, fashion_vit_from_teacher
    teacher = FashionViT(2, 16, 2, 32, 7, 28, 10, 1)
    path = tmp_path / 'teacher.pt'
    torch.save({'model': teacher.state_dict(), 'extra': argparse.Namespace(a=1)}, path)  # not plain data
    with pytest.raises(UnsafeCheckpointError, match=f'{path}.*--trust_checkpoint'):
        fashion_vit_from_teacher(str(path), layer_map='first', depth=1, dim=16, heads=2, mlp_dim=32, patch=7)
    with trusted_checkpoints([str(path)]):
        student = fashion_vit_from_teacher(str(path), layer_map='first', depth=1, dim=16, heads=2, mlp_dim=32, patch=7)
    assert torch.equal(student.blocks[0].attn.query.weight, teacher.blocks[0].attn.query.weight)
    timm = pytest.importorskip('timm')
    from opdf_torchdistill.timm_models import load_weights_file
    model = timm.create_model('resnet10t', pretrained=False, num_classes=4)
    torch.save({'model': model.state_dict(), 'extra': argparse.Namespace(a=1)}, tmp_path / 'w.pt')
    with pytest.raises(UnsafeCheckpointError, match='w.pt'):
        load_weights_file(model, str(tmp_path / 'w.pt'), 'timm_model')
    torch.save({'model': {'fc.weight': torch.zeros(1)}}, tmp_path / 'wrong.pt')
    with pytest.raises(CheckpointError, match='timm_model: weights .*wrong.pt.* missing keys'):
        load_weights_file(model, str(tmp_path / 'wrong.pt'), 'timm_model')


def test_an_unreachable_url_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    status, err = cli(capsys, base_argv(tmp_path / 's.pt', '--set',
                                        '+models.teacher_model.src_ckpt=http://example.invalid/t.pt'))
    line = one_line(err)
    assert status == 1 and 'models.teacher_model.src_ckpt: cannot load http://example.invalid/t.pt: URLError' in line
