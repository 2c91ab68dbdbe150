"""Shared pieces of the command-line programs: config loading, model building, devices, logging."""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from typing import Any, Iterable, Sequence

import torch
import yaml
from torch import distributed as dist
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies
from torchdistill.common.module_util import load_full_state_dict
from torchdistill.misc.log import set_basic_log_config, setup_log_file
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model

from ..io import CheckpointError, check_state_dict_fits, checkpoint_size_limit, is_trusted, load_checkpoint
from .config_guard import UnsafeConfigError, check_config_tags, compose_yaml, walk_nodes

__all__ = ['setup_logging', 'load_config', 'config_snapshot', 'config_differences', 'apply_overrides', 'parse_value',
           'build_model', 'load_model_checkpoint',
           'safe_torchdistill_loads', 'init_distributed', 'is_main_process', 'student_config_of', 'ConfigError',
           'check_state_dict_fits', 'checkpoint_size_limit', 'check_device', 'describe_error', 'run_cli', 'USER_ERRORS',
           'read_config']

logger = logging.getLogger('opdf_torchdistill.cli')


class ConfigError(ValueError):
    """A config file or ``--set`` override that cannot be used as given (the message says why and where)."""


def setup_logging(run_log: str | None = None) -> None:
    """torchdistill's log format; only rank 0 logs below WARNING in distributed runs."""
    set_basic_log_config()
    if run_log is not None and is_main_process():
        setup_log_file(os.path.expanduser(run_log))
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------
# --set overrides
# ----------------------------------------------------------------------------------------------
class _ValueLoader(yaml.SafeLoader):
    """YAML 1.1 safe loading, except that ``1e-3`` / ``5E4`` are floats (PyYAML needs a dot: ``1.0e-3``)."""


_ValueLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def parse_value(raw: str) -> Any:
    """A ``--set`` value as YAML parses it (safe tags only), with ``1e-3`` a float."""
    return yaml.load(raw, Loader=_ValueLoader)


