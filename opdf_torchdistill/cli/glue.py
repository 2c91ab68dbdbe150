"""GLUE runner (``opdf-glue``, ``tools/glue.py``): torchdistill's Hugging Face GLUE recipes, with OPDF.

It follows torchdistill's ``examples/hf_transformers/general_language_understanding.py`` (checked
at torchdistill commit 3e4373c): the same config layout (``datasets.<name>.{name, raw_data_kwargs,
dataset_id_map}``, ``models.{teacher_model, student_model}.{config_kwargs, tokenizer_kwargs,
model_kwargs, dst_ckpt}``, ``train``, ``test``, ``private``) and flags (``--config --task_name --run_log
--seed --private_output -test_only -student_only -adjust_lr``); teacher and student are built with
``from_pretrained`` as there, trained by torchdistill's ``DistillationBox`` (``TrainingBox`` without a
teacher), validated every epoch, the best student saved with ``save_pretrained`` to ``dst_ckpt`` (with
the ``opdf_hf_student`` wrapper: contracted, a plain Hugging Face model), finally reloaded from there
with a plain ``from_pretrained`` and tested, and with ``--private_output DIR`` the ``private`` sets
(GLUE's test splits) predicted into the benchmark's submission files. Differences, each for a reason:

* no ``accelerate``: ``torchrun`` runs it data-parallel (the student in ``DistributedDataParallel``;
  NCCL on CUDA, gloo on CPU: :func:`~opdf_torchdistill.cli.common.init_distributed`, as ``opdf-train``),
  and ``--amp bf16|fp16`` is ``torch.autocast`` (fp16 with a gradient scaler); torchdistill 1.1.5's
  ``accelerator.use_fp16`` read, which ``accelerate`` 1.0 broke, is never reached;
* GLUE metrics computed here (accuracy, F1, Matthews, Pearson, Spearman: the definitions of
  ``evaluate``'s ``glue`` metric), so nothing is fetched from the Hub at run time; under ``torchrun``
  each process predicts a contiguous share of the set and the shares are gathered in order (exact
  metrics, no padded duplicates);
* a ``dataset_id_map`` split may be half of a split, ``validation[1/2]`` or ``validation[2/2]``
  (:func:`dev_half`: a fixed permutation, then halves), so that one dev set serves selection and report
  (``configs/glue/study.yaml``);
* ``raw_data_kwargs`` may name local files (``train_file_path``, ``valid_file_path`` and any
  ``<split>_file_path``, e.g. ``test_file_path``; ``.csv``, ``.tsv``, ``.json``/``.jsonl`` with the
  Hub's ``glue`` column names; a test file may leave out ``label``) that take precedence over the Hub;
  only the datasets the run uses are loaded (the ``private`` sets only with ``--private_output``);
* ``models.*.num_labels`` (where the official STS-B and MNLI recipes put it) reaches the model config,
  and a test loader without a sampler (the official MNLI recipe's) evaluates in order;
* the final reload is strict: a checkpoint with missing or unexpected keys is an error (the script
  would test a partly random model); the frozen teacher runs in ``eval()`` (dropout off);
* the example's ``custom`` package (a dependency of the official recipes) is replaced by the same
  registrations in :mod:`opdf_torchdistill.hf` when it is not importable;
* as ``opdf-train``: the first step's gradient norm of every loss term on the aligned cores and the
  alignment coverage are logged and written to ``--metrics_json``; ``<dst_ckpt>.last.pt`` beside the
  student folder holds model (MPO cores), optimizer, scheduler, RNG states and the config after every
  epoch, and ``--resume`` continues from it (bit-exact on CPU; a changed config is refused); ``--set``
  overrides config values; outputs are guarded (``--force``), one run per ``dst_ckpt`` (a lock), and
  every error is one ``error:`` line with exit status 1.

Examples::

    opdf-glue --config configs/glue/rte/opdf-kd-bert6_from_bert_base_uncased.yaml --task_name rte --seed 0 \\
        --metrics_json runs/rte.json --private_output submission/
    torchrun --nproc_per_node 2 -m opdf_torchdistill.cli.glue --config ... --device cpu
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import torch
from torch import distributed as dist

from ..io import atomic_torch_save, atomic_write_json, atomic_write_text, is_trusted, load_checkpoint
from ..runfiles import OutputError, RunLock
from .common import (ConfigError, check_device, config_differences, config_snapshot, init_distributed,
                     is_main_process, read_config, run_cli, setup_logging)

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
# the GLUE benchmark's submission files ((task, split) -> file name) and the tasks whose files spell the
# labels out (the others take label ids; STS-B a score)
GLUE_SUBMISSION_FILES = {
    ('cola', 'test'): 'CoLA.tsv', ('sst2', 'test'): 'SST-2.tsv', ('mrpc', 'test'): 'MRPC.tsv',
    ('stsb', 'test'): 'STS-B.tsv', ('qqp', 'test'): 'QQP.tsv', ('mnli', 'test_matched'): 'MNLI-m.tsv',
    ('mnli', 'test_mismatched'): 'MNLI-mm.tsv', ('qnli', 'test'): 'QNLI.tsv', ('rte', 'test'): 'RTE.tsv',
    ('wnli', 'test'): 'WNLI.tsv', ('ax', 'test'): 'AX.tsv',
}
GLUE_STRING_LABEL_TASKS = ('mnli', 'ax', 'qnli', 'rte')
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
        # a test split (GLUE's test files have no labels) gets the Hub's placeholder label -1
        unlabelled = split is not None and split.startswith('test') and 'label' not in rows[0]
        missing = [k for k in keys + ([] if unlabelled else ['label']) if k not in rows[0]]
        if missing:
            raise ValueError(f'{path}: columns {missing} missing for GLUE task {task!r} (found {sorted(rows[0])}); '
                             f'expected the Hub glue/{task} columns {keys + ["label"]}')
        columns = {k: [str(r[k]) for r in rows] for k in keys}
        columns['label'] = [(-1.0 if task == 'stsb' else -1) for _ in rows] if unlabelled else \
            [_label(r['label'], task, path, i) for i, r in enumerate(rows)]
        out[split] = datasets.Dataset.from_dict(columns)
    return out


def _used_dataset_ids(config: Mapping, private: bool = False) -> set[str]:
    """Every ``dataset_id`` the train and test sections read, and with ``private`` the ``private`` section's
    (the GLUE test sets, predicted for ``--private_output``)."""
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
    if private:
        walk(config.get('private'))
    return found


def _dataset_task(name: str, cfg: Mapping, task_name: str | None) -> str:
    task = cfg.get('name') or cfg.get('key') or task_name
    if task not in GLUE_TASK2KEYS:
        raise ValueError(f'datasets.{name}: GLUE task {task!r} unknown; give datasets.{name}.name or --task_name '
                         f'(one of {sorted(GLUE_TASK2KEYS)})')
    return task


def dataset_splits(datasets_config: Mapping, task_name: str | None) -> dict[str, tuple[str, str]]:
    """``{dataset_id: (GLUE task, split)}`` of every entry of ``datasets_config`` (e.g. ``'mnli/test_m':
    ('mnli', 'test_matched')``, ``'ax/test_ax': ('ax', 'test')``)."""
    out = {}
    for name, cfg in datasets_config.items():
        for split, dataset_id in dict(cfg['dataset_id_map']).items():
            out[dataset_id] = (_dataset_task(name, cfg, task_name), split)
    return out


_HALF = re.compile(r'^(?P<split>[A-Za-z0-9_]+)\[(?P<half>[12])/2\]$')


def split_half(split: str) -> tuple[str, int | None]:
    """``'validation[1/2]'`` -> ``('validation', 1)``; a plain split name -> ``(name, None)``."""
    match = _HALF.match(str(split))
    return (match['split'], int(match['half'])) if match else (str(split), None)


def dev_half(data, half: int, seed: int = 0):
    """The first (``half=1``) or second half of a split, after a permutation fixed by ``seed`` (numpy's
    legacy ``RandomState``, stable across versions); each half keeps the split's order. The halves are
    disjoint and together the split (the first has the extra example of an odd size). GLUE's dev sets
    are split like this between selection (``validation[1/2]``) and report (``validation[2/2]``), as in
    the paper: ``configs/glue/study.yaml``."""
    n = len(data)
    order = np.random.RandomState(seed).permutation(n)
    cut = (n + 1) // 2
    chosen = np.sort(order[:cut] if half == 1 else order[cut:])
    return data.select([int(i) for i in chosen])


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
        task = _dataset_task(name, cfg, task_name)
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
            base, half = split_half(split)
            if base not in raw:
                raise ValueError(f'datasets.{name}.dataset_id_map names split {base!r}, which {source} do not provide '
                                 f'(splits: {sorted(raw)}); give its file in raw_data_kwargs as {base}_file_path')
            split_data = raw[base] if half is None else dev_half(raw[base], half)
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
def hf_load(what: str, load, **kwargs):
    """``load(**kwargs)`` (a ``from_pretrained``), with an unreachable or missing model (transformers'
    several-line ``OSError``) as one line naming ``what`` (the config key) and the path."""
    from ..hf import _one_line_os_error
    return _one_line_os_error(what, kwargs, load)


def load_tokenizer_and_model(model_config: Mapping, task_name: str | None, prioritizes_dst_ckpt: bool = False,
                             strict: bool = False, role: str = 'models.student_model'):
    """As the example's: config, tokenizer and model from ``from_pretrained`` kwargs; ``dst_ckpt``
    (when it exists and ``prioritizes_dst_ckpt``) or ``src_ckpt`` replaces the model's path. With
    ``strict``, any missing, unexpected or mismatched key is an error. Errors name ``role``'s keys."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    config_kwargs = dict(model_config['config_kwargs'])
    if model_config.get('num_labels') is not None and 'num_labels' not in config_kwargs:
        # the official STS-B and MNLI recipes give num_labels next to config_kwargs, not in them
        config_kwargs['num_labels'] = model_config['num_labels']
    config = hf_load(f'{role}.config_kwargs.pretrained_model_name_or_path', AutoConfig.from_pretrained,
                     **config_kwargs, finetuning_task=task_name)
    tokenizer = hf_load(f'{role}.tokenizer_kwargs.pretrained_model_name_or_path', AutoTokenizer.from_pretrained,
                        **model_config['tokenizer_kwargs'])
    model_kwargs = dict(model_config['model_kwargs'])
    dst, src = model_config.get('dst_ckpt'), model_config.get('src_ckpt')
    if prioritizes_dst_ckpt and dst and os.path.exists(os.path.expanduser(dst)):
        model_kwargs['pretrained_model_name_or_path'] = os.path.expanduser(dst)
    elif src:
        if not os.path.exists(os.path.expanduser(src)):
            raise FileNotFoundError(f'src_ckpt {src!r} does not exist')
        model_kwargs['pretrained_model_name_or_path'] = os.path.expanduser(src)
    model, info = hf_load(f'{role}.model_kwargs.pretrained_model_name_or_path',
                          AutoModelForSequenceClassification.from_pretrained, config=config, output_loading_info=True,
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


def is_hf_recipe(config: Mapping) -> bool:
    """Whether ``config`` is a Hugging Face (GLUE example) recipe: a model built from ``model_kwargs``
    with ``from_pretrained``, not a torchdistill model ``key`` + ``kwargs``."""
    models = config.get('models') if isinstance(config, Mapping) else None
    return isinstance(models, Mapping) and any(isinstance(m, Mapping) and 'model_kwargs' in m for m in models.values())


def load_glue_config(path: str, overrides=(), trust_config: bool = False) -> tuple[dict, dict]:
    """``(config, snapshot)``: the recipe with its tags run (after :func:`check_config_tags` unless
    ``trust_config``) and ``--set`` overrides applied, and the same as plain data (tags recorded, not
    run) for the output guards and the resume checkpoint. Dependencies are not imported here."""
    config = read_config(path, overrides, trust_config)
    return config, config_snapshot(os.path.expanduser(str(path)), overrides)


def _student_config(config: Mapping) -> Mapping:
    models = config.get('models') or {}
    student = models.get('student_model') or models.get('model')
    if not isinstance(student, Mapping):
        raise ConfigError('the config has neither models.student_model nor models.model')
    return student


def student_dst_dir(config: Mapping) -> str:
    """The student's ``dst_ckpt`` folder (``~`` expanded); a missing one is a :class:`ConfigError`."""
    dst = _student_config(config).get('dst_ckpt')
    if not dst or not isinstance(dst, (str, os.PathLike)):
        raise ConfigError(f'models.student_model.dst_ckpt must be a folder path (where the best student is saved), '
                          f'got {dst!r}')
    return os.path.expanduser(str(dst))


def resume_ckpt_path(dst_dir: str | os.PathLike) -> Path:
    """``<dst_ckpt folder>.last.pt``: the epoch checkpoint beside the student folder."""
    dst = Path(os.path.expanduser(str(dst_dir)))
    return dst.with_name(dst.name + '.last.pt')


def _resolve_task(config: Mapping, task_name: str | None) -> str:
    task = task_name or next((d.get('name') for d in config['datasets'].values() if d.get('name')), None)
    if task not in GLUE_TASK2KEYS:
        raise ValueError(f'GLUE task {task!r} unknown: give --task_name or datasets.<name>.name, one of '
                         f'{sorted(GLUE_TASK2KEYS)}')
    return task


def prepare(config: dict, task_name: str | None, used_ids: set[str] | None, world_size: int = 1,
            pad_to_multiple_of: int | None = None) -> SimpleNamespace:
    """What the example's ``main`` builds before training: dependencies, the task, teacher and student
    (``from_pretrained``), the tokenized datasets (only ``used_ids``), the scheduler's step count and the
    padding collator. Returns ``task, teacher, student, tokenizer, dataset_dict, teacher_config,
    student_config``."""
    from torchdistill.datasets.registry import register_collate_func
    from transformers import DataCollatorWithPadding
    _import_dependencies(config.get('dependencies'))
    import opdf_torchdistill.hf  # noqa: F401  (the example's custom registrations, opdf_hf_student)
    task = _resolve_task(config, task_name)
    models_config = config['models']
    teacher_config = models_config.get('teacher_model')
    student_config = models_config['student_model'] if 'student_model' in models_config else models_config['model']
    teacher = None if teacher_config is None else \
        load_tokenizer_and_model(teacher_config, task, True, role='models.teacher_model')[1]
    tokenizer, student = load_tokenizer_and_model(student_config, task, False,
                                                  role='models.student_model' if 'student_model' in models_config else 'models.model')
    dataset_dict = get_all_datasets(config['datasets'], task, tokenizer, used_ids)
    customize_lr_config(config, dataset_dict, world_size)
    register_collate_func(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of))
    return SimpleNamespace(task=task, teacher=teacher, student=student, tokenizer=tokenizer, dataset_dict=dataset_dict,
                           teacher_config=teacher_config, student_config=student_config)


