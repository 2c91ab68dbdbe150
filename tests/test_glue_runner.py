"""``opdf-glue`` on a par with torchdistill's HF example, and the diagnostics on the GLUE path (issue 21):
``--set`` with the recipes as committed (local models and data, the teacher folder as the student's
base), ``--metrics_json`` with the first-step gradient norms, ``--private_output`` submission files,
``--resume`` bit for bit, ``--amp``, two-process ``torchrun`` on CPU (gloo), ``opdf-gradnorms`` on a GLUE
recipe (its ``custom`` dependency) and ``opdf-inspect`` on Hugging Face and timm models. Tiny random
BERTs saved as local checkpoints (``test_glue.hub``), generated GLUE-format CSV files; no download."""
import json
import os
import random
import re
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip('transformers')
pytest.importorskip('datasets')

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig  # noqa: E402

from conftest import ROOT  # noqa: E402
from opdf_torchdistill.cli import glue, gradnorms  # noqa: E402
from opdf_torchdistill.cli import inspect as inspect_cli  # noqa: E402
from opdf_torchdistill.hf import core_state_dict  # noqa: E402
from test_glue import WORDS, hub  # noqa: E402,F401  (hub: the local checkpoints fixture)

GLUE = ROOT / 'configs' / 'glue'
RTE = GLUE / 'rte' / 'opdf-kd-bert6_from_bert_base_uncased.yaml'
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))


