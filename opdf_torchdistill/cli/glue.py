"""GLUE runner (``opdf-glue``, ``tools/glue.py``): torchdistill's Hugging Face GLUE recipes, with OPDF.

It follows torchdistill's ``examples/hf_transformers/general_language_understanding.py`` (checked
at torchdistill commit 3e4373c): the same config layout (``datasets.<name>.{name, raw_data_kwargs,
dataset_id_map}``, ``models.{teacher_model, student_model}.{config_kwargs, tokenizer_kwargs,
model_kwargs, dst_ckpt}``, ``train``, ``test``) and flags (``--config --task_name --run_log --seed
-test_only -student_only``); teacher and student are built with ``from_pretrained`` as there, trained
by torchdistill's ``DistillationBox`` (``TrainingBox`` without a teacher), validated every epoch, the
best student saved with ``save_pretrained`` to ``dst_ckpt`` (with the ``opdf_hf_student`` wrapper:
contracted, a plain Hugging Face model) and finally reloaded from there with a plain
``from_pretrained`` and tested. Differences, each for a reason:

* single process on ``--device`` (no ``accelerate``; use torchdistill's script for multi-GPU runs);
* GLUE metrics computed here (accuracy, F1, Matthews, Pearson, Spearman: the definitions of
  ``evaluate``'s ``glue`` metric), so nothing is fetched from the Hub at run time;
* ``raw_data_kwargs`` may name local files (``train_file_path``, ``valid_file_path`` and any
  ``<split>_file_path``, e.g. ``test_file_path``; ``.csv``, ``.tsv``, ``.json``/``.jsonl`` with the
  Hub's ``glue`` column names) that take precedence over the Hub; only the datasets the train and
  test sections use are loaded (submission-only sets such as MNLI's ``ax`` are not);
* ``models.*.num_labels`` (where the official STS-B and MNLI recipes put it) reaches the model config,
  and a test loader without a sampler (the official MNLI recipe's) evaluates in order;
* the final reload is strict: a checkpoint with missing or unexpected keys is an error (the script
  would test a partly random model); the frozen teacher runs in ``eval()`` (dropout off);
* the example's ``custom`` package (a dependency of the official recipes) is replaced by the same
  registrations in :mod:`opdf_torchdistill.hf` when it is not importable; no ``--private_output``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..runfiles import OutputError, RunLock
from .common import ConfigError, _check_duplicate_keys, check_device, config_snapshot, run_cli
from .config_guard import check_config_tags

logger = logging.getLogger('opdf_torchdistill.glue')

GLUE_TASK2KEYS = {
    'ax': ('premise', 'hypothesis'), 'cola': ('sentence', None), 'mnli': ('premise', 'hypothesis'),
    'mrpc': ('sentence1', 'sentence2'), 'qnli': ('question', 'sentence'), 'qqp': ('question1', 'question2'),
    'rte': ('sentence1', 'sentence2'), 'sst2': ('sentence', None), 'stsb': ('sentence1', 'sentence2'),
    'wnli': ('sentence1', 'sentence2'),
}
# label names in the Hub's `glue` dataset (index = label id), for local files that spell them out
GLUE_LABEL_NAMES = {
    'ax': ['entailment', 'neutral', 'contradiction'], 'cola': ['unacceptable', 'acceptable'],
    'mnli': ['entailment', 'neutral', 'contradiction'], 'mrpc': ['not_equivalent', 'equivalent'],
    'qnli': ['entailment', 'not_entailment'], 'qqp': ['not_duplicate', 'duplicate'],
    'rte': ['entailment', 'not_entailment'], 'sst2': ['negative', 'positive'], 'stsb': None,
    'wnli': ['not_entailment', 'entailment'],
}
_FILE_KEYS = {'train_file_path': 'train', 'valid_file_path': 'validation'}  # the example script's two keys


def _file_split(key: str) -> str | None:
    """Split a ``raw_data_kwargs`` key names: the script's two, or ``<split>_file_path`` (``test_file_path``,
    ``validation_matched_file_path``, ...)."""
    if key in _FILE_KEYS:
        return _FILE_KEYS[key]
    return key[:-len('_file_path')] if key.endswith('_file_path') and len(key) > len('_file_path') else None


# ------------------------------------------------------------------------------------------------
# Metrics (the definitions of evaluate's `glue` metric)
# ------------------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind='mergesort')
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else float('nan')


def glue_metrics(task: str, predictions, references) -> dict[str, float]:
    """The GLUE metrics of ``task`` (``evaluate.load('glue', task)``'s keys and definitions)."""
    p, r = np.asarray(predictions), np.asarray(references)
    if len(p) != len(r) or len(p) == 0:
        raise ValueError(f'glue_metrics: {len(p)} predictions for {len(r)} references')
    if task == 'stsb':
        p, r = p.astype(np.float64), r.astype(np.float64)
        return {'pearson': _pearson(p, r), 'spearmanr': _pearson(_ranks(p), _ranks(r))}
    accuracy = float((p == r).mean())
    if task == 'cola':
        tp, tn = float(((p == 1) & (r == 1)).sum()), float(((p == 0) & (r == 0)).sum())
        fp, fn = float(((p == 1) & (r == 0)).sum()), float(((p == 0) & (r == 1)).sum())
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return {'matthews_correlation': (tp * tn - fp * fn) / denom if denom > 0 else 0.0}
    if task in ('mrpc', 'qqp'):
        tp, fp, fn = float(((p == 1) & (r == 1)).sum()), float(((p == 1) & (r == 0)).sum()), float(((p == 0) & (r == 1)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
        return {'accuracy': accuracy, 'f1': f1}
    if task in GLUE_TASK2KEYS:
        return {'accuracy': accuracy}
    raise ValueError(f'unknown GLUE task {task!r}; valid: {sorted(GLUE_TASK2KEYS)}')


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def _read_rows(path: str) -> list[dict]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'GLUE data file {path!r} does not exist')
    suffix = Path(path).suffix.lower()
    with open(path, newline='', encoding='utf-8') as f:
        if suffix in ('.csv', '.tsv'):
            return list(csv.DictReader(f, delimiter='\t' if suffix == '.tsv' else ','))
        if suffix in ('.json', '.jsonl'):
            text = f.read().strip()
            if text.startswith('['):
                return json.loads(text)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    raise ValueError(f'GLUE data file {path!r}: unsupported format {suffix!r}; use .csv, .tsv, .json or .jsonl')


def _label(value, task: str, path: str, row: int):
    if task == 'stsb':
        return float(value)
    if isinstance(value, str) and value.strip().lstrip('-').isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    names = GLUE_LABEL_NAMES[task]
    if value in names:
        return names.index(value)
    raise ValueError(f'{path}: row {row}: label {value!r} is neither an integer id nor one of {task} labels {names}')


def load_local_glue(task: str, files: Mapping[str, str]):
    """``{split: datasets.Dataset}`` from local files with the Hub's ``glue`` columns (in memory)."""
    import datasets
    keys = [k for k in GLUE_TASK2KEYS[task] if k is not None]
    out = {}
    for file_key, path in files.items():
        split = _file_split(file_key)
        if not path:
            continue
        rows = _read_rows(path)
        if not rows:
            raise ValueError(f'{path}: no rows')
        missing = [k for k in keys + ['label'] if k not in rows[0]]
        if missing:
            raise ValueError(f'{path}: columns {missing} missing for GLUE task {task!r} (found {sorted(rows[0])}); '
                             f'expected the Hub glue/{task} columns {keys + ["label"]}')
        columns = {k: [str(r[k]) for r in rows] for k in keys}
        columns['label'] = [_label(r['label'], task, path, i) for i, r in enumerate(rows)]
        out[split] = datasets.Dataset.from_dict(columns)
    return out


def _used_dataset_ids(config: Mapping) -> set[str]:
    """Every ``dataset_id`` the train and test sections read (private prediction sets are not run here)."""
    found = set()

    def walk(node):
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == 'dataset_id' and isinstance(value, str):
                    found.add(value)
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
    walk(config.get('train'))
    walk(config.get('test'))
    return found


def get_all_datasets(datasets_config: Mapping, task_name: str | None, tokenizer, used_ids: set[str] | None = None):
    """Tokenized datasets by id, as the example's ``get_all_datasets``; with ``used_ids``, only those
    (a dataset entry none of whose ids is used, e.g. MNLI's ``glue_ax`` for submissions, is not loaded)."""
    dataset_dict = {}
    for name, cfg in datasets_config.items():
        id_map = dict(cfg['dataset_id_map'])
        if used_ids is not None:
            id_map = {split: i for split, i in id_map.items() if i in used_ids}
            if not id_map:
                logger.info('datasets.%s: not used by train/test; not loaded', name)
                continue
        task = cfg.get('name') or cfg.get('key') or task_name
        if task not in GLUE_TASK2KEYS:
            raise ValueError(f'datasets.{name}: GLUE task {task!r} unknown; give datasets.{name}.name or --task_name '
                             f'(one of {sorted(GLUE_TASK2KEYS)})')
        files = dict(cfg.get('raw_data_kwargs') or {})
        unknown = sorted(k for k in files if _file_split(k) is None)
        if unknown:
            raise ValueError(f'datasets.{name}.raw_data_kwargs: unknown keys {unknown}; valid: train_file_path, '
                             f'valid_file_path or <split>_file_path')
        if any(files.values()):
            raw = load_local_glue(task, files)
            source = 'local files'
        else:
            import datasets
            raw = datasets.load_dataset('glue', task)  # the Hub (or its local cache), as the example script
            source = f'the Hub dataset glue/{task}'
        s1, s2 = GLUE_TASK2KEYS[task]
        padding = 'max_length' if cfg.get('pad_to_max_length', False) else False
        max_length = cfg.get('max_length', 128)

        def preprocess(examples, s1=s1, s2=s2, padding=padding, max_length=max_length):
            texts = (examples[s1],) if s2 is None else (examples[s1], examples[s2])
            result = tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)
            result['labels'] = examples['label']
            return result

        for split, dataset_id in id_map.items():
            if split not in raw:
                raise ValueError(f'datasets.{name}.dataset_id_map names split {split!r}, which {source} do not provide '
                                 f'(splits: {sorted(raw)}); give its file in raw_data_kwargs as {split}_file_path')
            split_data = raw[split]
            dataset_dict[dataset_id] = split_data.map(preprocess, batched=True, remove_columns=split_data.column_names)
            logger.info('%s: %d examples (%s, %s)', dataset_id, len(dataset_dict[dataset_id]), task, source)
    return dataset_dict


def customize_lr_config(config: dict, dataset_dict: Mapping, world_size: int = 1) -> None:
    """Fill ``scheduler.kwargs.num_training_steps`` from the data size (the example's ``custom.optim``)."""
    train = config.get('train')
    if not train:
        return
    stages = [train] if 'stage1' not in train else [train[k] for k in sorted(train) if k.startswith('stage')]
    for stage in stages:
        if 'scheduler' not in stage or 'train_data_loader' not in stage:
            continue
        loader = stage['train_data_loader']
        steps = math.ceil(len(dataset_dict[loader['dataset_id']]) / loader['kwargs']['batch_size']
                          / stage.get('grad_accum_step', 1) / world_size)
        stage['scheduler']['kwargs']['num_training_steps'] = steps * stage['num_epochs']


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def load_tokenizer_and_model(model_config: Mapping, task_name: str | None, prioritizes_dst_ckpt: bool = False,
                             strict: bool = False):
    """As the example's: config, tokenizer and model from ``from_pretrained`` kwargs; ``dst_ckpt``
    (when it exists and ``prioritizes_dst_ckpt``) or ``src_ckpt`` replaces the model's path. With
    ``strict``, any missing, unexpected or mismatched key is an error."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    config_kwargs = dict(model_config['config_kwargs'])
    if model_config.get('num_labels') is not None and 'num_labels' not in config_kwargs:
        # the official STS-B and MNLI recipes give num_labels next to config_kwargs, not in them
        config_kwargs['num_labels'] = model_config['num_labels']
    config = AutoConfig.from_pretrained(**config_kwargs, finetuning_task=task_name)
    tokenizer = AutoTokenizer.from_pretrained(**model_config['tokenizer_kwargs'])
    model_kwargs = dict(model_config['model_kwargs'])
    dst, src = model_config.get('dst_ckpt'), model_config.get('src_ckpt')
    if prioritizes_dst_ckpt and dst and os.path.exists(os.path.expanduser(dst)):
        model_kwargs['pretrained_model_name_or_path'] = os.path.expanduser(dst)
    elif src:
        if not os.path.exists(os.path.expanduser(src)):
            raise FileNotFoundError(f'src_ckpt {src!r} does not exist')
        model_kwargs['pretrained_model_name_or_path'] = os.path.expanduser(src)
    model, info = AutoModelForSequenceClassification.from_pretrained(config=config, output_loading_info=True,
                                                                    **model_kwargs)
    bad = {k: sorted(v) for k, v in info.items() if k != 'error_msgs' and v}
    if strict and (bad or info.get('error_msgs')):
        raise RuntimeError(f'{model_kwargs["pretrained_model_name_or_path"]}: not a plain checkpoint of this model: '
                           f'{bad} {info.get("error_msgs") or ""}')
    return tokenizer, model


def _import_dependencies(dependencies) -> None:
    """torchdistill's ``import_dependencies``, except that the example script's ``custom`` package is
    replaced by :mod:`opdf_torchdistill.hf`'s registrations when it is not importable."""
    import importlib

    from torchdistill.common.main_util import import_dependencies
    deps = [dependencies] if isinstance(dependencies, (str, dict)) else list(dependencies or [])
    kept = []
    for dep in deps:
        name = dep.get('name') if isinstance(dep, dict) else dep[0] if isinstance(dep, (list, tuple)) else dep
        if name == 'custom':
            try:
                importlib.import_module('custom')
            except ImportError:
                logger.info("dependency 'custom' (torchdistill's examples/hf_transformers/custom) is not importable; "
                            'using the same registrations from opdf_torchdistill.hf')
                importlib.import_module('opdf_torchdistill.hf')
                continue
        kept.append(dep)
    import_dependencies(kept)


# ------------------------------------------------------------------------------------------------
# Train / evaluate
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data_loader, task: str, device, title: str | None = None, header: str = 'Test: ') -> dict:
    if title:
        logger.info(title)
    model.eval()
    preds, refs = [], []
    for batch in data_loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits
        preds.append(logits.squeeze(-1) if task == 'stsb' else logits.argmax(dim=-1))
        refs.append(batch['labels'])
    result = glue_metrics(task, torch.cat(preds).float().cpu().numpy() if task == 'stsb' else torch.cat(preds).cpu().numpy(),
                          torch.cat(refs).cpu().numpy())
    logger.info(header + ', '.join(f'{k} = {v}' for k, v in sorted(result.items())))
    return result


