"""Hugging Face Transformers glue: OPDF for students built with ``from_pretrained`` (torchdistill's GLUE recipes).

torchdistill's Hugging Face example scripts (``examples/hf_transformers/*.py``) build the teacher and
the student with ``AutoModelForSequenceClassification.from_pretrained`` inside the script, not through
the model registry, so the ``opdf_student`` model key cannot be used there. This module registers an
*auxiliary model wrapper* for the student instead; torchdistill builds it before hooks, DDP wrapping
and the optimizer, and it changes the student **in place** (the script keeps its reference):

.. code-block:: yaml

    dependencies:
      - name: 'custom'                   # the example script's own package (unchanged)
      - name: 'opdf_torchdistill.hf'     # registers opdf_hf_student (and imports the plugin)
    train:
      student:
        auxiliary_model_wrapper:
          key: 'opdf_hf_student'
          kwargs:
            mpo: {selection: 'bert', num_dummy: 1}
        forward_hook: {output: ['classifier', 'opdf']}

``opdf_hf_student`` optionally initialises the student from the teacher's layers
(:func:`~opdf_torchdistill.init_from_teacher.init_from_teacher_layers`), over-parameterizes it
(``mpo:``, with ``align_to`` given as a Hugging Face model/config to plan against a teacher of another
width), attaches the probe, and makes ``state_dict()`` return *contracted, dense* weights. The
scripts save the best student with ``save_pretrained`` and reload it at the end with a plain
``from_pretrained``; with dense state dicts that checkpoint is a plain Hugging Face model (loads
without this package, no missing or unexpected keys), while training still runs on the cores.

Importing this module also registers what the example's ``custom`` package registers
(``forward_batch_as_kwargs``, ``extract_transformers_loss``, ``optimizer_no_decay``, the
``transformers`` schedulers, the ``default_data_collator`` collate function) under the same keys when
they are not registered yet, so the GLUE recipes also run under :mod:`opdf_torchdistill.cli.glue`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

import torch
from torch import nn
from torchdistill.core.interfaces.registry import FORWARD_PROC_FUNC_DICT, register_forward_proc_func
from torchdistill.datasets.registry import COLLATE_FUNC_DICT, register_collate_func
from torchdistill.losses.registry import FUNC2EXTRACT_MODEL_OUTPUT_DICT, register_func2extract_model_output
from torchdistill.models.registry import register_auxiliary_model_wrapper
from torchdistill.optim.registry import OPTIM_DICT, SCHEDULER_DICT, get_optimizer, register_optimizer, register_scheduler
from transformers import AutoConfig, AutoModelForSequenceClassification, default_data_collator
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

from .init_from_teacher import init_from_teacher_layers
from .options import OptionError
from .plugin.probe import attach_probe
from .surgery import mpo_modules, overparameterize

__all__ = ['opdf_hf_student', 'install_dense_state_dict', 'core_state_dict', 'hf_skeleton', 'load_hf_model', 'WRAPPER_KEY']

logger = logging.getLogger(__name__)

WRAPPER_KEY = 'opdf_hf_student'
_INIT_KEYS = ('model', 'layer_map', 'embeddings', 'pooler', 'classifier')


# ------------------------------------------------------------------------------------------------
# The example script's `custom` registrations (same keys, same behaviour), registered once.
# ------------------------------------------------------------------------------------------------
def forward_batch_as_kwargs(model, sample_batch, targets=None, supp_dict=None):
    return model(**sample_batch)


def extract_transformers_loss(student_outputs, targets, **kwargs):
    """The loss a Hugging Face model computed itself (``outputs.loss``), as torchdistill's GLUE recipes use."""
    return {'loss': student_outputs.loss}


def optimizer_no_decay(model, optimizer_key, weight_decay, no_decay=None, **kwargs):
    """AdamW-style grouping: no weight decay on biases and LayerNorm weights (as the example's)."""
    if no_decay is None:
        no_decay = ['bias', 'LayerNorm.weight']
    named = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
    groups = [{'params': [p for n, p in named if not any(nd in n for nd in no_decay)], 'weight_decay': weight_decay},
              {'params': [p for n, p in named if any(nd in n for nd in no_decay)], 'weight_decay': 0.0}]
    return get_optimizer(groups, optimizer_key, **kwargs)


