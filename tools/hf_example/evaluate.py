"""Stand-in for Hugging Face ``evaluate``'s GLUE metric, for torchdistill's stock HF example offline.

torchdistill's ``examples/hf_transformers/general_language_understanding.py`` calls
``evaluate.load('glue', task_name)``, which downloads the metric's script from the Hub at run time. Put
this folder first on ``PYTHONPATH`` and that call returns the same metric computed by
:func:`opdf_torchdistill.cli.glue.glue_metrics` (the definitions of ``evaluate``'s ``glue``: accuracy, F1,
Matthews correlation, Pearson and Spearman), with nothing fetched::

    PYTHONPATH=/path/to/opdf-torchdistill/tools/hf_example GLUE_TASK=rte python \\
        examples/hf_transformers/general_language_understanding.py --config my_rte.yaml

With local data files the script must run without ``--task_name`` (with it, it loads the Hub's
``glue`` dataset), so it calls ``evaluate.load('glue', None)``: the task then comes from the
``GLUE_TASK`` environment variable.
"""
import os

import numpy as np

from opdf_torchdistill.cli.glue import GLUE_TASK2KEYS, glue_metrics

__all__ = ['load', 'GlueMetric']


def _values(x):
    if x is None:
        return []
    if hasattr(x, 'detach'):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(x)).tolist()


class GlueMetric:
    """``add_batch`` / ``add`` / ``compute`` as ``evaluate``'s metrics (``compute`` resets)."""

    def __init__(self, task: str):
        self.task = task
        self.predictions: list = []
        self.references: list = []

    def add_batch(self, predictions=None, references=None, **kwargs):
        self.predictions += _values(predictions)
        self.references += _values(references)

    def add(self, prediction=None, reference=None, **kwargs):
        self.add_batch([prediction], [reference])

    def compute(self, predictions=None, references=None, **kwargs):
        self.add_batch(predictions, references)
        result = glue_metrics(self.task, self.predictions, self.references)
        self.predictions, self.references = [], []
        return result


def load(path, config_name=None, **kwargs):
    if path != 'glue':
        raise ValueError(f'this stand-in for evaluate only provides the glue metric, not {path!r}')
    task = config_name or os.environ.get('GLUE_TASK')
    if task not in GLUE_TASK2KEYS:
        raise ValueError(f"evaluate.load('glue', {config_name!r}): give the task as the config name (--task_name) or "
                         f'in the GLUE_TASK environment variable, one of {sorted(GLUE_TASK2KEYS)}')
    return GlueMetric(task)