# ------------------------------------------------------------------------------------------------
# Predict / evaluate (sharded over processes under torchrun, gathered in order)
# ------------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


@torch.no_grad()
def predict(model, dataset, loader_config: Mapping, task: str, device, amp: str | None = None):
    """``(predictions, references)`` of ``dataset`` in order (class ids, or STS-B scores), as numpy arrays.
    Under ``torchrun`` each process predicts a contiguous share and every process receives the whole."""
    from torchdistill.datasets.util import build_data_loader
    rank, world = _rank_world()
    n = len(dataset)
    if world > 1:
        per = -(-n // world)
        dataset = torch.utils.data.Subset(dataset, list(range(min(n, rank * per), min(n, (rank + 1) * per))))
    loader_config = {k: v for k, v in loader_config.items() if k not in ('sampler', 'batch_sampler', 'dataset_wrapper')}
    loader_config['sampler'] = {'class_or_func': torch.utils.data.SequentialSampler, 'kwargs': None}
    loader_config['requires_supp'] = False
    loader_config['kwargs'] = {**(loader_config.get('kwargs') or {}), 'drop_last': False}
    if torch.device(device).type != 'cuda':
        loader_config['kwargs']['pin_memory'] = False  # nothing to pin for
    model.eval()
    preds, refs = [], []
    if len(dataset):
        for batch in build_data_loader(dataset, loader_config, False):
            batch = {k: v.to(device) for k, v in batch.items()}
            refs.append(batch.pop('labels').cpu())
            with _autocast(device, amp):
                logits = model(**batch).logits
            preds.append(logits.squeeze(-1).float().cpu() if task == 'stsb' else logits.argmax(dim=-1).cpu())
    p = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.float32 if task == 'stsb' else np.int64)
    r = torch.cat(refs).numpy() if refs else np.zeros(0)
    if world > 1:
        shares: list = [None] * world
        dist.all_gather_object(shares, (p, r))
        p, r = np.concatenate([s[0] for s in shares]), np.concatenate([s[1] for s in shares])
    return p, r


