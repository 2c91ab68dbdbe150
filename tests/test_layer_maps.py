"""Initialisation and alignment layer maps are separate keys (issue 21, step 1).

With the paper's setting (BERT-of-Theseus: init from teacher layers 0..S-1, align layer i with 2i + 1)
the alignment term acts from the first step; with init == align every aligned core pair starts equal,
which ``LossTermGradients`` reports as a WARNING and as ``alignment_starts_at_zero`` in the first-step
metrics. Tiny random BERTs (4 teacher / 2 student layers) and the Fashion-MNIST ViT recipes (a random
teacher checkpoint, tiny written idx files)."""
import logging

import pytest
import torch
from torch import nn

from conftest import ROOT
from opdf_torchdistill.errors import MatchError
from opdf_torchdistill.matching import LayerInfo, describe_pairing, index_match, resolve_match
from opdf_torchdistill.plugin.diagnostics import ZERO_DISTANCE_RTOL, LossTermGradients
from opdf_torchdistill.plugin.losses import AuxTensorAlignmentLoss
from opdf_torchdistill.plugin.probe import attach_probe

WARNING_TEXT = 'alignment acts only as a pull-back to the initial weights'


# ------------------------------------------------------------------------------------------------
# The alignment map's forms (names only)
# ------------------------------------------------------------------------------------------------
def _stack(prefix, depth, suffixes=('attn.query', 'mlp.fc1')):
    return [LayerInfo(f'{prefix}{i}.{s}', 'Linear', (8, 8)) for i in range(depth) for s in suffixes] + \
        [LayerInfo('head', 'Linear', (10, 8))]


def test_index_maps_pair_each_stack_by_layer_index():
    student, teacher = _stack('blocks.', 3), _stack('blocks.', 6)
    uniform = index_match('uniform', student, teacher)
    assert uniform['blocks.0.attn.query'] == 'blocks.1.attn.query' and uniform['blocks.2.mlp.fc1'] == 'blocks.5.mlp.fc1'
    assert uniform['head'] == 'head'  # unnumbered layers pair by name
    assert uniform == resolve_match(None, student, teacher)  # 'uniform' is the automatic pairing for stacks
    assert index_match('first', student, teacher)['blocks.2.attn.query'] == 'blocks.2.attn.query'
    assert index_match([4, 0, 2], student, teacher)['blocks.0.mlp.fc1'] == 'blocks.4.mlp.fc1'
    assert index_match({0: 5, 1: 3, 2: 1}, student, teacher)['blocks.2.mlp.fc1'] == 'blocks.1.mlp.fc1'
    assert describe_pairing(uniform) == 'blocks.#: 0<-1, 1<-3, 2<-5; 1 unnumbered layer(s) with the same name'
    # name maps still work through the same entry point
    assert resolve_match({'blocks.0.attn.query': 'blocks.4.attn.query'}, student, teacher) == \
        {'blocks.0.attn.query': 'blocks.4.attn.query'}


@pytest.mark.parametrize('layer_map,match', [
    ('every', "unknown layer map 'every'; valid: 'uniform'"),
    ([1, 3], 'lists 2 teacher layers for 3 student layers'),
    ([1, 3, 6], r'teacher layers \[6\] do not exist'),
    ({0: 1, 1: 3}, r'missing \[2\]'),
])
def test_invalid_alignment_maps_name_the_key_and_the_choices(layer_map, match):
    with pytest.raises(MatchError, match=match) as info:
        resolve_match(layer_map, _stack('blocks.', 3), _stack('blocks.', 6), key='alignment layer_map')
    assert 'alignment layer_map' in str(info.value)


