import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Two cores are all CI has; never oversubscribe them (BLAS/SVD collapse when threads fight).
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    n = b.norm().item()
    return ((a - b).norm().item() / n) if n > 0 else (a - b).norm().item()


FAKE_KD_OPDF = ROOT / 'tests' / 'configs' / 'kd_opdf_fake.yaml'


def fake_run_args(tmp, name, *extra):
    """Runner arguments for the tiny KD + OPDF run on FakeData, writing ``<tmp>/<name>.pt``."""
    from opdf_torchdistill.cli.train import get_parser
    return get_parser().parse_args(['--config', str(FAKE_KD_OPDF), '--device', 'cpu', '--seed', '3',
                                    '--set', f'models.student_model.dst_ckpt={tmp / name}.pt', *extra])


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """One epoch of the 2-epoch fake KD+OPDF run (shared, read-only): ``run.pt`` and ``run.last.pt``."""
    from opdf_torchdistill.cli.train import run
    tmp = tmp_path_factory.mktemp('trained')
    metrics, _, _ = run(fake_run_args(tmp, 'run', '--stop_after', '1'))
    assert metrics['stopped_at_epoch'] == 1
    return tmp
