"""How hard each loss term of a recipe pulls on the cores OPDF aligns, before spending GPU-days on it.

Builds the recipe's teacher, student and distillation box, runs ONE training step's forward pass and
prints, per weighted loss term (and weight decay), the gradient norm on the aligned auxiliary cores,
with the alignment coverage. ``tools/train.py`` logs the same at its first step and records it in
``--metrics_json``; this tool does it without a training run. ``--miniature`` swaps the recipe's
ImageFolder/CIFAR datasets for FakeData and drops pretrained weights and checkpoints (random
teachers: the KD term's scale then differs from a trained teacher's).

Hugging Face (GLUE) recipes, those of :mod:`opdf_torchdistill.cli.glue` and torchdistill's HF example,
are recognised by their ``model_kwargs``: teacher and student are built as ``opdf-glue`` builds them
(``from_pretrained``, the ``opdf_hf_student`` wrapper; the example's ``custom`` dependency is served by
:mod:`opdf_torchdistill.hf` when it is not importable) and the first batch of the training set is
used. They need local models and data (``--set``; ``--miniature`` is for image recipes).

Examples::

    python tools/grad_norms.py --config configs/digits/kd_opdf.yaml
    python tools/grad_norms.py --config configs/glue/rte/opdf-kd-bert6_from_bert_base_uncased.yaml \
        --set datasets.glue.raw_data_kwargs.train_file_path=rte/train.csv ...   # local models and data
    python tools/grad_norms.py --config configs/ilsvrc2012/opdf-kd-resnet18_from_resnet34.yaml --miniature \\
        --batch_size 16 --set train.criterion.kwargs.sub_terms.opdf.criterion.kwargs.reduction=paper --json out.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

__all__ = ['main', 'measure', 'get_parser']

logger = logging.getLogger('opdf_torchdistill.gradnorms')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Gradient norm of each weighted loss term on the aligned auxiliary '
                                            'cores at one training step of a torchdistill recipe')
    p.add_argument('--config', required=True, help='YAML config (torchdistill layout) with a teacher')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config value (as tools/train.py)')
    p.add_argument('--miniature', action='store_true',
                   help='FakeData instead of the recipe\'s ImageFolder/CIFAR data; no pretrained weights or checkpoints')
    p.add_argument('--batch_size', type=int, help='training batch size (default: the recipe\'s; 4 with --miniature)')
    p.add_argument('--seed', type=int, default=0, help='torch seed for model init and data order')
    p.add_argument('--device', default='cpu')
    p.add_argument('--task_name', help='GLUE recipes: the task (default: datasets.<name>.name)')
    p.add_argument('--json', help='write the measurement here')
    p.add_argument('--trust_config', action='store_true',
                   help='let the config\'s tags import and call any name (configs are code; see opdf-train)')
    p.add_argument('--debug', action='store_true', help='on an error, print the traceback too')
    return p


def measure(config: dict, device: torch.device, seed: int = 0) -> dict:
    """One step of ``config``'s first stage; returns :meth:`LossTermGradients.measure`'s result."""
    from torchdistill.core.distillation import get_distillation_box
    from ..plugin.diagnostics import LossTermGradients
    from .common import build_model, student_config_of
    torch.manual_seed(seed)
    teacher_config = config['models'].get('teacher_model')
    if teacher_config is None:
        raise ValueError('the config has no models.teacher_model: gradient norms compare distillation terms')
    teacher = build_model(teacher_config, device, False, name='teacher_model')
    student = build_model(student_config_of(config), device, False,
                          name='student_model' if 'student_model' in config['models'] else 'model')
    box = get_distillation_box(teacher, student, config['datasets'], config['train'], device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    if not box.teacher_updatable:
        box.teacher_model.eval()
    images, targets, supp_dict = next(iter(box.train_data_loader))
    term_gradients = LossTermGradients(box)
    box.forward_process(images.to(device), targets.to(device), supp_dict)
    return term_gradients.measure(student)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from .common import apply_overrides, check_device, load_config, run_cli, setup_logging
    from .miniature import load_miniature
    setup_logging()
    measured: dict = {}

    def body() -> None:
        from .common import config_snapshot
        from .glue import is_hf_recipe, load_glue_config, measure_first_step
        if is_hf_recipe(config_snapshot(args.config, args.overrides)):
            if args.miniature:
                raise ValueError(f'{args.config}: --miniature swaps image datasets and model checkpoints; a Hugging '
                                 f'Face (GLUE) recipe needs local models and data instead: point its model paths '
                                 f'and raw_data_kwargs at them with --set')
            config, _ = load_glue_config(args.config, args.overrides, args.trust_config)
            if args.batch_size:
                config['train']['train_data_loader']['kwargs']['batch_size'] = args.batch_size
            measured.update(measure_first_step(config, check_device(args.device), args.seed, args.task_name))
            return
        if args.miniature:
            batch_size = args.batch_size or 4
            config = load_miniature(args.config, size=max(8, batch_size), batch_size=batch_size)
            apply_overrides(config, args.overrides)
        else:
            config = load_config(args.config, args.overrides, trust_config=args.trust_config)
            if args.batch_size:
                config['train']['train_data_loader']['kwargs']['batch_size'] = args.batch_size
        measured.update(measure(config, check_device(args.device), args.seed))

    status = run_cli(body, args.debug)
    if status != 0:
        return status
    result = measured
    result.update({'config': args.config, 'overrides': args.overrides, 'miniature': args.miniature, 'seed': args.seed})
    print(json.dumps({k: result[k] for k in ('grad_norms', 'cores', 'num_cores', 'alignment') if k in result}, indent=1))
    if args.json:
        from ..io import atomic_write_json
        atomic_write_json(result, args.json)
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
