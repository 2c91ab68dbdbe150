"""Initialise a shallower student from a teacher's layers (the paper's BERT students start so).

:func:`init_from_teacher_layers` copies student encoder layer ``i`` from teacher layer ``f(i)``
(e.g. ``2i + 1``: a 6-layer student from layers 1, 3, ..., 11 of a 12-layer BERT), plus the
embeddings and, optionally, the pooler and the classifier. It works on Hugging Face encoder models
whose base model has ``embeddings`` and ``encoder.layer`` (BERT, RoBERTa, ELECTRA, ...), plain or
wrapped in a task head (``BertForSequenceClassification``...). Call it *before*
``overparameterize``: the cores are then decomposed from the copied weights. No dependency on
``transformers`` itself: modules are found by attribute.

The initialisation map (``init_from_teacher.layer_map``) is independent of the alignment map (the
``layer_map`` of ``AuxTensorAlignmentLoss``, default: relative depth, ``2i + 1`` for 6 <- 12): neither
is derived from the other. BERT-of-Theseus, the paper's main row, initialises from teacher layers
``0..S-1`` (``'first'``) and aligns student layer ``i`` to teacher layer ``2i + 1`` (``'uniform'``),
so the aligned cores differ from the first step. Initialising from the very layers the student is
aligned to (``'uniform'`` for both) makes the alignment term start at exactly 0: it then only pulls
the student back toward its initial weights (``LossTermGradients`` warns about it at the first step).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

from torch import nn

__all__ = ['init_from_teacher_layers', 'resolve_layer_map', 'encoder_parts']

logger = logging.getLogger(__name__)


def encoder_parts(model: nn.Module, role: str) -> tuple[str, nn.Module]:
    """``(prefix, base model)`` of a BERT-style model: the module holding ``embeddings`` and
    ``encoder.layer``; ``role`` ('student'/'teacher') only names the model in errors."""
    candidates = [('', model)]
    prefix = getattr(model, 'base_model_prefix', None)  # Hugging Face: 'bert', 'roberta', ...
    if isinstance(prefix, str) and isinstance(getattr(model, prefix, None), nn.Module):
        candidates.insert(0, (prefix + '.', getattr(model, prefix)))
    for name, base in candidates:
        layers = getattr(getattr(base, 'encoder', None), 'layer', None)
        if isinstance(getattr(base, 'embeddings', None), nn.Module) and isinstance(layers, nn.ModuleList):
            return name, base
    raise ValueError(f'init_from_teacher: the {role} ({type(model).__name__}) is not a BERT-style encoder: expected '
                     f'a base model with .embeddings and .encoder.layer (a ModuleList)')


def resolve_layer_map(layer_map, num_student: int, num_teacher: int) -> list[int]:
    """Teacher layer index for each student layer ``0..num_student-1``.

    ``layer_map`` is ``'uniform'`` (student layer ``i`` <- teacher layer ``(i + 1) * T // S - 1``: the
    last layer of each of ``S`` equal blocks, i.e. ``2i + 1`` for 12 -> 6, the paper's *alignment*
    map), ``'first'`` (``i`` <- ``i``: BERT-of-Theseus' initialisation), a list (``i`` <-
    ``layer_map[i]``), or a mapping ``{i: j}`` that names every student layer. Errors name the key
    (``init_from_teacher.layer_map``) and the valid choices.
    """
    choices = ("'uniform' (i <- (i+1)T//S - 1: 2i+1 for 12 -> 6), 'first' (i <- i), a list of teacher layer indices "
               "(one per student layer) or a mapping {student: teacher}")
    if isinstance(layer_map, str):
        if layer_map == 'uniform':
            if num_teacher < num_student:
                raise ValueError(f"init_from_teacher.layer_map: 'uniform' needs a teacher at least as deep as the "
                                 f'student ({num_teacher} < {num_student} layers)')
            mapping = [(i + 1) * num_teacher // num_student - 1 for i in range(num_student)]
        elif layer_map == 'first':
            mapping = list(range(num_student))
        else:
            raise ValueError(f'init_from_teacher.layer_map: unknown layer_map {layer_map!r}; valid: {choices}')
    elif isinstance(layer_map, Mapping):
        keys = {int(k) if isinstance(k, str) and k.isdigit() else k for k in layer_map}
        if keys != set(range(num_student)):
            missing = sorted(set(range(num_student)) - keys)
            extra = sorted(map(str, keys - set(range(num_student))))
            raise ValueError(f'init_from_teacher.layer_map must name every student layer 0..{num_student - 1} once; '
                             f'missing {missing}, not student layers {extra}')
        mapping = [layer_map[i] if i in layer_map else layer_map[str(i)] for i in range(num_student)]
    elif isinstance(layer_map, Sequence):
        mapping = list(layer_map)
        if len(mapping) != num_student:
            raise ValueError(f'init_from_teacher.layer_map lists {len(mapping)} teacher layers for a student of '
                             f'{num_student} layers')
    else:
        raise ValueError(f'init_from_teacher.layer_map must be {choices}, got {type(layer_map).__name__}')
    for i, j in enumerate(mapping):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < num_teacher:
            raise ValueError(f'init_from_teacher.layer_map: student layer {i} <- teacher layer {j!r}: the teacher has layers '
                             f'0..{num_teacher - 1}')
    return mapping


def _copy(dst: nn.Module, src: nn.Module, dst_name: str, src_name: str) -> None:
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    if set(src_state) != set(dst_state):
        raise ValueError(f'init_from_teacher: {dst_name} and {src_name} have different parameters: only in the student '
                         f'{sorted(set(dst_state) - set(src_state))}, only in the teacher {sorted(set(src_state) - set(dst_state))}')
    bad = [(k, tuple(dst_state[k].shape), tuple(v.shape)) for k, v in src_state.items() if dst_state[k].shape != v.shape]
    if bad:
        raise ValueError(f'init_from_teacher: {dst_name} <- {src_name}: shapes differ (key, student, teacher): {bad}; '
                         f'the student must have the teacher\'s widths')
    dst.load_state_dict(src_state, strict=True)


def init_from_teacher_layers(student: nn.Module, teacher: nn.Module, layer_map='uniform', *, embeddings: bool = True,
                             pooler: bool = True, classifier: bool = False) -> list[tuple[str, str]]:
    """Copy teacher weights into ``student`` in place: encoder layer ``i`` <- teacher layer ``map(i)``.

    Args:
        student, teacher: BERT-style models of the same widths (see :func:`encoder_parts`).
        layer_map: the initialisation map, see :func:`resolve_layer_map`; ``'uniform'`` (default, for
            backward compatibility) is ``2i + 1`` for 12 -> 6; ``'first'`` is Theseus' ``0..S-1``. It
            does not set the alignment pairing (the alignment loss's own ``layer_map``).
        embeddings: copy the embeddings too (the paper's students start with the teacher's).
        pooler: copy the pooler when both models have one.
        classifier: copy the task head (``classifier``) too; for a teacher fine-tuned on the same task.

    Returns:
        The ``(student module, teacher module)`` pairs copied, in order.

    Raises:
        ValueError: a student already over-parameterized, a model that is not BERT-style, an
            invalid map, or parts whose parameters or shapes differ (named).
    """
    from .surgery import is_overparameterized
    if is_overparameterized(student):
        raise ValueError('init_from_teacher: the student is already over-parameterized; initialise it from the '
                         'teacher first, then call overparameterize (the cores are decomposed from the copied weights)')
    s_prefix, s_base = encoder_parts(student, 'student')
    t_prefix, t_base = encoder_parts(teacher, 'teacher')
    s_layers, t_layers = s_base.encoder.layer, t_base.encoder.layer
    mapping = resolve_layer_map(layer_map, len(s_layers), len(t_layers))
    pairs = []

    def copy(dst, src, dst_name, src_name):
        _copy(dst, src, dst_name, src_name)
        pairs.append((dst_name, src_name))

    if embeddings:
        copy(s_base.embeddings, t_base.embeddings, s_prefix + 'embeddings', t_prefix + 'embeddings')
    for i, j in enumerate(mapping):
        copy(s_layers[i], t_layers[j], f'{s_prefix}encoder.layer.{i}', f'{t_prefix}encoder.layer.{j}')
    if pooler:
        s_pool, t_pool = getattr(s_base, 'pooler', None), getattr(t_base, 'pooler', None)
        if (s_pool is None) != (t_pool is None):
            raise ValueError(f'init_from_teacher: pooler=True but only the {"student" if t_pool is None else "teacher"} '
                             f'has a pooler; pass pooler=False')
        if s_pool is not None:
            copy(s_pool, t_pool, s_prefix + 'pooler', t_prefix + 'pooler')
    if classifier:
        s_head, t_head = getattr(student, 'classifier', None), getattr(teacher, 'classifier', None)
        if not isinstance(s_head, nn.Module) or not isinstance(t_head, nn.Module):
            raise ValueError('init_from_teacher: classifier=True needs a .classifier module on both models')
        copy(s_head, t_head, 'classifier', 'classifier')
    logger.info('initialised the student from the teacher (init_from_teacher.layer_map %r: student layer i <- '
                'teacher layer %s): %s', layer_map, mapping, ', '.join(f'{s} <- {t}' for s, t in pairs))
    return pairs
