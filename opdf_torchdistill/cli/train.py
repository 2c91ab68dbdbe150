"""Train, validate and test an image classifier from a torchdistill YAML (KD or plain), with OPDF.

Written on torchdistill's public API (``get_distillation_box`` / ``get_training_box``, its data
loaders, losses and YAML loader); it accepts torchdistill's standard config layout, so the same
YAML runs under torchdistill's own example script. Differences that matter:

* distributed runs (``torchrun``) work on CPU too (gloo), and the student is DDP-wrapped there;
* a frozen teacher is put in ``eval()`` mode (torchdistill 1.1.5 leaves it in train mode, so its
  BatchNorm layers would use batch statistics and drift);
* ``<dst_ckpt stem>.last.pt`` is written after every epoch with optimizer, scheduler, stage and RNG
  states, and ``--resume`` continues from it bit-exactly on CPU;
* every file is written atomically; ``--metrics_json`` records the results for ablations.

Examples::

    python tools/train.py --config configs/digits/kd_opdf.yaml --device cpu --seed 1
    torchrun --nproc_per_node 2 tools/train.py --config ... --device cpu
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchdistill.common.module_util import check_if_wrapped
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box
from torchdistill.datasets.util import build_data_loader

from ..io import atomic_torch_save, atomic_write_json
from .common import build_model, init_distributed, is_main_process, load_config, setup_logging, student_config_of

__all__ = ['main', 'run', 'get_parser', 'evaluate', 'last_ckpt_path']

logger = logging.getLogger('opdf_torchdistill.train')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Knowledge distillation (with OPDF) for image classification, '
                                            'from a torchdistill YAML config')
    p.add_argument('--config', required=True, help='YAML config (torchdistill layout)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda, cuda:1, ...')
    p.add_argument('--run_log', help='also write the log to this file')
    p.add_argument('--seed', type=int, help='seed for python, numpy and torch RNGs')
    p.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                   help='continue from a .last.pt checkpoint (default: the one next to dst_ckpt)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config value, e.g. --set train.num_epochs=3 (value parsed as YAML)')
    p.add_argument('--dst_ckpt', help='where the best student checkpoint goes (overrides the config\'s dst_ckpt)')
    p.add_argument('--stop_after', type=int, metavar='N',
                   help='leave after N epochs of this invocation (time-limited jobs); continue with --resume')
    p.add_argument('--metrics_json', help='write final metrics (accuracies, times, parameter counts) here')
    p.add_argument('--amp', choices=['bf16'], help='train under bfloat16 autocast (MPO contraction stays float32)')
    p.add_argument('--threads', type=int, help='torch intra-op threads')
    p.add_argument('-test_only', action='store_true', help='only test the student from its dst_ckpt')
    p.add_argument('-student_only', action='store_true', help='do not test the teacher')
    p.add_argument('-adjust_lr', action='store_true', help='multiply learning rates by the number of processes')
    p.add_argument('-log_config', action='store_true', help='log the loaded config')
    return p


def last_ckpt_path(dst_ckpt: str) -> Path:
    path = Path(os.path.expanduser(dst_ckpt))
    return path.with_name(path.stem + '.last' + path.suffix)


def _unwrap(model):
    return model.module if check_if_wrapped(model) else model


def _rng_state() -> dict:
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
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


def _train_one_epoch(box, device, epoch: int, num_epochs: int, log_freq: int, amp: str | None) -> dict:
    loader = box.train_data_loader
    total = len(loader)
    losses, seen, start = [], 0, time.perf_counter()
    for step, (images, targets, supp_dict) in enumerate(loader, 1):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if amp == 'bf16':
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = box.forward_process(images, targets, supp_dict)
        else:
            loss = box.forward_process(images, targets, supp_dict)
        box.post_forward_process(loss=loss)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f'epoch {epoch} step {step}: loss is {value}; lower the learning rate '
                                     f'(over-parameterized students need smaller ones) or check the data')
        losses.append(value)
        seen += images.shape[0]
        if step % log_freq == 0 or step == total:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (total - step)
            logger.info('Epoch %d/%d [%d/%d]  loss %.4f  lr %.3g  %.1f img/s  eta %s', epoch + 1, num_epochs, step,
                        total, sum(losses[-log_freq:]) / len(losses[-log_freq:]),
                        box.optimizer.param_groups[0]['lr'], seen / max(elapsed, 1e-9),
                        datetime.timedelta(seconds=int(eta)))
    return {'loss': sum(losses) / max(len(losses), 1), 'seconds': time.perf_counter() - start}


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


def train(teacher, student, config: dict, args, device, distributed: bool, world_size: int) -> dict:
    train_config = config['train']
    student_config = student_config_of(config)
    dst_ckpt = os.path.expanduser(student_config['dst_ckpt'])
    last_path = last_ckpt_path(dst_ckpt)
    lr_factor = world_size if distributed and args.adjust_lr else 1
    dataset_dict = config['datasets']
    if teacher is None:
        box = get_training_box(student, dataset_dict, train_config, device, None, distributed, lr_factor)
    else:
        box = get_distillation_box(teacher, student, dataset_dict, train_config, device, None, distributed, lr_factor)
    _wrap_for_cpu_ddp(box, distributed)
    box_model = lambda: box.student_model if teacher is not None else box.model  # noqa: E731

    start_epoch, best, history = 0, -1.0, []
    if args.resume:
        path = last_path if args.resume == 'auto' else Path(os.path.expanduser(args.resume))
        if not path.exists():
            raise FileNotFoundError(f'--resume: no checkpoint at {path} (it is written after every epoch)')
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
        start_epoch, best, history = ckpt['epoch'], ckpt['best_value'], ckpt.get('history', [])
        _advance_to_epoch(box, start_epoch)
        _wrap_for_cpu_ddp(box, distributed)
        student.load_state_dict(ckpt['model'], strict=True)
        if ckpt.get('box_model') is not None:
            _unwrap(box_model()).load_state_dict(ckpt['box_model'], strict=True)
        box.optimizer.load_state_dict(ckpt['optimizer'])
        if box.lr_scheduler is not None and ckpt.get('lr_scheduler') is not None:
            box.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        _set_rng_state(ckpt['rng'])
        logger.info('resumed from %s at epoch %d (best val acc@1 %.4f)', path, start_epoch, best)

    log_freq = int(train_config.get('log_freq', 100))
    start = time.perf_counter()
    stage = getattr(box, 'stage_number', 1)
    for epoch in range(start_epoch, box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        if teacher is not None and not box.teacher_updatable:
            box.teacher_model.eval()
        train_stats = _train_one_epoch(box, device, epoch, box.num_epochs, log_freq, args.amp)
        val = evaluate(student, box.val_data_loader, device, f'Validation (epoch {epoch + 1})')
        history.append({'epoch': epoch + 1, 'train_loss': train_stats['loss'], 'val_acc1': val['acc1'],
                        'val_loss': val['loss'], 'seconds': train_stats['seconds']})
        if val['acc1'] > best:
            logger.info('best val acc@1 %.4f -> %.4f; saving %s', max(best, 0.0), val['acc1'], dst_ckpt)
            best = val['acc1']
            if is_main_process():
                atomic_torch_save({'model': student.state_dict(), 'optimizer': box.optimizer.state_dict(),
                                   'lr_scheduler': None if box.lr_scheduler is None else box.lr_scheduler.state_dict(),
                                   'best_value': best, 'args': vars(args)}, dst_ckpt)
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
                'epoch': epoch + 1, 'best_value': best, 'history': history, 'rng': _rng_state(), 'args': vars(args),
            }, last_path)
        if distributed:
            dist.barrier()
        if args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < box.num_epochs:
            logger.info('stopping after %d epoch(s) as asked; resume with --resume %s', args.stop_after, last_path)
            box.clean_modules()
            return {'best_val_acc1': best, 'train_seconds': time.perf_counter() - start, 'history': history,
                    'stopped_at_epoch': epoch + 1}
    elapsed = time.perf_counter() - start
    logger.info('training time %s', datetime.timedelta(seconds=int(elapsed)))
    box.clean_modules()
    return {'best_val_acc1': best, 'train_seconds': elapsed, 'history': history}


def _param_counts(model) -> dict:
    from ..surgery import mpo_modules
    total = sum(p.numel() for p in model.parameters())
    mpo = list(mpo_modules(model))
    cores = sum(sum(t.numel() for t in m.parametrizations[name].parameters()) for _, m, name, _ in mpo)
    cores += sum(sum(t.numel() for t in m.parametrizations[name].buffers()) for _, m, name, _ in mpo)
    dense = sum(p.plan.shape[0] * p.plan.shape[1] for _, _, _, p in mpo)
    return {'train_params': total, 'inference_params': total - cores + dense if mpo else total}


def main(argv=None) -> dict:
    """Command-line entry point; returns the metrics."""
    metrics = run(get_parser().parse_args(argv))[0]
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def run(args: argparse.Namespace, config: dict | None = None):
    """Train (unless ``-test_only``) and test; returns ``(metrics, student, teacher)``.

    ``config``: an already loaded (and possibly edited) config to use instead of ``args.config``.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed, world_size, device_ids, device = init_distributed(args.device)
    setup_logging(args.run_log)
    logger.info('args: %s', vars(args))
    _set_seed(args.seed)
    if config is None:
        config = load_config(args.config, args.overrides)
    if args.log_config:
        logger.info('config: %s', config)
    models_config = config['models']
    teacher_config = models_config.get('teacher_model')
    student_config = student_config_of(config)
    if args.dst_ckpt:
        student_config['dst_ckpt'] = args.dst_ckpt
    if 'dst_ckpt' not in student_config:
        raise KeyError('models.student_model.dst_ckpt is required (where the best checkpoint goes)')
    teacher = build_model(teacher_config, device, distributed) if teacher_config is not None else None
    student = build_model(student_config, device, distributed)
    metrics: dict = {'config': args.config, 'seed': args.seed, 'overrides': args.overrides}
    metrics.update(_param_counts(student))
    if not args.test_only:
        metrics.update(train(teacher, student, config, args, device, distributed, world_size))
        if metrics.get('stopped_at_epoch') is not None:  # unfinished: testing waits for the resumed run
            if args.metrics_json and is_main_process():
                atomic_write_json(metrics, args.metrics_json)
            return metrics, student, teacher

    dst_ckpt = os.path.expanduser(student_config['dst_ckpt'])
    if os.path.exists(dst_ckpt):
        ckpt = torch.load(dst_ckpt, map_location='cpu', weights_only=False)
        student.load_state_dict(ckpt['model'] if 'model' in ckpt else ckpt, strict=True)
        logger.info('loaded the best student checkpoint %s (strict)', dst_ckpt)
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
    main()