def test_invalid_map_forms_are_rejected_when_the_loss_is_built():
    for bad, match in [('odd', "AuxTensorAlignmentLoss layer_map: unknown layer map 'odd'; valid: 'uniform'"),
                       ([1, 'a'], 'AuxTensorAlignmentLoss layer_map: a list must be teacher layer indices'),
                       ({0: 'blocks.1'}, r'AuxTensorAlignmentLoss layer_map: a mapping must be \{student index'),
                       (3, 'AuxTensorAlignmentLoss layer_map must be')]:
        with pytest.raises(ValueError, match=match):
            AuxTensorAlignmentLoss(layer_map=bad)
    from opdf_torchdistill.options import MPOConfig, OptionError
    with pytest.raises(OptionError, match="mpo.layer_map: unknown layer map 'nope'"):
        MPOConfig.from_options(align_to=nn.Linear(4, 4), layer_map='nope')
    with pytest.raises(MatchError, match="the student has layers other.0..0 but the teacher has no other.# layers"):
        index_match('first', [LayerInfo('other.0.fc', 'Linear', (8, 8))], _stack('blocks.', 6), key='layer_map')


# ------------------------------------------------------------------------------------------------
# Tiny random BERTs: paper setting vs init == align
# ------------------------------------------------------------------------------------------------
transformers = pytest.importorskip('transformers')


def _bert(layers, seed):
    from transformers import AutoModelForSequenceClassification, BertConfig
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return AutoModelForSequenceClassification.from_config(cfg)


class _Criterion:
    def __init__(self, terms):
        self.term_dict = terms


class _Box:
    """What ``LossTermGradients`` reads from a torchdistill box: the criterion's weighted terms."""

    def __init__(self, terms):
        self.criterion = _Criterion(terms)
        self.optimizer = None


class _KD(nn.Module):
    def forward(self, student_logits, teacher_logits):
        return nn.functional.kl_div(student_logits.log_softmax(-1), teacher_logits.softmax(-1), reduction='batchmean')


def _first_step(init_map, align_map, caplog):
    """Init a 2-layer student from a 4-layer teacher with ``init_map``, over-parameterize it, run one
    KD + alignment step and return ``LossTermGradients.measure``'s result."""
    if caplog is None:
        return _step(init_map, align_map)
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill'):
        return _step(init_map, align_map)


def _step(init_map, align_map):
    from opdf_torchdistill.hf import opdf_hf_student
    from opdf_torchdistill.init_from_teacher import init_from_teacher_layers
    teacher, student = _bert(4, 1), _bert(2, 2)
    init_from_teacher_layers(student, teacher, init_map, classifier=True)
    opdf_hf_student(student_model=student, mpo={'selection': 'bert', 'num_dummy': 1})
    attach_probe(teacher)
    teacher.eval()
    student.eval()  # no dropout: a deterministic step
    kd, align = _KD(), AuxTensorAlignmentLoss(layer_map=align_map)
    probe = LossTermGradients(_Box({'kd': (kd, 1.0), 'opdf': (align, 1.0)}))
    x = torch.randint(5, 40, (3, 9))
    with torch.no_grad():
        t_logits = teacher(input_ids=x).logits
    s_logits = student(input_ids=x).logits
    loss = kd(s_logits, t_logits) + align({'opdf': {'output': student.opdf.entries}},
                                          {'opdf': {'output': teacher.opdf.entries}})
    result = probe.measure(student)
    loss.backward()
    return result


def test_paper_setting_alignment_acts_from_the_first_step(caplog):
    result = _first_step('first', 'uniform', caplog)  # Theseus: init 0, 1; align 1, 3
    assert result['grad_norms']['opdf'] > 0 and result['grad_norms']['kd'] > 0
    alignment = result['alignment']
    assert alignment['alignment_starts_at_zero'] is False
    assert alignment['initial_relative_distance'] > 0.1 and alignment['initial_max_relative_distance'] > 0.1
    assert alignment['distance_weights'] == 12 and alignment['distance_cores'] == 24  # 2 auxiliary cores each
    assert alignment['layer_map'] == ["layer_map 'uniform'"]
    assert WARNING_TEXT not in caplog.text
    assert "layer_map 'uniform' -> bert.encoder.layer.#: 0<-1, 1<-3" in caplog.text


@pytest.mark.parametrize('init_map,align_map', [('uniform', None), ('uniform', 'uniform'), ('first', 'first'),
                                                ([2, 0], [2, 0])])
