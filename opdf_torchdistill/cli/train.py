"""Train, validate and test an image classifier from a torchdistill YAML (KD or plain), with OPDF.

Written on torchdistill's public API (``get_distillation_box`` / ``get_training_box``, its data
loaders, losses and YAML loader); it accepts torchdistill's standard config layout, so the same
YAML runs under torchdistill's own example script. Differences that matter:

* distributed runs (``torchrun``) work on CPU too (gloo), and the student is DDP-wrapped there;
* a frozen teacher is put in ``eval()`` mode (torchdistill 1.1.5 leaves it in train mode, so its
  BatchNorm layers would use batch statistics and drift);
* ``<dst_ckpt stem>.last.pt`` is written after every epoch with optimizer, scheduler, stage, RNG
  states and the resolved config, and ``--resume`` continues from it bit-exactly on CPU (and refuses a
  changed config unless ``--resume_changed_config``);
* every checkpoint is read with ``weights_only=True`` (``--trust_checkpoint FILE`` opts one file out);
  a ``src_ckpt`` that does not exist is an error;
* a run whose student weights or buffers become NaN/Inf stops with an error naming them, and nothing
  non-finite is ever saved; ``dst_ckpt`` is checked for writability before training;
* a frozen teacher, also inside a wrapper (FT, CRD), stays in ``eval()``; under ``torchrun`` the
  student's buffers (BatchNorm statistics) are broadcast from rank 0 before validation and saving, so
  the logged validation is that of the saved checkpoint;
* every file is written atomically; ``--metrics_json`` records the results for ablations.

* ``--launcher slurm`` submits the run as one SLURM job through submitit (``--launcher_set nodes=2``,
  ``gpus_per_node=8``, ``tasks_per_node=8``, ``partition=...``): every task runs this trainer, with the
  rank, world size and master address from the SLURM environment (the same ``init_distributed`` as
  under ``torchrun``); on preemption or time-out the job requeues itself and continues with ``--resume``
  (:mod:`opdf_torchdistill.study.jobs`).

Examples::

    python tools/train.py --config configs/digits/kd_opdf.yaml --device cpu --seed 1
    torchrun --nproc_per_node 2 tools/train.py --config ... --device cpu
    python tools/train.py --config ... --device cuda --launcher slurm --launcher_set nodes=2 \\
        --launcher_set gpus_per_node=8 --launcher_set tasks_per_node=8 --launcher_set partition=gpu
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchdistill.common.module_util import check_if_wrapped
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box
from torchdistill.datasets.util import build_data_loader

from ..io import atomic_torch_save, atomic_write_json, is_trusted, load_checkpoint, trusted_checkpoints
from ..plugin.diagnostics import LossTermGradients
from ..runfiles import (RunLock, check_existing_kind, check_outputs, config_input_files, last_ckpt_path,
                        refuse_existing)
from .common import (ConfigError, build_model, check_device, config_differences, config_snapshot, init_distributed,
                     is_main_process, load_config, run_cli, safe_torchdistill_loads, setup_logging, student_config_of)

__all__ = ['main', 'run', 'get_parser', 'evaluate', 'last_ckpt_path', 'non_finite_tensors', 'sync_buffers',
           'check_epochs', 'positive_int', 'DivergedError', 'ResumeError']

logger = logging.getLogger('opdf_torchdistill.train')


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss, parameter or buffer; nothing non-finite was saved."""


