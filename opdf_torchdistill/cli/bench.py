"""Benchmarks that print figures (never assertions): decomposition time, KD vs KD+OPDF training step
time and peak memory, contracted-model latency and outputs, and the analytic FLOP floor.

All timings are medians of ``--repeats`` interleaved repeats after warm-up (variants alternate inside
each repeat, so drifts of a noisy machine hit them alike), with min and max. Peak memory is measured
in a fresh subprocess per variant: peak RSS (sampled at 1 kHz) above the RSS before the models are
built on CPU,
``max_memory_allocated`` on CUDA. Figures go to stdout as tables and to ``--json``.

Sections (``--sections``, default all):

* ``decompose``: whole-model decomposition time (resnet18, resnet50, 6-layer 768-wide transformer).
* ``step``: one KD training step (forward teacher + student, KD loss, backward, SGD step) of
  ResNet-18 <- ResNet-34 and of a 6 <- 12 layer 768-wide transformer, plain student vs OPDF student
  (with the alignment term) at several scales, for each ``--sizes`` resolution x ``--batch`` size.
  The table also gives the extra time the analytic contraction FLOPs need at this machine's measured
  matmul rate (the floor) and the measured extra time over that floor (the efficiency).
* ``levers``: each speed lever with and without it (contraction order, decomposition thread pool,
  the eval cache, the once-per-step cache of a module called twice).
* ``inference``: plain model vs the contracted OPDF model: latency ratio and max output difference.

Example::

    python tools/bench.py --sections step --sizes 224 --batch 64 --repeats 5 --json bench.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write_json
from ..tables import format_table

__all__ = ['main']

SCALES = {'L1 (default)': {'num_dummy': 1}, 'L2': {'num_dummy': 2}, 'L3': {'num_dummy': 3}}


# ----------------------------------------------------------------------------------------------
# Models and FLOPs
# ----------------------------------------------------------------------------------------------
def transformer_stack(num_layers: int = 6, width: int = 768, heads: int = 12, num_classes: int = 1000) -> nn.Module:
    """A BERT-base-sized encoder stack (768 wide, 3072 MLP) with a linear head on the mean token."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))
    return Stack()


def build(name: str) -> nn.Module:
    import torchvision
    if name == 'transformer6':
        return transformer_stack(6)
    if name == 'transformer12':
        return transformer_stack(12)
    return getattr(torchvision.models, name)()


def model_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs (2 per multiply-add) of the Conv/Linear/attention matmuls for input ``x``."""
    total = [0]

    def conv_hook(m, args, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())

    def linear_hook(m, args, out):
        total[0] += 2 * out.numel() * m.in_features

    def mha_hook(m, args, out):
        q = args[0]
        tokens = q.shape[0] * q.shape[1]
        total[0] += 2 * tokens * m.embed_dim * 3 * m.embed_dim  # q, k, v projections
        total[0] += 2 * 2 * q.shape[0] * q.shape[1] ** 2 * m.embed_dim  # scores and weighted sum

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(mha_hook))
            handles.append(m.out_proj.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def matmul_gflops(device: torch.device, size: int = 1024, repeats: int = 10) -> float:
    """This machine's dense float32 matmul rate (GFLOP/s), the unit of the FLOP floor."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict:
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values), 'n': len(values)}


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------
def _pair(kind: str):
    if kind == 'resnet':
        return build('resnet34'), build('resnet18')
    return build('transformer12'), build('transformer6')


def _inputs(kind: str, size: int, batch: int, device: torch.device) -> torch.Tensor:
    if kind == 'resnet':
        return torch.randn(batch, 3, size, size, device=device)
    return torch.randn(batch, size, 768, device=device)  # ``size`` = sequence length