def test_init_equal_to_align_warns_and_flags_the_metrics(init_map, align_map, caplog):
    result = _first_step(init_map, align_map, caplog)
    alignment = result['alignment']
    assert alignment['alignment_starts_at_zero'] is True
    assert alignment['initial_max_relative_distance'] <= ZERO_DISTANCE_RTOL
    assert result['grad_norms']['opdf'] == 0.0 and result['grad_norms']['kd'] > 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and WARNING_TEXT in r.getMessage()]
    assert len(warnings) == 1  # once
    assert "init 'first' and align 'uniform'" in warnings[0].getMessage()
    if align_map is None:  # the default is said to be automatic, not derived from the init map
        assert alignment['layer_map'][0].startswith('automatic')


def test_init_map_errors_name_the_key():
    from opdf_torchdistill.init_from_teacher import init_from_teacher_layers
    with pytest.raises(ValueError, match=r"init_from_teacher.layer_map: unknown layer_map 'odd'; valid: 'uniform'"):
        init_from_teacher_layers(_bert(2, 2), _bert(4, 1), 'odd')
    with pytest.raises(ValueError, match='alignment layer_map'):
        _first_step('first', [0, 9], None)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST ViT: the Theseus recipes vs the committed 'odd' ones (random teacher, tiny data)
# ------------------------------------------------------------------------------------------------
FASHION = ROOT / 'configs' / 'fashion'
THESEUS_ARMS = ('ce', 'kd', 'kd_split', 'kd_mpo', 'kd_opdf', 'kd_opdf_random')


def _plain_yaml(path):
    """The YAML as data, tags kept as ``{'!tag': value}`` (nothing imported or called)."""
    from opdf_torchdistill.cli.common import config_snapshot
    return config_snapshot(str(path))


def test_theseus_recipes_mirror_the_vit_pair():
    assert sorted(p.stem for p in (FASHION / 'vit_theseus').glob('*.yaml')) == sorted(THESEUS_ARMS)
    for arm in THESEUS_ARMS:
        config = _plain_yaml(FASHION / 'vit_theseus' / f'{arm}.yaml')
        models = config['models']
        student = models['model' if arm == 'ce' else 'student_model']
        assert student['kwargs']['layer_map'] == 'first'
        assert student['kwargs'].get('base', student['key']) == 'fashion_vit_from_teacher'
        assert student['dst_ckpt'] == f'./runs/fashion/vit_theseus_{arm}.pt'
        terms = config['train']['criterion']['kwargs']['sub_terms']
        if arm == 'ce':
            assert set(terms) == {'ce'} and 'teacher_model' not in models
            continue
        original = _plain_yaml(FASHION / 'vit' / f'{arm if arm != "kd_split" else "kd"}.yaml')
        teacher, original_teacher = dict(models['teacher_model']), dict(original['models']['teacher_model'])
        # the same teacher model, read from the committed checkpoint of the confirmatory study
        assert teacher.pop('src_ckpt') == student['kwargs']['teacher_ckpt'] == \
            './docs/results/teachers/fashion_vit_teacher.pt'
        original_teacher.pop('src_ckpt')
        assert teacher == original_teacher and config['datasets'] == original['datasets']
        optimizer = config['train']['optimizer']
        if arm == 'kd_split':  # the optimizer control: the MPO arm's per-group rates on the dense student
            mpo_optimizer = _plain_yaml(FASHION / 'vit_theseus' / 'kd_mpo.yaml')['train']['optimizer']
            assert optimizer['kwargs'].pop('as_if_mpo') == {'num_dummy': 1} and optimizer.pop('filters_params') is False
            assert optimizer == mpo_optimizer
        else:
            assert optimizer == original['train']['optimizer']
        assert ('opdf' in terms) == arm.startswith('kd_opdf')
        if 'opdf' in terms:
            kwargs = dict(terms['opdf']['criterion']['kwargs'])
            assert kwargs.pop('layer_map') == 'uniform'
            assert kwargs == original['train']['criterion']['kwargs']['sub_terms']['opdf']['criterion']['kwargs']
        assert original['models'].get('student_model', {}).get('kwargs', {}).get('layer_map') == 'odd'


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    from opdf_torchdistill import data
    from opdf_torchdistill.data import FashionMNIST
    from opdf_torchdistill.zoo import fashion_vit
    from test_fashion import write_fashion
    write_fashion(tmp_path / 'data', n_train=200, n_test=20, gz=False)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / 'data'))
    original = FashionMNIST.__init__

    def smaller(self, split='train', **kwargs):
        original(self, split, **{**kwargs, 'val_size': 50, 'train_size': 100 if kwargs.get('train_size') else None})
    monkeypatch.setattr(FashionMNIST, '__init__', smaller)
    torch.manual_seed(0)
    torch.save({'model': fashion_vit(depth=6).state_dict()}, tmp_path / 'teacher.pt')  # a random teacher
    return tmp_path


