"""The ablation/study runner: record keys, stale records, selection, statistics, byte-exact reports."""
import io
import json
import math
import re
import sys
import threading
from pathlib import Path

import pytest
from scipy import stats

from opdf_torchdistill import study
from opdf_torchdistill.cli import ablate
from opdf_torchdistill.study import records as study_records, runner
from conftest import ROOT

LR = 'train.optimizer.kwargs.lr'
LAMBDA = 'train.criterion.kwargs.sub_terms.opdf.weight'

CONFIG = """# a recipe in torchdistill's layout; the tags are never executed by the key
datasets:
  &train_id d/train: !import_call
    key: 'no_such_module.Data'
    init: {{kwargs: {{split: 'train'}}}}
models:
  teacher_model: &teacher {{key: 'tnet', src_ckpt: '{teacher}'}}
  student_model: {{key: 's', kwargs: {{align_to: *teacher}}, dst_ckpt: './runs/{name}.pt'}}
train:
  num_epochs: 3
  train_data_loader: {{dataset_id: *train_id}}
  optimizer: {{key: 'SGD', kwargs: {{lr: 0.1, momentum: 0.9}}}}
  criterion: {{kwargs: {{sub_terms: {{opdf: {{weight: 1.0}}}}}}}}
"""


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / 'teacher.pt').write_bytes(b'teacher weights v1')
    for name in ('kd', 'opdf'):
        (tmp_path / f'{name}.yaml').write_text(CONFIG.format(teacher=tmp_path / 'teacher.pt', name=name))
    return tmp_path


# -- keys and stale records ---------------------------------------------------------------------
def test_record_key_follows_the_resolved_config(workspace):
    config = str(workspace / 'kd.yaml')
    key = study.run_key(config, 0)
    assert study.resolved_config(config)['datasets']['d/train']['__tag__'] == '!import_call'  # not executed
    assert study.run_key(config, 0) == key and study.run_key(config, 1) != key
    assert study.run_key(config, 0, {LR: 0.2}) != key
    assert study.run_key(config, 0, {LR: 0.1}) == key  # an override equal to the config: the same run
    assert study.run_key(config, 0, name='other') != key and study.run_key(config, 0, device='cuda') != key
    text = (workspace / 'kd.yaml').read_text()
    (workspace / 'kd.yaml').write_text('# only a comment changed\n' + text.replace('./runs/kd.pt', './elsewhere.pt'))
    assert study.run_key(config, 0) == key  # comments and dst_ckpt do not change what a run computes
    (workspace / 'kd.yaml').write_text(text.replace('num_epochs: 3', 'num_epochs: 4'))
    edited = study.run_key(config, 0)
    assert edited != key
    (workspace / 'teacher.pt').write_bytes(b'teacher weights v2')  # a retrained teacher
    assert study.run_key(config, 0) != edited
    identity = study.run_identity(config, 0)
    assert identity.inputs == {str(workspace / 'teacher.pt'): 'file:' + study_records._file_sha.__wrapped__(
        str(workspace / 'teacher.pt'), ())}  # not a checkpoint: its bytes are the input
    assert set(identity.versions) == {'opdf_torchdistill', 'torchdistill', 'torch'}
    with pytest.raises(FileNotFoundError, match='nope.yaml does not exist'):
        study.run_key(str(workspace / 'nope.yaml'), 0)
    with pytest.raises(ValueError, match="no key 'lrr'"):
        study.run_key(config, 0, {'train.optimizer.kwargs.lrr': 0.1})



class _NotPlainData:  # pickled by reference: a checkpoint holding it is not plain tensor data
    pass


def _teacher_state():
    import torch
    torch.manual_seed(0)
    return {'conv.weight': torch.randn(4, 3, 3, 3), 'bn.num_batches_tracked': torch.tensor(7),
            'head.bias': torch.zeros(5, dtype=torch.bfloat16), 'mask': torch.tensor([True, False])}


