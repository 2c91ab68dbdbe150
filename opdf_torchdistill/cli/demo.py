"""The main job: OPDF end to end on real embedded data (scikit-learn's handwritten digits).

1. trains the teacher (the shipped recipe ``digits/teacher``), or reuses its checkpoint;
2. trains the student alone, with KD, and with KD + OPDF (MPO over-parameterization + alignment);
3. contracts and exports the OPDF student to the plain architecture and checks that the exported
   model, built without this package, reproduces the test accuracy;
4. prints a comparison table: accuracy, parameters while training and at inference, latency.

The recipes ship inside the package (:mod:`opdf_torchdistill.recipes`; ``configs/digits/`` in a
checkout), so ``opdf-demo`` runs from an installed wheel in any folder; it writes checkpoints and the
exported student under ``--out`` (default ``./runs/digits``, relative to the working directory).
Needs the ``demo`` extra (scikit-learn, which ships the digits images).

Example::

    python tools/digits_demo.py            # about a minute on 2 CPU cores
    opdf-demo --out /tmp/digits --epochs 2 # a quick check that everything runs
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ['main']

from ..recipes import ROOT as RECIPES

DEFAULT_CONFIGS = RECIPES / 'digits'
NEEDED = ('teacher', 'student_ce', 'kd', 'kd_opdf')  # the recipes (<name>.yaml) the demo runs


def _step(number: int, total: int, text: str) -> None:
    print(f'[{number}/{total}] {text}', flush=True)


def _latency_ms(model, x: torch.Tensor, repeats: int = 30) -> float:
    """Median wall time of one forward pass (ms) after warm-up, under inference_mode."""
    model.eval()
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _epoch_overrides(config: Path, epochs: int | None) -> list[str]:
    """``--set`` items that shorten a recipe to ``epochs`` (its cosine schedule's ``T_max`` too, so the
    shortened run still ends at the lowest rate)."""
    if epochs is None:
        return []
    from .common import load_config
    train = load_config(str(config))['train']
    items = [f'train.num_epochs={epochs}']
    if 'T_max' in ((train.get('scheduler') or {}).get('kwargs') or {}):
        items.append(f'train.scheduler.kwargs.T_max={epochs}')
    return items


def _train(config: Path, seed: int, device: str, out_dir: Path, name: str, epochs: int | None = None,
           mode: str = '--force'):
    """Run one config through the runner, with its checkpoints (and the teacher's) under ``out_dir``.

    ``mode``: ``--force`` (the demo owns ``out_dir``: a rerun replaces its own students), ``--resume``
    (continue an interrupted teacher) or ``''`` (a fresh run that must not replace anything)."""
    from .train import get_parser, run
    key = 'model' if name in ('teacher', 'student_ce') else 'student_model'
    argv = ['--config', str(config), '--device', device, '--seed', str(seed), '--dst_ckpt', str(out_dir / f'{name}.pt')]
    argv += [mode] if mode else []
    if key == 'student_model':
        argv += ['--set', f'models.teacher_model.src_ckpt={out_dir / "teacher.pt"}']
    for item in _epoch_overrides(config, epochs):
        argv += ['--set', item]
    start = time.perf_counter()
    metrics, student, teacher = run(get_parser().parse_args(argv))
    return metrics, student, teacher, time.perf_counter() - start


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='OPDF on the embedded digits data: teacher, KD, KD+OPDF, export')
    p.add_argument('--out', default='runs/digits',
                   help='directory for checkpoints and the exported student (relative to the working directory)')
    p.add_argument('--configs', default=str(DEFAULT_CONFIGS),
                   help=f'directory with {", ".join(n + ".yaml" for n in NEEDED)} (default: the shipped recipes)')
    p.add_argument('--epochs', type=_positive_int, metavar='N',
                   help="train every model for N epochs instead of the recipes' num_epochs (a quick check; "
                        'accuracies drop)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, help='torch intra-op threads')
    p.add_argument('--retrain_teacher', action='store_true', help='train the teacher even if its checkpoint exists')
    p.add_argument('-v', '--verbose', action='store_true', help='show the full training logs')
    p.add_argument('--debug', action='store_true', help='on an error, print the traceback too')
    return p


def _teacher_step(args, configs: Path, out: Path, total: int):
    """Reuse a finished teacher, resume an interrupted one, train a missing one; say which."""
    from ..io import load_checkpoint
    from ..plugin.models import build_base_model
    from ..runfiles import run_state, total_epochs
    from .common import load_config
    config = configs / 'teacher.yaml'
    epochs = args.epochs or total_epochs(load_config(str(config)))
    teacher_ckpt = out / 'teacher.pt'
    state, reached = run_state(teacher_ckpt, epochs)
    if args.retrain_teacher:
        state = 'retrain'
    if state == 'done':
        _step(1, total, f'teacher: reusing {teacher_ckpt} (finished: {reached or epochs} epochs)')
        teacher = build_base_model('digits_cnn', widths=[32, 64, 64], num_classes=10)
        teacher.load_state_dict(load_checkpoint(teacher_ckpt)['model'], strict=True)
        return teacher, None
    if state == 'resume':
        _step(1, total, f'teacher: {teacher_ckpt} is unfinished (epoch {reached} of {epochs}); resuming it ...')
        mode = '--resume'
    else:
        _step(1, total, 'teacher: training digits_cnn (32, 64, 64) with cross-entropy ...' +
              (' (--retrain_teacher)' if state == 'retrain' else ''))
        mode = '--force' if state == 'retrain' else ''
    _, teacher, _, seconds = _train(config, args.seed, args.device, out, 'teacher', args.epochs, mode)
    return teacher, seconds


def main(argv=None) -> int:
    from .common import run_cli
    args = get_parser().parse_args(argv)
    status: list[int] = []
    code = run_cli(lambda: status.append(_main(args)), args.debug)
    return code if code != 0 or not status else status[0]


def _main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s\t%(levelname)s\t%(name)s\t%(message)s')
    from ..plugin.models import build_base_model
    from ..tables import format_table
    from ..data import Digits
    from .common import load_config
    from .export import export_student
    from ..io import load_checkpoint

    configs, out = Path(args.configs), Path(args.out)
    missing = [f'{name}.yaml' for name in NEEDED if not (configs / f'{name}.yaml').is_file()]
    if missing:
        print(f'error: --configs {configs}: missing {", ".join(missing)} (the demo runs '
              f'{", ".join(n + ".yaml" for n in NEEDED)}; the shipped ones are in {DEFAULT_CONFIGS})', file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    total = 6
    rows, start = [], time.perf_counter()
    test = Digits('test', train_fraction=0.25)
    x_test, y_test = test.images, test.targets

    teacher, _ = _teacher_step(args, configs, out, total)
    results = {}
    for number, (name, label) in enumerate([('student_ce', 'student alone (cross-entropy)'), ('kd', 'student + KD'),
                                            ('kd_opdf', 'student + KD + OPDF')], 2):
        _step(number, total, f'{label}: training digits_cnn (4, 8, 8) ...')
        metrics, student, _, seconds = _train(configs / f'{name}.yaml', args.seed, args.device, out, name, args.epochs)
        results[name] = (metrics, student, seconds)
        print(f'      test acc@1 {metrics["test"]["acc1"]:.2f} %  ({seconds:.1f} s)', flush=True)
        if name == 'kd_opdf':
            print('      ' + str(student.opdf.report).replace('\n', '\n      '), flush=True)

    _step(5, total, 'exporting the OPDF student: contract the cores, verify, write the plain checkpoint ...')
    config = load_config(str(configs / 'kd_opdf.yaml'), [f'models.student_model.dst_ckpt={out / "kd_opdf.pt"}'])
    exported_path = out / 'kd_opdf_exported.pt'
    summary = export_student(config, str(out / 'kd_opdf.pt'), str(exported_path), x_test[:64])  # owns out: force
    plain = build_base_model('digits_cnn', widths=[4, 8, 8], num_classes=10)
    plain.load_state_dict(load_checkpoint(exported_path), strict=True)
    plain.eval()
    trained = results['kd_opdf'][1].eval()
    with torch.inference_mode():
        exported_pred, trained_pred = plain(x_test).argmax(1), trained(x_test).argmax(1)
    exported_acc = 100.0 * (exported_pred == y_test).sum().item() / len(y_test)
    if not torch.equal(exported_pred, trained_pred):
        print(f'error: the exported student predicts differently from the trained one on '
              f'{(exported_pred != trained_pred).sum().item()} test images', file=sys.stderr)
        return 1
    print(f'      {exported_path}: plain digits_cnn, outputs match to {summary["relative_output_difference"]:.1e}, '
          f'test acc@1 {exported_acc:.2f} % (same predictions on all {len(y_test)} test images)', flush=True)

    _step(6, total, 'measuring latency (batch of 360 test images, median of 30 forward passes) ...')
    with torch.inference_mode():
        teacher_acc = 100.0 * (teacher.eval()(x_test).argmax(1) == y_test).float().mean().item()

    def count(model):
        return sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for n, b in model.named_buffers() if '.parametrizations.' in n)

    rows.append(['teacher (32, 64, 64)', f'{teacher_acc:.2f}', count(teacher), count(teacher),
                 f'{_latency_ms(teacher, x_test):.2f}'])
    for name, label in [('student_ce', 'student alone'), ('kd', 'KD'), ('kd_opdf', 'KD + OPDF (MPO form)')]:
        metrics, student, _ = results[name]
        rows.append([label, f'{metrics["test"]["acc1"]:.2f}', metrics['train_params'], metrics['inference_params'],
                     f'{_latency_ms(student, x_test):.2f}'])
    rows.append(['KD + OPDF exported (plain)', f'{exported_acc:.2f}', count(plain), count(plain),
                 f'{_latency_ms(plain, x_test):.2f}'])
    print()
    print(format_table(['model', 'test acc@1 (%)', 'training params', 'inference params', 'latency (ms)'], rows,
                       'lrrrr'))
    short = f" Trained {args.epochs} epoch(s) per model (--epochs), not the recipes' num_epochs." if args.epochs else ''
    print(f'\nseed {args.seed}; digits test split: {len(test)} images; total time {time.perf_counter() - start:.0f} s. '
          f'One seed is noisy: see the digits study (docs/results-digits.md) for the 10-seed ablation.{short}')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