def _did_you_mean(key: str, choices: Iterable[Any]) -> str:
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f'; did you mean {" or ".join(repr(c) for c in close)}?' if close else ''
    return f'{hint} (keys there: {sorted(names)})'


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.path=value`` overrides (values parsed as YAML) to a loaded config, in place.

    Every key on the path must exist (a typo is an error with a did-you-mean); ``+dotted.path=value``
    adds a key that the config does not have yet (its parent must exist). List items are addressed by
    index (``train.stage1.x.0=...``).
    """
    for item in overrides or ():
        if '=' not in item:
            raise ConfigError(f'--set {item!r} must look like dotted.path=value')
        path, raw = item.split('=', 1)
        add = path.startswith('+')
        keys = path.lstrip('+').split('.')
        if not all(keys):
            raise ConfigError(f'--set {item!r}: empty key in {path!r}')
        value = parse_value(raw)
        node: Any = config
        for depth, key in enumerate(keys):
            where = '.'.join(keys[:depth]) or '<top level>'
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not re.fullmatch(r'-?\d+', key) or not -len(node) <= int(key) < len(node):
                    raise ConfigError(f'--set {item!r}: {where} is a list of {len(node)} items; {key!r} is not an '
                                      f'index of it')
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f'--set {item!r}: {where} is a {type(node).__name__} ({node!r}), not a mapping')
            if key not in node and not (last and add):
                extra = '' if not last else f'; to add a new key write --set +{path.lstrip("+")}={raw}'
                raise ConfigError(f'--set {item!r}: no key {key!r} under {where}{_did_you_mean(key, node)}{extra}')
            if last:
                if add and key in node:
                    raise ConfigError(f'--set {item!r}: {path.lstrip("+")} already exists; drop the "+" to change it')
                node[key] = value
            else:
                if add and depth == len(keys) - 2 and node[key] is None:
                    node[key] = {}  # an empty section (``kwargs:``) receives its first key
                node = node[key]
    return config


# ----------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------
def _check_duplicate_keys(path: str) -> None:
    """PyYAML keeps the last of two equal keys in a mapping without a word (a pasted ``forward_hook:``
    block would silently replace the recipe's). Composing builds nodes only: no tag runs."""
    for node in walk_nodes(compose_yaml(path, ConfigError)):
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != 'tag:yaml.org,2002:merge':
                    ident = (key.tag, key.value)
                    if ident in first:
                        raise ConfigError(
                            f'{path}:{key.start_mark.line + 1}: duplicate key {key.value!r} (first at line '
                            f'{first[ident]}); YAML would silently keep only the last one: merge the two entries')
                    first[ident] = key.start_mark.line + 1


class TagRecordingLoader(yaml.SafeLoader):
    """Loads a torchdistill YAML as plain data: a tagged node ``!import_call {...}`` becomes
    ``{'!import_call': {...}}`` (nothing is imported or called)."""


def _construct_tagged(loader, tag_suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {'!' + tag_suffix: value}


TagRecordingLoader.add_multi_constructor('!', _construct_tagged)


def config_snapshot(path: str, overrides: Sequence[str] = ()) -> dict:
    """The config file with its overrides as plain data (tags recorded, not run): what a resume
    checkpoint stores to tell whether the config changed."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f'{path}: is a directory; give a YAML config file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such config file')
    _check_duplicate_keys(path)  # also: a YAML syntax error as a ConfigError naming the line
    with open(path, 'r') as fp:
        snapshot = yaml.load(fp, Loader=TagRecordingLoader)
    return apply_overrides(snapshot, overrides)


def config_differences(old: Any, new: Any, prefix: str = '') -> list[str]:
    """``key: old -> new`` lines for every leaf that differs between two plain configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            where = f'{prefix}.{key}' if prefix else str(key)
            if key not in new:
                lines.append(f'{where}: {old[key]!r} -> (removed)')
            elif key not in old:
                lines.append(f'{where}: (absent) -> {new[key]!r}')
            else:
                lines.extend(config_differences(old[key], new[key], where))
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for k, (a, b) in enumerate(zip(old, new)) for line in config_differences(a, b, f'{prefix}.{k}')]
    return [] if old == new else [f'{prefix or "<config>"}: {old!r} -> {new!r}']


def read_config(path: str, overrides: Sequence[str] = (), trust_config: bool = False) -> dict:
    """A torchdistill YAML with its tags run and ``--set`` overrides applied, after the checks every
    program makes first: the file exists, no duplicate keys, and (unless ``trust_config``) no tag
    outside the allowed packages. Its ``dependencies`` are not imported (see :func:`load_config`)."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f'{path}: is a directory; give a YAML config file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such config file')
    _check_duplicate_keys(path)
    if not trust_config:
        check_config_tags(path)
    config = yaml_util.load_yaml_file(path)
    if not isinstance(config, dict):
        raise ConfigError(f'{path}: a config must be a mapping, got {type(config).__name__}')
    apply_overrides(config, overrides)
    return config


def load_config(path: str, overrides: Sequence[str] = (), trust_config: bool = False) -> dict:
    """Load a torchdistill YAML (``!import_call`` etc.), apply overrides, import its dependencies.

    ``opdf_torchdistill`` is always imported, so configs work with or without ``dependencies:``.
    Duplicate mapping keys are refused (file, line and key named). Unless ``trust_config``, a tag that
    would import or call something outside the allowed packages is refused before any tag runs
    (:mod:`.config_guard`: configs are code).
    """
    config = read_config(path, overrides, trust_config)
    import_dependencies(config.get('dependencies', None))
    import opdf_torchdistill  # noqa: F401  (registers the plugin's components)
    return config


# ----------------------------------------------------------------------------------------------
# Checkpoints and models
# ----------------------------------------------------------------------------------------------
def load_model_checkpoint(model: torch.nn.Module, src: str, what: str, trust: Iterable[str] = (),
                          strict: bool = True) -> None:
    """Load ``src`` (a file, or an http(s) URL as torchdistill allows) into ``model`` like torchdistill's
    ``load_ckpt``, but read as plain data (``weights_only=True``) and with a missing file an error
    naming ``what`` (e.g. ``models.teacher_model.src_ckpt``) instead of an INFO line and random weights."""
    if isinstance(src, str) and src.startswith(('https://', 'http://')):
        trusted = src in set(trust or ())
        try:
            ckpt = torch.hub.load_state_dict_from_url(src, map_location='cpu', progress=True, weights_only=not trusted)
        except Exception as exc:  # noqa: BLE001 - re-raised with the key and the URL
            reason = ' '.join(str(exc).split()) or type(exc).__name__
            raise CheckpointError(f'{what}: cannot load {src}: {type(exc).__name__}: {reason[:300]} (offline? '
                                  f'download the file and give its path; if it is not plain tensor data and you '
                                  f'trust it, pass --trust_checkpoint {src})') from None
    else:
        path = os.path.expanduser(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{what}: checkpoint {path!r} does not exist (absolute: '
                                    f'{os.path.abspath(path)}); fix the path, or remove {what} to start from '
                                    f'the model\'s own initial weights')
        ckpt = load_checkpoint(path, trusted=is_trusted(path, trust), max_bytes=checkpoint_size_limit(model))
    if isinstance(ckpt, dict) and 'model' in ckpt:
        ckpt = ckpt['model']
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{what}: {src} holds a {type(ckpt).__name__}, not a state_dict (or '
                              f'{{"model": state_dict}})')
    if strict:
        check_state_dict_fits(model, ckpt, f'{what} {src}')
    load_full_state_dict(model, ckpt, strict=strict)
    logger.info('%s: loaded %s (weights_only, strict=%s)', what, src, strict)


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, refused with a clear message when this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f'--device {device!r}: not a device ({exc}); e.g. cpu, cuda, cuda:1') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {device}: this machine has no CUDA device (torch.cuda.is_available() is '
                              f'False); use --device cpu')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f'--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), '
                              f'cuda:0..cuda:{torch.cuda.device_count() - 1}')
    elif dev.type not in ('cpu', 'meta') and dev.type != 'mps':
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, 'is_available', lambda: False)():
            raise ConfigError(f'--device {device}: this machine has no {dev.type} device; use --device cpu')
    return dev


def describe_error(exc: BaseException) -> str:
    """One line (or the message our own errors chose) for a command-line ``error:`` report."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    text = str(exc).strip()
    if isinstance(exc, USER_ERRORS) or type(exc).__module__.startswith('opdf_torchdistill'):  # messages for users
        return text or type(exc).__name__
    first = text.splitlines()[0] if text else ''
    return f'{type(exc).__name__}: {first} (run with --debug for the traceback)'


def run_cli(body, debug: bool = False) -> int:
    """Run ``body()`` as a command: 0 on success; every exception one ``error:`` line on stderr and status
    1 (``--debug``: the traceback too); Ctrl-C status 130."""
    import sys
    import traceback
    try:
        body()
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a command reports, it does not crash
        if debug:
            traceback.print_exc()
        logger.debug('details', exc_info=True)
        print(f'error: {describe_error(exc)}', file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


@contextlib.contextmanager
def safe_torchdistill_loads(trust: Iterable[str] = ()):
    """While building torchdistill's training/distillation box, route its stage-level ``src_ckpt`` loads
    (``train[.stageN].{teacher,student,model}.src_ckpt``) through :func:`load_model_checkpoint`:
    torchdistill's ``load_ckpt`` unpickles with ``weights_only=False`` and ignores missing files."""
    from torchdistill.core import distillation, training
    trust = tuple(trust or ())

    def safe_load_ckpt(ckpt_file_path, model=None, optimizer=None, lr_scheduler=None, strict=True):
        if optimizer is not None or lr_scheduler is not None or model is None:
            raise NotImplementedError('opdf_torchdistill: only model src_ckpt loads are supported here')
        load_model_checkpoint(model, ckpt_file_path, f'train: src_ckpt {ckpt_file_path!r}', trust, strict)
        return None, None

    saved = distillation.load_ckpt, training.load_ckpt
    distillation.load_ckpt = training.load_ckpt = safe_load_ckpt
    try:
        yield
    finally:
        distillation.load_ckpt, training.load_ckpt = saved


def build_model(model_config: dict, device: torch.device, distributed: bool = False, load_src: bool = True,
                name: str = 'model', trust: Iterable[str] = ()):
    """Build ``models.<name>`` like torchdistill: torchvision first, then its registry; then ``src_ckpt``
    (read as plain data; a file named there that does not exist is an error)."""
    model_config.setdefault('kwargs', {})
    if model_config['kwargs'] is None:
        model_config['kwargs'] = {}
    src = model_config.get('src_ckpt', None)
    what = f'models.{name}.src_ckpt'
    if load_src and src is not None and not str(src).startswith(('https://', 'http://')) \
            and os.path.isdir(os.path.expanduser(src)):
        raise IsADirectoryError(f'{what}: {src!r} is a directory, not a checkpoint file')
    if load_src and src is not None and not str(src).startswith(('https://', 'http://')) \
            and not os.path.isfile(os.path.expanduser(src)):  # before building: fail fast
        raise FileNotFoundError(f'{what}: checkpoint {src!r} does not exist (absolute: '
                                f'{os.path.abspath(os.path.expanduser(src))}); fix the path, or remove {what} to '
                                f'start from the model\'s own initial weights')
    model = get_image_classification_model(model_config, distributed)
    if model is None:
        model = get_model(model_config['key'], model_config.get('repo_or_dir', None), **model_config['kwargs'])
    if load_src and src is not None:
        load_model_checkpoint(model, src, what, trust)
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is written for the user (printed as it is, without the type name)."""
    from ..errors import MatchError, OptionError
    from ..io import UnsafeCheckpointError
    from ..mpo import MPOError
    from ..runfiles import OutputError
    return (ConfigError, CheckpointError, UnsafeCheckpointError, UnsafeConfigError, OptionError, MPOError, MatchError,
            OutputError, FileNotFoundError, PermissionError, IsADirectoryError, KeyError, ValueError, OSError)


USER_ERRORS = _user_errors()
