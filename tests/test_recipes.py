"""Every YAML under configs/ in miniature: datasets swapped for FakeData of the right image size and
class count, tiny batches, one epoch per stage, no pretrained weights; built and trained a few steps
and tested through the runner on CPU. And every OPDF recipe differs from its baseline only by plugin
keys and the hyper-parameters OPDF needs."""
import logging
import re
from pathlib import Path

import pytest
import torchvision
import yaml
from torchdistill.common import main_util, yaml_util

from opdf_torchdistill.cli.common import load_config
from opdf_torchdistill.cli.train import get_parser, run
from conftest import ROOT

CONFIGS = sorted((ROOT / 'configs').rglob('*.yaml'))
# source image size (transforms then crop/resize as the recipe says) and class count per dataset
FAKE = {'ilsvrc2012': ((3, 64, 64), 1000), 'cifar10': ((3, 32, 32), 10), 'cifar100': ((3, 32, 32), 100)}
DATASET_KEYS = {'torchvision.datasets.ImageFolder', 'torchvision.datasets.CIFAR10', 'torchvision.datasets.CIFAR100'}
FAKE_SIZE = 8


class FakeImages(torchvision.datasets.FakeData):
    """FakeData with the ``targets``/``classes`` attributes real datasets have (CRD needs them)."""

    def __init__(self, size, image_size, num_classes, transform, offset):
        super().__init__(size=size, image_size=image_size, num_classes=num_classes, transform=transform,
                         random_offset=offset)
        self.classes = list(range(num_classes))
        self.targets = [int(super(FakeImages, self).__getitem__(i)[1]) for i in range(size)]


def _load_miniature(path: Path, monkeypatch) -> dict:
    image_size, num_classes = FAKE.get(path.parent.name, ((3, 32, 32), 10))
    offsets = iter(range(0, 10_000, 1000))
    real = main_util.import_call

    def fake_import_call(key, package=None, init=None, **kwargs):
        if key in DATASET_KEYS:
            transform = ((init or {}).get('kwargs') or {}).get('transform')
            return FakeImages(FAKE_SIZE, image_size, num_classes, transform, next(offsets))
        return real(key, package, init, **kwargs)
    monkeypatch.setattr(yaml_util, 'import_call', fake_import_call)
    config = load_config(str(path))
    _shrink(config)
    return config


def _shrink(node, parent_key=None):
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key == 'num_epochs':
                node[key] = 1
            elif key == 'batch_size':
                node[key] = 4
            elif key == 'num_workers':
                node[key] = 0
            elif key == 'pin_memory':
                node[key] = False
            elif key == 'weights' and parent_key == 'kwargs':
                node[key] = None  # no pretrained downloads
            elif key == 'pretrained':
                node[key] = False
            elif key == 'num_negative_samples':
                node[key] = 4
            elif key == 'output_size' and 'teacher_norm_module_path' in node:
                node[key] = FAKE_SIZE  # CRD's memory bank: one row per training image
            elif key in ('wrapper',) and value in ('DataParallel', 'DistributedDataParallel'):
                node[key] = None
            else:
                _shrink(value, key)
    elif isinstance(node, list):
        for value in node:
            _shrink(value, parent_key)


@pytest.mark.parametrize('path', CONFIGS, ids=[str(p.relative_to(ROOT / 'configs')) for p in CONFIGS])
def test_recipe_in_miniature(path, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # recipes write their own side files (e.g. FT's paraphraser) relative to cwd
    config = _load_miniature(path, monkeypatch)
    args = get_parser().parse_args(['--config', str(path), '--device', 'cpu', '--seed', '0',
                                    '--dst_ckpt', str(tmp_path / 'student.pt')])
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill'):
        metrics, student, teacher = run(args, config)
    assert 'test' in metrics and (tmp_path / 'student.pt').exists()
    if 'AuxTensorAlignmentLoss' in path.read_text():
        assert re.search(r'OPDF alignment \((\d+) pairs', caplog.text), 'the alignment term never ran'
        assert metrics['train_params'] > metrics['inference_params']


BASELINE_PAIRS = [(p, p.with_name(p.name[len('opdf-'):])) for p in CONFIGS if p.name.startswith('opdf-')]


class _PlainLoader(yaml.SafeLoader):
    """Reads a torchdistill YAML as data: every ``!tag`` becomes ``{'!tag': value}``, nothing runs."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {'!' + suffix: value}


_PlainLoader.add_multi_constructor('!', _tagged)


def _differences(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), path + (key,))
        return out
    return [] if a == b else [(path, a, b)]


def _allowed(path, base, opdf) -> bool:
    """The plugin keys and the hyper-parameters an OPDF recipe may change (see README, Recipes)."""
    path = tuple(p for p in path if not (isinstance(p, str) and p.startswith('!')))  # through !join etc.
    if path == ('dependencies',):
        return opdf == ['opdf_torchdistill']
    if path[:2] == ('models', 'student_model') and path[-1] in ('key', 'base', 'mpo', 'dst_ckpt'):
        return True
    if 'forward_hook' in path:
        base_out = (base or {}).get('output', []) if path[-1] == 'forward_hook' else (base or [])
        opdf_out = (opdf or {}).get('output', []) if path[-1] == 'forward_hook' else (opdf or [])
        return opdf_out[:len(base_out)] == base_out and all(str(o).endswith('opdf') for o in opdf_out[len(base_out):])
    if 'auxiliary_model_wrapper' in path:
        i = path.index('auxiliary_model_wrapper')
        return path[i + 1:] in [(), ('key',), ('kwargs', 'wrap')] and (
            path[i + 1:] != ('key',) or opdf == 'opdf_probe') and (path[i + 1:] != () or opdf == {'key': 'opdf_probe'})
    if path[-3:] == ('optimizer', 'kwargs', 'lr'):
        return True
    if path[-2:] == ('sub_terms', 'opdf'):
        return base is None and opdf['criterion']['key'] == 'AuxTensorAlignmentLoss'
    return False


@pytest.mark.parametrize('opdf,baseline', BASELINE_PAIRS, ids=[p.name for p, _ in BASELINE_PAIRS])
def test_opdf_recipe_differs_from_its_baseline_only_by_plugin_keys(opdf, baseline):
    base = yaml.load(baseline.read_text(), Loader=_PlainLoader)
    new = yaml.load(opdf.read_text(), Loader=_PlainLoader)
    diffs = _differences(base, new)
    # the wrapped baseline wrapper's key moves into opdf_probe's `wrap:`: check the pairing explicitly
    for path, a, b in diffs:
        if path[-2:] == ('kwargs', 'wrap'):
            key_path = path[:-2] + ('key',)
            base_key = [x for p, x, _ in diffs if p == key_path]
            assert base_key and base_key[0] == b, f'{opdf.name}: wrap {b!r} is not the baseline wrapper {base_key}'
    bad = [(' / '.join(map(str, p)), a, b) for p, a, b in diffs if not _allowed(p, a, b)]
    assert not bad, f'{opdf.name} changes more than plugin keys and hyper-parameters: {bad}'
    assert any(p[-2:] == ('sub_terms', 'opdf') for p, _, _ in diffs), 'no alignment term'