def _register_example_components() -> None:
    if 'forward_batch_as_kwargs' not in FORWARD_PROC_FUNC_DICT:
        register_forward_proc_func(forward_batch_as_kwargs)
    if 'extract_transformers_loss' not in FUNC2EXTRACT_MODEL_OUTPUT_DICT:
        register_func2extract_model_output(extract_transformers_loss)
    if 'optimizer_no_decay' not in OPTIM_DICT:
        register_optimizer(optimizer_no_decay)
    for func in TYPE_TO_SCHEDULER_FUNCTION.values():
        if func.__name__ not in SCHEDULER_DICT:
            register_scheduler(func)
    if 'default_data_collator' not in COLLATE_FUNC_DICT:
        register_collate_func(default_data_collator)


_register_example_components()


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def _pretrained_kwargs(spec: Any, what: str, extra: str) -> dict:
    """``from_pretrained`` kwargs from a path / hub id (string) or a mapping naming one."""
    if isinstance(spec, str):
        spec = {'pretrained_model_name_or_path': spec}
    if not isinstance(spec, Mapping) or 'pretrained_model_name_or_path' not in spec:
        raise OptionError(f'{what} must be a model path / hub id or a mapping with pretrained_model_name_or_path '
                          f'(and {extra}), got {spec!r}')
    return dict(spec)


def load_hf_model(spec: Any, what: str) -> nn.Module:
    """A sequence-classification model from ``spec``: a model, a path/hub id (string), or a mapping
    of ``from_pretrained`` kwargs (``pretrained_model_name_or_path`` required)."""
    if isinstance(spec, nn.Module):
        return spec
    kwargs = _pretrained_kwargs(spec, what, 'other from_pretrained kwargs')
    return _one_line_os_error(what, kwargs, AutoModelForSequenceClassification.from_pretrained)


def _one_line_os_error(what: str, kwargs: dict, load):
    """``load(**kwargs)``; transformers' several-line ``OSError`` (unreachable Hub, missing folder) as
    one line naming ``what``."""
    try:
        return load(**kwargs)
    except OSError as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise OSError(f'{what}: cannot load {kwargs.get("pretrained_model_name_or_path")!r}: {first} (offline? '
                      f'download it and point {what} at its folder)') from None


def hf_skeleton(spec: Any, what: str = 'mpo.align_to') -> nn.Module:
    """A model with the architecture of ``spec`` (path/hub id or ``{pretrained_model_name_or_path,
    **config overrides}``) on the meta device: shapes only, no weights read."""
    if isinstance(spec, nn.Module):
        return spec
    config = _one_line_os_error(what, _pretrained_kwargs(spec, what, 'config overrides such as num_labels'),
                                AutoConfig.from_pretrained)
    with torch.device('meta'):
        return AutoModelForSequenceClassification.from_config(config)


# ------------------------------------------------------------------------------------------------
# Dense state dicts
# ------------------------------------------------------------------------------------------------
class _DenseStateDict:
    """``state_dict`` post-hook: each MPO weight's core keys become the contracted weight under the
    plain key, so any saver (``save_pretrained``, accelerate's ``get_state_dict``) writes the plain
    model. Loading such a dict back into the MPO model decomposes it (the surgery's load pre-hook)."""

    def __call__(self, module, state_dict, prefix, local_metadata):
        for name, sub, tensor_name, _ in mpo_modules(module):
            base = f'{prefix}{name}.' if name else prefix
            core_prefix = f'{base}parametrizations.{tensor_name}.'
            for key in [k for k in state_dict if k.startswith(core_prefix)]:
                del state_dict[key]
            with torch.no_grad():
                state_dict[base + tensor_name] = getattr(sub, tensor_name).detach().clone()


def install_dense_state_dict(model: nn.Module) -> nn.Module:
    """Make ``model.state_dict()`` return contracted dense weights (idempotent); returns ``model``."""
    if not any(isinstance(h, _DenseStateDict) for h in model._state_dict_hooks.values()):
        model.register_state_dict_post_hook(_DenseStateDict())
    return model