def evaluate(model, dataset, loader_config: Mapping, task: str, device, title: str | None = None,
             header: str = 'Test: ', amp: str | None = None) -> dict:
    """The GLUE metrics of ``model`` on ``dataset`` (every process gets the same numbers)."""
    if title:
        logger.info(title)
    preds, refs = predict(model, dataset, loader_config, task, device, amp)
    result = glue_metrics(task, preds, refs)
    logger.info(header + ', '.join(f'{k} = {v}' for k, v in sorted(result.items())))
    return result


def submission_text(task: str, predictions, idx2str: bool) -> str:
    """A GLUE submission file: ``index<TAB>prediction`` lines after that header (as torchdistill's
    ``predict_private``); class ids, or with ``idx2str`` the Hub's label names; STS-B scores."""
    lines = ['index\tprediction']
    names = GLUE_LABEL_NAMES.get(task)
    for i, value in enumerate(predictions):
        if task == 'stsb':
            text = str(np.float32(value))
        elif idx2str:
            text = names[int(value)]
        else:
            text = str(int(value))
        lines.append(f'{i}\t{text}')
    return '\n'.join(lines) + '\n'


def _private_entries(config: Mapping, task_name: str | None) -> list[dict]:
    """The ``private`` section resolved: ``{dataset_id, task, split, file, idx2str, loader}`` per entry, the
    file name defaulting to the GLUE benchmark's (``RTE.tsv``, ``MNLI-m.tsv``, ...) and ``idx2str`` to
    what the benchmark expects (label names for MNLI, AX, QNLI and RTE, ids for the others)."""
    entries = config.get('private') or []
    if not isinstance(entries, list):
        raise ConfigError(f'private must be a list of {{private_data_loader, pred_output, idx2str}} entries, got '
                          f'{type(entries).__name__}')
    splits = dataset_splits(config['datasets'], task_name)
    out = []
    for k, entry in enumerate(entries):
        loader = entry.get('private_data_loader') if isinstance(entry, Mapping) else None
        if not isinstance(loader, Mapping) or 'dataset_id' not in loader:
            raise ConfigError(f'private.{k}: needs private_data_loader.dataset_id')
        dataset_id = loader['dataset_id']
        if dataset_id not in splits:
            raise ConfigError(f'private.{k}: dataset_id {dataset_id!r} is not in any datasets.*.dataset_id_map '
                              f'(ids: {sorted(splits)})')
        task, split = splits[dataset_id]
        task = loader.get('task_name') or task
        name = entry.get('pred_output') or GLUE_SUBMISSION_FILES.get((task, split))
        if not name:
            raise ConfigError(f'private.{k}: no pred_output, and ({task}, {split}) is not a GLUE submission set')
        idx2str = entry.get('idx2str', task in GLUE_STRING_LABEL_TASKS)
        if idx2str and GLUE_LABEL_NAMES.get(task) is None:
            idx2str = False  # STS-B: scores
        out.append({'dataset_id': dataset_id, 'task': task, 'split': split, 'file': str(name),
                    'idx2str': bool(idx2str), 'loader': loader})
    return out


