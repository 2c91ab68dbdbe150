"""The embedded digits data, its configs, the main job and the ablation runner."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from opdf_torchdistill import study
from opdf_torchdistill.cli import ablate
from opdf_torchdistill.study import runner
from opdf_torchdistill.cli.train import get_parser, run
from opdf_torchdistill.data import Digits, digits_split_indices
from conftest import ROOT

DIGITS = ROOT / 'configs' / 'digits'


def test_split_is_deterministic_disjoint_and_stratified():
    a, b = digits_split_indices(0), digits_split_indices.__wrapped__(0)
    for k in ('train', 'val', 'test'):
        assert np.array_equal(a[k], b[k])
    sets = [set(a[k].tolist()) for k in ('train', 'val', 'test')]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == 1797
    labels = np.array([Digits('test').targets.tolist()]).ravel()
    assert np.bincount(labels).min() >= 34  # every class, in proportion (about 36 each)
    quarter = digits_split_indices(0, train_fraction=0.25)
    assert set(quarter['train'].tolist()) <= sets[0] and np.array_equal(quarter['test'], a['test'])
    assert not np.array_equal(digits_split_indices(1)['test'], a['test'])


def test_dataset_items_resize_and_normalisation():
    train = Digits('train')
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert abs(train.images.mean().item()) < 1e-5 and abs(train.images.std().item() - 1) < 1e-3
    assert Digits('val', image_size=16)[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="split must be one of"):
        Digits('training')


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pt'
    run(get_parser().parse_args(['--config', str(DIGITS / 'teacher.yaml'), '--device', 'cpu', '--seed', '0',
                                 '--set', 'train.num_epochs=1', '--dst_ckpt', str(path)]))
    return path


@pytest.mark.parametrize('name', ['student_ce', 'kd', 'kd_svd', 'kd_mpo', 'kd_opdf', 'at', 'at_opdf'])
def test_every_digits_config_trains_one_epoch(name, teacher_ckpt, tmp_path):
    argv = ['--config', str(DIGITS / f'{name}.yaml'), '--device', 'cpu', '--seed', '0', '--set', 'train.num_epochs=1',
            '--dst_ckpt', str(tmp_path / 'student.pt')]
    if name != 'student_ce':
        argv += ['--set', f'models.teacher_model.src_ckpt={teacher_ckpt}']
    metrics, student, _ = run(get_parser().parse_args(argv))
    assert 0 <= metrics['test']['acc1'] <= 100 and (tmp_path / 'student.pt').exists()
    assert (metrics['train_params'] > metrics['inference_params']) == ('opdf' in name or 'svd' in name or 'mpo' in name)


def test_main_job_prints_the_comparison_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'digits_demo.py'), '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert 'KD + OPDF exported (plain)' in out and 'same predictions on all 360 test images' in out
    assert (tmp_path / 'kd_opdf_exported.pt').exists() and (tmp_path / 'teacher.pt').exists()
    rows = {line.split('  ')[0]: line.split() for line in out.splitlines() if line.startswith(('KD', 'student', 'teacher'))}
    assert rows['KD + OPDF exported (plain)'][-4] == rows['KD + OPDF (MPO form)'][-4]  # same accuracy


# -- the ablation runner on a fake run -----------------------------------------------------------
def _fake_execute(config, seed, overrides, workdir, device, isolate, *rest):
    lr = overrides.get('lr', 0.1)
    base = {'a': 90.0, 'b': 91.0}[config.split('/')[-1].split('.')[0]]
    acc = base + seed * 0.5 - abs(math.log10(lr) + 1)  # best at lr 0.1
    if lr >= 1.0 and 'b' in config:
        return {'status': 'diverged', 'metrics': {}, 'error': 'loss is nan'}
    return {'status': 'ok', 'error': None, 'metrics': {'test_acc1': acc, 'best_val_acc1': acc + 1, 'test_acc5': 100,
                                                        'test_loss': 0.1, 'train_params': 20, 'inference_params': 10,
                                                        'ratio': 2.0, 'train_seconds': 0.1}}


def test_ablation_runner_resumes_and_aggregates(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, '_execute', lambda *a: calls.append(a) or _fake_execute(*a))
    out = tmp_path / 'runs.jsonl'
    for name in ('a', 'b'):  # record keys hash the resolved config, so the configs must exist
        (tmp_path / f'{name}.yaml').write_text(f'lr: 0.1\nmodels: {{model: {{key: {name}}}}}\n')
    a, b = str(tmp_path / 'a.yaml'), str(tmp_path / 'b.yaml')
    args = ['run', '--configs', a, b, '--seeds', '0', '1', '2', '--grid', 'lr=0.01,0.1,1.0',
            '--out', str(out), '--tune', 'lr', '--baseline', 'a', '--plots', str(tmp_path / 'plots'), '--lr_key', 'lr']
    assert ablate.main(args) == 0
    assert len(calls) == 18 and len(study.load_records(out)) == 18
    assert ablate.main(args) == 0
    assert len(calls) == 18  # everything recorded: nothing re-run
    records = study.load_records(out)
    records = [r for r in records if not (r['name'] == 'a' and r['seed'] == 2 and r['overrides']['lr'] == 0.01)]
    out.write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert ablate.main(args) == 0
    assert len(calls) == 19  # only the missing run
    rows = {r['name']: r for r in study.summarize(study.load_records(out), ['lr'], 'a')}
    assert rows['a']['overrides']['lr'] == 0.1 and rows['b']['overrides']['lr'] == 0.1
    mean, std, half = study.mean_ci([90.0, 90.5, 91.0])
    assert rows['a']['test_mean'] == pytest.approx(90.5) == pytest.approx(mean)
    assert rows['a']['test_std'] == pytest.approx(0.5) and rows['a']['test_ci95'] == pytest.approx(half)
    assert half == pytest.approx(4.302652729911275 * 0.5 / math.sqrt(3))  # t(0.975, 2 df)
    d = rows['b']['vs_baseline']
    assert d['n'] == 3 and d['mean'] == pytest.approx(1.0) and d['p'] == 0.0
    diverged = [r for r in study.summarize(study.load_records(out)) if r['name'] == 'b' and r['overrides']['lr'] == 1.0]
    assert diverged[0]['diverged'] == 3 and diverged[0]['n'] == 0
    assert (tmp_path / 'plots' / 'methods.png').exists() and (tmp_path / 'plots' / 'lr.png').exists()