def _make_step(kind: str, scale: dict | None, size: int, batch: int, device: torch.device,
               teacher: nn.Module | None = None) -> tuple[Callable, dict]:
    """A closure running one KD (+OPDF) training step, and facts about it (``teacher`` may be shared)."""
    from ..alignment import CoreAligner
    from ..plugin.probe import attach_probe
    from ..surgery import overparameterize
    torch.manual_seed(0)
    built_teacher, student = _pair(kind)
    teacher = built_teacher if teacher is None else teacher
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    x = _inputs(kind, size, batch, device)
    y = torch.randint(0, 1000, (batch,), device=device)
    facts = {'student_flops': model_flops(student, x), 'teacher_flops': model_flops(teacher, x)}
    aligner = None
    if scale is not None:
        report = overparameterize(student, **scale)
        facts['contraction_flops'] = report.contraction_flops
        facts['ratio'] = report.ratio
        attach_probe(student)
        attach_probe(teacher)
        aligner = CoreAligner()
    opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)

    def step():
        with torch.no_grad():
            t_out = teacher(x)
        s_out = student(x)
        loss = 0.5 * F.cross_entropy(s_out, y) + 0.5 * 16 * F.kl_div(
            F.log_softmax(s_out / 4, 1), F.softmax(t_out / 4, 1), reduction='batchmean')
        if aligner is not None:
            loss = loss + 1e-3 * aligner.loss(student.opdf.entries, teacher.opdf.entries)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, facts


def _peak_memory(kind: str, scale: dict | None, size: int, batch: int, device: str, threads: int | None) -> float:
    """Peak memory (MiB) of building the models and running 3 steps, measured in a fresh process:
    on CPU the highest resident set size seen by a 1 kHz sampler minus the RSS before the models
    were built; on CUDA ``max_memory_allocated``."""
    code = (
        'import json, torch\n'
        f'torch.set_num_threads({threads or torch.get_num_threads()})\n'
        'from opdf_torchdistill.cli.bench import _make_step, _RssSampler\n'
        f'dev = torch.device({device!r})\n'
        'sampler = _RssSampler()\n'
        'if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)\n'
        f'step, _ = _make_step({kind!r}, {scale!r}, {size}, {batch}, dev)\n'
        'for _ in range(3): step()\n'
        'peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else sampler.stop()\n'
        'print(json.dumps(peak))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _release_memory() -> None:
    """Free the previous configuration's models before building the next (and give pages back)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:  # not glibc
        pass


def _rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


class _RssSampler:
    """Samples this process's RSS every millisecond; ``stop()`` returns the peak above the start."""

    def __init__(self):
        import threading
        self.base = self.peak = _rss_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())
        return self.peak - self.base


def bench_steps(args, device: torch.device, rate: float) -> list[dict]:
    results = []
    for kind, sizes, batches in (('resnet', args.sizes, args.batch), ('transformer', [args.seq_len], args.transformer_batch)):
        if kind not in args.models:
            continue
        for size in sizes:
            for batch in batches:
                variants = {'KD': None}
                variants.update({f'KD+OPDF {k}': v for k, v in SCALES.items() if k.split()[0] in args.scales})
                steps, facts = {}, {}
                teacher = _pair(kind)[0]  # one teacher for all variants: less memory, same work
                for name, scale in variants.items():
                    steps[name], facts[name] = _make_step(kind, scale, size, batch, device, teacher)
                for step in steps.values():  # warm-up
                    step()
                    step()
                times = {name: [] for name in steps}
                for _ in range(args.repeats):
                    for name, step in steps.items():
                        _sync(device)
                        start = time.perf_counter()
                        step()
                        _sync(device)
                        times[name].append(time.perf_counter() - start)
                base = statistics.median(times['KD'])
                del steps, teacher
                _release_memory()
                memory = {}
                if not args.no_memory:
                    for name, scale in variants.items():
                        memory[name] = _peak_memory(kind, scale, size, batch, device.type, args.threads)
                for name in times:
                    s = _stats(times[name])
                    row = {'model': 'ResNet-18 <- ResNet-34' if kind == 'resnet' else '6 <- 12 layer transformer',
                           'input': f'{size}x{size}' if kind == 'resnet' else f'{size} tokens', 'batch': batch,
                           'variant': name, 'step_s': s, 'time_ratio': s['median'] / base,
                           'ratio_min_max': [s['min'] / base, s['max'] / base]}
                    f = facts[name]
                    if 'contraction_flops' in f:
                        floor = 3 * f['contraction_flops'] / (rate * 1e9)  # forward + backward ~ 3x forward
                        row.update({'param_ratio': f['ratio'], 'contraction_gflop_step': 3 * f['contraction_flops'] / 1e9,
                                    'model_gflop_step': (3 * f['student_flops'] + f['teacher_flops']) / 1e9,
                                    'floor_extra_s': floor, 'measured_extra_s': s['median'] - base,
                                    'extra_over_floor': (s['median'] - base) / floor if floor > 0 else None})
                    if memory:
                        row['peak_mib'] = memory[name]
                        row['memory_ratio'] = memory[name] / memory['KD'] if memory['KD'] > 0 else None
                    results.append(row)
                print(_format_steps([r for r in results if r['batch'] == batch and r['input'].startswith(str(size))
                                     and r['model'].startswith('ResNet' if kind == 'resnet' else '6')]), flush=True)
                print(flush=True)
    return results