def test_teacher_checkpoints_are_hashed_by_tensor_contents_not_file_bytes(tmp_path):
    """``torch.save`` writes a random serialization id: the same teacher saved twice is two different files
    but one content hash; any changed tensor, dtype or shape changes it."""
    import torch
    state = _teacher_state()
    a, b, bare = tmp_path / 'a.pt', tmp_path / 'b.pt', tmp_path / 'bare.pt'
    torch.save({'model': state, 'best_value': 90.0, 'args': {'dst_ckpt': str(a)}}, a)
    torch.save({'model': state, 'best_value': 91.0, 'args': {'dst_ckpt': str(b)}}, b)
    torch.save(state, bare)

    def content(path):
        return study_records._content_hash.__wrapped__(str(path), ())

    def file_sha(path):
        return study_records._file_sha.__wrapped__(str(path), ())

    assert file_sha(a) != file_sha(b) and file_sha(a) != file_sha(bare)
    assert content(a) == content(b) == content(bare) and content(a).startswith('tensors:')
    for change in (lambda s: s['conv.weight'].view(-1)[5].add_(1e-6), lambda s: s.update(mask=s['mask'].flip(0)),
                   lambda s: s.update({'head.bias': s['head.bias'].float()}),
                   lambda s: s.update({'conv.weight': s['conv.weight'].reshape(4, 27)}),
                   lambda s: s.update({'extra': torch.zeros(1)})):
        changed = _teacher_state()
        change(changed)
        torch.save({'model': changed}, b)
        assert content(b) != content(a)
    (tmp_path / 'x.pt').write_bytes(b'not a checkpoint')
    assert content(tmp_path / 'x.pt') == 'file:' + file_sha(tmp_path / 'x.pt')
    torch.save({'model': state, 'obj': _NotPlainData()}, b)  # never unpickled: hashed as bytes
    assert content(b) == 'file:' + file_sha(b)


def test_run_keys_survive_a_retrained_teacher_and_a_version_bump_and_older_records_stay_usable(workspace,
                                                                                               monkeypatch):
    import torch
    teacher, config = workspace / 'teacher.pt', str(workspace / 'kd.yaml')
    torch.save({'model': _teacher_state()}, teacher)
    first = study.run_identity(config, 0)
    assert first.inputs == {str(teacher): study_records._content_hash.__wrapped__(str(teacher), ())}
    # a record written before content hashing: its key hashed the versions and the teacher file's SHA-256
    old_inputs = {str(teacher): study_records._file_sha.__wrapped__(str(teacher), ())}
    old_key = study_records._sha16(study_records.canonical({
        'name': 'kd', 'config_hash': first.config_hash, 'seed': 0, 'device': 'cpu', 'versions': first.versions,
        'inputs': old_inputs}))
    older = {'key': old_key, 'config': config, 'name': 'kd', 'seed': 0, 'overrides': {}, 'device': 'cpu',
             'config_hash': first.config_hash, 'versions': first.versions, 'inputs': old_inputs, 'status': 'ok',
             'metrics': {'test_acc1': 80.0, 'best_val_acc1': 81.0}}
    assert study.record_finder([older], 'key')('kd', {}, 0, first) is older  # the same teacher file: reused
    assert not any(study.find_stale([older]).values())
    assert study.record_finder([older], 'key')('kd', {}, 1, study.run_identity(config, 1)) is None

    torch.save({'model': _teacher_state(), 'best_value': 1.0}, teacher)  # retrained, identical weights
    again = study.run_identity(config, 0)
    assert again.key == first.key and again.inputs == first.inputs  # a fresh machine reuses every record
    assert study.record_finder([older], 'key')('kd', {}, 0, again) is None  # older record: its file is gone
    assert [r['key'] for r in study.find_stale([older])['other_inputs']] == [old_key]
    monkeypatch.setattr(study_records, 'environment', lambda: {'opdf_torchdistill': '0.2.0', 'torchdistill': '1.1.5',
                                                               'torch': '9.9'})
    bumped = study.run_identity(config, 0)
    assert bumped.key == first.key and bumped.versions['opdf_torchdistill'] == '0.2.0'  # versions: stored, not keyed
    state = _teacher_state()
    state['conv.weight'][0, 0, 0, 0] += 1.0
    torch.save({'model': state}, teacher)
    assert study.run_identity(config, 0).key != first.key  # a teacher with other weights: trained again


