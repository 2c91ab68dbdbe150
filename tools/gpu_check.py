#!/usr/bin/env python
"""GPU readiness check: is this CUDA machine ready for the paper-scale studies? (Under 8 minutes on one GPU.)

Measures and checks, on ``--device`` (default: ``cuda`` when there is one):

1. **Step time and peak memory**, KD vs KD+OPDF (one dummy factor, the alignment term on), one training
   step (teacher forward, student forward and backward, SGD) of ResNet-18 <- ResNet-34 at 224x224, batch
   128, and of BERT-base shapes (a 6 <- 12 layer, 768-wide encoder; batch 32 x 128 tokens), in float32 and
   under bf16 autocast (the MPO contraction stays float32). Median of ``--repeats`` steps after warm-up;
   peak memory is ``torch.cuda.max_memory_allocated`` over three steps (on CPU: not measured).
2. **CPU-vs-device agreement of the contraction**: a ResNet-18 is over-parameterized on the CPU, copied
   to the device, and every MPO weight contracted there and on the CPU in float64; the largest relative
   difference must be below 1e-4 (float32 arithmetic).
3. **A short digits run**: the digits teacher (CPU, 30 epochs), then KD+OPDF students (30 epochs) on
   the CPU and on the device with the same seeds; the device's mean test accuracy must match the CPU's
   within noise (the larger of 3 points and 3 standard errors of the difference).

``--device cpu`` runs the same code on the CPU with small models and shapes (CIFAR's ResNet-20 <- ResNet-20
at 32x32, batch 2; a 2 <- 4 layer, 128-wide encoder, 16 tokens, batch 2; one step each, no warm-up; a
digits teacher of 10 epochs and one student of 5 epochs), for the test suite: the device's figures are
then the CPU's.
Exit status 0 when every check passes, 1 otherwise; ``--json FILE`` writes every figure.

    python tools/gpu_check.py                       # on the first CUDA device, full sizes
    python tools/gpu_check.py --device cpu          # the small CPU path (tests/test_scale.py)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


_DECOMPOSED: dict = {}  # kind -> an over-parameterized student, decomposed once (a deep copy per variant)


def models(kind: str, quick: bool, opdf: bool):
    """``(teacher, student)``: ResNet-34 -> ResNet-18, or a 12 -> 6 layer 768-wide encoder (BERT-base's
    shapes); with ``quick`` (CPU) the encoder is 4 -> 2 layers, 128 wide. The OPDF student (one dummy
    factor) is decomposed once per kind and copied."""
    from opdf_torchdistill.cli.bench import _pair, transformer_stack
    from opdf_torchdistill.surgery import overparameterize
    torch.manual_seed(0)
    if kind == 'transformer' and quick:
        teacher, student = transformer_stack(4, 128, 2), transformer_stack(2, 128, 2)
    elif quick:
        import torchvision.datasets  # noqa: F401  (torchdistill's registry reads it)
        from torchdistill.models.registry import get_model
        teacher, student = get_model('resnet20', num_classes=1000), get_model('resnet20', num_classes=1000)
    else:
        teacher, student = _pair(kind)
    if not opdf:
        return teacher, student
    if (kind, quick) not in _DECOMPOSED:
        overparameterize(student, num_dummy=1)
        _DECOMPOSED[(kind, quick)] = student
    return teacher, copy.deepcopy(_DECOMPOSED[(kind, quick)])


def kd_step(kind: str, opdf: bool, size: int, batch: int, device: torch.device, amp: str | None, quick: bool = False):
    """One KD (+OPDF, with the alignment term) training step as a closure (``opdf-bench``'s step)."""
    from opdf_torchdistill.alignment import CoreAligner
    from opdf_torchdistill.cli.bench import _inputs
    from opdf_torchdistill.plugin.probe import attach_probe
    teacher, student = models(kind, quick, opdf)
    teacher.to(device).eval().requires_grad_(False)
    if opdf:
        attach_probe(student)
        attach_probe(teacher)
    student.to(device).train()
    aligner = CoreAligner() if opdf else None
    torch.manual_seed(0)
    x = _inputs(kind, size, batch, device)
    if kind == 'transformer' and quick:
        x = x[..., :128].contiguous()
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == 'bf16' else None

    def forward():
        with torch.no_grad():
            t_out = teacher(x)
        s_out = student(x)
        loss = 0.5 * F.cross_entropy(s_out.float(), y) + 0.5 * 16 * F.kl_div(
            F.log_softmax(s_out.float() / 4, 1), F.softmax(t_out.float() / 4, 1), reduction='batchmean')
        if aligner is not None:
            loss = loss + 1e-3 * aligner.loss(student.opdf.entries, teacher.opdf.entries)
        return loss

    def step():
        if autocast is not None:
            with autocast():
                loss = forward()
        else:
            loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def measure_steps(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    rows = []
    shapes = [('resnet', 32 if quick else 224, 2 if quick else 128), ('transformer', 16 if quick else 128,
                                                                      2 if quick else 32)]
    for kind, size, batch in shapes:
        for amp in (None, 'bf16'):
            base = None
            for opdf in (False, True):
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                step = kd_step(kind, opdf, size, batch, device, amp, quick)
                losses = [step() for _ in range(0 if quick else 2)]  # warm-up (none on the CPU path)
                times = []
                for _ in range(repeats):
                    _sync(device)
                    start = time.perf_counter()
                    losses.append(step())
                    _sync(device)
                    times.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None
                median = statistics.median(times)
                base = median if not opdf else base
                names = {'resnet': 'ResNet-20 <- ResNet-20 (CIFAR)' if quick else 'ResNet-18 <- ResNet-34',
                         'transformer': '2 <- 4 layer encoder, 128 wide' if quick else 'BERT-base shapes (6 <- 12)'}
                rows.append({'model': names[kind],
                             'input': f'{size}x{size}' if kind == 'resnet' else f'{size} tokens', 'batch': batch,
                             'dtype': 'bf16 autocast' if amp else 'float32', 'variant': 'KD+OPDF' if opdf else 'KD',
                             'step_s': median, 'time_ratio': median / base, 'peak_mib': peak,
                             'finite': all(math.isfinite(v) for v in losses)})
                del step
    return rows


def contraction_agreement(device: torch.device, quick: bool) -> dict:
    from opdf_torchdistill import contract
    _, model = models('resnet', quick, True)  # ResNet-18 (quick: ResNet-20), over-parameterized on the CPU
    reference = contract(copy.deepcopy(model).double())
    on_device = contract(copy.deepcopy(model).to(device))
    ref, got = reference.state_dict(), on_device.state_dict()
    worst, name = 0.0, None
    for key, value in ref.items():
        if not value.is_floating_point() or value.dim() < 2:
            continue
        diff = (got[key].double().cpu() - value).norm().item() / max(value.norm().item(), 1e-30)
        if diff > worst:
            worst, name = diff, key
    return {'max_rel_error': worst, 'weight': name, 'ok': worst < 1e-4}


def digits_agreement(device: torch.device, quick: bool) -> dict:
    from opdf_torchdistill.cli.train import get_parser, run
    epochs, seeds = (5, [0]) if quick else (30, [0, 1, 2])
    teacher_epochs = 10 if quick else 30
    folder = Path(tempfile.mkdtemp(prefix='opdf_gpu_check_'))
    configs = ROOT / 'configs' / 'digits'
    common = ['--threads', '1', '--set', f'train.num_epochs={epochs}', '--set',
              f'train.scheduler.kwargs.T_max={epochs}', '-student_only']
    teacher = folder / 'teacher.pt'
    run(get_parser().parse_args(['--config', str(configs / 'teacher.yaml'), '--device', 'cpu', '--seed', '0',
                                 '--dst_ckpt', str(teacher), '--threads', '1', '-student_only', '--set',
                                 f'train.num_epochs={teacher_epochs}', '--set',
                                 f'train.scheduler.kwargs.T_max={teacher_epochs}']))
    accuracy = {}
    for where in ('cpu', device.type if device.type == 'cpu' else str(device)):
        if where in accuracy:
            continue
        accuracy[where] = []
        for seed in seeds:
            dst = folder / f'{where.replace(":", "_")}_{seed}.pt'
            metrics, _, _ = run(get_parser().parse_args(
                ['--config', str(configs / 'kd_opdf.yaml'), '--device', where, '--seed', str(seed), '--dst_ckpt',
                 str(dst), '--set', f'models.teacher_model.src_ckpt={teacher}'] + common))
            accuracy[where].append(metrics['test']['acc1'])
    cpu = accuracy['cpu']
    dev = accuracy.get(str(device), accuracy.get(device.type, cpu))
    diff = statistics.fmean(dev) - statistics.fmean(cpu)
    spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (cpu, dev)]
    se = math.sqrt(sum(s ** 2 / len(seeds) for s in spread))
    tolerance = max(3.0, 3 * se)
    return {'epochs': epochs, 'seeds': seeds, 'cpu_acc1': cpu, 'device_acc1': dev, 'difference': diff,
            'tolerance': tolerance, 'ok': abs(diff) <= tolerance}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, help='timed steps per variant (default 10; 1 on CPU)')
    p.add_argument('--json', help='write every figure here')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda: no CUDA device here', file=sys.stderr)
        return 1
    quick = device.type == 'cpu'
    if quick:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'GPU readiness check on {device} ({name}), torch {torch.__version__}, '
          f'{datetime.datetime.now().astimezone().isoformat(timespec="seconds")}'
          + (' (small CPU shapes)' if quick else ''), flush=True)
    steps = measure_steps(device, quick, args.repeats or (1 if quick else 10))
    print(f'{"model":<28} {"input":>10} {"batch":>5} {"dtype":<14} {"variant":<8} {"step (s)":>9} {"x KD":>6} '
          f'{"peak MiB":>9}')
    for r in steps:
        peak = f'{r["peak_mib"]:9.0f}' if r['peak_mib'] is not None else f'{"-":>9}'
        print(f'{r["model"]:<28} {r["input"]:>10} {r["batch"]:>5} {r["dtype"]:<14} {r["variant"]:<8} '
              f'{r["step_s"]:9.4f} {r["time_ratio"]:6.2f} {peak}', flush=True)
    contraction = contraction_agreement(device, quick)
    print(f'contraction, {device} vs CPU float64: max relative error {contraction["max_rel_error"]:.2e} '
          f'({contraction["weight"]}): {"ok" if contraction["ok"] else "FAILED"}', flush=True)
    import logging
    quiet = [logging.getLogger(n) for n in ('opdf_torchdistill', 'torchdistill')]
    for log in quiet:  # one line for the digits runs, not their training logs
        log.setLevel(logging.WARNING)
    digits = digits_agreement(device, quick)
    print(f'digits KD+OPDF ({digits["epochs"]} epochs, seeds {digits["seeds"]}): CPU test acc@1 '
          f'{statistics.fmean(digits["cpu_acc1"]):.2f}, {device} {statistics.fmean(digits["device_acc1"]):.2f}, '
          f'difference {digits["difference"]:+.2f} (tolerance {digits["tolerance"]:.2f}): '
          f'{"ok" if digits["ok"] else "FAILED"}', flush=True)
    finite = all(r['finite'] for r in steps)
    ok = finite and contraction['ok'] and digits['ok']
    elapsed = time.perf_counter() - start
    print(f'{"READY" if ok else "NOT READY"}: steps finite {finite}, contraction {contraction["ok"]}, digits '
          f'{digits["ok"]} ({elapsed:.0f} s)', flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({'device': str(device), 'name': name, 'torch': torch.__version__,
                                               'steps': steps, 'contraction': contraction, 'digits': digits,
                                               'seconds': elapsed, 'ok': ok}, indent=2) + '\n')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