def predict_private(model, dataset_dict: Mapping, entries: list[dict], out_dir: str, device,
                    amp: str | None = None) -> list[str]:
    """Write every ``private`` set's predictions to ``out_dir`` (atomically, rank 0); returns the paths."""
    written = []
    for entry in entries:
        dataset = dataset_dict[entry['dataset_id']]
        preds, _ = predict(model, dataset, entry['loader'], entry['task'], device, amp)
        path = Path(os.path.expanduser(out_dir)) / entry['file']
        if is_main_process():
            atomic_write_text(submission_text(entry['task'], preds, entry['idx2str']), path)
            logger.info('%s: %d predictions (%s %s) -> %s', entry['dataset_id'], len(preds), entry['task'],
                        entry['split'], path)
        written.append(str(path))
    return written


# ------------------------------------------------------------------------------------------------
# Train
# ------------------------------------------------------------------------------------------------
def _wrap_student_ddp(box, device_ids) -> None:
    """Wrap the box's student in ``DistributedDataParallel`` (the GLUE recipes name no ``wrapper``:
    accelerate wraps there); CPU (gloo) and CUDA alike."""
    from torch.nn.parallel import DistributedDataParallel
    from torchdistill.common.module_util import check_if_wrapped
    attr = 'student_model' if hasattr(box, 'student_model') else 'model'
    model = getattr(box, attr)
    if check_if_wrapped(model) or not any(p.requires_grad for p in model.parameters()):
        return
    setattr(box, attr, DistributedDataParallel(model, device_ids=device_ids))