def _fake_execute(config, seed, overrides, workdir, device, isolate, threads=None):
    """Validation/test accuracy as a known function of the run: kd is best at lr 0.1, opdf at lr 0.05
    with lambda 1.0; opdf at lr 0.2 has the best validation score but diverges with seed 101."""
    name = config.rsplit('/', 1)[-1].split('.')[0]
    lr, lam = overrides.get(LR, 0.1), overrides.get(LAMBDA, 0.0)
    if name == 'opdf' and lr == 0.2 and seed == 101:
        return {'status': 'diverged', 'metrics': {}, 'error': 'FloatingPointError: loss is nan'}
    score = {'kd': {0.05: 80.0, 0.1: 82.0, 0.2: 81.0}, 'opdf': {0.05: 83.0, 0.1: 81.5, 0.2: 90.0}}[name][lr]
    score += lam + 0.25 * (seed % 100)
    return {'status': 'ok', 'error': None, 'metrics': {
        'test_acc1': score - 1 + (0.5 * seed if name == 'opdf' else 0.0), 'best_val_acc1': score,
        'train_params': 30 if name == 'opdf' else 10, 'inference_params': 10,
        'ratio': 3.0 if name == 'opdf' else 1.0, 'train_seconds': 1.0}}


def _spec(workspace, seeds=(0, 1, 2)):
    spec = {'study': 'toy', 'workdir': str(workspace / 'work'), 'baseline': 'kd', 'select_seeds': [100, 101],
            'seeds': list(seeds), 'labels': {LR: 'lr', LAMBDA: 'lambda'},
            'pairs': {'toy': {'title': 'Toy pair', 'records': str(workspace / 'toy.jsonl'), 'arms': {
                'kd': {'config': str(workspace / 'kd.yaml'), 'grid': {LR: [0.05, 0.1, 0.2]}},
                'opdf': {'config': str(workspace / 'opdf.yaml'), 'grid': {LR: [0.05, 0.1, 0.2], LAMBDA: [0.0, 1.0]}},
            }}}}
    path = workspace / 'study.yaml'
    path.write_text(json.dumps(spec))
    return path


EXPECTED = """#### Toy pair: selection on validation (seeds 100, 101)

| arm | lr | lambda | val acc@1 (%) | selected |
|---|---|---|---|---|
| kd | 0.05 | - | 80.12 |  |
| kd | 0.1 | - | 82.12 | yes |
| kd | 0.2 | - | 81.12 |  |
| opdf | 0.05 | 0.0 | 83.12 |  |
| opdf | 0.05 | 1.0 | 84.12 | yes |
| opdf | 0.1 | 0.0 | 81.62 |  |
| opdf | 0.1 | 1.0 | 82.62 |  |
| opdf | 0.2 | 0.0 | diverged 1/2 |  |
| opdf | 0.2 | 1.0 | diverged 1/2 |  |

#### Toy pair: test accuracy at the selected setting (seeds 0, 1, 2)

| arm | lr | lambda | n | test acc@1 (%) | 95 % CI | params x | vs kd (paired, 95 % CI) | p (paired t) | p (Holm) |
|---|---|---|---|---|---|---|---|---|---|
| kd | 0.1 | - | 3 | 81.25 | [80.63, 81.87] | 1.00 | - | - | - |
| opdf | 0.05 | 1.0 | 3 | 83.75 | [81.89, 85.61] | 3.00 | +2.50 +- 1.24 | 0.013 | 0.013 |

Paired differences to kd over the same seeds; two-sided paired t-test; Holm correction over the 1 comparison in this table.
"""