def train(teacher_model, student_model, dataset_dict, dst_ckpt_dir, task, device, config, tokenizer) -> dict:
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.training import get_training_box
    from torchdistill.misc.log import MetricLogger, SmoothedValue
    train_config = config['train']
    if teacher_model is None:
        box = get_training_box(student_model, dataset_dict, train_config, device, None, False, 1)
    else:
        box = get_distillation_box(teacher_model, student_model, dataset_dict, train_config, device, None, False, 1)
    from ..plugin.diagnostics import LossTermGradients
    best, history, first_step = None, [], None
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        if teacher_model is not None and not train_config.get('teacher', {}).get('requires_grad', True):
            box.teacher_model.eval()  # torchdistill 1.1.5 leaves the frozen teacher in train mode (dropout on)
        metric_logger = MetricLogger(delimiter='  ')
        metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value}'))
        for batch in metric_logger.log_every(box.train_data_loader, train_config.get('log_freq', 50), f'Epoch: [{epoch}]'):
            batch = {k: v.to(device) for k, v in batch.items()}
            # first step: each loss term's gradient norm on the aligned cores, and whether alignment starts at 0
            term_gradients = LossTermGradients(box) if teacher_model is not None and first_step is None else None
            loss = box.forward_process(batch, targets=None, supp_dict=None)
            if term_gradients is not None:
                first_step = term_gradients.measure(student_model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'epoch {epoch}: training loss is {loss.item()}; stopping (nothing saved '
                                         f'from this epoch)')
            box.post_forward_process(loss=loss)
            metric_logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]['lr'])
        val = evaluate(student_model, box.val_data_loader, task, device, header='Validation: ')
        value = sum(val.values())
        history.append(val)
        if best is None or value > best:
            logger.info('Updating ckpt at %s', dst_ckpt_dir)
            best = value
            save_pretrained_atomic(dst_ckpt_dir, student_model, tokenizer)
        box.post_epoch_process()
    return {'validation': history, 'first_step': first_step}