def _post_forward(box, loss: torch.Tensor, scaler) -> None:
    """``box.post_forward_process(loss=loss)``; with an fp16 gradient scaler, torchdistill's default
    post-forward process with the loss scaled and the gradients unscaled before clipping and the step."""
    if scaler is None:
        box.post_forward_process(loss=loss)
        return
    from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, ReduceLROnPlateau
    box.stage_grad_count += 1
    if box.grad_accum_step > 1:
        loss = loss / box.grad_accum_step
    scaler.scale(loss).backward()
    stepped = box.stage_grad_count % box.grad_accum_step == 0
    if stepped:
        scaler.unscale_(box.optimizer)
        if box.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in box.optimizer.param_groups for p in g['params']],
                                           box.max_grad_norm)
        scaler.step(box.optimizer)
        scaler.update()
        box.optimizer.zero_grad()
    if box.lr_scheduler is not None and box.scheduling_step > 0 and stepped \
            and box.stage_grad_count % box.scheduling_step == 0:
        if isinstance(box.lr_scheduler, ReduceLROnPlateau):
            raise ConfigError('--amp fp16 with a step-wise ReduceLROnPlateau scheduler is not supported')
        if isinstance(box.lr_scheduler, CosineAnnealingWarmRestarts):
            box.lr_scheduler.step(int(box.stage_grad_count / box.scheduling_step))
        else:
            box.lr_scheduler.step()


def _gathered_rng_states() -> list:
    """Every process's RNG states (rank order), so a resumed ``torchrun`` run restores each its own."""
    from .train import _rng_state
    state = _rng_state()
    _, world = _rank_world()
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def _load_resume(path: Path, args, snapshot) -> dict:
    """The resume checkpoint at ``path``, checked: it is one, and the config is the one it was trained with."""
    from .train import ResumeError
    if not path.exists():
        raise FileNotFoundError(f'--resume: no checkpoint at {path} (it is written beside the student folder after '
                                f'every epoch)')
    ckpt = load_checkpoint(path, trusted=is_trusted(path, getattr(args, 'trust_checkpoint', None)))
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt or 'optimizer' not in ckpt or 'model' not in ckpt:
        raise ResumeError(f'--resume {path}: not an opdf-glue resume checkpoint (no epoch/optimizer/model state)')
    differences = [d for d in config_differences(ckpt.get('config'), snapshot)
                   if not d.startswith(('models.student_model.dst_ckpt', 'models.model.dst_ckpt'))] \
        if ckpt.get('config') is not None and snapshot is not None else []
    if differences:
        listed = '\n  '.join(differences)
        if not getattr(args, 'resume_changed_config', False):
            raise ResumeError(f'--resume {path}: the config differs from the one the checkpoint was trained with:\n  '
                              f'{listed}\nrestore it, or pass --resume_changed_config to continue with the new values')
        logger.warning('--resume %s with a changed config (--resume_changed_config):\n  %s', path, listed)
    return ckpt