def _vit_first_step(config_path, tmp_path, caplog):
    from opdf_torchdistill.cli import gradnorms
    from opdf_torchdistill.cli.common import load_config
    ckpt = tmp_path / 'teacher.pt'
    config = load_config(str(config_path), [f'models.teacher_model.src_ckpt={ckpt}',
                                            f'models.student_model.kwargs.teacher_ckpt={ckpt}',
                                            'train.train_data_loader.kwargs.batch_size=16'])
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill'):
        return gradnorms.measure(config, torch.device('cpu'), seed=0)


def test_theseus_vit_alignment_acts_from_the_first_step(tiny_fashion, caplog):
    result = _vit_first_step(FASHION / 'vit_theseus' / 'kd_opdf.yaml', tiny_fashion, caplog)
    assert result['grad_norms']['opdf'] > 0
    assert result['alignment']['alignment_starts_at_zero'] is False
    assert result['alignment']['aligned_weights'] == 20
    assert WARNING_TEXT not in caplog.text
    assert "initialisation layer_map 'first': student block i <- teacher block [0, 1, 2]" in caplog.text
    assert "layer_map 'uniform' -> blocks.#: 0<-1, 1<-3, 2<-5" in caplog.text


def test_committed_vit_recipe_starts_at_zero_and_says_so(tiny_fashion, caplog):
    result = _vit_first_step(FASHION / 'vit' / 'kd_opdf.yaml', tiny_fashion, caplog)
    assert result['grad_norms']['opdf'] == 0.0 and result['grad_norms']['kd'] > 0
    assert result['alignment']['alignment_starts_at_zero'] is True
    assert sum(WARNING_TEXT in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


def test_theseus_vit_trains_through_the_runner_and_records_the_flag(tiny_fashion):
    """One epoch of the Theseus kd_opdf recipe through opdf-train: the first-step record carries
    the flag and the initial distance (what --metrics_json writes); the ce arm runs without a teacher."""
    from opdf_torchdistill.cli.train import get_parser, run
    ckpt = tiny_fashion / 'teacher.pt'
    common = ['--device', 'cpu', '--seed', '0', '-student_only', '--set', 'train.num_epochs=1',
              '--set', 'train.train_data_loader.kwargs.batch_size=50']
    metrics, student, _ = run(get_parser().parse_args(
        ['--config', str(FASHION / 'vit_theseus' / 'kd_opdf.yaml'), '--dst_ckpt', str(tiny_fashion / 's.pt'),
         '--set', f'models.teacher_model.src_ckpt={ckpt}', '--set', f'models.student_model.kwargs.teacher_ckpt={ckpt}']
        + common))
    assert metrics['alignment']['alignment_starts_at_zero'] is False
    assert metrics['alignment']['initial_relative_distance'] > 0.1 and metrics['grad_norms']['opdf'] > 0
    metrics, _, _ = run(get_parser().parse_args(
        ['--config', str(FASHION / 'vit_theseus' / 'ce.yaml'), '--dst_ckpt', str(tiny_fashion / 'ce.pt'),
         '--set', f'models.model.kwargs.teacher_ckpt={ckpt}'] + common))
    assert metrics['test']['samples'] == 20
