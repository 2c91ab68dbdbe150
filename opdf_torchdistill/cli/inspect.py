"""Print what OPDF would do to a model: the per-layer MPO table and the whole-model ratio.

Examples::

    python tools/inspect_model.py resnet18
    python tools/inspect_model.py resnet50 --target_ratio 1.6 --json plan.json
    python tools/inspect_model.py vit_b_16 --num_dummy 2 --include encoder --apply --input_size 3 224 224
    python tools/inspect_model.py resnet20 --kwargs '{"num_classes": 100}'     # a torchdistill model key
    python tools/inspect_model.py wide_resnet --kwargs '{"depth": 16, "k": 2, "num_classes": 100, "pretrained": false, "progress": false}' \
        --teacher wide_resnet28_10 --teacher_kwargs '{"num_classes": 100, "pretrained": false, "progress": false}'

With ``--teacher`` the student is planned against the teacher (as ``mpo: {align_to: ...}`` does) and
the pairing table of the alignment loss is printed: which student weight aligns with which teacher
weight, on which cores, and why the others do not.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from ..io import atomic_write_json

__all__ = ['main', 'get_parser']


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Show the MPO over-parameterization plan of a model (no weights needed)')
    p.add_argument('model', help='torchvision model name or torchdistill model key')
    p.add_argument('--kwargs', default='{}', help='JSON kwargs for the model constructor')
    p.add_argument('--repo_or_dir', help='torch.hub repository for the model key')
    p.add_argument('--num_dummy', type=int, help='dummy factors per weight (OPDF scale L; default 1)')
    p.add_argument('--num_factors', type=int, help='real factors per side (default 2)')
    p.add_argument('--target_ratio', type=float, help='whole-model parameter ratio to plan for')
    p.add_argument('--include', nargs='*', help='regexes of weights to use')
    p.add_argument('--exclude', nargs='*', help='regexes of weights to leave alone')
    p.add_argument('--types', nargs='*', help='module types (Linear Conv1d Conv2d Conv3d MultiheadAttention)')
    p.add_argument('--min_numel', type=int, help='skip weights with fewer elements')
    p.add_argument('--max_bond', type=int, help='cap bond dimensions (approximate)')
    p.add_argument('--freeze', choices=['central', 'auxiliary'], help='cores to freeze')
    p.add_argument('--factor_order', choices=['paper', 'largest_bond'], help='factor order (default paper)')
    p.add_argument('--mpo', default='{}', help='JSON with any further MPO options (overrides, ...)')
    p.add_argument('--teacher', help='teacher model key: plan against it and print the alignment pairing table')
    p.add_argument('--teacher_kwargs', default='{}', help='JSON kwargs for the teacher constructor')
    p.add_argument('--teacher_repo_or_dir', help='torch.hub repository for the teacher key')
    p.add_argument('--no_align_to', action='store_true',
                   help='with --teacher: plan the student on its own (no align_to) and only report the pairing')
    p.add_argument('--cores', default='auxiliary', help="cores the alignment uses: auxiliary, all or central")
    p.add_argument('--apply', action='store_true', help='also decompose (timed) and verify eval outputs')
    p.add_argument('--input_size', type=int, nargs='+', default=[3, 224, 224], help='input shape for --apply')
    p.add_argument('--json', help='write the report (and the alignment, with --teacher) as JSON here')
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from ..options import OptionError
    from ..plugin.models import build_base_model
    from ..alignment import MatchError, pairing_table
    from ..surgery import overparameterize, plan, plan_alignment

    options = json.loads(args.mpo)
    for key in ('num_dummy', 'num_factors', 'target_ratio', 'include', 'exclude', 'types', 'min_numel', 'max_bond',
                'freeze', 'factor_order'):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    alignment = None
    try:
        model = build_base_model(args.model, args.repo_or_dir, **json.loads(args.kwargs)).eval()
        teacher = None
        if args.teacher is not None:
            with torch.device('meta'):  # shapes only
                teacher = build_base_model(args.teacher, args.teacher_repo_or_dir, **json.loads(args.teacher_kwargs))
            if not args.no_align_to:
                options.setdefault('align_to', teacher)
        if not args.apply:
            report = plan(model, **options)
            print(report)
        else:
            x = torch.randn(1, *args.input_size)
            with torch.no_grad():
                reference = model(x)
            start = time.perf_counter()
            report = overparameterize(model, **options)
            print(report)
            with torch.no_grad():
                out = model(x)
            diff = ((out - reference).norm() / reference.norm()).item()
            print(f'decomposition {time.perf_counter() - start:.2f} s; eval output relative difference {diff:.2e}')
        if teacher is not None:
            try:
                pairs, coverage = plan_alignment(report, teacher, args.cores)
            except MatchError as exc:
                print(f'error: {exc}', file=sys.stderr)
                return 2
            print()
            print(pairing_table(pairs, coverage))
            print(coverage.summary())
            for name, why in coverage.unaligned:
                print(f'WARNING: {name} is over-parameterized but not aligned: {why}', file=sys.stderr)
            alignment = coverage.to_dict()
            alignment['teacher'] = args.teacher
            alignment['pairs'] = [{'student': p.student, 'teacher': p.teacher, 'teacher_factors': p.teacher_plan.describe(),
                                   'cores': list(p.cores)} for p in pairs]
    except (OptionError, ValueError, TypeError) as exc:  # TypeError: wrong constructor kwargs
        print(f'error: {exc}', file=sys.stderr)
        return 2
    if args.json:
        out = report.to_dict()
        if alignment is not None:
            out['alignment'] = alignment
        atomic_write_json(out, args.json)
    return 0

if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