def save_pretrained_atomic(dst_dir: str | os.PathLike, *savers) -> Path:
    """``save_pretrained`` of every object into a fresh hidden folder beside ``dst_dir``, files given the
    umask's permissions (transformers writes some with 0600), then swapped in for ``dst_dir`` with two
    renames: a kill leaves the old folder (or the new one) complete, never a half-written mix."""
    import shutil
    from ..io import _HOST, _umask
    dst = Path(os.path.expanduser(str(dst_dir)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f'.{dst.name}.{_HOST}.{os.getpid()}.tmp')
    old = dst.with_name(f'.{dst.name}.{_HOST}.{os.getpid()}.old')
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        for saver in savers:
            saver.save_pretrained(tmp)
        mode = 0o666 & ~_umask()
        for path in tmp.rglob('*'):
            if path.is_file():
                os.chmod(path, mode)
                with open(path, 'rb') as f:
                    os.fsync(f.fileno())
        if dst.exists():
            os.rename(dst, old)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dst


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='GLUE knowledge distillation with OPDF (torchdistill HF recipes)')
    parser.add_argument('--config', required=True, help='yaml file path')
    parser.add_argument('--run_log', help='log file path')
    parser.add_argument('--task_name', type=str, default=None, help='GLUE task (default: datasets.<name>.name)')
    parser.add_argument('--seed', type=int, default=None, help='a seed for reproducible training')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    parser.add_argument('-test_only', action='store_true', help='only test the models')
    parser.add_argument('-student_only', action='store_true', help='test the student model only')
    parser.add_argument('--force', action='store_true',
                        help='replace an existing student dst_ckpt folder (without it a fresh run onto one is refused)')
    parser.add_argument('--trust_config', action='store_true',
                        help='let the config\'s tags import and call any name (configs are code; see opdf-train)')
    parser.add_argument('--debug', action='store_true', help='on an error, print the traceback too')
    return parser