def _test_file(task, path, n, rng):
    """A GLUE test split as the benchmark ships it: no label column."""
    s1, s2 = glue.GLUE_TASK2KEYS[task]
    cols = [s1] + ([s2] if s2 else [])
    rows = [','.join(' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in cols) for _ in range(n)]
    path.write_text(','.join(cols) + '\n' + '\n'.join(rows) + '\n')
    return str(path)


def _write_data(task, root, labels):
    """Training (8 rows: two steps at batch size 4) and validation (4 rows) CSV files with the Hub's columns."""
    s1, s2 = glue.GLUE_TASK2KEYS[task]
    cols = [s1] + ([s2] if s2 else []) + ['label']
    rng, files = random.Random(0), {}
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (('train', 8), ('validation', 4)):
        rows = [','.join([' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in cols[:-1]]
                         + [str(i % labels)]) for i in range(n)]
        files[split] = root / f'{task}-{split}.csv'
        files[split].write_text(','.join(cols) + '\n' + '\n'.join(rows) + '\n')
    return files


def local_sets(hub, tmp_path, task='rte', labels=2, epochs=1, test=False):
    """``--set`` overrides that run a committed bert6 recipe on local files: the teacher's four paths
    (config, tokenizer, model, init_from_teacher), the teacher folder as the student's base (its three
    paths), the data files and the run's size."""
    teacher = str(hub[('base', labels)])
    files = _write_data(task, tmp_path, labels)
    sets = [f'models.teacher_model.{k}.pretrained_model_name_or_path={teacher}'
            for k in ('config_kwargs', 'tokenizer_kwargs', 'model_kwargs')]
    sets += [f'train.student.auxiliary_model_wrapper.kwargs.init_from_teacher.model={teacher}']
    sets += [f'models.student_model.{k}.pretrained_model_name_or_path={teacher}'
             for k in ('config_kwargs', 'tokenizer_kwargs', 'model_kwargs')]
    sets += ['models.student_model.config_kwargs.num_hidden_layers=2',
             f'models.student_model.dst_ckpt={tmp_path / "student"}',
             f'datasets.glue.raw_data_kwargs.train_file_path={files["train"]}',
             f'datasets.glue.raw_data_kwargs.valid_file_path={files["validation"]}',
             f'train.num_epochs={epochs}', 'train.log_freq=1000', 'train.train_data_loader.kwargs.batch_size=4',
             'train.train_data_loader.kwargs.pin_memory=false', 'train.val_data_loader.kwargs.pin_memory=false',
             'test.test_data_loader.kwargs.pin_memory=false']
    if test:
        sets.append(f'+datasets.glue.raw_data_kwargs.test_file_path='
                    f'{_test_file(task, tmp_path / "test.csv", 5, random.Random(2))}')
    return [a for s in sets for a in ('--set', s)]


def _argv(hub, tmp_path, *extra, **kwargs):
    return ['--config', str(RTE), '--device', 'cpu', '--seed', '0', *local_sets(hub, tmp_path, **kwargs), *map(str, extra)]


def _plain_reload(folder):
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
    assert not [k for k in load_file(str(folder / 'model.safetensors')) if 'parametrizations' in k]
    return model.eval()


# ------------------------------------------------------------------------------------------------
# opdf-glue: --set on the committed recipe, --metrics_json, submission files, guards
# ------------------------------------------------------------------------------------------------
def test_committed_recipe_with_set_metrics_json_and_submission_files(hub, tmp_path, capsys):
    metrics_json, out = tmp_path / 'rte.json', tmp_path / 'submission'
    assert glue.main(_argv(hub, tmp_path, '--metrics_json', metrics_json, '--private_output', out, test=True)) == 0
    metrics = json.loads(metrics_json.read_text())
    assert metrics['task'] == 'rte' and metrics['world_size'] == 1 and len(metrics['validation']) == 1
    assert set(metrics['student']) == {'accuracy'} and set(metrics['teacher']) == {'accuracy'}
    # the first-step table of the paper's setting: the alignment term acts (init 'first', align 'uniform')
    assert metrics['grad_norms']['opdf'] > 0 and metrics['grad_norms']['kd'] > 0
    assert metrics['alignment']['alignment_starts_at_zero'] is False
    assert metrics['alignment']['aligned_weights'] == 12 and metrics['train_params'] > metrics['inference_params']
    # the GLUE submission file: the benchmark's name, header, row indices and label strings for RTE
    assert metrics['private_outputs'] == [str(out / 'RTE.tsv')]
    lines = (out / 'RTE.tsv').read_text().splitlines()
    assert lines[0] == 'index\tprediction' and len(lines) == 6
    assert [line.split('\t')[0] for line in lines[1:]] == ['0', '1', '2', '3', '4']
    assert {line.split('\t')[1] for line in lines[1:]} <= {'entailment', 'not_entailment'}
    student = _plain_reload(tmp_path / 'student')
    assert student.config.num_hidden_layers == 2
    # a second fresh run onto the same outputs is refused (one line, status 1); --force replaces them
    capsys.readouterr()
    assert glue.main(_argv(hub, tmp_path / 'again', '--metrics_json', metrics_json)[:-2] +
                     ['--set', f'models.student_model.dst_ckpt={tmp_path / "student"}']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'earlier run' in err and '--resume' in err and '--force' in err


def test_outputs_are_guarded(hub, tmp_path, capsys):
    teacher = hub[('base', 2)]
    for extra, match in [(['--metrics_json', teacher / 'config.json'], 'is a file inside the config'),
                         (['--private_output', teacher], 'private_output .* reads'),
                         (['--metrics_json', tmp_path / 'log.txt', '--run_log', tmp_path / 'log.txt'],
                          'are the same file'),
                         (['--set', 'train.num_epoch=1'], "no key 'num_epoch' under train; did you mean 'num_epochs'")]:
        assert glue.main(_argv(hub, tmp_path, *extra)) == 1
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and re.search(match, err), err
    (tmp_path / 'binary.json').write_bytes(b'\x80\x04not json')
    assert glue.main(_argv(hub, tmp_path, '--metrics_json', tmp_path / 'binary.json')) == 1
    assert 'not a JSON file' in capsys.readouterr().err
    assert not (tmp_path / 'student').exists()
    with pytest.raises(SystemExit) as exc:
        glue.main(['--config', str(RTE), '--amp', 'fp8'])
    assert exc.value.code == 2


def test_a_missing_model_folder_is_one_line_naming_the_key(hub, tmp_path, capsys):
    missing = tmp_path / 'models' / 'bert-base-uncased-rte'
    argv = _argv(hub, tmp_path) + ['--set', f'models.teacher_model.config_kwargs.pretrained_model_name_or_path={missing}']
    assert glue.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: models.teacher_model.config_kwargs.pretrained_model_name_or_'
                                                    f'path: cannot load {str(missing)!r}')


def test_submission_files_of_every_task_follow_the_glue_benchmark():
    from torchdistill.common import yaml_util
    expected = {'cola': ['CoLA.tsv'], 'sst2': ['SST-2.tsv'], 'mrpc': ['MRPC.tsv'], 'stsb': ['STS-B.tsv'],
                'qqp': ['QQP.tsv'], 'qnli': ['QNLI.tsv'], 'rte': ['RTE.tsv'], 'mnli': ['MNLI-m.tsv', 'MNLI-mm.tsv', 'AX.tsv']}
    for task, files in expected.items():
        config = yaml_util.load_yaml_file(str(GLUE / task / 'opdf-kd-bert6_from_bert_base_uncased.yaml'))
        entries = glue._private_entries(config, None)
        assert [e['file'] for e in entries] == files, task
        assert all(e['idx2str'] == (e['task'] in ('mnli', 'ax', 'qnli', 'rte')) for e in entries), task
        assert [e['split'] for e in entries] == (['test_matched', 'test_mismatched', 'test'] if task == 'mnli'
                                                 else ['test'])
        for e in entries:  # without pred_output / idx2str the benchmark's names and label forms are the default
            bare = {'private': [{'private_data_loader': e['loader']}], 'datasets': config['datasets']}
            (default,) = glue._private_entries(bare, None)
            assert (default['file'], default['idx2str']) == (e['file'], e['idx2str'])
    assert glue.submission_text('sst2', [1, 0], False) == 'index\tprediction\n0\t1\n1\t0\n'
    assert glue.submission_text('mnli', [2, 0], True) == 'index\tprediction\n0\tcontradiction\n1\tentailment\n'
    assert glue.submission_text('stsb', [3.25, 0.5], False) == 'index\tprediction\n0\t3.25\n1\t0.5\n'


# ------------------------------------------------------------------------------------------------
# --resume: bit for bit on CPU; a changed config is refused
# ------------------------------------------------------------------------------------------------
def _untimed(history):
    return [{k: v for k, v in h.items() if k != 'seconds'} for h in history]


def _cores(result):
    with core_state_dict(result['trained_student']):
        return {k: v.detach().clone() for k, v in result['trained_student'].state_dict().items()}


def test_resume_continues_bit_for_bit_and_refuses_a_changed_config(hub, tmp_path, capsys):
    straight = glue.command(glue.get_parser().parse_args(_argv(hub, tmp_path / 'a', epochs=2)))
    assert [h['epoch'] for h in straight['validation']] == [1, 2]
    b = tmp_path / 'b'
    first = glue.command(glue.get_parser().parse_args(_argv(hub, b, '--stop_after', 1, epochs=2)))
    assert first['stopped_at_epoch'] == 1 and 'student' not in first
    assert glue.main(_argv(hub, b, epochs=2)) == 1  # a fresh run onto the interrupted one: refused
    assert '--resume' in capsys.readouterr().err
    changed = _argv(hub, b, '--resume', epochs=2) + ['--set', 'train.optimizer.kwargs.lr=1.0e-3']
    assert glue.main(changed) == 1
    err = capsys.readouterr().err
    assert 'train.optimizer.kwargs.lr: 2.5e-05 -> 0.001' in err and '--resume_changed_config' in err
    resumed = glue.command(glue.get_parser().parse_args(_argv(hub, b, '--resume', epochs=2)))
    assert _untimed(resumed['validation']) == _untimed(straight['validation'])
    a_cores, b_cores = _cores(straight), _cores(resumed)
    assert a_cores.keys() == b_cores.keys() and any('parametrizations' in k for k in a_cores)
    assert all(torch.equal(a_cores[k], b_cores[k]) for k in a_cores)  # bit for bit
    assert resumed['student'] == straight['student']
    last = torch.load(b / 'student.last.pt', weights_only=True)
    assert last['epoch'] == 2 and last['first_step']['grad_norms']['opdf'] > 0
    a_saved, b_saved = load_file(str(tmp_path / 'a' / 'student' / 'model.safetensors')), \
        load_file(str(b / 'student' / 'model.safetensors'))
    assert all(torch.equal(a_saved[k], b_saved[k]) for k in a_saved)


# ------------------------------------------------------------------------------------------------
# --amp, MNLI's three submission files (in process)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_amp_trains_and_saves_a_plain_float32_model(hub, tmp_path, amp):
    result = glue.command(glue.get_parser().parse_args(_argv(hub, tmp_path, '--amp', amp, '-student_only')))
    assert result['metrics']['amp'] == amp and set(result['student']) == {'accuracy'}
    student = _plain_reload(tmp_path / 'student')
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_mnli_private_sets_write_the_three_benchmark_files(hub, tmp_path):
    import copy
    from test_glue import _miniature
    path = GLUE / 'mnli' / 'opdf-kd-bert6_from_bert_base_uncased.yaml'
    config = _miniature(path, hub, tmp_path)
    rng = random.Random(3)
    config['datasets']['glue']['raw_data_kwargs'].update(
        test_matched_file_path=_test_file('mnli', tmp_path / 'm.csv', 3, rng),
        test_mismatched_file_path=_test_file('mnli', tmp_path / 'mm.csv', 4, rng))
    config['datasets']['glue_ax']['raw_data_kwargs'] = {'test_file_path': _test_file('ax', tmp_path / 'ax.csv', 2, rng)}
    args = glue.get_parser().parse_args(['--config', str(path), '--device', 'cpu', '--seed', '0', '-student_only',
                                         '--private_output', str(tmp_path / 'out')])
    result = glue.run(args, copy.deepcopy(config))
    names = ['entailment', 'neutral', 'contradiction']
    for name, n in (('MNLI-m.tsv', 3), ('MNLI-mm.tsv', 4), ('AX.tsv', 2)):
        lines = (tmp_path / 'out' / name).read_text().splitlines()
        assert lines[0] == 'index\tprediction' and len(lines) == n + 1, name
        assert all(line.split('\t')[1] in names for line in lines[1:]), name
    assert len(result['metrics']['private_outputs']) == 3


# ------------------------------------------------------------------------------------------------
# torchrun: two processes on CPU (gloo)
# ------------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_equal_ranks_and_save_a_plain_model(hub, tmp_path):
    argv = _argv(hub, tmp_path, '--metrics_json', tmp_path / 'ddp.json', '-student_only')
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(_free_port()), str(ROOT / 'tests' / 'glue_ddp_worker.py'), str(tmp_path / 'ddp'), *argv],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rank0, rank1 = (torch.load(tmp_path / f'ddp.rank{r}.pt', weights_only=True) for r in (0, 1))
    assert rank0['state'].keys() == rank1['state'].keys()
    assert all(torch.equal(rank0['state'][k], rank1['state'][k]) for k in rank0['state'])
    assert rank0['student'] == rank1['student'] and _untimed(rank0['validation']) == _untimed(rank1['validation'])
    metrics = json.loads((tmp_path / 'ddp.json').read_text())
    assert metrics['world_size'] == 2 and metrics['grad_norms']['opdf'] > 0 and metrics['student'] == rank0['student']
    assert 'distributed: 2 processes, backend gloo' in done.stderr
    student = _plain_reload(tmp_path / 'student')
    # the saved weights are the contraction of rank 0's cores
    from opdf_torchdistill.mpo import reconstruct
    name = 'bert.encoder.layer.1.output.dense'
    prefix = f'{name}.parametrizations.weight.'
    keys = sorted((k for k in rank0['state'] if k.startswith(prefix)), key=lambda k: int(re.sub(r'\D', '', k[len(prefix):])))
    dense = student.state_dict()[f'{name}.weight']
    assert len(keys) == 3 and torch.allclose(reconstruct([rank0['state'][k] for k in keys]).reshape(dense.shape), dense,
                                             atol=1e-5)


# ------------------------------------------------------------------------------------------------
# opdf-gradnorms on a GLUE recipe; opdf-inspect on Hugging Face and timm models
# ------------------------------------------------------------------------------------------------
def test_gradnorms_measures_a_glue_recipe_with_its_custom_dependency(hub, tmp_path, capsys):
    sets = local_sets(hub, tmp_path)
    assert gradnorms.main(['--config', str(RTE), *sets, '--json', str(tmp_path / 'g.json')]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed['grad_norms']['opdf'] > 0 and printed['grad_norms']['kd'] > 0
    assert printed['alignment']['alignment_starts_at_zero'] is False and printed['alignment']['aligned_weights'] == 12
    saved = json.loads((tmp_path / 'g.json').read_text())
    assert saved['grad_norms'] == printed['grad_norms'] and saved['config'] == str(RTE)
    # init == align ('uniform' both): the table shows the alignment starting at 0
    same = sets + ['--set', 'train.student.auxiliary_model_wrapper.kwargs.init_from_teacher.layer_map=uniform']
    assert gradnorms.main(['--config', str(RTE), *same]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed['grad_norms']['opdf'] == 0 and printed['alignment']['alignment_starts_at_zero'] is True
    assert gradnorms.main(['--config', str(RTE), '--miniature']) == 1
    assert 'needs local models and data' in capsys.readouterr().err


def test_inspect_prints_the_bert_base_6_from_12_pairing_from_a_transformers_config(tmp_path, capsys):
    assert inspect_cli.main(['hf:BertForSequenceClassification', '--kwargs', '{"num_hidden_layers": 6}',
                             '--selection', 'bert', '--teacher', 'hf:BertForSequenceClassification',
                             '--layer_map', 'uniform', '--json', str(tmp_path / 'plan.json')]) == 0
    out = capsys.readouterr().out
    assert 'OPDF alignment coverage: 36/36 MPO weights aligned' in out
    assert re.search(r'bert\.encoder\.layer\.5\.output\.dense +bert\.encoder\.layer\.11\.output\.dense +'
                     r'32x1x24 \| 64x1x48 +0,2', out)
    assert '66.96M -> 114.73M' in out
    pairs = json.loads((tmp_path / 'plan.json').read_text())['alignment']['pairs']
    assert {p['student'].split('.')[3] + '<-' + p['teacher'].split('.')[3] for p in pairs} == \
        {f'{i}<-{2 * i + 1}' for i in range(6)}


def test_inspect_takes_hf_folders_config_files_classes_and_timm_names(hub, tmp_path, capsys):
    teacher = hub[('base', 2)]  # a 4-layer folder; its config only is read
    tiny = '{"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 45}'
    assert inspect_cli.main(['hf:BertConfig', '--kwargs', tiny, '--selection', 'bert', '--teacher', str(teacher),
                             '--layer_map', 'first']) == 0
    out = capsys.readouterr().out
    assert 'coverage: 12/12' in out and re.search(r'layer\.1\.attention\.self\.query +bert\.encoder\.layer\.1\.', out)
    BertConfig(**json.loads(tiny)).to_json_file(str(tmp_path / 'student.json'))
    assert inspect_cli.main([str(tmp_path / 'student.json'), '--selection', 'bert', '--teacher', f'hf:{teacher}',
                             '--teacher_kwargs', '{"num_hidden_layers": 6}', '--layer_map', '[1, 5]']) == 0
    out = capsys.readouterr().out
    assert 'coverage: 12/12' in out and re.search(r'layer\.1\.output\.dense +bert\.encoder\.layer\.5\.output\.dense', out)
    assert inspect_cli.main(['timm:tiny_vit_5m_224', '--selection', 'tinyvit', '--teacher', 'timm:tiny_vit_21m_224']) == 0
    assert 'OPDF alignment coverage: 40/40' in capsys.readouterr().out
    for argv, match in [(['bert-base-uncased'], 'did you mean hf:<the folder of bert-base-uncased>'),
                        (['tiny_vit_5m_224'], 'did you mean timm:tiny_vit_5m_224'),
                        (['hf:google/bert'], 'a hub id is not fetched'),
                        (['hf:BertTokenizer'], 'neither a config nor a model class'),
                        (['timm:tiny_vit_6m_224'], 'unknown timm model'),
                        (['hf:BertConfig', '--selection', 'tinyvit'], 'matches no supported weight'),
                        (['resnet18', '--layer_map', 'uniform'], 'needs --teacher')]:
        assert inspect_cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and match in err, (argv, err)


def test_the_evaluate_stand_in_for_the_stock_script(monkeypatch):
    """``tools/hf_example/evaluate.py``: ``evaluate.load('glue', task)`` as torchdistill's script uses it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('evaluate_stand_in', ROOT / 'tools' / 'hf_example' / 'evaluate.py')
    stand_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_in)
    metric = stand_in.load('glue', 'mrpc')
    metric.add_batch(predictions=torch.tensor([1, 0]), references=torch.tensor([1, 1]))
    metric.add_batch(predictions=torch.tensor([1, 0]), references=torch.tensor([0, 0]))
    assert metric.compute() == pytest.approx(glue.glue_metrics('mrpc', [1, 0, 1, 0], [1, 1, 0, 0]))
    assert metric.compute(predictions=[1], references=[1]) == {'accuracy': 1.0, 'f1': 1.0}  # compute resets
    monkeypatch.setenv('GLUE_TASK', 'stsb')
    stsb = stand_in.load('glue', None)
    stsb.add_batch(predictions=torch.tensor(0.5), references=torch.tensor(1.0))  # a batch of one: squeeze() -> 0-d
    stsb.add_batch(predictions=torch.tensor([0.1, 0.9]), references=torch.tensor([2.0, 3.0]))
    assert set(stsb.compute()) == {'pearson', 'spearmanr'}
    monkeypatch.delenv('GLUE_TASK')
    with pytest.raises(ValueError, match='GLUE_TASK'):
        stand_in.load('glue', None)
