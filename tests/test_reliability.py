"""Reliability: clear errors, robust numerics, exact resume, atomic outputs, AMP, fuzzing."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from opdf_torchdistill import MPOError, contract, mpo, overparameterize
from opdf_torchdistill.cli.train import get_parser, run
from opdf_torchdistill.io import atomic_torch_save
from conftest import ROOT, rel
from models import ConvZoo

CONFIGS = ROOT / 'tests' / 'configs'


# -- fuzzing ----------------------------------------------------------------------------------
@st.composite
def factorizations(draw):
    n = draw(st.integers(1, 4))
    rows = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    cols = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    dummies = draw(st.integers(0, 2))
    at = draw(st.integers(0, n))
    rows = rows[:at] + [1] * dummies + rows[at:]
    cols = cols[:at] + [1] * dummies + cols[at:]
    return rows, cols


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(factorizations(), st.sampled_from([torch.float64, torch.float32]), st.sampled_from(['randn', 'lowrank', 'zeros', 'scaled']),
       st.integers(0, 2 ** 31 - 1), st.booleans())
def test_fuzz_decompose_reconstruct_is_exact_or_refused(fac, dtype, kind, seed, wrong_shape):
    rows, cols = fac
    shape = (int(torch.tensor(rows).prod()), int(torch.tensor(cols).prod()))
    g = torch.Generator().manual_seed(seed)
    if wrong_shape:
        shape = (shape[0] + 1, shape[1])
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == 'lowrank':
        w = w[:, :1] @ w[:1, :]
    elif kind == 'zeros':
        w = torch.zeros_like(w)
    elif kind == 'scaled':
        w = w * 10.0 ** float(torch.randint(-20, 20, (1,), generator=g))
    w = w.to(dtype)
    if wrong_shape:
        with pytest.raises(MPOError, match='do not multiply'):
            mpo.decompose(w, rows, cols)
        return
    cores = mpo.decompose(w, rows, cols)
    assert rel(mpo.reconstruct(cores), w) <= (1e-12 if dtype == torch.float64 else 1e-5)


# -- numerics ---------------------------------------------------------------------------------
def test_svd_failure_falls_back_to_another_driver(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise torch._C._LinAlgError('simulated: the algorithm failed to converge')
    monkeypatch.setattr(torch.linalg, 'svd', broken)
    w = torch.randn(24, 30, dtype=torch.float64)
    cores = mpo.decompose(w, (6, 1, 4), (6, 1, 5))  # a tall unfolding (36 x 20): the SVD path
    assert calls and rel(mpo.reconstruct(cores), w) <= 1e-12
    monkeypatch.setattr(torch.linalg, 'eigh', broken)
    cores = mpo.decompose(w, (4, 1, 6), (5, 1, 6))  # a wide one: eigh fails, then the SVD fails too
    assert len(calls) >= 3 and rel(mpo.reconstruct(cores), w) <= 1e-12


def test_ill_conditioned_weights_in_a_model_stay_exact():
    model = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 32))
    with torch.no_grad():
        u, _, v = torch.linalg.svd(torch.randn(64, 48), full_matrices=False)
        model[0].weight.copy_((u * torch.logspace(3, -9, 48)) @ v)       # condition number 1e12
        model[1].weight.copy_(torch.randn(32, 2) @ torch.randn(2, 64))  # rank 2
    x = torch.randn(5, 48)
    with torch.no_grad():
        ref = model(x)
        overparameterize(model)
        assert rel(model(x), ref) <= 1e-5


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_training_step_and_exact_contraction(dtype):
    model = ConvZoo()
    overparameterize(model)
    x = torch.randn(4, 256)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with torch.autocast('cpu', dtype=dtype):
        out = model(x)
        assert model.head.weight.dtype == torch.float32  # the contraction ran in float32
    loss = out.float().square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    model.eval()
    with torch.no_grad():
        before = model(x)
        contract(model)
        assert rel(model(x), before) <= 1e-5


def test_nan_in_a_dense_checkpoint_names_the_key():
    model = nn.Sequential(nn.Linear(8, 8))
    overparameterize(model)
    state = {'0.weight': torch.full((8, 8), float('nan')), '0.bias': torch.zeros(8)}
    with pytest.raises(MPOError, match=r'0\.weight: checkpoint weight contains NaN or Inf'):
        model.load_state_dict(state)


# -- resume -----------------------------------------------------------------------------------
def _train(tmp_path, name, *extra):
    args = ['--config', str(CONFIGS / 'kd_opdf_fake.yaml'), '--device', 'cpu', '--seed', '3',
            '--set', f'models.student_model.dst_ckpt={tmp_path / name}.pt', '--set', 'train.num_epochs=3',
            '--set', 'train.scheduler.kwargs.milestones=[2]', *extra]
    return run(get_parser().parse_args(args))


def test_resume_is_bit_identical_on_cpu(tmp_path):
    _train(tmp_path, 'full')
    metrics, _, _ = _train(tmp_path, 'split', '--stop_after', '1')
    assert metrics['stopped_at_epoch'] == 1 and 'test' not in metrics
    _train(tmp_path, 'split', '--resume')
    full = torch.load(tmp_path / 'full.last.pt', weights_only=True)  # resume files are plain data
    split = torch.load(tmp_path / 'split.last.pt', weights_only=True)
    assert full['epoch'] == split['epoch'] == 3
    assert full['model'].keys() == split['model'].keys()
    assert all(torch.equal(full['model'][k], split['model'][k]) for k in full['model'])
    assert [h['train_loss'] for h in full['history']] == [h['train_loss'] for h in split['history']]
    f_state, s_state = full['optimizer']['state'], split['optimizer']['state']
    assert all(torch.equal(f_state[k]['momentum_buffer'], s_state[k]['momentum_buffer']) for k in f_state)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='--resume: no checkpoint'):
        _train(tmp_path, 'nothing', '--resume')


# -- atomic outputs ---------------------------------------------------------------------------
def test_a_failing_writer_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / 'ckpt.pt'
    atomic_torch_save({'v': 1}, target)

    def explode(obj, f, *args, **kwargs):
        f.write(b'partial bytes')
        raise OSError('disk full (simulated)')
    monkeypatch.setattr(torch, 'save', explode)
    with pytest.raises(OSError, match='disk full'):
        atomic_torch_save({'v': 2}, target)
    assert torch.load(target)['v'] == 1  # the previous version is intact
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']  # no temporary file left


def test_a_killed_writer_never_leaves_a_partial_destination(tmp_path):
    target = tmp_path / 'export.pt'
    script = (
        'import sys, time, torch\n'
        'from opdf_torchdistill.io import atomic_write\n'
        'def slow(f):\n'
        '    for _ in range(10000):\n'
        '        f.write(b"x" * 4096); f.flush(); time.sleep(0.001)\n'
        f'atomic_write(r"{target}", slow)\n')
    proc = subprocess.Popen([sys.executable, '-c', script], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob('.export.pt.*.tmp')):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = list(tmp_path.glob('.export.pt.*.tmp'))
    assert leftovers and leftovers[0].stat().st_size > 0  # the killed write was under way
    atomic_torch_save({'ok': True}, target)  # the next write succeeds and sweeps the leftover
    assert torch.load(target)['ok'] and not list(tmp_path.glob('.export.pt.*.tmp'))
