"""Checkpoints are data, not code (issue 15): every load site reads with ``weights_only=True``, refuses a
pickled payload without running it (naming the file), and opens one file on ``--trust_checkpoint``."""
import os
import random
import shutil

import numpy as np
import pytest
import torch

from opdf_torchdistill.cli import export as export_cli
from opdf_torchdistill.cli import train as train_cli
from opdf_torchdistill.cli.train import run
from opdf_torchdistill.io import CheckpointError, UnsafeCheckpointError, load_checkpoint
from conftest import FAKE_KD_OPDF, fake_run_args

CONFIG = FAKE_KD_OPDF


class _Payload:
    """Unpickling this runs a shell command that creates the marker file (what an attacker would ship)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _malicious(path, marker, state=None):
    torch.save({'model': state or {}, 'note': _Payload(marker)}, path)
    return path

_args = fake_run_args


def test_what_the_runner_saves_loads_as_plain_data(trained):
    best = torch.load(trained / 'run.pt', weights_only=True)
    last = torch.load(trained / 'run.last.pt', weights_only=True)
    assert last['epoch'] == 1 and last['config']['train']['num_epochs'] == 2
    assert set(best['model']) == set(last['model'])
    assert isinstance(last['rng']['numpy']['key'], torch.Tensor)


def test_rng_states_round_trip_through_a_plain_checkpoint(tmp_path):
    random.seed(5)
    np.random.seed(5)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    torch.save(train_cli._rng_state(), tmp_path / 'rng.pt')
    expected = (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(2))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    train_cli._set_rng_state(torch.load(tmp_path / 'rng.pt', weights_only=True))
    got = (random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_load_checkpoint_refuses_a_payload_without_running_it(tmp_path):
    marker = tmp_path / 'pwned'
    path = _malicious(tmp_path / 'evil.pt', marker)
    with pytest.raises(UnsafeCheckpointError, match=r'evil\.pt: refusing to load.*posix\.system.*--trust_checkpoint'):
        load_checkpoint(path)
    assert not marker.exists()
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'evil.pt').read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r'cut\.pt: cannot read the checkpoint.*truncated'):
        load_checkpoint(tmp_path / 'cut.pt')


@pytest.mark.parametrize('key', ['models.teacher_model.src_ckpt', 'models.student_model.src_ckpt',
                                 'train.teacher.src_ckpt'])
def test_src_ckpt_payload_is_refused(tmp_path, key):
    marker = tmp_path / 'pwned'
    path = _malicious(tmp_path / 'evil.pt', marker)
    with pytest.raises(UnsafeCheckpointError, match=r'evil\.pt: refusing to load'):
        run(_args(tmp_path, 'x', '--set', f'+{key}={path}'))
    assert not marker.exists()
    assert not (tmp_path / 'x.pt').exists()


def test_resume_and_test_only_payloads_are_refused(tmp_path, trained):
    marker = tmp_path / 'pwned'
    evil = _malicious(tmp_path / 'evil.last.pt', marker)
    with pytest.raises(UnsafeCheckpointError, match=r'evil\.last\.pt: refusing to load'):
        run(_args(tmp_path, 'r', '--resume', str(evil)))
    _malicious(tmp_path / 'best.pt', marker)
    with pytest.raises(UnsafeCheckpointError, match=r'best\.pt: refusing to load'):
        run(_args(tmp_path, 'best', '-test_only'))
    assert not marker.exists()
    assert train_cli.main(['--config', str(CONFIG), '--device', 'cpu', '-test_only',
                           '--set', f'models.student_model.dst_ckpt={tmp_path / "best.pt"}']) == 1
    assert not marker.exists()


def test_export_payload_is_refused(tmp_path, capsys):
    marker = tmp_path / 'pwned'
    evil = _malicious(tmp_path / 'evil.pt', marker)
    status = export_cli.main(['--config', str(CONFIG), '--ckpt', str(evil), '--output', str(tmp_path / 'out.pt')])
    assert status == 1 and not marker.exists() and not (tmp_path / 'out.pt').exists()
    assert 'evil.pt: refusing to load' in capsys.readouterr().err


def test_old_resume_file_needs_trust_and_then_resumes(tmp_path, trained):
    """A first-release ``.last.pt`` holds NumPy RNG objects: refused as it is, resumed with --trust_checkpoint."""
    shutil.copy(trained / 'run.pt', tmp_path / 'old.pt')
    old = torch.load(trained / 'run.last.pt', weights_only=True)
    old['rng']['numpy'] = np.random.get_state()  # the legacy tuple with an ndarray
    old['best_value'] = old['best_value']
    del old['config'], old['classes']
    torch.save(old, tmp_path / 'old.last.pt')
    with pytest.raises(UnsafeCheckpointError, match=r'old\.last\.pt: refusing to load.*numpy'):
        run(_args(tmp_path, 'old', '--resume'))
    metrics, _, _ = run(_args(tmp_path, 'old', '--resume', '--trust_checkpoint', str(tmp_path / 'old.last.pt')))
    assert [h['epoch'] for h in metrics['history']] == [1, 2] and 'test' in metrics
    assert torch.load(tmp_path / 'old.last.pt', weights_only=True)['epoch'] == 2  # rewritten in the new format
