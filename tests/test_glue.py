"""The paper's BERT setting: named selection, factor shapes, init from teacher layers, the
``opdf_hf_student`` wrapper, the GLUE runner, and every recipe under configs/glue/ in miniature
(tiny random-init BERTs saved as local Hugging Face checkpoints, generated GLUE-format CSV files)."""
import copy
import logging
import random
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip('transformers')
pytest.importorskip('datasets')

from torchdistill.common import yaml_util  # noqa: E402
from transformers import (AutoModelForSequenceClassification, BertConfig, BertModel,  # noqa: E402
                          BertTokenizerFast)

from conftest import ROOT  # noqa: E402
from opdf_torchdistill import is_overparameterized, mpo_modules, plan  # noqa: E402
from opdf_torchdistill.cli import glue  # noqa: E402
from opdf_torchdistill.hf import install_dense_state_dict, opdf_hf_student  # noqa: E402
from opdf_torchdistill.init_from_teacher import init_from_teacher_layers, resolve_layer_map  # noqa: E402
from opdf_torchdistill.options import OptionError  # noqa: E402
from opdf_torchdistill.selections import NAMED_SELECTIONS  # noqa: E402

GLUE = ROOT / 'configs' / 'glue'
RECIPES = sorted(p for p in GLUE.rglob('*.yaml') if p.name != 'study.yaml')  # study.yaml: tests/test_scale.py
TASKS = ['rte', 'mrpc', 'stsb', 'cola', 'sst2', 'qnli', 'qqp', 'mnli']
WORDS = [f'w{i}' for i in range(40)]
SELECTED_PER_LAYER = 6  # Q, K, V, attention output, FFN in, FFN out


def _bert(hidden, layers, intermediate, num_labels=None, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 16, intermediate_size=intermediate, max_position_embeddings=64,
                     num_labels=num_labels or 2)
    return BertModel(cfg) if num_labels is None else AutoModelForSequenceClassification.from_config(cfg)


def _meta_bert(hidden, layers, intermediate):
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                     intermediate_size=intermediate)
    with torch.device('meta'):
        return AutoModelForSequenceClassification.from_config(cfg)


# ------------------------------------------------------------------------------------------------
# Selection, factor shapes, init from teacher, the wrapper
# ------------------------------------------------------------------------------------------------
def test_bert_selection_is_the_papers_matrices_with_the_papers_factor_shapes():
    report = plan(_meta_bert(768, 12, 3072), selection='bert', num_dummy=1)
    names = [row.name for row in report.layers]
    assert len(names) == 12 * SELECTED_PER_LAYER
    suffixes = {re.sub(r'^bert\.encoder\.layer\.\d+\.', '', n) for n in names}
    assert suffixes == {'attention.self.query', 'attention.self.key', 'attention.self.value', 'attention.output.dense',
                        'intermediate.dense', 'output.dense'}
    skipped = {s.name for s in report.skipped}
    assert {'bert.pooler.dense', 'classifier'} <= skipped
    shapes = {row.plan.describe() for row in report.layers}
    assert shapes == {'32x1x24 | 32x1x24', '64x1x48 | 32x1x24', '32x1x24 | 64x1x48'}, shapes
    by_name = {row.name: row for row in report.layers}
    assert by_name['bert.encoder.layer.0.attention.self.query'].plan.num_params / 768 ** 2 == pytest.approx(2.125)
    l3 = plan(_meta_bert(768, 1, 3072), selection='bert', num_dummy=3)
    assert {round(r.params_after / r.params_before, 4) for r in l3.layers} == {3.25}
    # explicit keys refine a selection; a selection applied to a model without BERT layers fails loudly
    assert len(plan(_meta_bert(768, 2, 3072), selection='bert', exclude=[r'layer\.1\.']).layers) == SELECTED_PER_LAYER
    with pytest.raises(OptionError, match='matches no supported weight'):
        plan(torch.nn.Sequential(torch.nn.Linear(8, 8)), selection='bert')
    with pytest.raises(OptionError, match='selection must be one of'):
        plan(_meta_bert(768, 1, 3072), selection='bret')
    assert set(NAMED_SELECTIONS) >= {'bert', 'tinyvit'}