def _guard_outputs(args, plain: Mapping, dst_dir: str) -> None:
    """The trainer's rules (:mod:`opdf_torchdistill.runfiles`) for the GLUE runner: the student folder and
    the log are neither the config nor any file or folder the config reads (a teacher folder reused as
    the student's base must not become the output), and an existing student folder is not replaced
    without ``--force``."""
    from ..runfiles import check_existing_kind, check_outputs, config_input_files, refuse_existing
    inputs = {f'the config\'s {k}' if k != '--config' else k: v
              for k, v in config_input_files(plain, args.config, directories=True).items()}
    outputs = {'--run_log': args.run_log}
    if not args.test_only:
        outputs['the student dst_ckpt folder'] = dst_dir
        for role, path in inputs.items():
            if Path(os.path.expanduser(str(path))).resolve() == Path(dst_dir).resolve():
                raise OutputError(f'the student dst_ckpt folder {dst_dir} is also {role}, which this run reads: '
                                  f'saving the student there would destroy it; choose another dst_ckpt')
        if Path(dst_dir).is_dir() and any(Path(dst_dir).iterdir()) and not args.force:
            refuse_existing({'the student dst_ckpt folder': dst_dir},
                            'it holds an earlier run\'s model, which a fresh run would replace: pass --force, or '
                            'choose another dst_ckpt')
    check_outputs({k: v for k, v in outputs.items() if k != 'the student dst_ckpt folder'}, inputs)
    if not args.force:
        check_existing_kind(args.run_log, 'text', '--run_log')


