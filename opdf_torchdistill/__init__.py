"""opdf-torchdistill: over-parameterized distillation (OPDF, NeurIPS 2024) for torchdistill.

Core API (no torchdistill needed)::

    from opdf_torchdistill import overparameterize, contract
    report = overparameterize(student, num_dummy=1)   # exact MPO form, more trainable parameters
    print(report)                                     # per-layer table and whole-model ratio
    ...train...
    contract(student)                                 # plain architecture again, same outputs

Importing the package also registers the torchdistill components (model ``opdf_student``, auxiliary
model wrapper ``opdf_probe``, loss ``AuxTensorAlignmentLoss``, dataset ``Digits``), so a YAML's
``dependencies: ['opdf_torchdistill']`` is all a config needs.
"""
from .errors import MatchError, OptionError
from .mpo import MPOError, decompose, reconstruct
from .options import MPOConfig
from .planning import MPOPlan
from .report import OverparamReport
from .surgery import clear_caches, contract, is_overparameterized, mpo_modules, overparameterize, plan

__version__ = '0.2.0'

__all__ = [
    'overparameterize', 'contract', 'plan', 'mpo_modules', 'is_overparameterized', 'clear_caches',
    'decompose', 'reconstruct', 'MPOConfig', 'MPOPlan', 'OverparamReport', 'MPOError', 'OptionError', 'MatchError',
]

try:  # torchdistill is a dependency, but the core must stay importable without it (e.g. exported models)
    from . import plugin  # noqa: F401  (registers the torchdistill components)
except ImportError as _exc:  # pragma: no cover
    if 'torchdistill' not in str(_exc):
        raise