def train(teacher_model, student_model, dataset_dict, dst_ckpt_dir, task, device, config, tokenizer,
          args: argparse.Namespace | None = None, distributed: bool = False, world_size: int = 1,
          device_ids=None, snapshot=None) -> dict:
    """Train, validate every epoch, save the best student (rank 0) and the epoch checkpoint; returns
    ``{'validation': [...], 'first_step': ..., 'best_value', 'train_seconds', 'stopped_at_epoch'?}``."""
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.interfaces.post_forward_proc import default_post_forward_process
    from torchdistill.core.training import get_training_box
    from torchdistill.misc.log import MetricLogger, SmoothedValue
    from ..hf import core_state_dict
    from ..plugin.diagnostics import LossTermGradients
    from .train import ResumeError, _plain_args, _restore_training_state, _set_rng_state, sync_buffers
    args = args if args is not None else get_parser().parse_args(['--config', '-'])
    amp = getattr(args, 'amp', None)
    train_config = config['train']
    resume_path = resume_ckpt_path(dst_ckpt_dir)
    ckpt = _load_resume(resume_path if args.resume == 'auto' else Path(os.path.expanduser(args.resume)), args,
                        snapshot) if getattr(args, 'resume', None) else None
    lr_factor = world_size if distributed and getattr(args, 'adjust_lr', False) else 1
    if teacher_model is None:
        box = get_training_box(student_model, dataset_dict, train_config, device, device_ids, distributed, lr_factor)
    else:
        box = get_distillation_box(teacher_model, student_model, dataset_dict, train_config, device, device_ids,
                                   distributed, lr_factor)
    if distributed:
        _wrap_student_ddp(box, device_ids)
    scaler = None
    if amp == 'fp16':
        if getattr(box.post_forward_process, '__func__', None) is not default_post_forward_process:
            raise ConfigError('--amp fp16 needs torchdistill\'s default post_forward_process (the gradient scaler '
                              'replaces it); this config names another one: use --amp bf16')
        scaler = torch.amp.GradScaler(device.type)
    val_config = train_config['val_data_loader']
    val_set = dataset_dict[val_config['dataset_id']]
    start_epoch, best, history, first_step = 0, None, [], None
    if ckpt is not None:
        start_epoch, best, history, first_step = ckpt['epoch'], ckpt['best_value'], ckpt.get('history', []), \
            ckpt.get('first_step')
        with core_state_dict(student_model):
            student_model.load_state_dict(ckpt['model'], strict=True)
        _restore_training_state(box, ckpt, resume_path)
        if (ckpt.get('scaler') is None) != (scaler is None):
            raise ResumeError(f'--resume {resume_path}: the checkpoint was trained with --amp '
                              f'{ckpt.get("args", {}).get("amp")}, this run asks for --amp {amp}')
        if scaler is not None:
            scaler.load_state_dict(ckpt['scaler'])
        rank, world = _rank_world()
        states = ckpt['rng']
        if len(states) != world:
            logger.warning('--resume: the checkpoint holds the RNG states of %d process(es), this run has %d: every '
                           'process takes rank 0\'s (the run continues, not bit for bit)', len(states), world)
        _set_rng_state(states[rank] if len(states) == world else states[0])
        logger.info('resumed from %s at epoch %d (best validation %s)', resume_path, start_epoch, best)
    log_freq = train_config.get('log_freq', 50)
    start = time.perf_counter()
    result: dict[str, Any] = {}
    for epoch in range(start_epoch, box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        if teacher_model is not None and not train_config.get('teacher', {}).get('requires_grad', True):
            box.teacher_model.eval()  # torchdistill 1.1.5 leaves the frozen teacher in train mode (dropout on)
        metric_logger = MetricLogger(delimiter='  ')
        metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value}'))
        losses, epoch_start = [], time.perf_counter()
        for batch in metric_logger.log_every(box.train_data_loader, log_freq, f'Epoch: [{epoch}]'):
            batch = {k: v.to(device) for k, v in batch.items()}
            # first step: each loss term's gradient norm on the aligned cores, and whether alignment starts at 0
            term_gradients = LossTermGradients(box) if teacher_model is not None and first_step is None else None
            with _autocast(device, amp):
                loss = box.forward_process(batch, targets=None, supp_dict=None)
            if term_gradients is not None:
                first_step = term_gradients.measure(student_model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'epoch {epoch}: training loss is {loss.item()}; stopping (nothing saved '
                                         f'from this epoch)')
            _post_forward(box, loss, scaler)
            losses.append(loss.item())
            metric_logger.update(loss=losses[-1], lr=box.optimizer.param_groups[0]['lr'])
        train_loss = sum(losses) / max(len(losses), 1)
        if distributed:
            sync_buffers(student_model)
            total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            train_loss = float(total[0] / max(float(total[1]), 1.0))  # the mean over every process's steps
        val = evaluate(student_model, val_set, val_config, task, device, header='Validation: ', amp=amp)
        value = sum(val.values())
        history.append({'epoch': epoch + 1, **val, 'train_loss': train_loss,
                        'seconds': time.perf_counter() - epoch_start})
        if best is None or value > best:
            logger.info('Updating ckpt at %s', dst_ckpt_dir)
            best = value
            if is_main_process():
                save_pretrained_atomic(dst_ckpt_dir, student_model, tokenizer)
        box.post_epoch_process()
        rng = _gathered_rng_states()
        if is_main_process():
            with core_state_dict(student_model):
                model_state = student_model.state_dict()  # the MPO cores: an exact resume
            atomic_torch_save({
                'model': model_state, 'optimizer': box.optimizer.state_dict(),
                'lr_scheduler': None if box.lr_scheduler is None else box.lr_scheduler.state_dict(),
                'scaler': None if scaler is None else scaler.state_dict(),
                'classes': {'optimizer': type(box.optimizer).__name__,
                            'lr_scheduler': None if box.lr_scheduler is None else type(box.lr_scheduler).__name__},
                'epoch': epoch + 1, 'best_value': best, 'history': history, 'first_step': first_step, 'rng': rng,
                'args': _plain_args(args), 'config': snapshot, 'world_size': world_size,
            }, resume_path)
        if distributed:
            dist.barrier()
        stop_after = getattr(args, 'stop_after', None)
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after and epoch + 1 < box.num_epochs:
            logger.info('stopping after %d epoch(s) as asked; continue with --resume', stop_after)
            result['stopped_at_epoch'] = epoch + 1
            break
    box.clean_modules()
    result.update({'validation': history, 'first_step': first_step, 'best_value': best,
                   'train_seconds': time.perf_counter() - start})
    return result


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
    from .train import positive_int
    parser = argparse.ArgumentParser(description='GLUE knowledge distillation with OPDF (torchdistill HF recipes)')
    parser.add_argument('--config', required=True, help='yaml file path')
    parser.add_argument('--run_log', help='log file path')
    parser.add_argument('--task_name', type=str, default=None, help='GLUE task (default: datasets.<name>.name)')
    parser.add_argument('--private_output', metavar='DIR',
                        help='write GLUE submission files (the config\'s private sets: the test splits) into DIR')
    parser.add_argument('--seed', type=int, default=None, help='a seed for reproducible training')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (under torchrun: cuda means each process its LOCAL_RANK GPU)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override an existing config value, e.g. --set train.num_epochs=1 (value parsed as YAML); '
                             '--set +dotted.key=VALUE adds a key')
    parser.add_argument('--amp', choices=['bf16', 'fp16'],
                        help='mixed precision: torch.autocast (fp16 with a gradient scaler); MPO contraction stays float32')
    parser.add_argument('--metrics_json', '--json', dest='metrics_json',
                        help='write the metrics (validation per epoch, test, first-step gradient norms, coverage) here')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                        help='continue from the epoch checkpoint (default: <dst_ckpt>.last.pt beside the student folder)')
    parser.add_argument('--resume_changed_config', action='store_true',
                        help='let --resume continue with a config that differs from the checkpoint\'s (listed in the log)')
    parser.add_argument('--stop_after', type=positive_int, metavar='N',
                        help='leave after N epochs of this invocation (time-limited jobs); continue with --resume')
    parser.add_argument('--trust_checkpoint', action='append', default=[], metavar='FILE',
                        help='load FILE (a --resume checkpoint) even though it is not plain tensor data')
    parser.add_argument('--threads', type=int, help='torch intra-op threads')
    parser.add_argument('-test_only', action='store_true', help='only test the models')
    parser.add_argument('-student_only', action='store_true', help='test the student model only')
    parser.add_argument('-adjust_lr', action='store_true', help='multiply learning rates by the number of processes')
    parser.add_argument('--force', action='store_true',
                        help='replace an existing student dst_ckpt folder, its epoch checkpoint and other outputs '
                             '(without it a fresh run onto them is refused; continue one with --resume)')
    parser.add_argument('--trust_config', action='store_true',
                        help='let the config\'s tags import and call any name (configs are code; see opdf-train)')
    parser.add_argument('--debug', action='store_true', help='on an error, print the traceback too')
    return parser


