"""Export a trained OPDF student as the plain base architecture (contracted, verified, atomic).

Builds the student from the config, loads the trained MPO checkpoint (strict, read with
``weights_only=True``), contracts every MPO and verifies before writing: every exported dense weight
equals an independent float64 contraction of the checkpoint's own cores (or the checkpoint's dense
weight), no tensor is NaN/Inf, the plain model's outputs equal the MPO model's (on test images when the
config has a test set, plus random inputs), and the result loads with ``strict=True`` into a freshly
built base model. It refuses to write otherwise, refuses to write over ``--ckpt`` or over an existing
file (unless ``--force``). The output is a plain ``state_dict`` (``torch.load`` with ``weights_only=True``
works, and so does torchdistill's ``load_ckpt``); a ``.json`` next to it says how to build the base model.

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

from .. import mpo as mpo_math
from ..io import atomic_torch_save, atomic_write_json, is_trusted, load_checkpoint
from ..runfiles import OutputError, check_outputs, refuse_existing
from .common import build_model, check_state_dict_fits, checkpoint_size_limit, load_config, run_cli, setup_logging, student_config_of
from .train import positive_int

__all__ = ['main', 'get_parser', 'export_student', 'ExportError']

logger = logging.getLogger('opdf_torchdistill.export')


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked (mismatch, non-finite weights, a refused path); nothing
    was written."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Contract a trained OPDF student to its plain architecture and save it')
    p.add_argument('--config', required=True, help='the YAML the student was trained with')
    p.add_argument('--ckpt', help='trained checkpoint (default: models.student_model.dst_ckpt)')
    p.add_argument('--output', required=True, help='where to write the plain state_dict (.pt)')
    p.add_argument('--input_size', type=int, nargs='+', help='input shape for the check (default: test images)')
    p.add_argument('--num_inputs', type=positive_int, default=8, help='inputs per check batch')
    p.add_argument('--rtol', type=float, default=1e-5, help='largest relative output difference accepted')
    p.add_argument('--device', default='cpu')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override an existing config value (+dotted.key=VALUE adds one)')
    p.add_argument('--force', action='store_true', help='overwrite --output and its .json if they exist')
    p.add_argument('--trust_checkpoint', action='append', default=[], metavar='FILE',
                   help='load FILE even though it is not plain tensor data (unpickling it can run code: only '
                        'for files whose origin you know)')
    p.add_argument('--trust_config', action='store_true',
                   help='let the config\'s tags import and call any name (configs are code; see opdf-train)')
    p.add_argument('--debug', action='store_true', help='on an error, print the traceback too')
    return p


def summary_path(output: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(output))).with_suffix('.json')


def check_output_paths(ckpt_path: str | os.PathLike, output: str | os.PathLike, force: bool = False,
                       config_path: str | os.PathLike | None = None) -> None:
    """Refuse outputs that would destroy the checkpoint, the config, each other, or an existing file
    without --force (the trainer's rules, :mod:`opdf_torchdistill.runfiles`)."""
    out, summary = Path(os.path.expanduser(str(output))), summary_path(output)
    inputs = {'the checkpoint being exported': ckpt_path, '--config': config_path}
    if out.resolve() == summary.resolve():
        raise ExportError(f'--output {out} is also where the summary JSON goes (<output stem>.json); give the '
                          f'weights another suffix, e.g. {out.with_suffix(".pt")}')
    try:
        check_outputs({'--output': out, f'the summary {summary} (<output stem>.json)': summary}, inputs)
        if not force:
            refuse_existing({'--output': out, 'its summary': summary}, 'pass --force to overwrite them, or choose '
                                                                      'another --output')
    except OutputError as exc:
        raise ExportError(str(exc)) from None


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


def _non_finite(state: dict) -> list[str]:
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _independent_references(model, state: dict) -> dict:
    """``{dense key: float64 weight}`` computed from the checkpoint's own tensors, not from the model:
    its MPO cores contracted in float64, or its dense weight when it stored one."""
    from ..surgery import core_state_keys, mpo_modules
    refs = {}
    for name, _, tensor_name, p in mpo_modules(model):
        prefix = f'{name}.' if name else ''
        keys = core_state_keys(prefix, tensor_name, p.plan.num_cores)
        if all(k in state for k in keys):
            with mpo_math.single_threaded():
                matrix = mpo_math.reconstruct([state[k].detach().to('cpu', torch.float64) for k in keys])
            refs[prefix + tensor_name] = matrix.reshape(p.site.weight_shape)
        elif prefix + tensor_name in state:
            refs[prefix + tensor_name] = state[prefix + tensor_name].detach().to('cpu', torch.float64)
    return refs


def export_student(config: dict, ckpt_path: str, output: str, inputs: torch.Tensor, rtol: float = 1e-5,
                   device: str = 'cpu', force: bool = True, trust: tuple = (),
                   config_path: str | os.PathLike | None = None) -> dict:
    """Contract, verify and write; returns a summary dict. Raises :class:`ExportError` when a check fails
    (nothing is written then). ``output`` (or its ``.json``) may never be ``ckpt_path``; ``force=False``
    also refuses existing files (the command line's default; callers that own their output directory,
    like the demo, overwrite). ``trust``: checkpoint paths that may be loaded although not plain data."""
    from ..plugin.models import build_base_model
    from ..surgery import contract, is_overparameterized

    check_output_paths(ckpt_path, output, force, config_path)
    student_config = copy.deepcopy(student_config_of(config))
    dev = torch.device(device)
    path = os.path.expanduser(ckpt_path)
    model = build_model(student_config, dev, load_src=False)
    ckpt = load_checkpoint(path, trusted=is_trusted(path, trust), max_bytes=checkpoint_size_limit(model))
    source = ckpt['model'] if isinstance(ckpt, dict) and 'model' in ckpt else ckpt
    if not isinstance(source, dict):
        raise ExportError(f'{path}: holds a {type(source).__name__}, not a state_dict (or {{"model": state_dict}})')
    bad = _non_finite(source)
    if bad:
        raise ExportError(f'{path}: the checkpoint has NaN/Inf in {bad[:8]}{" ..." if len(bad) > 8 else ""} '
                          f'(a diverged run); not exported')
    check_state_dict_fits(model, source, f'checkpoint {path}')
    model.load_state_dict(source, strict=True)
    model.eval()
    if not is_overparameterized(model):
        logger.warning('the student has no MPO weights: exporting it unchanged')
    references = _independent_references(model, source)
    x = inputs.to(dev)
    with torch.no_grad():
        expected = model(x)
        contract(model)
        plain_out = model(x)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise ExportError(f'the contracted weights have NaN/Inf in {bad[:8]}; not written')
    weight_diff = 0.0
    for key, ref in references.items():
        d = _relative(state[key], ref)
        weight_diff = max(weight_diff, d)
        if not d <= rtol:
            raise ExportError(f'{key}: the exported weight differs from a float64 contraction of the checkpoint\'s '
                              f'cores by {d:.2e} (> rtol {rtol:.1e}); not written')
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
    base.load_state_dict(state, strict=True)
    with torch.no_grad():
        base_diff = _relative(base(x), expected)
    if not base_diff <= rtol:
        raise ExportError(f'the base model {base_key!r} with the exported weights differs by {base_diff:.2e}; not written')

    summary = {'output': str(output), 'source_ckpt': str(ckpt_path), 'base': base_key, 'base_repo_or_dir': repo,
               'base_kwargs': kwargs, 'params': sum(v.numel() for v in base.parameters()),
               'weights_checked': len(references), 'max_relative_weight_difference_float64': weight_diff,
               'relative_output_difference': diff, 'base_model_relative_difference': base_diff,
               'checked_inputs': list(inputs.shape)}
    check_output_paths(ckpt_path, output, force, config_path)  # again: a file may have appeared meanwhile
    atomic_torch_save(state, os.path.expanduser(str(output)))
    atomic_write_json(summary, summary_path(output))
    logger.info('exported %s (%s, %d parameters); %d weights match a float64 contraction of the checkpoint to %.2e, '
                'outputs to %.2e', output, base_key, summary['params'], len(references), weight_diff, diff)
    return summary


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (0: written, 1: refused with a one-line message,
    2: no checkpoint)."""
    args = get_parser().parse_args(argv)
    setup_logging()
    missing = []

    def body() -> None:
        config = load_config(args.config, args.overrides, trust_config=args.trust_config)
        ckpt = args.ckpt or student_config_of(config).get('dst_ckpt')
        if ckpt is None or not os.path.exists(os.path.expanduser(ckpt)):
            missing.append(ckpt)
            return
        check_output_paths(ckpt, args.output, args.force, args.config)  # before any work
        export_student(config, ckpt, args.output, _check_inputs(config, args), args.rtol, args.device, args.force,
                       tuple(args.trust_checkpoint), config_path=args.config)

    status = run_cli(body, args.debug)
    if status == 0 and missing:
        print(f'error: no trained checkpoint at {missing[0]!r} (train first, or give --ckpt)', file=sys.stderr)
        return 2
    return status


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
