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