def test_layer_map_forms_and_errors():
    assert resolve_layer_map('uniform', 6, 12) == [1, 3, 5, 7, 9, 11]
    assert resolve_layer_map('first', 2, 4) == [0, 1]
    assert resolve_layer_map([3, 0], 2, 4) == [3, 0]
    assert resolve_layer_map({1: 2, '0': 3}, 2, 4) == [3, 2]
    for bad, match in [('every', 'unknown layer_map'), ([1], 'lists 1 teacher layers'), ([1, 4], 'teacher has layers 0..3'),
                       ({0: 1}, r'missing \[1\]'), (3, 'layer_map must be')]:
        with pytest.raises(ValueError, match=match):
            resolve_layer_map(bad, 2, 4)
    with pytest.raises(ValueError, match='at least as deep'):
        resolve_layer_map('uniform', 4, 2)


def test_init_from_teacher_copies_mapped_layers_embeddings_pooler_and_head():
    teacher, student = _bert(48, 4, 96, num_labels=2, seed=1), _bert(48, 2, 96, num_labels=2, seed=2)
    pairs = init_from_teacher_layers(student, teacher, 'uniform', classifier=True)
    assert pairs[1:3] == [('bert.encoder.layer.0', 'bert.encoder.layer.1'), ('bert.encoder.layer.1', 'bert.encoder.layer.3')]
    s, t = student.state_dict(), teacher.state_dict()
    for key in s:
        src = key.replace('encoder.layer.0.', 'encoder.layer.1.').replace('encoder.layer.1.', 'encoder.layer.3.') \
            if key.startswith('bert.encoder.layer.1.') else key.replace('encoder.layer.0.', 'encoder.layer.1.')
        assert torch.equal(s[key], t[src]), key
    other = _bert(48, 2, 96, num_labels=2, seed=3)
    init_from_teacher_layers(other, teacher, [0, 0], embeddings=False, pooler=False)
    assert not torch.equal(other.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(other.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[0].output.dense.weight)
    with pytest.raises(ValueError, match='shapes differ'):
        init_from_teacher_layers(_bert(64, 2, 96, num_labels=2), teacher)
    with pytest.raises(ValueError, match='not a BERT-style encoder'):
        init_from_teacher_layers(torch.nn.Linear(2, 2), teacher)
    opdf_hf_student(student_model=other, mpo={'selection': 'bert'})
    with pytest.raises(ValueError, match='already over-parameterized'):
        init_from_teacher_layers(other, teacher)


def test_wrapper_dense_state_dict_and_plain_reload(tmp_path):
    student = _bert(48, 2, 96, num_labels=3)
    x = torch.randint(0, len(WORDS) + 5, (2, 7))
    student.eval()
    before = student(input_ids=x).logits
    same = opdf_hf_student(student_model=student, mpo={'selection': 'bert', 'num_dummy': 1})
    assert same is student and len(list(mpo_modules(student))) == 2 * SELECTED_PER_LAYER
    assert hasattr(student, 'opdf') and install_dense_state_dict(student) is student  # idempotent
    state = student.state_dict()
    assert not [k for k in state if 'parametrizations' in k]
    assert list(state) and set(state) == set(_bert(48, 2, 96, num_labels=3).state_dict())
    student.save_pretrained(tmp_path)
    plain, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
    plain.eval()
    assert torch.allclose(plain(input_ids=x).logits, before, atol=1e-5)
    with pytest.raises(OptionError, match='student wrapper'):
        opdf_hf_student(teacher_model=plain)
    with pytest.raises(OptionError, match="init_from_teacher: unknown keys"):
        opdf_hf_student(student_model=plain, init_from_teacher={'model': str(tmp_path), 'layers': [0]})


@pytest.mark.parametrize('task,expected', [
    ('cola', {'matthews_correlation': 0.0}), ('mrpc', {'accuracy': 0.5, 'f1': 0.5}), ('rte', {'accuracy': 0.5})])
def test_glue_metrics(task, expected):
    assert glue.glue_metrics(task, [1, 0, 1, 0], [1, 1, 0, 0]) == pytest.approx(expected)
    stsb = glue.glue_metrics('stsb', [0.1, 0.2, 0.2, 0.9], [1.0, 2.0, 3.0, 4.0])
    assert stsb['spearmanr'] == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr (ties averaged)
    assert stsb['pearson'] == pytest.approx(0.8381163549234939)  # scipy.stats.pearsonr
    # sklearn's matthews_corrcoef / f1_score on the same labels: 0.25 and 0.75
    assert glue.glue_metrics('cola', [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]) == pytest.approx({'matthews_correlation': 0.25})
    assert glue.glue_metrics('qqp', [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1])['f1'] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------
# Recipes in miniature
# ------------------------------------------------------------------------------------------------
def _plain_yaml(path):
    """The YAML as data, tags kept as ``{'!tag': value}`` (nothing imported or called)."""
    from opdf_torchdistill.cli.common import config_snapshot
    return config_snapshot(str(path))


def _diffs(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diffs(a.get(k), b.get(k), path + (k,))]
    return [] if a == b else [(path, a, b)]


def _allowed(path, base, new) -> bool:
    path = tuple(p for p in path if not (isinstance(p, str) and p.startswith('!')))
    if path == ('dependencies',):
        return new == base + [{'name': 'opdf_torchdistill.hf'}]
    if path[:2] == ('models', 'student_model') and path[-1] == 'dst_ckpt':
        return True
    if path[-1] == 'output' and 'forward_hook' in path:
        return new == base + ['opdf']
    if path == ('train', 'teacher', 'auxiliary_model_wrapper'):
        return base is None and new == {'key': 'opdf_probe'}
    if path[:3] == ('train', 'student', 'auxiliary_model_wrapper'):
        return path[3:] in [(), ('kwargs',), ('kwargs', 'mpo')] and base is None and (
            path[3:] != () or new['key'] == 'opdf_hf_student')
    if path[-3:] == ('optimizer', 'kwargs', 'lr'):
        return new < base
    if path[-2:] == ('sub_terms', 'opdf'):
        return base is None and new['criterion']['key'] == 'AuxTensorAlignmentLoss'
    return False


PAIRS = [(p, p.with_name(p.name[len('opdf-'):])) for p in RECIPES if p.name.startswith('opdf-')]


def test_glue_recipes_cover_the_papers_tasks():
    assert len(RECIPES) == 4 * len(TASKS) and len(PAIRS) == 2 * len(TASKS)
    for task in TASKS:
        assert sorted(p.name for p in (GLUE / task).glob('*.yaml')) == sorted(
            f'{o}kd-{n}.yaml' for o in ('', 'opdf-') for n in ('bert6_from_bert_base_uncased',
                                                               'bert_base_uncased_from_bert_large_uncased'))


@pytest.mark.parametrize('opdf,baseline', PAIRS, ids=[str(p.relative_to(GLUE)) for p, _ in PAIRS])
def test_opdf_recipe_differs_from_its_baseline_only_by_plugin_keys(opdf, baseline):
    base, new = _plain_yaml(baseline), _plain_yaml(opdf)
    diffs = _diffs(base, new)
    bad = [(' / '.join(map(str, p)), a, b) for p, a, b in diffs if not _allowed(p, a, b)]
    assert not bad, f'{opdf.name} changes more than plugin keys and hyper-parameters: {bad}'
    assert any(p[-2:] == ('sub_terms', 'opdf') for p, _, _ in diffs)
    mpo = new['train']['student']['auxiliary_model_wrapper']['kwargs']['mpo']
    assert mpo['selection'] == 'bert' and mpo['num_dummy'] == 1


def test_bert6_recipes_init_from_first_layers_and_align_uniform():
    """The paper's setting (BERT-of-Theseus): init from teacher layers 0..5, align layer i with 2i + 1;
    the KD baseline starts from the same layers, so the two differ only by OPDF."""
    for task in TASKS:
        kd = _plain_yaml(GLUE / task / 'kd-bert6_from_bert_base_uncased.yaml')
        opdf = _plain_yaml(GLUE / task / 'opdf-kd-bert6_from_bert_base_uncased.yaml')
        for config in (kd, opdf):
            init = config['train']['student']['auxiliary_model_wrapper']['kwargs']['init_from_teacher']
            assert init['layer_map'] == 'first', task
        term = opdf['train']['criterion']['kwargs']['sub_terms']['opdf']['criterion']
        assert term['kwargs'] == {'layer_map': 'uniform'}, task
        for name in ('kd-bert_base_uncased_from_bert_large_uncased.yaml',
                     'opdf-kd-bert_base_uncased_from_bert_large_uncased.yaml'):  # pretrained student: no init
            student = _plain_yaml(GLUE / task / name)['train']['student']
            assert 'init_from_teacher' not in ((student.get('auxiliary_model_wrapper') or {}).get('kwargs') or {})


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """Local stand-ins for every Hub id the recipes name: 48-wide students (the BERT-base role: a
    BertModel without head, like bert-base-uncased), 64-wide 4-layer teachers for the BERT-large role
    (1024 = 16x4x.. vs 768 = 16x3x.. in full size) and 48-wide 4-layer teachers for the BERT-base role,
    per number of labels; and a WordPiece tokenizer."""
    root = tmp_path_factory.mktemp('hub')
    vocab = root / 'vocab.txt'
    vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS) + '\n')
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    dirs = {'bert-base-uncased': root / 'student'}
    _bert(48, 2, 96).save_pretrained(dirs['bert-base-uncased'])
    tokenizer.save_pretrained(dirs['bert-base-uncased'])
    for labels in (1, 2, 3):
        for role, hidden, inter in (('large', 64, 128), ('base', 48, 96)):
            path = root / f'{role}-{labels}'
            _bert(hidden, 4, inter, num_labels=labels, seed=labels).save_pretrained(path)
            tokenizer.save_pretrained(path)
            dirs[(role, labels)] = path
    return dirs