def test_study_selects_on_validation_resumes_and_reports_byte_for_byte(workspace, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(runner, '_execute', lambda *a: calls.append(a) or _fake_execute(*a))
    spec = _spec(workspace)
    spec_ = study.load_study(spec)
    out = io.StringIO()
    study.run_study(spec_, stream=out)
    assert len(calls) == 3 * 2 + 6 * 2 + 2 * 3  # selection (points x 2 seeds), then 3 seeds per arm
    progress = out.getvalue()
    assert 'phase all: 0/24 runs done' in progress and '[24/24 runs done, mean run' in progress
    assert '[18/24 runs done' in progress and 'ETA 0:00:00' in progress
    final = [c for c in calls if c[1] in (0, 1, 2)]
    assert {(c[0].rsplit('/', 1)[-1], c[2][LR], c[2].get(LAMBDA)) for c in final} == {
        ('kd.yaml', 0.1, None), ('opdf.yaml', 0.05, 1.0)}  # opdf lr 0.2 scored best but diverged once
    records = study.load_records(workspace / 'toy.jsonl')
    assert len(records) == 24 and {r['phase'] for r in records} == {'select', 'final'}
    assert all(r['config_hash'] and r['versions'] and r['inputs'] for r in records)
    study.run_study(study.load_study(spec), stream=io.StringIO())
    assert len(calls) == 24  # all recorded: nothing trains again

    capsys.readouterr()
    assert ablate.main(['report', '--study', str(spec)]) == 0
    first = capsys.readouterr()
    assert first.out == EXPECTED and first.err == ''
    assert ablate.main(['report', '--study', str(spec), '--summary_json', str(workspace / 's.json')]) == 0
    assert capsys.readouterr().out == EXPECTED  # the same bytes again
    rows = json.loads((workspace / 's.json').read_text())
    assert ablate.main(['report', '--study', str(spec), '--plots', str(workspace / 'plots')]) == 0
    plotted = capsys.readouterr()
    assert plotted.out == EXPECTED and 'wrote' in plotted.err and (workspace / 'plots' / 'toy.png').stat().st_size > 0
    with pytest.raises(SystemExit, match='--tune, --baseline apply to --out reports only'):
        ablate.main(['report', '--study', str(spec), '--tune', LR, '--baseline', 'kd'])
    with pytest.raises(SystemExit, match='--pairs applies to --study reports only'):
        ablate.main(['report', '--out', str(workspace / 'toy.jsonl'), '--pairs', 'toy'])
    assert ablate.main(['study', str(workspace / 'studdy.yaml'), '--dry_run']) == 1  # a message, not a traceback
    assert ablate.main(['report', '--study', str(spec), '--pairs', 'toyy']) == 1
    err = capsys.readouterr().err
    assert 'error: study spec' in err and 'studdy.yaml does not exist' in err and "no pairs ['toyy']" in err
    assert [r['arm'] for r in rows] == ['kd', 'opdf'] and rows[1]['vs_baseline']['n'] == 3

    # a config edit: the report leaves kd's records out (and says so); the next run trains them again
    text = (workspace / 'kd.yaml').read_text()
    (workspace / 'kd.yaml').write_text(text.replace('momentum: 0.9', 'momentum: 0.8'))
    assert ablate.main(['report', '--study', str(spec)]) == 0
    edited = capsys.readouterr()
    assert 'WARNING: 9 record(s) left out: their config changed since they ran' in edited.err
    assert '| kd | 0.05 | - | missing 2/2 |  |' in edited.out
    assert '| kd | - | - | - | - | - | - | - | - | - |' in edited.out
    stale = study.find_stale(study.load_records(workspace / 'toy.jsonl'))
    assert len(stale['stale']) == 9 and {r['name'] for r in stale['stale']} == {'kd'}
    study.run_study(study.load_study(spec), stream=io.StringIO())
    assert len(calls) == 24 + 9
    (workspace / 'kd.yaml').write_text(text)  # back as it was: the first records count again
    assert ablate.main(['report', '--study', str(spec)]) == 0
    assert capsys.readouterr().out == EXPECTED


def test_paired_statistics_and_holm_on_known_numbers():
    d = study.paired_difference({0: 91.0, 1: 92.0, 2: 94.0, 9: 50.0}, {0: 90.0, 1: 90.0, 2: 90.0})
    diffs = [1.0, 2.0, 4.0]
    sd = math.sqrt(sum((x - 7 / 3) ** 2 for x in diffs) / 2)
    t = (7 / 3) / (sd / math.sqrt(3))
    assert d['n'] == 3 and d['mean'] == pytest.approx(7 / 3)
    assert d['ci95'] == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert d['p'] == pytest.approx(2 * stats.t.sf(t, 2)) and d['p'] == pytest.approx(0.1181, abs=1e-4)
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = study.holm([0.5, math.nan, 0.2])
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.4)
    assert study.holm([0.6, 0.7]) == [1.0, 1.0] and study.holm([]) == []


def test_progress_eta_uses_each_arms_mean_time():
    out = io.StringIO()
    progress = study.Progress(total=5, done=1, times={'a': [10.0, 30.0], 'b': [60.0]}, stream=out)
    assert progress.mean('a') == 20.0 and progress.mean('c') == pytest.approx(100 / 3)
    assert progress.line(['a', 'b', 'c']) == '1/5 runs done, mean run 0:00:33, ETA 0:01:53'
    assert study.Progress(3, 0).line(['a']) == '0/3 runs done, mean run unknown, ETA unknown'
    two = study.Progress(total=5, done=1, times={'a': [10.0, 30.0], 'b': [60.0]}, jobs=2)
    assert two.line(['a', 'b', 'c']) == '1/5 runs done, mean run 0:00:33, ETA 0:00:57'  # two runs at a time
    progress.finished({'name': 'b', 'seed': 0, 'overrides': {LR: 0.1}, 'status': 'ok', 'wall_seconds': 60.0,
                       'metrics': {'test_acc1': 90.0, 'best_val_acc1': 91.0}, 'phase': 'final'}, ['b'])
    assert out.getvalue() == '[2/5 runs done, mean run 0:00:40, ETA 0:01:00] final b seed=0 lr=0.1: ok val 91.00 ' \
                             'test 90.00 (60.0 s)\n'


