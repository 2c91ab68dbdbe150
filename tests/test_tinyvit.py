"""The paper's TinyViT setting: the ``timm_model`` key (no downloads, local weights), the 'tinyvit'
selection on timm's TinyViT-5M, and the ImageNet recipe pair in miniature on a generated ImageFolder
(small TinyViTs, 64x64 images), through the training runner."""
import logging
import re

import pytest
import torch
import yaml

timm = pytest.importorskip('timm')

from torchdistill.common import yaml_util  # noqa: E402

from conftest import ROOT  # noqa: E402
from opdf_torchdistill import plan  # noqa: E402
from opdf_torchdistill.cli.train import get_parser, run  # noqa: E402
from opdf_torchdistill.timm_models import timm_model  # noqa: E402

BASELINE = ROOT / 'configs' / 'ilsvrc2012' / 'kd-tiny_vit_5m_from_tiny_vit_21m.yaml'
OPDF = ROOT / 'configs' / 'ilsvrc2012' / 'opdf-kd-tiny_vit_5m_from_tiny_vit_21m.yaml'
# small TinyViTs of the same family: 1 block per stage, the student narrower than the teacher (as 5M vs 21M)
SMALL = {'student': dict(embed_dims=[16, 32, 40, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
         'teacher': dict(embed_dims=[24, 48, 80, 96], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 4])}
NUM_CLASSES = 4


def test_tinyvit_selection_is_qkv_proj_and_ffn_of_the_transformer_stages():
    with torch.device('meta'):
        student = timm_model('tiny_vit_5m_224', num_classes=1000)
        teacher = timm_model('tiny_vit_21m_224', num_classes=1000)
    report = plan(student, selection='tinyvit', num_dummy=1)
    names = [row.name for row in report.layers]
    assert len(names) == 10 * 4  # depths 2, 6, 2 of the transformer stages 1-3, four matrices per block
    assert {re.sub(r'^stages\.[123]\.blocks\.\d+\.', '', n) for n in names} == {'attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'}
    skipped = {s.name for s in report.skipped}
    assert 'head.fc' in skipped and 'stages.0.blocks.0.conv1.conv' in skipped
    aligned = plan(student, selection='tinyvit', num_dummy=1, align_to=teacher)
    assert all(row.partner == row.name for row in aligned.layers)  # every selected matrix has its 21M partner
    assert 1.1 < aligned.ratio < report.ratio


def test_timm_model_never_downloads_and_loads_local_weights_strictly(tmp_path):
    model = timm_model('tiny_vit_5m_224', num_classes=NUM_CLASSES, **SMALL['student'])
    torch.save({'model': model.state_dict()}, tmp_path / 'w.pt')
    again = timm_model('tiny_vit_5m_224', num_classes=NUM_CLASSES, weights=str(tmp_path / 'w.pt'), **SMALL['student'])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    timm_model('tiny_vit_5m_224', num_classes=NUM_CLASSES, weights=str(tmp_path / 'w.safetensors'), **SMALL['student'])
    with pytest.raises(FileNotFoundError, match='missing.safetensors'):
        timm_model('tiny_vit_5m_224', weights=str(tmp_path / 'missing.safetensors'))
    with pytest.raises(RuntimeError, match='does not fit'):
        timm_model('tiny_vit_5m_224', num_classes=10, weights=str(tmp_path / 'w.pt'), **SMALL['student'])
    with pytest.raises(ValueError, match='no Hub downloads'):
        timm_model('tiny_vit_5m_224', pretrained=True)
    with pytest.raises(ValueError, match='unknown timm model'):
        timm_model('tiny_vit_6m_224')


def test_tinyvit_opdf_recipe_differs_from_its_baseline_only_by_plugin_keys():
    from test_recipes import _PlainLoader, _allowed, _differences
    base = yaml.load(BASELINE.read_text(), Loader=_PlainLoader)
    new = yaml.load(OPDF.read_text(), Loader=_PlainLoader)
    diffs = _differences(base, new)
    bad = [(' / '.join(map(str, p)), a, b) for p, a, b in diffs if not _allowed(p, a, b)]
    assert not bad, bad
    assert any(p[-2:] == ('sub_terms', 'opdf') for p, _, _ in diffs)


def _image_folder(root):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split, n in (('train', 2), ('val', 1)):
        for c in range(NUM_CLASSES):
            folder = root / 'ilsvrc2012' / split / f'n{c:08d}'
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f'{i}.png')


def _miniature(path, tmp_path):
    text = path.read_text()
    for old, new in (("'~/datasets/'", repr(str(tmp_path) + '/')), ('size: &input_size [224, 224]', 'size: &input_size [64, 64]'),
                     ('size: 256', 'size: 72')):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    small = tmp_path / path.name
    small.write_text(text)
    config = yaml_util.load_yaml_file(str(small))
    models = config['models']
    for role, name in (('teacher', 'teacher_model'), ('student', 'student_model')):
        kwargs = models[name]['kwargs']
        kwargs.update(SMALL[role], num_classes=NUM_CLASSES)
        kwargs.pop('weights', None)  # random teacher: no weights file in a test
    align = models['student_model']['kwargs'].get('mpo', {}).get('align_to')
    if align is not None:
        assert align is models['teacher_model']  # the YAML alias: planning sees the small teacher too
    train = config['train']
    train['num_epochs'] = 1
    for loader in ('train_data_loader', 'val_data_loader'):
        train[loader]['kwargs'].update(batch_size=4, num_workers=0, pin_memory=False)
    config['test']['test_data_loader']['kwargs'].update(batch_size=4, num_workers=0, pin_memory=False)
    train['teacher']['wrapper'] = train['student']['wrapper'] = None
    train['scheduler']['kwargs']['T_max'] = 1
    return config


@pytest.mark.parametrize('path', [BASELINE, OPDF], ids=['kd', 'opdf-kd'])
def test_tinyvit_recipe_in_miniature_on_an_image_folder(path, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path)
    config = _miniature(path, tmp_path)
    args = get_parser().parse_args(['--config', str(path), '--device', 'cpu', '--seed', '0',
                                    '--dst_ckpt', str(tmp_path / 'student.pt')])
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill'):
        metrics, student, teacher = run(args, config)
    assert 'test' in metrics and (tmp_path / 'student.pt').exists()
    if path is OPDF:
        coverage = re.findall(r'OPDF alignment coverage: (\d+)/(\d+) MPO weights', caplog.text)
        assert coverage, 'the alignment term never ran'
        aligned, total = map(int, coverage[-1])
        assert aligned == total == 3 * 4, coverage  # 3 transformer blocks x (qkv, proj, fc1, fc2)
        assert metrics['train_params'] > metrics['inference_params']
