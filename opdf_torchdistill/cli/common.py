"""Shared pieces of the command-line programs: config loading, model building, devices, logging."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
import yaml
from torch import distributed as dist
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt
from torchdistill.misc.log import set_basic_log_config, setup_log_file
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model

__all__ = ['setup_logging', 'load_config', 'apply_overrides', 'build_model', 'init_distributed', 'is_main_process',
           'student_config_of']

logger = logging.getLogger('opdf_torchdistill.cli')


def setup_logging(run_log: str | None = None) -> None:
    """torchdistill's log format; only rank 0 logs below WARNING in distributed runs."""
    set_basic_log_config()
    if run_log is not None and is_main_process():
        setup_log_file(os.path.expanduser(run_log))
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.path=value`` overrides (values parsed as YAML) to a loaded config, in place."""
    for item in overrides or ():
        if '=' not in item:
            raise ValueError(f'override {item!r} must look like dotted.path=value')
        path, raw = item.split('=', 1)
        value = yaml.safe_load(raw)
        keys = path.split('.')
        node: Any = config
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise ValueError(f'override {item!r}: {".".join(keys[:depth])} is not a mapping')
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        if isinstance(node, list):
            node[int(keys[-1])] = value
        elif isinstance(node, dict):
            node[keys[-1]] = value
        else:
            raise ValueError(f'override {item!r}: {".".join(keys[:-1])} is not a mapping')
    return config


def load_config(path: str, overrides: Sequence[str] = ()) -> dict:
    """Load a torchdistill YAML (``!import_call`` etc.), apply overrides, import its dependencies.

    ``opdf_torchdistill`` is always imported, so configs work with or without ``dependencies:``.
    """
    config = yaml_util.load_yaml_file(os.path.expanduser(path))
    if not isinstance(config, dict):
        raise ValueError(f'{path}: a config must be a mapping, got {type(config).__name__}')
    apply_overrides(config, overrides)
    import_dependencies(config.get('dependencies', None))
    import opdf_torchdistill  # noqa: F401  (registers the plugin's components)
    return config


def build_model(model_config: dict, device: torch.device, distributed: bool = False, load_src: bool = True):
    """Build ``models.<name>`` like torchdistill: torchvision first, then its registry; then ``src_ckpt``."""
    model_config.setdefault('kwargs', {})
    if model_config['kwargs'] is None:
        model_config['kwargs'] = {}
    model = get_image_classification_model(model_config, distributed)
    if model is None:
        model = get_model(model_config['key'], model_config.get('repo_or_dir', None), **model_config['kwargs'])
    src = model_config.get('src_ckpt', None)
    if load_src and src is not None:
        load_ckpt(os.path.expanduser(src), model=model, strict=True)
    return model.to(device)


def student_config_of(config: dict) -> dict:
    models = config.get('models', {})
    if 'student_model' in models:
        return models['student_model']
    if 'model' in models:
        return models['model']
    raise KeyError('config has neither models.student_model nor models.model')


def init_distributed(device: str) -> tuple[bool, int, list[int] | None, torch.device]:
    """torchrun-style initialisation; gloo on CPU (torchdistill's helper hard-codes NCCL + CUDA)."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return False, 1, None, torch.device(device)
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if device.startswith('cuda'):
        torch.cuda.set_device(local_rank)
        dev, backend, device_ids = torch.device('cuda', local_rank), 'nccl', [local_rank]
    else:
        dev, backend, device_ids = torch.device(device), 'gloo', None
    dist.init_process_group(backend=backend, init_method='env://', world_size=world_size, rank=rank)
    dist.barrier()
    logger.info('distributed: %d processes, backend %s', world_size, backend)
    return True, world_size, device_ids, dev