def test_records_are_appended_atomically_and_concurrently(tmp_path):
    path = tmp_path / 'r.jsonl'
    study.append_record({'key': 'a', 'status': 'failed'}, path)
    study.append_record({'key': 'a', 'status': 'ok'}, path)  # a retried run replaces its failed record
    threads = [threading.Thread(target=study.append_record, args=({'key': f'k{i}', 'status': 'ok'}, path))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = study.load_records(path)
    assert records[0] == {'key': 'a', 'status': 'ok'} and len(records) == 17
    assert not list(tmp_path.glob('.*')) and not list(tmp_path.glob('*.lock'))  # nothing left beside the records
    study.append_record({'key': 'k3', 'status': 'ok', 'wall_seconds': 9.0}, path)  # a copy: nothing changes
    assert study.load_records(path) == records
    with pytest.raises(study.RecordError, match=r'r.jsonl:\d+: run k3 \(None seed=None\) is recorded there with '
                                                r'another result \(ok\); the new one \(diverged\) is not written'):
        study.append_record({'key': 'k3', 'status': 'diverged'}, path)
    assert study.load_records(path) == records



# -- hostile record files and specs (issue 23) ---------------------------------------------------
@pytest.fixture
def studied(workspace, monkeypatch):
    """The toy study, run to the end with fake runs: (spec path, record file)."""
    monkeypatch.setattr(runner, '_execute', _fake_execute)
    spec = _spec(workspace)
    study.run_study(study.load_study(spec), stream=io.StringIO())
    return spec, workspace / 'toy.jsonl'


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err  # one line, no traceback
    return err


def test_a_second_record_of_a_run_with_other_results_is_an_error_naming_both_lines(studied, capsys):
    spec, path = studied
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if json.loads(line)['phase'] == 'final')
    record = json.loads(lines[number - 1])
    forged = dict(record, metrics=dict(record['metrics'], test_acc1=40.06), wall_seconds=1.0)
    path.write_text('\n'.join(lines + [json.dumps(forged)]) + '\n')
    for argv in (['report', '--study', str(spec)], ['report', '--out', str(path)]):
        assert ablate.main(argv) == 1  # not a table in which 40.06 silently replaced the first result
        err = _one_error_line(capsys)
        assert f'{path}:{number} and line {len(lines) + 1}: two records of run {record["key"]}' in err
        assert f'test_acc1 {record["metrics"]["test_acc1"]}' in err and 'test_acc1 40.06' in err
    with pytest.raises(study.RecordError, match='with different results'):
        study.run_study(study.load_study(spec), stream=io.StringIO())
    # across files too: the same run in two record files given to one report
    other = path.with_name('other.jsonl')
    other.write_text(json.dumps(forged) + '\n')
    path.write_text('\n'.join(lines) + '\n')
    assert ablate.main(['report', '--out', str(path), str(other)]) == 1
    assert f'{path}:{number} and {other}:1: two records of run' in _one_error_line(capsys)


def test_a_copy_of_a_record_collapses_and_a_failed_attempt_yields_to_its_retry(studied, capsys):
    spec, path = studied
    capsys.readouterr()
    lines = path.read_text().splitlines()
    copy = json.loads(lines[5])
    copy['wall_seconds'], copy['metrics']['train_seconds'], copy['finished'] = 99.0, 98.0, '2030-01-01T00:00:00Z'
    failed = dict(json.loads(lines[-1]), status='failed', metrics={}, error='killed')
    path.write_text('\n'.join([json.dumps(failed)] + lines + [json.dumps(copy)]) + '\n')
    assert len(study.load_records(path)) == 24  # the same run timed twice is one run
    assert ablate.main(['report', '--study', str(spec)]) == 0
    assert capsys.readouterr().out == EXPECTED