class ResumeError(RuntimeError):
    """``--resume`` cannot continue from the given checkpoint as asked (the message says why and what to do)."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Knowledge distillation (with OPDF) for image classification, '
                                            'from a torchdistill YAML config')
    p.add_argument('--config', required=True, help='YAML config (torchdistill layout)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda, cuda:1, ...')
    p.add_argument('--run_log', help='also write the log to this file')
    p.add_argument('--seed', type=int, help='seed for python, numpy and torch RNGs')
    p.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                   help='continue from a .last.pt checkpoint (default: the one next to dst_ckpt)')
    p.add_argument('--resume_changed_config', action='store_true',
                   help='let --resume continue with a config that differs from the checkpoint\'s (listed in the log)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override an existing config value, e.g. --set train.num_epochs=3 (value parsed as YAML); '
                        '--set +dotted.key=VALUE adds a key the config does not have')
    p.add_argument('--trust_checkpoint', action='append', default=[], metavar='FILE',
                   help='load FILE even though it is not plain tensor data (unpickling it can run code: only for '
                        'files whose origin you know); repeat for several files')
    p.add_argument('--dst_ckpt', help='where the best student checkpoint goes (overrides the config\'s dst_ckpt)')
    p.add_argument('--force', action='store_true',
                   help='start a fresh run even though dst_ckpt or its .last.pt exist (they are replaced); without '
                        'it such a run is refused (continue one with --resume)')
    p.add_argument('--stop_after', type=positive_int, metavar='N',
                   help='leave after N epochs of this invocation (time-limited jobs); continue with --resume')
    p.add_argument('--metrics_json', '--json', dest='metrics_json',
                   help='write final metrics (accuracies, times, parameter counts, first-step gradient norms) here')
    p.add_argument('--amp', choices=['bf16'], help='train under bfloat16 autocast (MPO contraction stays float32)')
    p.add_argument('--threads', type=int, help='torch intra-op threads')
    p.add_argument('-test_only', action='store_true', help='only test the student from its dst_ckpt')
    p.add_argument('-student_only', action='store_true', help='do not test the teacher')
    p.add_argument('-adjust_lr', action='store_true', help='multiply learning rates by the number of processes')
    p.add_argument('-log_config', action='store_true', help='log the loaded config')
    p.add_argument('--trust_config', action='store_true',
                   help='let the config\'s !import_call/!import_get tags run any importable name (configs are code: '
                        'by default only torch, torchvision, torchdistill, this package, transformers, timm and the '
                        'config\'s dependencies are allowed)')
    p.add_argument('--debug', action='store_true', help='on an error, print the traceback too')
    p.add_argument('--launcher', choices=['local', 'slurm', 'submitit-local'],
                   help='submit this run as one job (slurm: a SLURM job through submitit, every task DDP, requeued '
                        'and resumed on preemption; submitit-local: the same on this machine) instead of training here')
    p.add_argument('--launcher_set', action='append', default=[], metavar='KEY=VALUE',
                   help='a launcher setting: partition, account, qos, nodes, gpus_per_node, tasks_per_node, '
                        'cpus_per_task, mem_gb, timeout_min, constraint, sbatch, setup, folder (job logs; default '
                        'runs/submitit), ... (repeat)')
    p.add_argument('--wait', action='store_true', help='with --launcher: wait for the job and return its status')
    return p


_LAUNCH_FLAGS = ('--launcher', '--launcher_set')


def _without_launcher_flags(argv) -> list[str]:
    """The trainer's own arguments: ``argv`` less ``--launcher X``, ``--launcher_set K=V`` and ``--wait``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _LAUNCH_FLAGS:
            skip = True
            continue
        if arg == '--wait' or arg.startswith(tuple(f + '=' for f in _LAUNCH_FLAGS)):
            continue
        out.append(str(arg))
    return out


def _submit(args, argv) -> int:
    """``--launcher slurm|submitit-local``: this run as one job
    (:func:`opdf_torchdistill.study.launchers.submit_single`)."""
    status = [0]

    def body():
        from ..study.launchers import launcher_for, submit_single
        launcher = launcher_for(None, args.launcher, args.launcher_set)
        status[0] = submit_single(_without_launcher_flags(argv), launcher, wait=args.wait, device=args.device)

    code = run_cli(body, args.debug)
    return code or status[0]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def _unwrap(model):
    return model.module if check_if_wrapped(model) else model