def _guard_outputs(args, plain: Mapping, dst_dir: str, config: Mapping | None = None) -> None:
    """The trainer's rules (:mod:`opdf_torchdistill.runfiles`) for the GLUE runner: the student folder,
    its epoch checkpoint, the lock, the log, ``--metrics_json`` and the submission files are neither the
    config nor any file or folder the config reads (a teacher folder reused as the student's base must
    not become the output), nor one another; an earlier run's student folder or epoch checkpoint is not
    replaced without ``--force`` (``--resume`` continues it); an existing ``--metrics_json`` or log that
    is not of its kind is not overwritten without ``--force``."""
    from ..runfiles import check_existing_kind, check_outputs, config_input_files, refuse_existing
    from .train import _check_writable
    inputs = {f'the config\'s {k}' if k != '--config' else k: v
              for k, v in config_input_files(plain, args.config, directories=True).items()}
    outputs: dict[str, Any] = {'--run_log': args.run_log, '--metrics_json': getattr(args, 'metrics_json', None)}
    resume = getattr(args, 'resume', None)
    force = getattr(args, 'force', False)
    private_output = getattr(args, 'private_output', None)
    if private_output:
        out_dir = Path(os.path.expanduser(private_output)).resolve()
        for role, path in inputs.items():
            path = Path(os.path.expanduser(str(path))).resolve()
            if path.is_dir() and (out_dir == path or path in out_dir.parents):
                raise OutputError(f'--private_output {private_output} is (inside) {role} ({path}), which this run '
                                  f'reads: choose another folder')
        source = config if config is not None else plain
        for entry in _private_entries(source, getattr(args, 'task_name', None)) if source.get('private') else []:
            outputs[f'the submission file {entry["file"]} (--private_output)'] = out_dir / entry['file']
    if not args.test_only:
        outputs['the resume checkpoint (<dst_ckpt>.last.pt)'] = resume_ckpt_path(dst_dir)
        outputs['the lock file'] = f'{dst_dir}.lock'
        for role, path in inputs.items():
            if Path(os.path.expanduser(str(path))).resolve() == Path(dst_dir).resolve():
                raise OutputError(f'the student dst_ckpt folder {dst_dir} is also {role}, which this run reads: '
                                  f'saving the student there would destroy it; choose another dst_ckpt')
        if not force and not resume:
            earlier = {}
            if Path(dst_dir).is_dir() and any(Path(dst_dir).iterdir()):
                earlier['the student dst_ckpt folder'] = dst_dir
            if resume_ckpt_path(dst_dir).exists():
                earlier['its epoch checkpoint'] = resume_ckpt_path(dst_dir)
            refuse_existing(earlier, 'it holds an earlier run\'s model, which a fresh run would replace: continue that '
                                     'run with --resume, replace it with --force, or choose another dst_ckpt')
    check_outputs(outputs, inputs)
    if not force:
        check_existing_kind(args.run_log, 'text', '--run_log')
        check_existing_kind(getattr(args, 'metrics_json', None), 'json', '--metrics_json')
        for role, path in outputs.items():
            if role.startswith('the submission file'):
                check_existing_kind(path, 'text', role)
    if getattr(args, 'metrics_json', None):
        _check_writable(args.metrics_json, '--metrics_json')