def test_an_incomplete_last_line_is_set_aside_with_one_warning_and_the_study_goes_on(studied, monkeypatch, capsys):
    spec, path = studied
    capsys.readouterr()
    text = path.read_text()
    path.write_text(text + '{"config": "kd.yaml", "key": "abc", "metri')  # kill -9 during an append
    assert ablate.main(['report', '--study', str(spec)]) == 0
    captured = capsys.readouterr()
    assert captured.out == EXPECTED
    warnings = [line for line in captured.err.splitlines() if 'WARNING' in line]
    assert len(warnings) == 1 and f'{path}:25: incomplete last line' in warnings[0], captured.err
    calls = []
    monkeypatch.setattr(runner, '_execute', lambda *a: calls.append(a) or _fake_execute(*a))
    study.run_study(study.load_study(spec), stream=io.StringIO())  # goes on: nothing to train
    assert calls == [] and path.read_text().endswith('"metri')
    study.append_record({'key': 'new', 'status': 'ok', 'metrics': {}}, path)  # the next append sets it aside
    assert path.read_text() == text + json.dumps({'key': 'new', 'metrics': {}, 'status': 'ok'}, sort_keys=True) + '\n'
    assert path.with_name('toy.jsonl.incomplete').read_text() == '{"config": "kd.yaml", "key": "abc", "metri\n'


@pytest.mark.parametrize('damage,message', [
    (lambda line: line[:40], r':3: not a JSON record \(.*\); only the last line may be incomplete'),
    (lambda line: json.dumps([json.loads(line)]), r':3: a record must be a JSON object \{\.\.\.\}, got a JSON list'),
    (lambda line: line.replace('"test_acc1": ', '"test_acc1": NaN, "x": '),
     r':3: non-finite metrics \(test_acc1: nan\)'),
    (lambda line: line.replace('"best_val_acc1": ', '"best_val_acc1": Infinity, "x": '),
     r':3: non-finite metrics \(best_val_acc1: inf\)'),
])
def test_a_damaged_line_is_a_one_line_error_naming_file_and_line(studied, capsys, damage, message):
    spec, path = studied
    lines = path.read_text().splitlines()
    lines[2] = damage(lines[2])
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(study.RecordError, match=re.escape(str(path)) + message):
        study.load_records(path)
    capsys.readouterr()
    for argv in (['report', '--study', str(spec)], ['report', '--out', str(path)], ['study', str(spec), '--dry_run']):
        assert ablate.main(argv) == 1
        assert re.match(r'error: ' + re.escape(str(path)) + message, _one_error_line(capsys))


def test_a_run_with_non_finite_metrics_is_recorded_as_diverged(tmp_path, monkeypatch):
    def fake_train(argv):
        metrics = argv[argv.index('--metrics_json') + 1]
        Path(metrics).write_text(json.dumps({'test': {'acc1': 50.0, 'loss': math.nan}, 'best_val_acc1': 51.0}))
        return 0, ''

    monkeypatch.setattr(runner, '_train_in_process', fake_train)
    result = runner._execute('c.yaml', 0, {}, tmp_path, 'cpu', False)
    assert result == {'status': 'diverged', 'metrics': {}, 'error': 'non-finite metrics: test_loss nan'}


def test_a_spec_with_a_yaml_syntax_error_or_shared_seeds_is_a_one_line_error(workspace, capsys):
    spec = _spec(workspace)
    text = json.loads(spec.read_text())
    bad = workspace / 'bad.yaml'
    bad.write_text('study: toy\nseeds: [0, 1\nselect_seeds: [100]\npairs: {}\n')
    with pytest.raises(study.StudyError, match=r"bad.yaml:3: not valid YAML: expected ',' or '\]', but got "
                                               r"':' \(while parsing a flow sequence at line 2\)"):
        study.load_study(bad)
    assert ablate.main(['report', '--study', str(bad)]) == 1
    assert re.match(r'error: .*bad.yaml:3: not valid YAML: ', _one_error_line(capsys))
    assert ablate.main(['study', str(bad), '--dry_run']) == 1
    _one_error_line(capsys)
    shared = dict(text, select_seeds=[100, 1], seeds=[0, 1, 2])
    bad.write_text(json.dumps(shared))
    assert ablate.main(['study', str(bad), '--dry_run']) == 1
    err = _one_error_line(capsys)
    assert 'pairs.toy: select_seeds [100, 1] and seeds [0, 1, 2] share [1]; selection seeds must be disjoint' in err
    shared = json.loads(json.dumps(text))
    shared['pairs']['toy']['seeds'] = [100, 101, 5]  # a pair's own seeds against the top level's selection seeds
    bad.write_text(json.dumps(shared))
    with pytest.raises(study.StudyError, match=r'pairs.toy: select_seeds \[100, 101\] and seeds \[100, 101, 5\] '
                                               r'share \[100, 101\]'):
        study.load_study(bad)