def _format_steps(rows: list[dict]) -> str:
    table = []
    for r in rows:
        table.append([r['model'], r['input'], r['batch'], r['variant'], f'{r.get("param_ratio", 1.0):.2f}',
                      f'{r["step_s"]["median"]:.3f} [{r["step_s"]["min"]:.3f}, {r["step_s"]["max"]:.3f}]',
                      f'{r["time_ratio"]:.3f}', f'{r.get("contraction_gflop_step", 0):.1f} / {r.get("model_gflop_step", 0):.0f}'
                      if 'contraction_gflop_step' in r else '-',
                      f'{r["floor_extra_s"]:.3f}' if 'floor_extra_s' in r else '-',
                      f'{r["extra_over_floor"]:.2f}' if r.get('extra_over_floor') is not None else '-',
                      f'{r["peak_mib"]:.0f}' if 'peak_mib' in r else '-',
                      f'{r["memory_ratio"]:.2f}' if r.get('memory_ratio') else '-'])
    return format_table(['model', 'input', 'batch', 'variant', 'params x', 'step s (median [min, max])', 'time x',
                         'GFLOP contraction / model', 'floor extra s', 'extra / floor', 'peak MiB', 'memory x'],
                        table, 'lllllrrrrrrr')


# ----------------------------------------------------------------------------------------------
# Decomposition and inference
# ----------------------------------------------------------------------------------------------
def bench_decompose(args) -> list[dict]:
    from ..surgery import overparameterize
    rows = []
    for name in args.decompose_models:
        times = []
        for _ in range(args.decompose_repeats):
            model = build(name)
            start = time.perf_counter()
            report = overparameterize(model)
            times.append(time.perf_counter() - start)
        rows.append({'model': name, 'weights': len(report.layers), 'params': report.model_params,
                     'ratio': report.ratio, 'seconds': _stats(times),
                     'max_error': max(r.error for r in report.layers)})
    print(format_table(['model', 'weights', 'params', 'ratio', 'decompose s (median [min, max])', 'max rel. error'],
                       [[r['model'], r['weights'], f'{r["params"] / 1e6:.1f}M', f'{r["ratio"]:.2f}',
                         f'{r["seconds"]["median"]:.2f} [{r["seconds"]["min"]:.2f}, {r["seconds"]["max"]:.2f}]',
                         f'{r["max_error"]:.1e}'] for r in rows], 'lrrrrr'), flush=True)
    print(flush=True)
    return rows


