"""Hostile inputs and faults (issue 12): each test reproduces a defect of the first release."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from opdf_torchdistill import MPOError, overparameterize
from opdf_torchdistill.cli import export as export_cli
from opdf_torchdistill.cli import train as train_cli
from opdf_torchdistill.cli.common import ConfigError, apply_overrides, load_config, parse_value
from opdf_torchdistill.cli.train import DivergedError, ResumeError, get_parser, run
from opdf_torchdistill.io import CheckpointError, atomic_torch_save, atomic_write_text
from opdf_torchdistill.options import OptionError
from conftest import FAKE_KD_OPDF, ROOT, fake_run_args

CONFIG = FAKE_KD_OPDF

_args = fake_run_args


# -- 1. divergence ------------------------------------------------------------------------------
def test_a_non_finite_buffer_stops_the_run_and_is_never_saved(tmp_path, monkeypatch):
    """Loss finite, BatchNorm running_var Inf (what lr=30 did on digits): epoch 1 is kept, epoch 2 is not saved."""
    original = train_cli._train_one_epoch

    def diverging(box, device, epoch, *rest, **kwargs):
        stats = original(box, device, epoch, *rest, **kwargs)
        if epoch == 1:
            train_cli._unwrap(box.student_model).bn1.running_var.fill_(float('inf'))
        return stats
    monkeypatch.setattr(train_cli, '_train_one_epoch', diverging)
    with pytest.raises(DivergedError, match=r'epoch 2: training diverged: the student has NaN/Inf in bn1\.running_var'):
        run(_args(tmp_path, 'div'))
    best = torch.load(tmp_path / 'div.pt', weights_only=True)
    last = torch.load(tmp_path / 'div.last.pt', weights_only=True)
    assert last['epoch'] == 1  # the diverged epoch wrote nothing
    assert all(torch.isfinite(v).all() for v in best['model'].values() if v.is_floating_point())
    assert train_cli.non_finite_tensors(nn.BatchNorm1d(2)) == []


def test_export_refuses_non_finite_weights(tmp_path, trained, capsys):
    ckpt = torch.load(trained / 'run.pt', weights_only=True)
    ckpt['model']['bn1.running_var'][0] = float('inf')
    torch.save(ckpt, tmp_path / 'bad.pt')
    status = export_cli.main(['--config', str(CONFIG), '--ckpt', str(tmp_path / 'bad.pt'),
                              '--output', str(tmp_path / 'plain.pt')])
    assert status == 1 and 'NaN/Inf in' in capsys.readouterr().err and not (tmp_path / 'plain.pt').exists()


# -- 2. missing src_ckpt ------------------------------------------------------------------------
@pytest.mark.parametrize('key', ['teacher_model', 'student_model'])
def test_a_missing_src_ckpt_is_an_error(tmp_path, key):
    with pytest.raises(FileNotFoundError, match=rf"models\.{key}\.src_ckpt: checkpoint '.*teahcer\.pt' does not exist"):
        run(_args(tmp_path, 'x', '--set', f'+models.{key}.src_ckpt={tmp_path}/teahcer.pt'))


# -- 3. export never destroys files --------------------------------------------------------------
def test_export_refuses_to_overwrite(tmp_path, trained, capsys):
    ckpt = trained / 'run.pt'
    base = ['--config', str(CONFIG), '--ckpt', str(ckpt)]
    before = ckpt.read_bytes()
    assert export_cli.main(base + ['--output', str(trained / '.' / 'run.pt')]) == 1
    assert 'is also the checkpoint being exported' in capsys.readouterr().err
    assert export_cli.main(base + ['--output', str(tmp_path / 'x.json')]) == 1
    assert 'also where the summary JSON goes' in capsys.readouterr().err
    assert ckpt.read_bytes() == before and not (tmp_path / 'x.json').exists()
    (tmp_path / 'plain.pt').write_bytes(b'keep me')
    assert export_cli.main(base + ['--output', str(tmp_path / 'plain.pt')]) == 1
    assert 'pass --force' in capsys.readouterr().err and (tmp_path / 'plain.pt').read_bytes() == b'keep me'
    assert export_cli.main(base + ['--output', str(tmp_path / 'plain.pt'), '--force']) == 0
    summary = __import__('json').loads((tmp_path / 'plain.json').read_text())
    assert summary['weights_checked'] == 22 and summary['max_relative_weight_difference_float64'] <= 1e-5
    assert torch.load(tmp_path / 'plain.pt', weights_only=True).keys() >= {'conv1.weight', 'fc.weight'}


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text('x', tmp_path / 'f.txt')
    finally:
        os.umask(old)
    assert (tmp_path / 'f.txt').stat().st_mode & 0o777 == 0o666 & ~umask


# -- 4. tied weights ----------------------------------------------------------------------------
def test_tied_linears_are_refused_with_both_names():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.raises(OptionError, match=r"0\.weight is the same Parameter as 2\.weight \(tied weights\).*exclude"):
        overparameterize(model)
    assert model[0].weight is model[2].weight  # untouched
    overparameterize(model, exclude=['^0$', '^2$'])  # the suggested way out works


def test_tied_embedding_and_decoder_are_refused():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.body = nn.Linear(8, 8)
            self.decoder = nn.Linear(8, 16, bias=False)
            self.decoder.weight = self.embed.weight
    with pytest.raises(OptionError, match=r'decoder\.weight is the same Parameter as embed\.weight'):
        overparameterize(LM())


# -- 5. config overrides ------------------------------------------------------------------------
def test_overrides_must_name_existing_keys():
    config = load_config(str(CONFIG))
    with pytest.raises(ConfigError, match=r"no key 'optimzer' under train; did you mean 'optimizer'"):
        apply_overrides(config, ['train.optimzer.kwargs.lr=0.1'])
    with pytest.raises(ConfigError, match=r"no key 'lrr'.*did you mean 'lr'.*--set \+train\.optimizer\.kwargs\.lrr"):
        apply_overrides(config, ['train.optimizer.kwargs.lrr=0.1'])
    apply_overrides(config, ['train.optimizer.kwargs.lr=1e-3', '+train.optimizer.kwargs.nesterov=true'])
    assert config['train']['optimizer']['kwargs']['lr'] == 0.001 and config['train']['optimizer']['kwargs']['nesterov']
    assert [parse_value(v) for v in ('1e-3', '5E4', '-2e+5', '0.5', '3', 'abc', '[1, 2]')] == \
        [0.001, 50000.0, -200000.0, 0.5, 3, 'abc', [1, 2]]


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / 'dup.yaml'
    path.write_text(CONFIG.read_text().replace(
        "    forward_hook: {output: ['opdf']}\n    requires_grad: True",
        "    forward_hook: {output: ['opdf']}\n    requires_grad: True\n    forward_hook: {output: ['opdf']}"))
    line = path.read_text().splitlines().index("    forward_hook: {output: ['opdf']}", 70) + 1
    with pytest.raises(ConfigError, match=rf"dup\.yaml:{line}: duplicate key 'forward_hook' \(first at line "):
        load_config(str(path))


def test_resume_refuses_a_changed_config_and_optimizer(tmp_path, trained):
    for name in ('run.pt', 'run.last.pt'):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    with pytest.raises(ResumeError, match=r'config differs[^\n]*\n  train\.optimizer\.kwargs\.lr: 0\.01 -> 0\.02\n'
                                          r'.*--resume_changed_config'):
        run(_args(tmp_path, 'run', '--resume', '--set', 'train.optimizer.kwargs.lr=0.02'))
    with pytest.raises(ResumeError, match=r"checkpoint's optimizer is SGD, the config builds Adam"):
        run(_args(tmp_path, 'run', '--resume', '--resume_changed_config', '--set', 'train.optimizer.key=Adam',
                  '--set', 'train.optimizer.kwargs={lr: 0.01}'))


# -- 6. NaN cores -------------------------------------------------------------------------------
def test_an_mpo_checkpoint_with_nan_cores_is_refused_by_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    overparameterize(model)
    state = model.state_dict()
    state['1.parametrizations.weight.original0'][0, 0, 0, 0] = float('nan')
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    overparameterize(fresh)
    with pytest.raises(MPOError, match=r'1: checkpoint MPO cores contain NaN or Inf '
                                       r'\(1\.parametrizations\.weight\.original0\)'):
        fresh.load_state_dict(state)


# -- 7. concurrent writers ----------------------------------------------------------------------
def test_the_stale_sweep_spares_a_live_writer(tmp_path):
    from opdf_torchdistill import io
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        live = tmp_path / f'.ckpt.pt.{io._HOST}.{sleeper.pid}.abc123.tmp'
        live.write_bytes(b'being written')
        dead = tmp_path / f'.ckpt.pt.{io._HOST}.999999999.abc124.tmp'
        dead.write_bytes(b'left by a killed writer')
        atomic_torch_save({'v': 1}, tmp_path / 'ckpt.pt')
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    atomic_torch_save({'v': 2}, tmp_path / 'ckpt.pt')
    assert not live.exists()  # its writer is gone now


# -- 9. clear messages instead of tracebacks ----------------------------------------------------
def test_resume_from_a_best_or_truncated_checkpoint(tmp_path, trained):
    with pytest.raises(ResumeError, match=r'run\.pt: not a resume checkpoint.*Resume from .*\.last\.pt'):
        run(_args(tmp_path, 'x', '--resume', str(trained / 'run.pt')))
    data = (trained / 'run.last.pt').read_bytes()
    (tmp_path / 'cut.last.pt').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r'cut\.last\.pt: cannot read the checkpoint'):
        run(_args(tmp_path, 'cut', '--resume'))


def test_an_unwritable_dst_ckpt_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / 'afile').write_text('not a directory')
    monkeypatch.setattr(train_cli, 'train', lambda *a, **k: pytest.fail('training started'))
    with pytest.raises(PermissionError, match=r'models\.student_model\.dst_ckpt: cannot write to .*afile'):
        run(_args(tmp_path, 'afile/ckpt'))


def test_lazy_meta_and_list_options_are_clear_errors():
    from torchdistill.models.registry import get_model
    with pytest.raises(OptionError, match=r'0\.weight \(LazyLinear\) is not initialised yet'):
        overparameterize(nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 8)))
    with torch.device('meta'):
        meta = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(OptionError, match=r'0\.weight \(Linear\) is on the meta device'):
        overparameterize(meta)
    with pytest.raises(OptionError, match=r'mpo must be a mapping of options.*got a list'):
        get_model('opdf_student', base='resnet20', num_classes=10, mpo=[{'num_dummy': 1}])


def test_a_hooked_probe_without_its_wrapper_is_named(tmp_path):
    config = tmp_path / 'noprobe.yaml'
    config.write_text(CONFIG.read_text().replace("    auxiliary_model_wrapper: {key: 'opdf_probe'}\n", ''))
    args = get_parser().parse_args(['--config', str(config), '--device', 'cpu',
                                    '--set', f'models.student_model.dst_ckpt={tmp_path / "x.pt"}'])
    with pytest.raises(ConfigError, match=r"train\.teacher\.forward_hook\.output: the teacher model "
                                          r"\(ResNet4Cifar\) has no module 'opdf'; "
                                          r".*auxiliary_model_wrapper: \{key: 'opdf_probe'\}"):
        run(args)


def test_console_mains_return_exit_statuses(tmp_path, trained, capsys):
    argv = ['--config', str(CONFIG), '--device', 'cpu', '-test_only', '--set',
            f'models.student_model.dst_ckpt={trained / "run.pt"}']
    assert train_cli.main(argv) == 0
    assert train_cli.main(argv[:-1] + [f'models.student_model.dst_ckpt={tmp_path / "none.pt"}']) == 1
    assert '-test_only: no checkpoint at' in capsys.readouterr().err


# -- 10. teacher mode and distributed buffers ---------------------------------------------------
def test_a_frozen_teacher_inside_a_trainable_wrapper_stays_in_eval():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for p in teacher.parameters():
        p.requires_grad_(False)
    wrapper = nn.ModuleDict({'teacher': teacher, 'head': nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4),
                                                                       nn.BatchNorm1d(4, affine=False))})
    wrapper.train()
    train_cli._eval_frozen(wrapper)
    assert not teacher.training and not teacher[1].training
    assert wrapper.training and all(m.training for m in wrapper['head'].modules())


def test_sync_buffers_makes_every_rank_hold_rank0s_statistics(tmp_path):
    script = textwrap.dedent(f'''
        import os, sys, torch
        from torch import distributed as dist, multiprocessing as mp, nn
        from opdf_torchdistill.cli.train import sync_buffers

        def work(rank):
            os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29541')
            dist.init_process_group('gloo', rank=rank, world_size=2)
            model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
            model[1].running_mean.fill_(rank + 1.0)
            model[1].num_batches_tracked.fill_(10 * rank + 3)
            sync_buffers(model)
            torch.save(dict(model[1].named_buffers()), r'{tmp_path}/rank%d.pt' % rank)
            dist.destroy_process_group()

        if __name__ == '__main__':
            mp.start_processes(work, nprocs=2, start_method='fork')  # import once: spawn re-imports per rank
        ''')
    (tmp_path / 'sync.py').write_text(script)
    subprocess.run([sys.executable, str(tmp_path / 'sync.py')], check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    r0, r1 = (torch.load(tmp_path / f'rank{k}.pt', weights_only=True) for k in (0, 1))
    assert torch.equal(r1['running_mean'], torch.ones(4)) and int(r1['num_batches_tracked']) == 3
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