def _write_task_data(task, root, rng):
    s1, s2 = glue.GLUE_TASK2KEYS[task]
    cols = [s1] + ([s2] if s2 else []) + ['label']
    labels = 3 if task == 'mnli' else 2
    files = {}
    for split, n in (('train', 4), ('validation', 4)):
        path = root / f'{task}-{split}.csv'
        lines = [','.join(cols)]
        for i in range(n):
            texts = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in cols[:-1]]
            label = f'{rng.uniform(0, 5):.2f}' if task == 'stsb' else str(i % labels)
            lines.append(','.join(texts + [label]))
        path.write_text('\n'.join(lines) + '\n')
        files[split] = str(path)
    return files


def _miniature(path, hub, tmp_path):
    task = path.parent.name
    config = yaml_util.load_yaml_file(str(path))
    labels = {'stsb': 1, 'mnli': 3}.get(task, 2)
    files = _write_task_data(task, tmp_path, random.Random(0))
    swap = {f'yoshitomo-matsubara/bert-large-uncased-{task}': str(hub[('large', labels)]),
            f'yoshitomo-matsubara/bert-base-uncased-{task}': str(hub[('base', labels)]),
            'bert-base-uncased': str(hub['bert-base-uncased'])}

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in list(node.items()):
                if isinstance(v, str) and v in swap and k != 'key':
                    node[k] = swap[v]
                elif k == 'num_epochs':
                    node[k] = 1
                elif k == 'batch_size':
                    node[k] = 4
                elif k == 'num_hidden_layers':
                    node[k] = 2
                elif k == 'pin_memory':
                    node[k] = False
                else:
                    walk(v, k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str) and v in swap:
                    node[i] = swap[v]
                else:
                    walk(v, key)
    walk(config)
    for name, dataset in config['datasets'].items():
        val_split = 'validation_matched' if task == 'mnli' else 'validation'
        if name == 'glue':
            dataset['raw_data_kwargs'] = {'train_file_path': files['train'], f'{val_split}_file_path' if task == 'mnli'
                                          else 'valid_file_path': files['validation']}
    config['models']['student_model']['dst_ckpt'] = str(tmp_path / 'student')
    config['train']['log_freq'] = 1000
    return config


