"""Print what OPDF would do to a model: the per-layer MPO table and the whole-model ratio.

Models by family (the same for ``--teacher``):

* a torchvision model name or a torchdistill model key (``resnet18``, ``resnet20``), ``--kwargs`` its
  constructor's;
* ``hf:<folder>`` (a Hugging Face model folder, e.g. a downloaded ``bert-base-uncased``), ``hf:<file>.json``
  (a config file) or ``hf:<transformers class>`` (``BertConfig``, ``BertForSequenceClassification``, ...):
  ``--kwargs`` are config values (``{"num_hidden_layers": 6}``). The model is built with
  ``from_config`` on the meta device: no weights are read (a folder's config only), nothing is
  downloaded. A folder or config file is built as ``AutoModelForSequenceClassification`` (what the
  GLUE recipes train; ``--hf_class`` changes it), a config class likewise, a model class as itself.
  A folder or ``.json`` file is recognised without the ``hf:`` prefix too;
* ``timm:<model name>`` (``timm:tiny_vit_5m_224``): ``timm.create_model(name, pretrained=False,
  **kwargs)`` on the meta device.

``--selection`` names one of the paper's selections (``bert``, ``tinyvit``). With ``--teacher`` the
student is planned against the teacher (as ``mpo: {align_to: ...}`` does) and the pairing table of the
alignment loss is printed: which student weight aligns with which teacher weight (``--layer_map``: the
alignment loss's ``layer_map``, e.g. ``uniform``, ``first``, ``[1, 3, 5]``), on which cores, and why
the others do not.

Examples::

    opdf-inspect resnet18
    opdf-inspect resnet50 --target_ratio 1.6 --json plan.json
    opdf-inspect vit_b_16 --num_dummy 2 --include encoder --apply --input_size 3 224 224
    opdf-inspect resnet20 --kwargs '{"num_classes": 100}'     # a torchdistill model key
    # the paper's BERT setting: a 6-layer student aligned with BERT-base's layers 1, 3, ..., 11
    opdf-inspect hf:BertForSequenceClassification --kwargs '{"num_hidden_layers": 6}' --selection bert \\
        --teacher hf:BertForSequenceClassification --layer_map uniform
    opdf-inspect hf:~/models/bert-base-uncased --kwargs '{"num_hidden_layers": 6}' --selection bert \\
        --teacher ~/models/bert-base-uncased-rte
    # the paper's TinyViT setting
    opdf-inspect timm:tiny_vit_5m_224 --selection tinyvit --teacher timm:tiny_vit_21m_224
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from ..io import atomic_write_json

__all__ = ['main', 'get_parser', 'build_model_by_family']

FAMILIES = ('hf', 'timm')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Show the MPO over-parameterization plan of a model (no weights needed)')
    p.add_argument('model', help='torchvision model name or torchdistill model key; hf:<folder | config.json | '
                                 'transformers class>; timm:<model name>')
    p.add_argument('--kwargs', default='{}', help='JSON kwargs: the constructor\'s, or the Hugging Face config\'s values')
    p.add_argument('--repo_or_dir', help='torch.hub repository for the model key')
    p.add_argument('--hf_class', default='AutoModelForSequenceClassification',
                   help='transformers class built from a hf: folder, config file or config class')
    p.add_argument('--selection', help='a named selection of the paper: bert or tinyvit')
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
    p.add_argument('--teacher', help='teacher (any form the model takes): plan against it and print the alignment '
                                     'pairing table')
    p.add_argument('--teacher_kwargs', default='{}', help='JSON kwargs for the teacher')
    p.add_argument('--teacher_repo_or_dir', help='torch.hub repository for the teacher key')
    p.add_argument('--layer_map', help="with --teacher: the alignment layer_map, 'uniform', 'first' or JSON "
                                       "([1, 3, 5], {\"0\": 1}); also the planning map with align_to")
    p.add_argument('--no_align_to', action='store_true',
                   help='with --teacher: plan the student on its own (no align_to) and only report the pairing')
    p.add_argument('--cores', default='auxiliary', help="cores the alignment uses: auxiliary, all or central")
    p.add_argument('--apply', action='store_true', help='also decompose (timed) and verify eval outputs '
                                                        '(the model is then built with random weights)')
    p.add_argument('--input_size', type=int, nargs='+', default=[3, 224, 224], help='input shape for --apply')
    p.add_argument('--json', help='write the report (and the alignment, with --teacher) as JSON here')
    return p


def _family(spec: str) -> tuple[str | None, str]:
    """``(family, name)``: ``hf:``/``timm:`` prefixes; an existing folder or ``.json`` file is ``hf``."""
    head, sep, rest = spec.partition(':')
    if sep and head in FAMILIES:
        return head, rest
    path = os.path.expanduser(spec)
    if os.path.isdir(path) or (spec.endswith('.json') and os.path.isfile(path)):
        return 'hf', spec
    return None, spec


def _hf_model(name: str, kwargs: dict, hf_class: str) -> torch.nn.Module:
    import transformers
    path = os.path.expanduser(name)
    if os.path.isdir(path) or os.path.isfile(path):
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, 'config.json')):
            raise ValueError(f'hf:{name}: the folder has no config.json (not a Hugging Face model folder)')
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)  # the config only: no weights read
        cls = None
    else:
        cls = getattr(transformers, name, None) if name.isidentifier() else None
        if not isinstance(cls, type):
            hint = ('; a hub id is not fetched: download the model and give its folder' if '/' in name or '-' in name
                    else '')
            raise ValueError(f'hf:{name}: not a folder, a config .json file or a transformers class{hint}')
        if issubclass(cls, transformers.PretrainedConfig):
            config, cls = cls(**kwargs), None
        elif issubclass(cls, transformers.PreTrainedModel):
            config = cls.config_class(**kwargs)
        else:
            raise ValueError(f'hf:{name}: transformers.{name} is neither a config nor a model class')
    if cls is None:
        auto = getattr(transformers, hf_class, None)
        if auto is None or not hasattr(auto, 'from_config'):
            raise ValueError(f'--hf_class {hf_class!r}: not a transformers model class')
        return auto.from_config(config)
    return cls(config)


def build_model_by_family(spec: str, kwargs: dict, repo_or_dir: str | None = None, meta: bool = True,
                          hf_class: str = 'AutoModelForSequenceClassification') -> torch.nn.Module:
    """The model ``spec`` names (see the module docstring), on the meta device unless ``meta`` is false."""
    from ..plugin.models import build_base_model
    family, name = _family(spec)
    context = torch.device('meta') if meta else torch.device('cpu')
    with context:
        if family == 'hf':
            return _hf_model(name, kwargs, hf_class)
        if family == 'timm':
            import timm
            if not timm.is_model(name):
                raise ValueError(f'timm:{name}: unknown timm model; similar: {timm.list_models(f"*{name[:6]}*")[:10]}')
            if 'pretrained' in kwargs:
                raise ValueError('timm models are built with pretrained=False here (no weights needed)')
            return timm.create_model(name, pretrained=False, **kwargs)
        try:
            return build_base_model(name, repo_or_dir, **kwargs)
        except ValueError as exc:  # OptionError: say which family the name may belong to
            hints = []
            try:
                import timm
                if timm.is_model(name):
                    hints.append(f'timm:{name}')
            except ImportError:
                pass
            if '/' in name or '-' in name:  # a Hugging Face hub id (bert-base-uncased, org/model)
                hints.append(f'hf:<the folder of {name}>')
            if hints:
                raise ValueError(f'{exc}; did you mean {" or ".join(hints)}?') from None
            raise


def _layer_map(text: str | None):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text  # 'uniform', 'first'
    if isinstance(value, dict):
        value = {int(k) if isinstance(k, str) and k.lstrip('-').isdigit() else k: v for k, v in value.items()}
    return value


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from ..alignment import MatchError, pairing_table
    from ..options import OptionError
    from ..surgery import overparameterize, plan, plan_alignment

    options = json.loads(args.mpo)
    for key in ('selection', 'num_dummy', 'num_factors', 'target_ratio', 'include', 'exclude', 'types', 'min_numel',
                'max_bond', 'freeze', 'factor_order'):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    alignment = None
    layer_map = _layer_map(args.layer_map)
    try:
        model = build_model_by_family(args.model, json.loads(args.kwargs), args.repo_or_dir, meta=not args.apply,
                                      hf_class=args.hf_class).eval()
        teacher = None
        if args.teacher is not None:
            teacher = build_model_by_family(args.teacher, json.loads(args.teacher_kwargs), args.teacher_repo_or_dir,
                                            meta=True, hf_class=args.hf_class)  # shapes only
            if not args.no_align_to:
                options.setdefault('align_to', teacher)
                if layer_map is not None:
                    options.setdefault('layer_map', layer_map)
        elif layer_map is not None:
            raise ValueError('--layer_map is the alignment map: it needs --teacher')
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
                pairs, coverage = plan_alignment(report, teacher, args.cores, layer_map)
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
            alignment['layer_map'] = layer_map
            alignment['pairs'] = [{'student': p.student, 'teacher': p.teacher, 'teacher_factors': p.teacher_plan.describe(),
                                   'cores': list(p.cores)} for p in pairs]
    except (OptionError, ValueError, TypeError, OSError) as exc:  # TypeError: wrong constructor kwargs
        print(f'error: {" ".join(str(exc).split())}', file=sys.stderr)
        return 2
    if args.json:
        out = report.to_dict()
        if alignment is not None:
            out['alignment'] = alignment
        atomic_write_json(out, args.json)
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