@contextlib.contextmanager
def core_state_dict(model: nn.Module):
    """Inside the block, ``model.state_dict()`` returns the MPO cores again (the dense post-hook of
    :func:`install_dense_state_dict` is lifted): what an exact resume checkpoint must hold, since the
    dense weights decompose back to other (equivalent) cores."""
    lifted = [(key, hook) for key, hook in model._state_dict_hooks.items() if isinstance(hook, _DenseStateDict)]
    for key, _ in lifted:
        del model._state_dict_hooks[key]
    try:
        yield model
    finally:
        for key, hook in lifted:
            model._state_dict_hooks[key] = hook


# ------------------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------------------
def _init_from_teacher(model: nn.Module, spec: Any) -> None:
    if not isinstance(spec, Mapping) or 'model' not in spec:
        raise OptionError(f"init_from_teacher must be a mapping with 'model' (the teacher: path / hub id or "
                          f"from_pretrained kwargs) and optional {list(_INIT_KEYS[1:])}, got {spec!r}")
    unknown = sorted(set(spec) - set(_INIT_KEYS))
    if unknown:
        raise OptionError(f'init_from_teacher: unknown keys {unknown}; valid keys: {list(_INIT_KEYS)}')
    teacher = load_hf_model(spec['model'], 'init_from_teacher.model')
    kwargs = {k: spec[k] for k in ('embeddings', 'pooler', 'classifier') if k in spec}
    if 'layer_map' not in spec:
        logger.info("init_from_teacher.layer_map not given: 'uniform' (student layer i <- teacher layer 2i + 1 "
                    "for 6 <- 12); the alignment map is the AuxTensorAlignmentLoss's own layer_map")
    init_from_teacher_layers(model, teacher, spec.get('layer_map', 'uniform'), **kwargs)


@register_auxiliary_model_wrapper(key=WRAPPER_KEY)
def opdf_hf_student(student_model: nn.Module | None = None, teacher_model: nn.Module | None = None,
                    mpo: Mapping[str, Any] | None = None, init_from_teacher: Mapping[str, Any] | None = None,
                    dense_state_dict: bool = True, device=None, device_ids=None, distributed=None) -> nn.Module:
    """Prepare a Hugging Face student for OPDF in place and return it (the same object).

    Args:
        student_model: the student the script built (``from_pretrained``).
        mpo: options of :func:`~opdf_torchdistill.overparameterize` (``selection: 'bert'``,
            ``num_dummy``, ...); ``align_to`` may be a path / hub id / ``{pretrained_model_name_or_path,
            **config}`` of the teacher (built on the meta device, no weights read). ``None`` leaves the
            student dense (a baseline that only uses ``init_from_teacher``).
        init_from_teacher: ``{model: <teacher path / hub id / from_pretrained kwargs>, layer_map:
            'uniform' | 'first' | [j0, j1, ...] | {i: j}, embeddings: true, pooler: true, classifier:
            false}``: copy the teacher's layers into the student first (the paper's students start so).
            ``layer_map`` (default ``'uniform'``, ``2i + 1``) is the *initialisation* map only; which
            teacher layer each student layer is aligned to is the ``AuxTensorAlignmentLoss``'s
            ``layer_map`` (default: relative depth, ``2i + 1``). The paper's setting (Theseus):
            ``'first'`` here, ``'uniform'`` there; the same map for both starts the alignment at 0.
        dense_state_dict: ``state_dict()`` returns contracted weights (default), so ``save_pretrained``
            writes a plain Hugging Face model. ``false`` saves the cores (exact resume, needs this package).
    """
    if student_model is None:
        raise OptionError(f'{WRAPPER_KEY} is a student wrapper: put it under train.student.auxiliary_model_wrapper '
                          f'(the teacher takes opdf_probe)')
    if not isinstance(dense_state_dict, bool):
        raise OptionError(f'{WRAPPER_KEY}: dense_state_dict must be true or false, got {dense_state_dict!r}')
    model = student_model
    if init_from_teacher is not None:
        _init_from_teacher(model, init_from_teacher)
    if mpo is not None:
        if not isinstance(mpo, Mapping):
            raise OptionError(f'{WRAPPER_KEY}: mpo must be a mapping of options, got {mpo!r}')
        options = dict(mpo)
        if options.get('align_to') is not None:
            options['align_to'] = hf_skeleton(options['align_to'])
        report = overparameterize(model, **options)
        logger.info('OPDF student (%s) over-parameterization:\n%s', type(model).__name__, report)
        attach_probe(model).report = report
        if dense_state_dict:
            install_dense_state_dict(model)
    return model
