"""torchdistill glue: registers ``opdf_student``, ``opdf_probe``, ``AuxTensorAlignmentLoss``,
``OPDFOptimizer`` and the digits components (dataset ``Digits``, model ``digits_cnn``).

Imported by ``import opdf_torchdistill`` (and so by a YAML's ``dependencies: ['opdf_torchdistill']``).
"""
from . import datasets, losses, models, optim  # noqa: F401  (registration side effects)
from .losses import AuxTensorAlignmentLoss
from .models import build_base_model, opdf_probe, opdf_student
from .probe import OPDFProbe, attach_probe

__all__ = ['AuxTensorAlignmentLoss', 'OPDFProbe', 'attach_probe', 'build_base_model', 'opdf_probe', 'opdf_student']