def run(args: argparse.Namespace, config: dict | None = None) -> dict:
    """Train (unless ``-test_only``) and test; returns ``{'validation': [...], 'teacher': ..., 'student': ...}``.
    ``config`` (already loaded) replaces reading ``args.config`` (tests pass miniature configs)."""
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import set_seed
    from torchdistill.datasets import util
    from torchdistill.datasets.registry import register_collate_func
    from transformers import DataCollatorWithPadding
    set_seed(args.seed)
    check_device(args.device)
    if config is None:
        path = os.path.expanduser(args.config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such config file')
        _check_duplicate_keys(path)
        if not args.trust_config:
            check_config_tags(path)
        config = yaml_util.load_yaml_file(path)
    _import_dependencies(config.get('dependencies'))
    import opdf_torchdistill.hf  # noqa: F401  (the example's custom registrations, opdf_hf_student)
    device = torch.device(args.device)
    task = args.task_name or next((d.get('name') for d in config['datasets'].values() if d.get('name')), None)
    if task not in GLUE_TASK2KEYS:
        raise ValueError(f'GLUE task {task!r} unknown: give --task_name or datasets.<name>.name, one of {sorted(GLUE_TASK2KEYS)}')
    models_config = config['models']
    teacher_config = models_config.get('teacher_model')
    student_config = models_config['student_model'] if 'student_model' in models_config else models_config['model']
    teacher = None if teacher_config is None else load_tokenizer_and_model(teacher_config, task, True)[1]
    student_tokenizer, student = load_tokenizer_and_model(student_config, task, False)
    dst_ckpt_dir = os.path.expanduser(student_config['dst_ckpt'])
    dataset_dict = get_all_datasets(config['datasets'], task, student_tokenizer, _used_dataset_ids(config))
    customize_lr_config(config, dataset_dict)
    register_collate_func(DataCollatorWithPadding(student_tokenizer))
    result: dict[str, Any] = {}
    if not args.test_only:
        if teacher is not None:
            teacher.to(device)
        student.to(device)
        result.update(train(teacher, student, dataset_dict, dst_ckpt_dir, task, device, config, student_tokenizer))
        result['trained_student'] = student
    test_loader_config = dict(config['test']['test_data_loader'])
    if not test_loader_config.get('sampler'):
        # the official MNLI recipe's test loader names no sampler (torchdistill requires one): evaluate in order
        logger.info('test.test_data_loader has no sampler; using SequentialSampler')
        test_loader_config['sampler'] = {'class_or_func': torch.utils.data.SequentialSampler, 'kwargs': None}
    test_loader = util.build_data_loader(dataset_dict[test_loader_config['dataset_id']], test_loader_config, False)
    if not args.student_only and teacher is not None:
        result['teacher'] = evaluate(teacher.to(device), test_loader, task, device,
                                     title=f'[Teacher: {teacher_config.get("key")}]')
    if not os.path.isdir(dst_ckpt_dir):
        raise FileNotFoundError(f'student dst_ckpt {dst_ckpt_dir!r} does not exist: train first (without -test_only)')
    # Reload the best checkpoint as a plain Hugging Face model (strict: a contracted OPDF student)
    _, best_student = load_tokenizer_and_model(student_config, task, True, strict=True)
    result['student'] = evaluate(best_student.to(device), test_loader, task, device,
                                 title=f'[Student: {student_config.get("key")}]')
    result['best_student'] = best_student
    return result


def main(argv=None) -> int:
    """Command-line entry point: 0 on success, 1 with one ``error:`` line (``--debug``: the traceback)."""
    from torchdistill.misc.log import set_basic_log_config, setup_log_file
    args = get_parser().parse_args(argv)
    set_basic_log_config()
    logging.getLogger('opdf_torchdistill').setLevel(logging.INFO)

    def body() -> None:
        plain = config_snapshot(args.config)
        models = plain.get('models') or {}
        student = models.get('student_model') or models.get('model') or {}
        if 'dst_ckpt' not in student:
            raise ConfigError('models.student_model.dst_ckpt is required (the folder the best student is saved to)')
        dst_dir = os.path.expanduser(str(student['dst_ckpt']))
        _guard_outputs(args, plain, dst_dir)  # before the log is opened or anything is read
        lock = None if args.test_only else RunLock(dst_dir, sys.argv).acquire()
        try:
            if args.run_log:
                setup_log_file(os.path.expanduser(args.run_log))
            logger.info(args)
            start = time.time()
            result = run(args)
            logger.info('done in %.1f s; student test %s', time.time() - start, result['student'])
        finally:
            if lock is not None:
                lock.release()

    return run_cli(body, args.debug)


if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(main())
