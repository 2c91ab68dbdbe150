"""timm models as torchdistill model keys (for TinyViT students and teachers), without Hub downloads.

Importing this module (a YAML's ``dependencies: ['opdf_torchdistill.timm_models']``) imports the
plugin and registers the model key ``timm_model``:

.. code-block:: yaml

    teacher_model:
      key: 'timm_model'
      kwargs: {model_name: 'tiny_vit_21m_224', num_classes: 1000, weights: '~/ckpt/tiny_vit_21m_224.safetensors'}
    student_model:
      key: 'opdf_student'
      kwargs: {base: 'timm_model', model_name: 'tiny_vit_5m_224', num_classes: 1000, mpo: {selection: 'tinyvit'}}

``weights`` is a local file (``.safetensors``, or a ``torch.save``d state_dict, optionally under
``'model'`` / ``'state_dict'``) loaded strictly; without it the model is randomly initialised. timm
is always called with ``pretrained=False``: nothing is downloaded at run time.
"""
from __future__ import annotations

import os
from typing import Any

import timm
from torch import nn
from torchdistill.models.registry import register_model

from . import plugin  # noqa: F401  (registers opdf_student, opdf_probe, the loss)
from .io import CheckpointError, check_state_dict_fits, checkpoint_size_limit, load_checkpoint

__all__ = ['timm_model', 'load_weights_file']


def load_weights_file(model: nn.Module, path: str, what: str) -> None:
    """Load a local weights file into ``model`` strictly; errors name ``what`` and the path."""
    full = os.path.expanduser(str(path))
    if not os.path.isfile(full):
        raise FileNotFoundError(f'{what}: weights file {path!r} does not exist (download it yourself; nothing is '
                                f'fetched at run time)')
    if full.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(full)
    else:  # the safe loader: plain data only unless --trust_checkpoint names the file, bounded size
        state = load_checkpoint(full, max_bytes=checkpoint_size_limit(model))
        for key in ('model', 'state_dict'):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise CheckpointError(f'{what}: {path!r} holds a {type(state).__name__}, not a state dict')
    check_state_dict_fits(model, state, f'{what}: weights {path!r}')
    model.load_state_dict(state, strict=True)


@register_model(key='timm_model')
def timm_model(model_name: str, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **kwargs)``, then the local ``weights`` file if given."""
    if 'pretrained' in kwargs or 'checkpoint_path' in kwargs or 'pretrained_cfg_overlay' in kwargs:
        raise ValueError(f'timm_model({model_name!r}): give local weights as weights: <file>; pretrained, '
                         f'checkpoint_path and pretrained_cfg_overlay are not accepted (no Hub downloads at run time)')
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = timm.list_models(f'*{str(model_name).split("_")[0]}*')[:20] if isinstance(model_name, str) else []
        raise ValueError(f'timm_model: unknown timm model {model_name!r}; similar: {close}')
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if weights is not None:
        load_weights_file(model, weights, f'timm_model({model_name!r})')
    return model