# Every OPDF recipe; the baselines (official files, or official files plus init_from_teacher) for the
# three data layouts (pairs of sentences, regression, MNLI's matched/mismatched splits): time.
MINIATURE = [p for p in RECIPES if p.name.startswith('opdf-') or p.parent.name in ('rte', 'stsb', 'mnli')]


@pytest.mark.parametrize('path', MINIATURE, ids=[str(p.relative_to(GLUE)) for p in MINIATURE])
def test_glue_recipe_in_miniature(path, hub, tmp_path, caplog):
    config = _miniature(path, hub, tmp_path)
    args = glue.get_parser().parse_args(['--config', str(path), '--device', 'cpu', '--seed', '0'])
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill'):
        result = glue.run(args, copy.deepcopy(config))
    task = path.parent.name
    assert set(result['student']) == set(glue.glue_metrics(task, [0, 1], [0, 1]))
    trained, best = result['trained_student'], result['best_student']
    assert not is_overparameterized(best)  # the saved student is a plain Hugging Face model (strict reload in run)
    saved = (tmp_path / 'student' / 'model.safetensors')
    from safetensors.torch import load_file
    assert not [k for k in load_file(saved) if 'parametrizations' in k]
    x = torch.randint(5, len(WORDS) + 5, (3, 9))
    trained.eval()
    best.eval()
    assert torch.allclose(best(input_ids=x).logits, trained(input_ids=x).logits, atol=1e-5)  # one epoch: best = last
    if path.name.startswith('opdf-'):
        selected = len(list(mpo_modules(trained)))
        assert selected == 2 * SELECTED_PER_LAYER
        # the alignment loss's log line ('OPDF alignment coverage: a/b MPO weights aligned'; older: '(a pairs')
        found = re.findall(r'OPDF alignment (?:coverage: (\d+)/\d+ MPO weights aligned|\((\d+) pairs)', caplog.text)
        pairs = [int(a or b) for a, b in found]
        assert pairs and pairs[-1] == selected, f'aligned {pairs}, selected {selected}'
    if 'bert6' in path.name:  # Theseus: student layers 0, 1 start from teacher layers 0, 1 ('first')
        assert 'bert.encoder.layer.1 <- bert.encoder.layer.1' in caplog.text
        assert 'bert.encoder.layer.1 <- bert.encoder.layer.3' not in caplog.text
    if 'bert6' in path.name and path.name.startswith('opdf-'):  # ... and align with 1, 3 ('uniform' 4 -> 2)
        assert "layer_map 'uniform' -> bert.encoder.layer.#: 0<-1, 1<-3" in caplog.text
        alignment = result['first_step']['alignment']
        assert alignment['alignment_starts_at_zero'] is False and alignment['initial_relative_distance'] > 0.1
        assert result['first_step']['grad_norms']['opdf'] > 0
        assert 'pull-back to the initial weights' not in caplog.text
    if task == 'rte':  # -test_only reloads the saved student and reproduces the test metrics
        args = glue.get_parser().parse_args(['--config', str(path), '--device', 'cpu', '-test_only', '-student_only'])
        again = glue.run(args, copy.deepcopy(config))
        assert again['student'] == result['student'] and 'teacher' not in again