def bench_inference(args, device: torch.device) -> list[dict]:
    from ..surgery import contract, overparameterize
    rows = []
    for name, x in (('resnet18', torch.randn(args.infer_batch, 3, 224, 224)),
                    ('transformer6', torch.randn(args.infer_batch, args.seq_len, 768))):
        torch.manual_seed(0)
        plain = build(name).to(device).eval()
        student = copy.deepcopy(plain)
        overparameterize(student)
        mpo_form = copy.deepcopy(student).eval()
        contract(student)
        student.eval()
        x = x.to(device)
        variants = {'plain': plain, 'OPDF, MPO form (eval, cached)': mpo_form, 'OPDF, contracted': student}
        times = {k: [] for k in variants}
        with torch.inference_mode():
            for m in variants.values():
                m(x)
                m(x)
            for _ in range(args.repeats):
                for k, m in variants.items():
                    _sync(device)
                    start = time.perf_counter()
                    m(x)
                    _sync(device)
                    times[k].append(time.perf_counter() - start)
            ref = plain(x).double()
            diff = ((student(x).double() - ref).abs().max() / ref.abs().max()).item()
        base = statistics.median(times['plain'])
        for k in variants:
            s = _stats(times[k])
            rows.append({'model': name, 'variant': k, 'latency_s': s, 'ratio': s['median'] / base,
                         'max_rel_output_diff': diff if k == 'OPDF, contracted' else None})
    print(format_table(['model', 'variant', 'latency s (median [min, max])', 'ratio', 'max |diff| / max |y|'],
                       [[r['model'], r['variant'], f'{r["latency_s"]["median"]:.4f} [{r["latency_s"]["min"]:.4f}, '
                         f'{r["latency_s"]["max"]:.4f}]', f'{r["ratio"]:.3f}',
                         '-' if r['max_rel_output_diff'] is None else f'{r["max_rel_output_diff"]:.1e}'] for r in rows],
                       'llrrr'), flush=True)
    print(flush=True)
    return rows


def _time(fn: Callable, repeats: int, device: torch.device) -> dict:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return _stats(times)