def test_a_run_is_forced_over_what_a_killed_attempt_left(tmp_path, monkeypatch):
    """A killed run leaves its hash-named checkpoints in the workdir: the next attempt passes --force (in
    process and as a subprocess); the files are deleted when the run ends."""
    import subprocess
    seen = []
    workdir = tmp_path / 'work'
    workdir.mkdir()

    def fake_train(argv):
        seen.append(argv)
        Path(argv[argv.index('--metrics_json') + 1]).write_text(json.dumps({'test': {'acc1': 50.0}}))
        return 0, ''

    def fake_run(argv, **kwargs):
        seen.append(argv[:3])
        fake_train(argv[3:])
        return subprocess.CompletedProcess(argv, 0, '', '')

    monkeypatch.setattr(runner, '_train_in_process', fake_train)
    monkeypatch.setattr(subprocess, 'run', fake_run)
    stem = runner._execute('c.yaml', 0, {LR: 0.1}, workdir, 'cpu', False) and seen[0][seen[0].index('--dst_ckpt') + 1]
    Path(stem).write_bytes(b'left by a killed attempt')
    assert runner._execute('c.yaml', 0, {LR: 0.1}, workdir, 'cpu', True)['status'] == 'ok'
    assert seen[1] == [sys.executable, '-m', 'opdf_torchdistill.cli.train'] and seen[2] == seen[0]
    assert '--force' in seen[0] and '--resume' not in seen[0]
    assert not list(workdir.iterdir())  # the run's files are deleted when it ends


def test_study_spec_errors_name_the_key(workspace):
    spec = json.loads(_spec(workspace).read_text())
    bad = workspace / 'bad.yaml'
    for edit, message in (
            (lambda s: s.update(seed=[1]), r"unknown keys \['seed'\]"),
            (lambda s: s['pairs']['toy']['arms']['kd'].update(config='missing.yaml'), 'missing.yaml does not exist'),
            (lambda s: s.update(baseline='teacher'), r"baseline 'teacher' is not an arm \(arms: \['kd', 'opdf'\]\)"),
            (lambda s: s['pairs']['toy']['arms']['kd'].update(grid={LR: []}), 'grid must map override keys'),
            (lambda s: s.update(seeds=[0, 0]), 'seeds must be a non-empty list of distinct integers')):
        broken = json.loads(json.dumps(spec))
        edit(broken)
        bad.write_text(json.dumps(broken))
        with pytest.raises((study.StudyError, FileNotFoundError), match=message):
            study.load_study(bad)
    with pytest.raises(study.StudyError, match=r"no pairs \['cnn'\]; pairs: \['toy'\]"):
        study.run_study(study.load_study(_spec(workspace)), ['cnn'], dry_run=True)


def test_the_fashion_study_plans_every_arm(capsys):
    fashion = study.load_study(ROOT / 'configs' / 'fashion' / 'study.yaml')
    out = io.StringIO()
    study.run_study(fashion, dry_run=True, stream=out)
    assert re.search(r"pairs \['cnn', 'cnn_at', 'vit'\], phase all: \d+/139 runs done", out.getvalue())
    for pair in fashion.pairs:
        plan = study.study_plan(fashion, pair, [])
        assert len(plan['select']) == (9 if pair.name == 'cnn_at' else 30)
        assert plan['unplanned'] == [a.name for a in pair.arms for _ in pair.seeds]
        assert len({t.identity.key for t in plan['select']}) == len(plan['select'])  # every run has its own key


@pytest.mark.parametrize('folder', ['v0.1', '.'])
def test_committed_digits_table_is_reproduced_from_its_records(capsys, folder):
    """The README's digits table, byte for byte, from the committed records: the first release's
    (written before config hashing, still readable) and the current one (hashed, none stale)."""
    results = ROOT / 'docs' / 'results' / folder
    records = results / 'records'
    expected = (results / 'digits_tuned.txt').read_text()
    argv = ['report', '--out', str(records / 'digits_a.jsonl'), str(records / 'digits_b.jsonl'), '--only',
            'student_ce', 'kd', 'kd_svd', 'kd_mpo', 'kd_opdf', 'at', 'at_opdf', '--tune', LR, LAMBDA, '--baseline', 'kd']
    assert ablate.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == expected
    if folder == 'v0.1':
        assert 'written before config hashing' in captured.err
    else:
        assert 'stale' not in captured.err.lower() and 'before config hashing' not in captured.err