def test_runner_rejects_bad_data_config(tmp_path, hub):
    tokenizer = BertTokenizerFast.from_pretrained(hub['bert-base-uncased'])
    good = tmp_path / 'ok.csv'
    good.write_text('sentence1,sentence2,label\na b,c d,entailment\n')
    bad = tmp_path / 'bad.csv'
    bad.write_text('premise,hypothesis,label\na b,c d,0\n')
    cases = [
        ({'raw_data_kwargs': {'train_file_path': str(bad)}}, "columns \\['sentence1', 'sentence2'\\] missing"),
        ({'raw_data_kwargs': {'train_path': str(good)}}, 'unknown keys'),
        ({'raw_data_kwargs': {'train_file_path': str(tmp_path / 'nope.csv')}}, 'does not exist'),
        ({'raw_data_kwargs': {'train_file_path': str(good)}, 'dataset_id_map': {'validation': 'rte/val'}},
         "split 'validation'"),
        ({'name': 'rtee', 'raw_data_kwargs': {'train_file_path': str(good)}}, "GLUE task 'rtee' unknown"),
    ]
    for extra, match in cases:
        cfg = {'name': 'rte', 'dataset_id_map': {'train': 'rte/train'}, **extra}
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            glue.get_all_datasets({'glue': cfg}, None, tokenizer)
    loaded = glue.get_all_datasets({'glue': {'name': 'rte', 'raw_data_kwargs': {'train_file_path': str(good)},
                                             'dataset_id_map': {'train': 'rte/train'}}}, None, tokenizer)
    assert loaded['rte/train'][0]['labels'] == 0  # label names map to the Hub's ids
    wrong = tmp_path / 'wrong.csv'
    wrong.write_text('sentence1,sentence2,label\na b,c d,maybe\n')
    with pytest.raises(ValueError, match="label 'maybe'"):
        glue.load_local_glue('rte', {'train_file_path': str(wrong)})