def _rng_state() -> dict:
    """All RNG states as tensors and plain Python data, so ``.last.pt`` loads with ``weights_only=True``."""
    np_state = np.random.get_state(legacy=False)
    state = {'torch': torch.get_rng_state(),
             'numpy': {'bit_generator': np_state['bit_generator'],
                       'key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
                       'pos': int(np_state['state']['pos']), 'has_gauss': int(np_state['has_gauss']),
                       'gauss': float(np_state['gauss'])},
             'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np_state = state['numpy']
    if isinstance(np_state, dict):
        np.random.set_state({'bit_generator': np_state['bit_generator'],
                             'state': {'key': np_state['key'].numpy().astype(np.uint32), 'pos': np_state['pos']},
                             'has_gauss': np_state['has_gauss'], 'gauss': np_state['gauss']})
    else:  # a trusted resume file of the first release: NumPy's legacy tuple
        np.random.set_state(np_state)
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _set_seed(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.inference_mode()
def evaluate(model, data_loader, device, title: str = 'Validation') -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy, reduced over processes."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    start = time.perf_counter()
    for batch in data_loader:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        outputs = model(images)
        k = min(5, outputs.shape[1])
        top = outputs.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        stats[0] += hits[:, :1].sum()
        stats[1] += hits.sum()
        stats[2] += torch.nn.functional.cross_entropy(outputs.float(), targets, reduction='sum')
        stats[3] += targets.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    n = max(stats[3].item(), 1.0)
    result = {'acc1': 100.0 * stats[0].item() / n, 'acc5': 100.0 * stats[1].item() / n,
              'loss': stats[2].item() / n, 'samples': int(stats[3].item()), 'seconds': time.perf_counter() - start}
    logger.info('%s: acc@1 %.4f  acc@5 %.4f  loss %.4f  (%d samples, %.1f s)', title, result['acc1'],
                result['acc5'], result['loss'], result['samples'], result['seconds'])
    return result


def _train_one_epoch(box, device, epoch: int, num_epochs: int, log_freq: int, amp: str | None,
                     measure_on=None) -> dict:
    """One epoch; with ``measure_on`` (the raw student) the first step's gradient norm of every weighted
    loss term on the aligned auxiliary cores is measured and returned as ``first_step``."""
    loader = box.train_data_loader
    total = len(loader)
    losses, seen, start = [], 0, time.perf_counter()
    first_step = None
    for step, (images, targets, supp_dict) in enumerate(loader, 1):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        term_gradients = LossTermGradients(box) if measure_on is not None and step == 1 else None
        if amp == 'bf16':
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = box.forward_process(images, targets, supp_dict)
        else:
            loss = box.forward_process(images, targets, supp_dict)
        if term_gradients is not None:
            first_step = term_gradients.measure(measure_on)
        box.post_forward_process(loss=loss)
        value = loss.item()
        if not math.isfinite(value):
            raise DivergedError(f'epoch {epoch + 1} step {step}: loss is {value}; nothing from this epoch was saved; '
                                f'lower the learning rate (over-parameterized students need smaller ones) or check '
                                f'the data')
        losses.append(value)
        seen += images.shape[0]
        if step % log_freq == 0 or step == total:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (total - step)
            logger.info('Epoch %d/%d [%d/%d]  loss %.4f  lr %.3g  %.1f img/s  eta %s', epoch + 1, num_epochs, step,
                        total, sum(losses[-log_freq:]) / len(losses[-log_freq:]),
                        box.optimizer.param_groups[0]['lr'], seen / max(elapsed, 1e-9),
                        datetime.timedelta(seconds=int(eta)))
    return {'loss': sum(losses) / max(len(losses), 1), 'seconds': time.perf_counter() - start, 'first_step': first_step}


def _wrap_for_cpu_ddp(box, distributed: bool) -> None:
    """torchdistill's ``wrap_model`` only wraps on CUDA; gloo runs need the student wrapped too."""
    if not distributed:
        return
    attr = 'student_model' if hasattr(box, 'student_model') else 'model'
    model = getattr(box, attr)
    if check_if_wrapped(model) or not any(p.requires_grad for p in model.parameters()):
        return
    if next(model.parameters()).device.type == 'cpu':
        setattr(box, attr, DistributedDataParallel(model, find_unused_parameters=False))


def _advance_to_epoch(box, epoch: int) -> None:
    """Replay stage transitions of a multi-stage box up to ``epoch`` (for resuming)."""
    if not hasattr(box, 'stage_end_epoch'):
        return
    box.current_epoch = epoch
    while box.stage_end_epoch <= epoch < box.num_epochs:
        box.advance_to_next_stage()


def _eval_frozen(module: torch.nn.Module) -> None:
    """``eval()`` every part of ``module`` whose parameters are all frozen (a frozen teacher, also inside
    a trainable wrapper such as FT's paraphraser or CRD's embedding heads), so its BatchNorm statistics
    and dropout do not change; trainable parts keep the mode the box gave them."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _eval_frozen(child)


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` (MPO cores included) holding NaN or Inf."""
    bad = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            bad.append(name)
    return bad


def _check_finite(model, where: str, dst_ckpt: str) -> None:
    bad = non_finite_tensors(model)
    if bad:
        shown = ', '.join(bad[:8]) + (f' and {len(bad) - 8} more' if len(bad) > 8 else '')
        raise DivergedError(f'{where}: training diverged: the student has NaN/Inf in {shown}; nothing from this epoch '
                            f'was saved ({dst_ckpt} keeps the last finite best, if any). Lower the learning rate '
                            f'(over-parameterized students need smaller ones) or check the data')


@torch.no_grad()
def sync_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Broadcast every buffer of ``model`` (BatchNorm running statistics, frozen cores) from rank ``src``:
    DDP leaves each rank with the statistics of its own last batches, so without this each rank would
    validate a different model and the saved one (rank 0's) would not be the validated one."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in _unwrap(model).buffers():
        dist.broadcast(buffer, src)


def _check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail before training, not after the first epoch, when an output cannot be written."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise IsADirectoryError(f'{what}: {path} is a directory; give a file path')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise PermissionError(f'{what}: cannot write to {path.parent} ({exc.strerror or exc}); choose another '
                              f'path') from None
    if path.exists() and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
        raise PermissionError(f'{what}: {path} is not writable')


def _load_resume(path: Path, args, last_path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f'--resume: no checkpoint at {path} (it is written after every epoch)')
    ckpt = load_checkpoint(path, trusted=is_trusted(path, getattr(args, 'trust_checkpoint', None)))
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt or 'optimizer' not in ckpt:
        raise ResumeError(f'--resume {path}: not a resume checkpoint (no epoch/optimizer state; a best or exported '
                          f'checkpoint cannot be resumed). Resume from {last_path}, or start a new run from these '
                          f'weights with models.student_model.src_ckpt')
    return ckpt


def _restore_training_state(box, ckpt: dict, path: Path) -> None:
    saved = ckpt.get('classes', {})
    for what, obj in (('optimizer', box.optimizer), ('lr_scheduler', box.lr_scheduler)):
        current = None if obj is None else type(obj).__name__
        if what in saved and saved[what] != current:
            raise ResumeError(f'--resume {path}: the checkpoint\'s {what} is {saved[what]}, the config builds '
                              f'{current}; its state cannot be carried over. Resume with the same {what}, or start '
                              f'a new run from the weights (models.student_model.src_ckpt)')
    try:
        box.optimizer.load_state_dict(ckpt['optimizer'])
        if box.lr_scheduler is not None and ckpt.get('lr_scheduler') is not None:
            box.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ResumeError(f'--resume {path}: the saved optimizer/scheduler state does not fit the one the config '
                          f'builds ({type(exc).__name__}: {exc}); resume with the optimizer, scheduler and parameter '
                          f'groups of the original run') from None


_DST_KEYS = ('models.student_model.dst_ckpt:', 'models.model.dst_ckpt:')


def _check_hook_paths(train_config: dict, models: dict) -> None:
    """A ``forward_hook`` path the model does not have fails deep in torchdistill (``'NoneType' object has no
    attribute 'register_forward_hook'``); name the stage, side and path instead. Sides with a wrapper or a
    ``sequential`` redesign are left to torchdistill (their module tree is only known once built)."""
    from torchdistill.common.module_util import get_module
    stages = [('train', train_config)] + [(f'train.{k}', v) for k, v in train_config.items()
                                         if k.startswith('stage') and isinstance(v, dict)]
    for where, stage in stages:
        for side, model in models.items():
            side_config = stage.get(side)
            if model is None or not isinstance(side_config, dict) or side_config.get('auxiliary_model_wrapper') \
                    or side_config.get('sequential'):
                continue
            hooks = side_config.get('forward_hook') or {}
            for io in ('input', 'output'):
                for path in hooks.get(io) or ():
                    if path == '.' or get_module(model, path) is not None:
                        continue
                    advice = (f"the OPDF probe 'opdf' is attached by auxiliary_model_wrapper: {{key: 'opdf_probe'}} "
                              f"under {where}.{side} (students built with key opdf_student have it already)"
                              if path.split('.')[0] == 'opdf' else 'check the module path against the model')
                    raise ConfigError(f'{where}.{side}.forward_hook.{io}: the {side} model ({type(model).__name__}) '
                                      f'has no module {path!r}; {advice}')


def train(teacher, student, config: dict, args, device, distributed: bool, world_size: int,
          snapshot: Any = None) -> dict:
    train_config = config['train']
    student_config = student_config_of(config)
    dst_ckpt = os.path.expanduser(student_config['dst_ckpt'])
    last_path = last_ckpt_path(dst_ckpt)
    lr_factor = world_size if distributed and args.adjust_lr else 1
    ckpt = None
    if args.resume:  # read and check before building anything
        path = last_path if args.resume == 'auto' else Path(os.path.expanduser(args.resume))
        ckpt = _load_resume(path, args, last_path)
        differences = [d for d in config_differences(ckpt['config'], snapshot) if not d.startswith(_DST_KEYS)] \
            if ckpt.get('config') is not None and snapshot is not None else []  # a moved run dir is no change
        if differences:
            listed = '\n  '.join(differences)
            if not getattr(args, 'resume_changed_config', False):
                raise ResumeError(f'--resume {path}: the config differs from the one the checkpoint was trained '
                                  f'with:\n  {listed}\nrestore it, or pass --resume_changed_config to continue '
                                  f'with the new values')
            logger.warning('--resume %s with a changed config (--resume_changed_config):\n  %s', path, listed)
    _check_hook_paths(train_config, {'teacher': teacher, 'student': student} if teacher is not None
                      else {'model': student})
    dataset_dict = config['datasets']
    if teacher is None:
        box = get_training_box(student, dataset_dict, train_config, device, None, distributed, lr_factor)
    else:
        box = get_distillation_box(teacher, student, dataset_dict, train_config, device, None, distributed, lr_factor)
    _wrap_for_cpu_ddp(box, distributed)
    box_model = lambda: box.student_model if teacher is not None else box.model  # noqa: E731

    start_epoch, best, history = 0, None, []
    if ckpt is not None:
        start_epoch, best, history = ckpt['epoch'], ckpt['best_value'], ckpt.get('history', [])
        if best is not None and best < 0:  # first-release files: -1 meant "nothing saved yet"
            best = None
        _advance_to_epoch(box, start_epoch)
        _wrap_for_cpu_ddp(box, distributed)
        student.load_state_dict(ckpt['model'], strict=True)
        if ckpt.get('box_model') is not None:
            _unwrap(box_model()).load_state_dict(ckpt['box_model'], strict=True)
        _restore_training_state(box, ckpt, path)
        _set_rng_state(ckpt['rng'])
        logger.info('resumed from %s at epoch %d (best val acc@1 %s)', path, start_epoch,
                    'none yet' if best is None else f'{best:.4f}')

    log_freq = int(train_config.get('log_freq', 100))
    first_step: dict = {}
    start = time.perf_counter()
    stage = getattr(box, 'stage_number', 1)
    for epoch in range(start_epoch, box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        if teacher is not None:
            _eval_frozen(box.teacher_model)
        train_stats = _train_one_epoch(box, device, epoch, box.num_epochs, log_freq, args.amp,
                                       measure_on=student if epoch == start_epoch else None)
        if train_stats['first_step'] is not None:
            first_step = train_stats['first_step']  # grad_norms, alignment coverage (--metrics_json)
        if distributed:
            sync_buffers(student)
        _check_finite(student, f'epoch {epoch + 1}', dst_ckpt)
        val = evaluate(student, box.val_data_loader, device, f'Validation (epoch {epoch + 1})')
        if not math.isfinite(val['loss']):
            raise DivergedError(f'epoch {epoch + 1}: training diverged: the validation loss is {val["loss"]} (the '
                                f'student outputs NaN/Inf); nothing from this epoch was saved')
        history.append({'epoch': epoch + 1, 'train_loss': train_stats['loss'], 'val_acc1': val['acc1'],
                        'val_loss': val['loss'], 'seconds': train_stats['seconds']})
        if best is None or val['acc1'] > best:
            logger.info('best val acc@1 %s -> %.4f; saving %s', 'none' if best is None else f'{best:.4f}',
                        val['acc1'], dst_ckpt)
            best = val['acc1']
            if is_main_process():
                atomic_torch_save({'model': student.state_dict(), 'optimizer': box.optimizer.state_dict(),
                                   'lr_scheduler': None if box.lr_scheduler is None else box.lr_scheduler.state_dict(),
                                   'best_value': best, 'args': _plain_args(args)}, dst_ckpt)
        box.post_epoch_process(metrics=val['acc1'])
        if getattr(box, 'stage_number', 1) != stage:
            stage = box.stage_number
            _wrap_for_cpu_ddp(box, distributed)
        if is_main_process():
            inner = _unwrap(box_model())
            atomic_torch_save({
                'model': student.state_dict(), 'box_model': None if inner is student else inner.state_dict(),
                'optimizer': box.optimizer.state_dict(),
                'lr_scheduler': None if box.lr_scheduler is None else box.lr_scheduler.state_dict(),
                'classes': {'optimizer': type(box.optimizer).__name__,
                            'lr_scheduler': None if box.lr_scheduler is None else type(box.lr_scheduler).__name__},
                'epoch': epoch + 1, 'best_value': best, 'history': history, 'rng': _rng_state(),
                'args': _plain_args(args), 'config': snapshot,
            }, last_path)
        if distributed:
            dist.barrier()
        if args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < box.num_epochs:
            logger.info('stopping after %d epoch(s) as asked; resume with --resume %s', args.stop_after, last_path)
            box.clean_modules()
            return {'best_val_acc1': best, 'train_seconds': time.perf_counter() - start, 'history': history,
                    'stopped_at_epoch': epoch + 1, **first_step}
    elapsed = time.perf_counter() - start
    logger.info('training time %s', datetime.timedelta(seconds=int(elapsed)))
    box.clean_modules()
    return {'best_val_acc1': best, 'train_seconds': elapsed, 'history': history, **first_step}


def _plain_args(args) -> dict:
    """``vars(args)`` with only plain values, so checkpoints stay loadable with ``weights_only=True``."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else
            [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v) for k, v in vars(args).items()}


def _param_counts(model) -> dict:
    from ..surgery import mpo_modules
    total = sum(p.numel() for p in model.parameters())
    mpo = list(mpo_modules(model))
    cores = sum(sum(t.numel() for t in m.parametrizations[name].parameters()) for _, m, name, _ in mpo)
    cores += sum(sum(t.numel() for t in m.parametrizations[name].buffers()) for _, m, name, _ in mpo)
    dense = sum(p.plan.shape[0] * p.plan.shape[1] for _, _, _, p in mpo)
    return {'train_params': total, 'inference_params': total - cores + dense if mpo else total}


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (0: success, 1: an error, printed as one line).

    :func:`run` is the programmatic entry point (it returns the metrics and raises)."""
    args = get_parser().parse_args(argv)
    if args.launcher not in (None, 'local'):
        return _submit(args, sys.argv[1:] if argv is None else list(argv))
    return run_cli(lambda: run(args), args.debug)


def check_epochs(config: dict) -> None:
    """``num_epochs`` of ``train`` and of every ``train.stageN`` must be a positive integer (``-1`` would run
    nothing and test the untrained student; ``abc`` would fail after the models are built)."""
    train = config.get('train')
    if not isinstance(train, dict):
        raise ConfigError('the config has no train: section (a mapping)')
    blocks = [('train', train)] + [(f'train.{k}', v) for k, v in train.items()
                                   if str(k).startswith('stage') and isinstance(v, dict)]
    for where, block in blocks:
        if 'num_epochs' not in block:
            continue
        value = block['num_epochs']
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f'{where}.num_epochs must be a positive integer, got {value!r}')


def _rank0_decides(check) -> None:
    """Run ``check()`` on rank 0 only and raise on every rank when it fails (rank 0 its own error), so no
    rank waits forever on a collective that rank 0 will never reach."""
    if not (dist.is_available() and dist.is_initialized()):
        check()
        return
    error, outcome = None, [None]
    if dist.get_rank() == 0:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error, outcome[0] = exc, str(exc)
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise ConfigError(f'rank 0 refused the run: {outcome[0]}')


def _guard_outputs(args, snapshot: Any, dst_ckpt: str) -> None:
    """Before anything is opened: no output may be an input or another output; a fresh run does not
    replace an earlier run's files without --force (see :mod:`opdf_torchdistill.runfiles`)."""
    outputs = {'--metrics_json': args.metrics_json, '--run_log': args.run_log}
    if not args.test_only:
        outputs = {'dst_ckpt': dst_ckpt, 'the resume checkpoint (<dst stem>.last.pt)': last_ckpt_path(dst_ckpt),
                   'the lock file': f'{os.path.expanduser(dst_ckpt)}.lock', **outputs}
    inputs = config_input_files(snapshot, args.config)
    inputs = {f'the config\'s {k}' if k != '--config' else k: v for k, v in inputs.items()}
    if args.test_only:
        inputs['dst_ckpt (read by -test_only)'] = dst_ckpt
    if args.resume and args.resume != 'auto' and Path(os.path.expanduser(args.resume)) != last_ckpt_path(dst_ckpt):
        inputs['--resume'] = args.resume
    check_outputs(outputs, inputs)
    force = getattr(args, 'force', False)
    if not args.test_only and not args.resume and not force:
        refuse_existing({'dst_ckpt': dst_ckpt, 'its resume checkpoint': last_ckpt_path(dst_ckpt)},
                        'they are an earlier run\'s, which a fresh run would replace: continue that run with '
                        '--resume, replace it with --force, or choose another dst_ckpt (--dst_ckpt)')
    if not force:
        check_existing_kind(args.metrics_json, 'json', '--metrics_json')
        check_existing_kind(args.run_log, 'text', '--run_log')
    if not args.test_only:  # fail now, not after the first epoch
        _check_writable(dst_ckpt, 'models.student_model.dst_ckpt')
    if args.metrics_json:
        _check_writable(args.metrics_json, '--metrics_json')


def run(args: argparse.Namespace, config: dict | None = None):
    """Train (unless ``-test_only``) and test; returns ``(metrics, student, teacher)``.

    ``config``: an already loaded (and possibly edited) config to use instead of ``args.config``.
    Outputs are checked before anything is opened (:func:`_guard_outputs`), and the run holds
    ``<dst_ckpt>.lock`` from then on (one run per checkpoint).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    distributed, world_size, device_ids, device = init_distributed(args.device)
    _set_seed(args.seed)
    trust = getattr(args, 'trust_checkpoint', None) or ()
    snapshot = config_snapshot(args.config, args.overrides) if config is None else None
    plain = snapshot if snapshot is not None else config
    student_plain = student_config_of(plain)
    if args.dst_ckpt:
        student_plain['dst_ckpt'] = args.dst_ckpt
    if 'dst_ckpt' not in student_plain:
        raise ConfigError('models.student_model.dst_ckpt is required (where the best checkpoint goes)')
    dst_ckpt = os.path.expanduser(str(student_plain['dst_ckpt']))
    check_epochs(plain)
    _rank0_decides(lambda: _guard_outputs(args, plain, dst_ckpt))
    lock = RunLock(dst_ckpt, sys.argv) if not args.test_only and is_main_process() else None
    if not args.test_only:  # every rank joins the decision (a collective), only rank 0 holds the lock
        _rank0_decides(lambda: lock.acquire() if lock is not None else None)
    try:
        setup_logging(args.run_log)
        logger.info('args: %s', vars(args))
        with trusted_checkpoints(trust):
            return _run(args, config, snapshot, dst_ckpt, distributed, world_size, device, trust)
    finally:
        if lock is not None:
            lock.release()


def _run(args, config, snapshot, dst_ckpt, distributed, world_size, device, trust):
    if config is None:
        config = load_config(args.config, args.overrides, trust_config=getattr(args, 'trust_config', False))
    check_epochs(config)
    if args.log_config:
        logger.info('config: %s', config)
    models_config = config['models']
    teacher_config = models_config.get('teacher_model')
    student_config = student_config_of(config)
    student_config['dst_ckpt'] = dst_ckpt
    teacher = build_model(teacher_config, device, distributed, name='teacher_model', trust=trust) \
        if teacher_config is not None else None
    student = build_model(student_config, device, distributed,
                          name='student_model' if 'student_model' in models_config else 'model', trust=trust)
    metrics: dict = {'config': args.config, 'seed': args.seed, 'overrides': args.overrides}
    metrics.update(_param_counts(student))
    if not args.test_only:
        with safe_torchdistill_loads(trust):  # stage-level train.*.src_ckpt: weights_only, missing file = error
            metrics.update(train(teacher, student, config, args, device, distributed, world_size, snapshot))
        if metrics.get('stopped_at_epoch') is not None:  # unfinished: testing waits for the resumed run
            if args.metrics_json and is_main_process():
                atomic_write_json(metrics, args.metrics_json)
            return metrics, student, teacher

    if os.path.exists(dst_ckpt):
        ckpt = load_checkpoint(dst_ckpt, trusted=is_trusted(dst_ckpt, trust))
        state = ckpt['model'] if isinstance(ckpt, dict) and 'model' in ckpt else ckpt
        student.load_state_dict(state, strict=True)
        logger.info('loaded the best student checkpoint %s (strict)', dst_ckpt)
    elif args.test_only:
        raise FileNotFoundError(f'-test_only: no checkpoint at models.student_model.dst_ckpt = {dst_ckpt}; train '
                                f'first or give --dst_ckpt')
    else:
        logger.warning('no checkpoint at %s: testing the student as it is', dst_ckpt)
    test_config = config.get('test', {})
    loader_config = test_config.get('test_data_loader')
    if loader_config is not None:
        test_loader = build_data_loader(config['datasets'][loader_config['dataset_id']], loader_config, distributed)
        if teacher is not None and not args.student_only:
            metrics['teacher_test'] = evaluate(teacher, test_loader, device, f'Test [teacher: {teacher_config["key"]}]')
        metrics['test'] = evaluate(student, test_loader, device, f'Test [student: {student_config["key"]}]')
    if args.metrics_json and is_main_process():
        atomic_write_json(metrics, args.metrics_json)
    if distributed:
        dist.barrier()
    return metrics, student, teacher


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
