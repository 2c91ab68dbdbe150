"""Export a trained OPDF student as the plain base architecture (contracted, verified, atomic).

Builds the student from the config, loads the trained MPO checkpoint (strict), contracts every MPO,
checks that the plain model's outputs equal the MPO model's (on test images when the config has a
test set, plus random inputs) and that the result loads with ``strict=True`` into a freshly built
base model; refuses to write otherwise. The output is a plain ``state_dict`` (``torch.load`` with
``weights_only=True`` works, and so does torchdistill's ``load_ckpt``); a ``.json`` next to it says
how to build the base model.

Example::

    python tools/export.py --config configs/digits/kd_opdf.yaml --output runs/digits/student_plain.pt
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path

import torch

from ..io import atomic_torch_save, atomic_write_json
from .common import build_model, load_config, setup_logging, student_config_of

__all__ = ['main', 'get_parser', 'export_student']

logger = logging.getLogger('opdf_torchdistill.export')


class ExportError(RuntimeError):
    """The contracted model does not reproduce the trained one; nothing was written."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Contract a trained OPDF student to its plain architecture and save it')
    p.add_argument('--config', required=True, help='the YAML the student was trained with')
    p.add_argument('--ckpt', help='trained checkpoint (default: models.student_model.dst_ckpt)')
    p.add_argument('--output', required=True, help='where to write the plain state_dict (.pt)')
    p.add_argument('--input_size', type=int, nargs='+', help='input shape for the check (default: test images)')
    p.add_argument('--num_inputs', type=int, default=8, help='inputs per check batch')
    p.add_argument('--rtol', type=float, default=1e-5, help='largest relative output difference accepted')
    p.add_argument('--device', default='cpu')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    return p


def _check_inputs(config: dict, args) -> torch.Tensor:
    batches = []
    loader_config = config.get('test', {}).get('test_data_loader')
    if args.input_size is None and loader_config is not None:
        dataset = config['datasets'][loader_config['dataset_id']]
        n = min(args.num_inputs, len(dataset))
        batches.append(torch.stack([dataset[i][0] for i in range(n)]))
    shape = tuple(args.input_size) if args.input_size else tuple(batches[0].shape[1:]) if batches else None
    if shape is None:
        raise ValueError('the config has no test set: give --input_size')
    batches.append(torch.randn(args.num_inputs, *shape, generator=torch.Generator().manual_seed(0)))
    return torch.cat(batches)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def export_student(config: dict, ckpt_path: str, output: str, inputs: torch.Tensor, rtol: float = 1e-5,
                   device: str = 'cpu') -> dict:
    """Contract, verify and write; returns a summary dict. Raises :class:`ExportError` on mismatch."""
    from ..plugin.models import build_base_model
    from ..surgery import contract, is_overparameterized

    student_config = copy.deepcopy(student_config_of(config))
    dev = torch.device(device)
    model = build_model(student_config, dev, load_src=False)
    ckpt = torch.load(os.path.expanduser(ckpt_path), map_location='cpu', weights_only=False)
    model.load_state_dict(ckpt['model'] if isinstance(ckpt, dict) and 'model' in ckpt else ckpt, strict=True)
    model.eval()
    if not is_overparameterized(model):
        logger.warning('the student has no MPO weights: exporting it unchanged')
    x = inputs.to(dev)
    with torch.no_grad():
        expected = model(x)
        contract(model)
        plain_out = model(x)
    diff = _relative(plain_out, expected)
    if not diff <= rtol:
        raise ExportError(f'contracted model differs from the MPO model by {diff:.2e} (> rtol {rtol:.1e}); not written')

    kwargs = dict(student_config.get('kwargs') or {})
    if student_config['key'] == 'opdf_student':
        base_key, repo = kwargs.pop('base'), kwargs.pop('base_repo_or_dir', None)
        kwargs.pop('mpo', None)
    else:
        base_key, repo = student_config['key'], student_config.get('repo_or_dir')
    kwargs.pop('weights', None)
    kwargs.pop('pretrained', None)
    base = build_base_model(base_key, repo, **kwargs).to(dev).eval()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    base.load_state_dict(state, strict=True)
    with torch.no_grad():
        base_diff = _relative(base(x), expected)
    if not base_diff <= rtol:
        raise ExportError(f'the base model {base_key!r} with the exported weights differs by {base_diff:.2e}; not written')

    atomic_torch_save(state, output)
    summary = {'output': str(output), 'source_ckpt': str(ckpt_path), 'base': base_key, 'base_repo_or_dir': repo,
               'base_kwargs': kwargs, 'params': sum(v.numel() for v in base.parameters()),
               'relative_output_difference': diff, 'base_model_relative_difference': base_diff,
               'checked_inputs': list(inputs.shape)}
    atomic_write_json(summary, Path(output).with_suffix('.json'))
    logger.info('exported %s (%s, %d parameters); outputs match to %.2e', output, base_key, summary['params'], diff)
    return summary


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging()
    config = load_config(args.config, args.overrides)
    ckpt = args.ckpt or student_config_of(config).get('dst_ckpt')
    if ckpt is None or not os.path.exists(os.path.expanduser(ckpt)):
        print(f'error: no trained checkpoint at {ckpt!r} (train first, or give --ckpt)', file=sys.stderr)
        return 2
    try:
        export_student(config, ckpt, args.output, _check_inputs(config, args), args.rtol, args.device)
    except ExportError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
