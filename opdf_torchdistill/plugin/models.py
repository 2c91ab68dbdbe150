"""torchdistill model components: the ``opdf_student`` model key and the ``opdf_probe`` wrapper.

``opdf_student`` is a model *factory*: torchdistill (and its example script) builds the student with
it, so the model is over-parameterized before hooks, DDP and the optimizer exist, and a ``-test_only``
run builds the same MPO structure for the checkpoint it reloads with ``strict=True``.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn
from torchdistill.models.registry import MODEL_DICT, register_auxiliary_model_wrapper, register_model
from torchvision import models as tv_models

from ..options import OptionError
from ..surgery import overparameterize
from .probe import attach_probe

__all__ = ['build_base_model', 'opdf_student', 'opdf_probe']

logger = logging.getLogger(__name__)


def build_base_model(key: str, repo_or_dir: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model the way torchdistill resolves ``models.*.key``: torchvision first, then
    torchdistill's model registry, then ``torch.hub`` when ``repo_or_dir`` is given."""
    if not isinstance(key, str):
        raise OptionError(f'base must be a model key (string), got {key!r}')
    if repo_or_dir is None and key in tv_models.__dict__ and callable(tv_models.__dict__[key]) \
            and not isinstance(tv_models.__dict__[key], type(tv_models)):
        return tv_models.__dict__[key](**kwargs)
    if repo_or_dir is None and key in MODEL_DICT:
        return MODEL_DICT[key](**kwargs)
    if repo_or_dir is not None:
        return torch.hub.load(repo_or_dir, key, **kwargs)
    registered = sorted(k for k in MODEL_DICT if k != 'opdf_student')
    raise OptionError(f'unknown base model key {key!r}: not a torchvision model and not in torchdistill\'s model '
                      f'registry (registered: {registered}); for hub models also give base_repo_or_dir')


_MODEL_CONFIG_KEYS = ('key', 'kwargs', 'repo_or_dir', 'src_ckpt', 'dst_ckpt')


def _teacher_skeleton(spec: Any) -> nn.Module:
    """``align_to`` from YAML: a teacher model config (``{key, kwargs, repo_or_dir}``; a whole
    ``models.teacher_model`` entry may be given through a YAML alias, its checkpoints are not read)
    built on the meta device with pretrained weights off: planning needs the shapes only."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, Mapping) or 'key' not in spec:
        raise OptionError(f'mpo.align_to must be a teacher model config with a "key" (and optional "kwargs"), got {spec!r}')
    unknown = {k for k in spec if k not in _MODEL_CONFIG_KEYS and not str(k).startswith('_')}  # _x: YAML anchors
    if unknown:
        raise OptionError(f'mpo.align_to (the teacher model config it names, e.g. *teacher_model): unknown keys '
                          f'{sorted(unknown)}; valid keys: {", ".join(_MODEL_CONFIG_KEYS)}')
    kwargs = dict(spec.get('kwargs') or {})
    for name, off in (('weights', None), ('pretrained', False)):
        if name in kwargs:
            kwargs[name] = off  # shapes only: never load or download weights for planning
    with torch.device('meta'):
        return build_base_model(spec['key'], spec.get('repo_or_dir'), **kwargs)


@register_model(key='opdf_student')
def opdf_student(base: str, mpo: Mapping[str, Any] | None = None, base_repo_or_dir: str | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build ``base`` with ``kwargs`` (pretrained ``weights`` included), over-parameterize it with the
    options ``mpo`` (see :mod:`opdf_torchdistill.options`) and attach the probe ``opdf``.

    ``base`` is any torchvision model, torchdistill model key, or ``torch.hub`` model with
    ``base_repo_or_dir`` (resolved as torchdistill resolves ``models.*.key``).

    .. code-block:: yaml

        student_model:
          key: 'opdf_student'
          kwargs:
            base: 'resnet18'
            mpo: {num_dummy: 1}
            num_classes: 1000
    """
    if mpo is not None and not isinstance(mpo, Mapping):
        raise OptionError(f'opdf_student: mpo must be a mapping of options (e.g. mpo: {{num_dummy: 1}}), got a '
                          f'{type(mpo).__name__}: {mpo!r}; a YAML list ("- key: value" lines) becomes a list: drop '
                          f'the dashes')
    model = build_base_model(base, base_repo_or_dir, **kwargs)
    options = dict(mpo or {})
    if options.get('align_to') is not None:
        options['align_to'] = _teacher_skeleton(options['align_to'])
    report = overparameterize(model, **options)
    logger.info('OPDF student (%s) over-parameterization:\n%s', base, report)
    probe = attach_probe(model)
    probe.report = report
    return model


_BOX_KWARGS = ('device', 'device_ids', 'distributed')


@register_auxiliary_model_wrapper(key='opdf_probe')
def opdf_probe(teacher_model: nn.Module | None = None, student_model: nn.Module | None = None,
               wrap: str | Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """Attach the probe to a teacher (or any plain model) *in place*.

    Without ``wrap`` it returns the same model, so hook paths and state_dict keys stay as they are
    (hook the probe as ``opdf``). With ``wrap`` it then builds another auxiliary model wrapper around
    the model and returns it, so methods that need their own wrapper (FT's ``Teacher4FactorTransfer``,
    CRD's ``Linear4CRD``, SRD's ``SRDModelWrapper``) keep it; hook the probe through the wrapper's
    path to the model then (``teacher_model.opdf``, ``model.opdf``). ``wrap`` is the inner wrapper's
    key, with every other kwarg passed to it (so a recipe changes one line and adds one), or a full
    ``{key, kwargs}`` mapping.
    """
    from torchdistill.models.wrapper import build_auxiliary_model_wrapper
    model = teacher_model if teacher_model is not None else student_model
    if model is None:
        raise ValueError('opdf_probe needs a teacher_model or student_model')
    attach_probe(model)
    box_kwargs = {k: v for k, v in kwargs.items() if k in _BOX_KWARGS}
    inner_kwargs = {k: v for k, v in kwargs.items() if k not in _BOX_KWARGS}
    if wrap is None:
        if inner_kwargs:
            raise OptionError(f'opdf_probe: unexpected kwargs {sorted(inner_kwargs)} (they are only passed on with wrap)')
        return model
    if isinstance(wrap, str):
        wrap = {'key': wrap, 'kwargs': inner_kwargs}
    elif not isinstance(wrap, Mapping) or 'key' not in wrap or inner_kwargs:
        raise OptionError(f'opdf_probe: wrap must be a wrapper key (other kwargs go to it) or a {{key, kwargs}} '
                          f'mapping, got {wrap!r} with {sorted(inner_kwargs)}')
    side = 'teacher_model' if teacher_model is not None else 'student_model'
    return build_auxiliary_model_wrapper({'auxiliary_model_wrapper': dict(wrap)}, **{side: model}, **box_kwargs)