def test_full_width_student_reloads_without_the_plugin(tmp_path):
    """The paper's shapes end to end: a 768-wide one-layer student initialised from a 768-wide teacher,
    over-parameterized (32x1x24 both sides), trained two steps with the alignment term through the
    runner, saved, and reloaded strictly in a fresh interpreter that never imports this package."""
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS) + '\n')
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    hub = {'bert-base-uncased': tmp_path / 'student', ('base', 2): tmp_path / 'teacher'}
    _bert(768, 1, 768).save_pretrained(hub['bert-base-uncased'])
    _bert(768, 2, 768, num_labels=2, seed=5).save_pretrained(hub[('base', 2)])
    for d in hub.values():
        tokenizer.save_pretrained(d)
    hub[('large', 2)] = hub[('base', 2)]
    path = GLUE / 'rte' / 'opdf-kd-bert6_from_bert_base_uncased.yaml'
    config = _miniature(path, hub, tmp_path)
    config['models']['student_model']['config_kwargs']['num_hidden_layers'] = 1
    args = glue.get_parser().parse_args(['--config', str(path), '--device', 'cpu', '--seed', '0'])
    result = glue.run(args, config)
    trained = result['trained_student']
    rows = {p.plan.describe() for _, _, _, p in mpo_modules(trained)}
    assert rows == {'32x1x24 | 32x1x24'} and len(list(mpo_modules(trained))) == SELECTED_PER_LAYER
    x = torch.randint(5, len(WORDS) + 5, (2, 11))
    trained.eval()
    expected = trained(input_ids=x).logits.detach()
    torch.save({'x': x, 'y': expected}, tmp_path / 'io.pt')
    code = (
        'import sys, torch\n'
        'from transformers import AutoModelForSequenceClassification as A\n'
        f'm, info = A.from_pretrained({str(tmp_path / "student")!r}, output_loading_info=True)\n'
        'assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info\n'
        f'io = torch.load({str(tmp_path / "io.pt")!r})\n'
        'm.eval()\n'
        'd = (m(input_ids=io["x"]).logits - io["y"]).abs().max().item()\n'
        'assert d < 1e-4, d\n'
        'assert not [k for k in sys.modules if k.startswith("opdf_torchdistill")]\n'
        'print("ok", d)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith('ok'), out.stderr[-2000:]