def bench_levers(args, device: torch.device) -> list[dict]:
    """Each speed lever on its own: measured with and without it."""
    from .. import mpo
    from ..parametrization import set_caching
    from ..surgery import overparameterize, plan
    rows = []
    # 1. Contraction order: the DP order vs a plain left-to-right chain, forward + backward, ResNet-18's
    #    weights with the default (wide) plans, where the two coincide, and with transposed (tall) plans.
    report = plan(build('resnet18'))

    def chain(cs):
        out = cs[0].reshape(-1, cs[0].shape[-1])
        for c in cs[1:]:
            out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
        return out

    for layout in ('default plans', 'transposed plans'):
        shapes = [r.plan.core_shapes if layout == 'default plans' else
                  tuple((s[3], s[2], s[1], s[0]) for s in reversed(r.plan.core_shapes)) for r in report.layers]
        cores = [[torch.randn(s, device=device, requires_grad=True) for s in sh] for sh in shapes]

        def run(order):
            total = sum(((mpo.reconstruct(cs) if order == 'dp' else chain(cs)).square().sum() for cs in cores))
            total.backward()
        flops = sum(3 * mpo.contraction_flops(sh) for sh in shapes) / 1e9
        for order in ('left-to-right', 'dp'):
            rows.append({'lever': f'contraction order, ResNet-18 weights, {layout}, fwd+bwd ({flops:.0f} GFLOP dp)',
                         'setting': order, **_time(lambda: run(order), args.repeats, device)})
        del cores
    # 2. Decomposition: one thread, one intra-op thread per matrix in a pool.
    for workers in (1, None):
        model = build('resnet18')
        start = time.perf_counter()
        overparameterize(model, workers=workers)
        rows.append({'lever': 'decomposition of resnet18', 'setting': f'{workers or torch.get_num_threads()} worker(s)',
                     'median': time.perf_counter() - start, 'min': None, 'max': None, 'n': 1})
    # 2b. Decomposition path: eigendecomposition of M M^T for wide unfoldings vs SVDs everywhere.
    for force_svd in (True, False):
        with mpo.svd_only() if force_svd else contextlib.nullcontext():
            for name in ('resnet50', 'transformer6'):
                model = build(name)
                start = time.perf_counter()
                overparameterize(model)
                rows.append({'lever': f'decomposition of {name}', 'setting': 'SVD only' if force_svd else 'eigh for wide unfoldings',
                             'median': time.perf_counter() - start, 'min': None, 'max': None, 'n': 1})
    # 3. Caching: eval forward (validation) and a module called twice per training step.
    torch.manual_seed(0)
    model = build('resnet18').to(device)
    overparameterize(model)
    x = torch.randn(args.infer_batch, 3, 224, 224, device=device)
    lin = nn.Linear(1024, 1024).to(device)
    twice = nn.Sequential(lin, nn.ReLU(), lin)
    overparameterize(twice)
    h = torch.randn(64, 1024, device=device)
    for enabled in (False, True):
        previous = set_caching(enabled)
        try:
            model.eval()
            with torch.inference_mode():
                rows.append({'lever': f'eval forward, resnet18 224x224 batch {args.infer_batch}',
                             'setting': 'cache on' if enabled else 'cache off', **_time(lambda: model(x), args.repeats, device)})
            rows.append({'lever': 'training step, one 1024x1024 Linear called twice', 'setting': 'cache on' if enabled else 'cache off',
                         **_time(lambda: twice(h).square().mean().backward(), args.repeats, device)})
        finally:
            set_caching(previous)
    print(format_table(['lever', 'setting', 'time s (median [min, max])'],
                       [[r['lever'], r['setting'], f'{r["median"]:.3f}' + (f' [{r["min"]:.3f}, {r["max"]:.3f}]' if r['min'] is not None else '')]
                        for r in rows], 'llr'), flush=True)
    print(flush=True)
    return rows


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='OPDF benchmarks (figures, not tests)')
    p.add_argument('--sections', nargs='+', default=['decompose', 'levers', 'step', 'inference'],
                   choices=['decompose', 'levers', 'step', 'inference'])
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, help='torch intra-op threads (default: torch default)')
    p.add_argument('--repeats', type=int, default=5, help='timed repeats (after warm-up)')
    p.add_argument('--sizes', type=int, nargs='+', default=[32, 224], help='ResNet input resolutions')
    p.add_argument('--batch', type=int, nargs='+', default=[64], help='batch sizes')
    p.add_argument('--seq_len', type=int, default=128, help='transformer sequence length')
    p.add_argument('--transformer_batch', type=int, nargs='+', default=[8], help='transformer batch sizes')
    p.add_argument('--models', nargs='+', default=['resnet', 'transformer'], choices=['resnet', 'transformer'])
    p.add_argument('--scales', nargs='+', default=['L1', 'L2', 'L3'], choices=['L1', 'L2', 'L3'])
    p.add_argument('--decompose_models', nargs='+', default=['resnet18', 'resnet50', 'transformer6'])
    p.add_argument('--decompose_repeats', type=int, default=3)
    p.add_argument('--infer_batch', type=int, default=16)
    p.add_argument('--no_memory', action='store_true', help='skip the peak-memory subprocesses')
    p.add_argument('--json', help='write all figures here')
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {'device': str(device), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
           'cpu': _cpu_name(), 'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None}
    rate = matmul_gflops(device)
    out['matmul_gflops'] = rate
    print(f'device {device} ({out["gpu"] or out["cpu"]}), {out["threads"]} threads, torch {torch.__version__}; '
          f'dense float32 matmul {rate:.0f} GFLOP/s\n', flush=True)
    if 'decompose' in args.sections:
        out['decompose'] = bench_decompose(args)
    if 'levers' in args.sections:
        out['levers'] = bench_levers(args, device)
    if 'step' in args.sections:
        out['step'] = bench_steps(args, device, rate)
    if 'inference' in args.sections:
        out['inference'] = bench_inference(args, device)
    if args.json:
        atomic_write_json(out, args.json)
    return 0


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'unknown CPU'


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