def test_prepare_resumes_an_interrupted_teacher_instead_of_reusing_its_best_checkpoint(tmp_path, monkeypatch, capsys):
    import subprocess
    import torch
    config = tmp_path / 'teacher.yaml'
    dst = tmp_path / 'runs' / 'teacher.pt'
    config.write_text(f"models: {{model: {{key: 'net', dst_ckpt: '{dst}'}}}}\ntrain: {{num_epochs: 3}}\n")
    last = dst.with_name('teacher.last.pt')
    assert study.teacher_state(str(config)) == ('missing', str(dst))
    dst.parent.mkdir()
    torch.save({'model': {}}, dst)  # the best checkpoint is written from the first epoch on
    torch.save({'epoch': 1}, last)
    assert study.teacher_state(str(config))[0] == 'resume'
    calls = []

    def fake_run(argv, stdout, stderr):
        calls.append(argv)
        metrics = argv[argv.index('--metrics_json') + 1]
        with open(metrics, 'w') as f:
            json.dump({'test': {'acc1': 91.5}}, f)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, 'run', fake_run)
    study.prepare_teachers([str(config)], 'cpu', 1, jobs=2)
    assert len(calls) == 1 and calls[0][-1] == '--resume' and calls[0][calls[0].index('--threads') + 1] == '1'
    out = capsys.readouterr().out
    assert 'resuming' in out and 'unfinished' in out and 'test acc@1 91.50' in out
    torch.save({'epoch': 3}, last)
    assert study.teacher_state(str(config))[0] == 'done'
    study.prepare_teachers([str(config)], 'cpu', 1)
    assert len(calls) == 1 and 'training finished), reused' in capsys.readouterr().out
    last.unlink()  # a teacher given by the user (no .last.pt): reused as it is
    assert study.teacher_state(str(config))[0] == 'done'
    dst.unlink()
    torch.save({'epoch': 2}, last)  # killed before its first best checkpoint was renamed into place: resumed
    assert study.teacher_state(str(config)) == ('resume', str(dst))
    torch.save({'epoch': 3}, last)  # finished, best checkpoint deleted since: trained, never forced over it
    assert study.teacher_state(str(config)) == ('missing', str(dst))
    study.prepare_teachers([str(config)], 'cpu', 1)
    assert len(calls) == 2 and '--resume' not in calls[1] and '--force' not in calls[1]
    last.unlink()

    monkeypatch.setattr(subprocess, 'run', lambda argv, stdout, stderr: (
        stdout.write('Traceback ...\nRuntimeError: out of memory\n'), subprocess.CompletedProcess(argv, 1))[1])
    with pytest.raises(study.StudyError, match=r'teacher training failed \(exit status 1\)(.|\n)*out of memory'):
        study.prepare_teachers([str(config)], 'cpu')


def test_committed_fashion_tables_are_reproduced_from_their_records(capsys, monkeypatch):
    """The README's Fashion-MNIST tables, byte for byte, from the committed records (none stale)."""
    monkeypatch.chdir(ROOT)  # the spec's paths are relative to the repository root
    expected = (ROOT / 'docs' / 'results' / 'fashion.md').read_text()
    assert ablate.main(['report', '--study', str(ROOT / 'configs' / 'fashion' / 'study.yaml')]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected and 'stale' not in captured.err.lower() and 'missing' not in captured.out
    assert expected in (ROOT / 'README.md').read_text()


def test_the_study_package_does_not_import_the_command_line_layer():
    """``opdf_torchdistill/study`` imports ``opdf_torchdistill.cli`` nowhere at module level; the runner
    starts the trainer as a program, and its rule for the resume checkpoint is the trainer's."""
    import ast
    from opdf_torchdistill.cli.train import last_ckpt_path
    eager = []
    for path in sorted((ROOT / 'opdf_torchdistill' / 'study').glob('*.py')):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                ['.' * node.level + (node.module or '')] if isinstance(node, ast.ImportFrom) else []
            eager += [f'{path.name}: {n}' for n in names if n.startswith(('..cli', 'opdf_torchdistill.cli'))]
    assert not eager, eager
    for dst in ('runs/teacher.pt', '~/t/x.pth', 'a.b/c'):
        assert runner._last_ckpt_path(dst) == last_ckpt_path(dst)
