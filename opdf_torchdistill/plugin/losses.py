"""torchdistill loss component: ``AuxTensorAlignmentLoss`` (a middle-level loss)."""
from __future__ import annotations

from torch import nn
from torchdistill.losses.registry import register_mid_level_loss

from ..alignment import CoreAligner
from .probe import PROBE_NAME

__all__ = ['AuxTensorAlignmentLoss']


@register_mid_level_loss(key='AuxTensorAlignmentLoss')
class AuxTensorAlignmentLoss(nn.Module):
    """OPDF's auxiliary-tensor alignment as a torchdistill loss term (lambda is the sub-term ``weight``).

    Reads the probe outputs (``forward_hook: {output: ['opdf']}`` on teacher and student) and returns
    the distance between the student's live cores and the teacher's cores in the same factor shapes
    and gauge over matched layers and aligned cores (see :mod:`opdf_torchdistill.alignment`).

    Args:
        cores: ``'auxiliary'`` (default, all but the central core), ``'all'``, ``'central'`` or indices.
        layer_map: the alignment map: ``'uniform'``, ``'first'``, a list or ``{i: j}`` of layer indices,
            ``{student_layer: teacher_layer}`` names or ``[[regex, replacement], ...]`` rules; default
            automatic (same role, relative depth). Not the initialisation map.
        reduction: ``'relative'`` (default: the sum over aligned cores of the squared distance relative to
            the teacher core's squared norm) or ``'paper'`` (the paper's mean of per-element MSEs;
            numerically inert on real models).
        targets: ``'teacher'`` (default) or ``'random'`` (control: random matrices of the teacher
            weights' shapes and norms), ``targets_seed`` seeds them.
        student_module_path, teacher_module_path, *_module_io: where the probes' outputs are hooked.

    .. code-block:: yaml

        opdf:
          criterion:
            key: 'AuxTensorAlignmentLoss'
            kwargs: {}
          weight: 1.0
    """

    def __init__(self, cores='auxiliary', layer_map=None, reduction='relative', targets='teacher', targets_seed=0,
                 student_module_path=PROBE_NAME, student_module_io='output', teacher_module_path=PROBE_NAME,
                 teacher_module_io='output'):
        super().__init__()
        self.aligner = CoreAligner(cores, layer_map, reduction, targets, targets_seed)
        self.student_path, self.student_io = student_module_path, student_module_io
        self.teacher_path, self.teacher_io = teacher_module_path, teacher_module_io

    @staticmethod
    def _fetch(io_dict, side: str, path: str, io: str):
        entry = io_dict.get(path, {}).get(io)
        if entry is None:
            how = ('build the student with the opdf_student model key' if side == 'student' else
                   "add auxiliary_model_wrapper: {key: 'opdf_probe'} under train.teacher")
            raise KeyError(f'AuxTensorAlignmentLoss: the {side} io_dict has no {path!r} {io!r}; add '
                           f"forward_hook: {{{io}: ['{path}']}} under train.{side} and {how}")
        if not hasattr(entry, 'values'):
            raise TypeError(f'AuxTensorAlignmentLoss: {side} {path!r} {io!r} is {type(entry).__name__}, not the OPDF '
                            f'probe output (DataParallel gathers hooked outputs and is not supported; use DDP)')
        return entry

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        student = self._fetch(student_io_dict, 'student', self.student_path, self.student_io)
        teacher = self._fetch(teacher_io_dict, 'teacher', self.teacher_path, self.teacher_io)
        return self.aligner.loss(student, teacher)

    def extra_repr(self) -> str:
        return (f'cores={self.aligner.cores!r}, layer_map={self.aligner.layer_map!r}, '
                f'reduction={self.aligner.reduction!r}, targets={self.aligner.target_source!r}')