def run(args: argparse.Namespace, config: dict | None = None, snapshot: dict | None = None,
        distributed: bool = False, world_size: int = 1, device_ids=None, device=None) -> dict:
    """Train (unless ``-test_only``), test, predict the private sets (``--private_output``); returns
    ``{'validation': [...], 'teacher': ..., 'student': ..., 'metrics': {...}, 'trained_student', 'best_student'}``.
    ``config`` (already loaded) replaces reading ``args.config`` (tests pass miniature configs); outputs
    are not guarded here (:func:`command` does it)."""
    from torchdistill.common.main_util import set_seed
    from .train import _param_counts
    set_seed(getattr(args, 'seed', None))
    device = device if device is not None else check_device(args.device)
    if config is None:
        config, snapshot = load_glue_config(args.config, getattr(args, 'overrides', ()),
                                            getattr(args, 'trust_config', False))
    amp = getattr(args, 'amp', None)
    private_output = getattr(args, 'private_output', None)
    if private_output and not config.get('private'):
        logger.warning('--private_output %s: the config has no private section; no submission files', private_output)
    setup = prepare(config, args.task_name, _used_dataset_ids(config, private=bool(private_output)), world_size,
                    pad_to_multiple_of=8 if amp else None)
    task, teacher, student, tokenizer = setup.task, setup.teacher, setup.student, setup.tokenizer
    dataset_dict, teacher_config, student_config = setup.dataset_dict, setup.teacher_config, setup.student_config
    dst_ckpt_dir = os.path.expanduser(student_config['dst_ckpt'])
    result: dict[str, Any] = {}
    metrics: dict[str, Any] = {'config': args.config, 'overrides': list(getattr(args, 'overrides', []) or []),
                               'task': task, 'seed': getattr(args, 'seed', None), 'world_size': world_size,
                               'amp': amp, 'dst_ckpt': dst_ckpt_dir}
    if not args.test_only:
        if teacher is not None:
            teacher.to(device)
        student.to(device)
        trained = train(teacher, student, dataset_dict, dst_ckpt_dir, task, device, config, tokenizer, args,
                        distributed, world_size, device_ids, snapshot)
        result.update(trained)
        result['trained_student'] = student
        first_step = trained.get('first_step') or {}
        metrics.update(_param_counts(student))
        metrics.update({'validation': trained['validation'], 'best_validation': trained['best_value'],
                        'train_seconds': trained['train_seconds'], **first_step})
        if trained.get('stopped_at_epoch') is not None:  # unfinished: testing waits for the resumed run
            metrics['stopped_at_epoch'] = trained['stopped_at_epoch']
            result['metrics'] = metrics
            return result
    test_loader_config = dict(config['test']['test_data_loader'])
    test_set = dataset_dict[test_loader_config['dataset_id']]
    if not args.student_only and teacher is not None:
        result['teacher'] = metrics['teacher'] = evaluate(teacher.to(device), test_set, test_loader_config, task,
                                                          device, title=f'[Teacher: {teacher_config.get("key")}]',
                                                          amp=amp)
    if not os.path.isdir(dst_ckpt_dir):
        raise FileNotFoundError(f'student dst_ckpt {dst_ckpt_dir!r} does not exist: train first (without -test_only)')
    # Reload the best checkpoint as a plain Hugging Face model (strict: a contracted OPDF student)
    _, best_student = load_tokenizer_and_model(student_config, task, True, strict=True)
    best_student.to(device)
    result['student'] = metrics['student'] = evaluate(best_student, test_set, test_loader_config, task, device,
                                                      title=f'[Student: {student_config.get("key")}]', amp=amp)
    result['best_student'] = best_student
    if private_output and config.get('private'):
        metrics['private_outputs'] = predict_private(best_student, dataset_dict,
                                                     _private_entries(config, args.task_name), private_output,
                                                     device, amp)
    result['metrics'] = metrics
    return result


def command(args: argparse.Namespace) -> dict:
    """What ``opdf-glue`` runs: processes (``torchrun``), config, output guards (decided by rank 0), the
    run lock, logging, :func:`run`, ``--metrics_json``. Raises on errors (``main`` prints them)."""
    from .train import _rank0_decides
    if getattr(args, 'threads', None):
        torch.set_num_threads(args.threads)
    check_device(args.device)
    distributed, world_size, device_ids, device = init_distributed(args.device)
    config, snapshot = load_glue_config(args.config, args.overrides, args.trust_config)
    dst_dir = student_dst_dir(config)
    _rank0_decides(lambda: _guard_outputs(args, snapshot, dst_dir, config))  # before the log or anything is opened
    lock = RunLock(dst_dir, sys.argv) if not args.test_only and is_main_process() else None
    _rank0_decides(lambda: lock.acquire() if lock is not None else None)
    try:
        setup_logging(args.run_log)
        logging.getLogger('opdf_torchdistill').setLevel(logging.INFO if is_main_process() else logging.WARNING)
        logger.info(args)
        if distributed:
            logger.info('distributed: %d processes, backend %s', world_size, dist.get_backend())
        start = time.time()
        result = run(args, config, snapshot, distributed, world_size, device_ids, device)
        if args.metrics_json and is_main_process():
            atomic_write_json(result['metrics'], args.metrics_json)
        if result.get('stopped_at_epoch') is None:
            logger.info('done in %.1f s; student test %s', time.time() - start, result['student'])
        if distributed:
            dist.barrier()
        return result
    finally:
        if lock is not None:
            lock.release()


def measure_first_step(config: dict, device, seed: int = 0, task_name: str | None = None) -> dict:
    """``opdf-gradnorms`` for a GLUE recipe: build teacher, student (its wrapper: init, MPO) and the
    distillation box as :func:`run` does, run one training step's forward pass on the first batch and
    return :meth:`LossTermGradients.measure`'s result (the table is logged)."""
    from torchdistill.core.distillation import get_distillation_box
    from ..plugin.diagnostics import LossTermGradients
    torch.manual_seed(seed)
    if (config.get('models') or {}).get('teacher_model') is None:
        raise ValueError('the config has no models.teacher_model: gradient norms compare distillation terms')
    setup = prepare(config, task_name, _used_dataset_ids({'train': config['train']}))
    setup.teacher.to(device)
    setup.student.to(device)
    box = get_distillation_box(setup.teacher, setup.student, setup.dataset_dict, config['train'], device, None,
                               False, 1)
    box.pre_epoch_process(epoch=0)
    if not box.teacher_updatable:
        box.teacher_model.eval()
    batch = {k: v.to(device) for k, v in next(iter(box.train_data_loader)).items()}
    term_gradients = LossTermGradients(box)
    box.forward_process(batch, targets=None, supp_dict=None)
    measured = term_gradients.measure(setup.student)
    box.clean_modules()
    return measured


def main(argv=None) -> int:
    """Command-line entry point: 0 on success, 1 with one ``error:`` line (``--debug``: the traceback),
    2 for a command-line (argparse) error, 130 on Ctrl-C."""
    args = get_parser().parse_args(argv)
    return run_cli(lambda: command(args), args.debug)


if __name__ == '__main__':  # pragma: no cover
    raise SystemExit(main())
