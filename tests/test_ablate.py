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
    # a declared family of 3 with one p-value so far: corrected as one of 3 (x3), not alone
    adjusted = study.holm([0.02, math.nan, math.nan], family_size=3)
    assert adjusted[0] == pytest.approx(0.06) and math.isnan(adjusted[1]) and math.isnan(adjusted[2])
    assert study.holm([0.01, 0.04], family_size=3) == pytest.approx([0.03, 0.08])
    with pytest.raises(ValueError, match='family_size 1 is smaller than the 2 p-values'):
        study.holm([0.01, 0.04], family_size=1)


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
    """The digits table (``digits_tuned.txt``, on the digits results page), byte for byte, from the committed
    records: the first release's
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
    """The Fashion-MNIST tables of the results page, byte for byte, from the committed records (none stale):
    ``docs/results/fashion.md`` is the one copy, and ``docs/results-fashion.md`` includes it as it is
    (tests/test_docs.py checks every row in the built page)."""
    monkeypatch.chdir(ROOT)  # the spec's paths are relative to the repository root
    expected = (ROOT / 'docs' / 'results' / 'fashion.md').read_text()
    assert ablate.main(['report', '--study', str(ROOT / 'configs' / 'fashion' / 'study.yaml')]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected and 'stale' not in captured.err.lower() and 'missing' not in captured.out
    assert '\n--8<-- "docs/results/fashion.md"\n' in (ROOT / 'docs' / 'results-fashion.md').read_text()


def test_committed_confirmatory_tables_are_reproduced_from_their_records(capsys, monkeypatch):
    """The confirmatory study's tables (``docs/results/fashion_confirm.md``, included by
    ``docs/results-confirm.md``), byte for byte from the committed records, none stale: regenerated
    whenever records are committed, while the study runs and after."""
    monkeypatch.chdir(ROOT)
    expected = (ROOT / 'docs' / 'results' / 'fashion_confirm.md').read_text()
    assert ablate.main(['report', '--study', str(ROOT / 'configs' / 'fashion' / 'confirm' / 'study.yaml')]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected and 'stale' not in captured.err.lower()
    assert '\n--8<-- "docs/results/fashion_confirm.md"\n' in (ROOT / 'docs' / 'results-confirm.md').read_text()


def test_confirmatory_alignment_acts_from_the_first_step_in_every_recorded_run():
    """Issue 19: in the confirmatory study's ViT pair (Theseus: student block i starts from teacher block i
    and aligns to block 2i+1) the alignment term is not zero at the start. Every recorded run of an
    aligned arm, in both pairs, has a first-step alignment gradient above 0, proportional to its weight
    (the same seed and state: gradient / weight is one number), and the ViT's are marked as not
    starting at distance 0."""
    checked = {}
    for pair in ('cnn', 'vit'):
        records = [r for r in study.load_records(ROOT / 'docs' / 'results' / 'records' / f'fashion_confirm_{pair}.jsonl')
                   if r['name'] in ('kd_opdf', 'kd_opdf_random') and r['status'] == 'ok']
        per_weight = {}
        for r in records:
            weight = r['overrides']['train.criterion.kwargs.sub_terms.opdf.weight']
            norm = r['metrics']['grad_norms']['opdf']
            assert norm > 0, (pair, r['key'])
            per_weight.setdefault((r['name'], r['seed']), []).append(norm / weight)
            if pair == 'vit':
                alignment = r['metrics']['alignment']
                assert alignment['alignment_starts_at_zero'] is False and alignment['initial_relative_distance'] > 1
                assert alignment['aligned_param_share'] == 1.0
        for ratios in per_weight.values():
            assert max(ratios) == pytest.approx(min(ratios), rel=1e-5)
        checked[pair] = {name: sum(1 for r in records if r['name'] == name) for name in ('kd_opdf', 'kd_opdf_random')}
    assert checked['cnn'] == {'kd_opdf': 30, 'kd_opdf_random': 20}  # 10 selection + 20 final; 20 final
    assert checked['vit'] == {'kd_opdf': 25, 'kd_opdf_random': 15}  # 10 selection + 15 final; 15 final


def test_the_confirmatory_study_is_complete_under_its_unchanged_preregistration(monkeypatch):
    """Issue 19's records: every run the pre-registration declares (selection points at both selection
    seeds, edge extensions, 20 final seeds per CNN arm and 15 per ViT arm) has a record, and the spec is
    byte for byte the file committed before the first run (f21c553): no deviation. A later edit of the
    spec has to change this test, and be reported as a deviation."""
    import hashlib
    monkeypatch.chdir(ROOT)
    path = ROOT / 'configs' / 'fashion' / 'confirm' / 'study.yaml'
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        'facbf915d52e9c36c65cd47019cb05ff4f89c082ad14084bf73a6d5a2a3f9b65'
    assert '# Deviations: none yet.' in path.read_text()
    confirm = study.load_study(path)
    finals = {}
    for pair in confirm.pairs:
        plan = study.study_plan(confirm, pair, study.load_records(pair.records))
        assert plan['waiting'] == [] and plan['unplanned'] == []
        planned = {t.identity.key for t in plan['select'] + plan['final']}
        assert plan['done'] == planned, (pair.name, len(planned - plan['done']))
        finals[pair.name] = (len(plan['select']), len(plan['final']))
    assert finals == {'cnn': (50, 120), 'vit': (52, 90)}  # one edge extension: CNN kd_opdf; two: ViT ce, kd_opdf


def test_report_tables_prints_the_chosen_sections_as_the_full_report_prints_them(capsys, monkeypatch):
    """``report --study SPEC --tables contrasts`` (what a README quotes) is, byte for byte, the contrasts
    sections of the full report; any choice of tables is the full report's sections in report order."""
    monkeypatch.chdir(ROOT)
    spec = str(ROOT / 'configs' / 'fashion' / 'confirm' / 'study.yaml')

    def report(*extra):
        assert ablate.main(['report', '--study', spec, *extra]) == 0
        return capsys.readouterr().out

    full = report()
    sections = re.split(r'(?=^#### )', full, flags=re.M)
    kinds = ['contrasts' if ': contrasts (' in t else 'tuning' if ': tuning budget' in t else
             'final' if ': test accuracy at' in t else 'selection' for t in sections if t]
    assert kinds == ['selection', 'tuning', 'final', 'contrasts'] * 2
    for chosen in (['contrasts'], ['final', 'selection'], ['tuning']):
        expected = ''.join(t for t, kind in zip([t for t in sections if t], kinds) if kind in chosen)
        assert report('--tables', *chosen) == expected.rstrip('\n') + ('\n' if full.endswith('\n') else '')
    with pytest.raises(SystemExit):
        ablate.main(['report', '--study', spec, '--tables', 'contrast'])
    assert 'invalid choice' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='--tables applies to --study reports only'):
        ablate.main(['report', '--out', 'x.jsonl', '--tables', 'contrasts'])
    with pytest.raises(ValueError, match='valid are selection, tuning, final, contrasts'):
        study.study_tables(study.load_study(spec), {}, sections=['everything'])


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


# -- pre-registered protocol (issue 19): mean over selection seeds, edge rule, inherit, contrasts ------
def _select_spec(workspace, arms, edge_rule=None, contrasts=None, select_seeds=(100, 101), seeds=(0, 1, 2)):
    """A one-pair spec over the workspace's configs (``arms``: name -> arm spec, config = NAME.yaml)."""
    for name in arms:
        if not (workspace / f'{name}.yaml').exists():
            (workspace / f'{name}.yaml').write_text(CONFIG.format(teacher=workspace / 'teacher.pt', name=name))
    pair = {'title': 'Protocol pair', 'records': str(workspace / 'protocol.jsonl'),
            'arms': {name: {'config': str(workspace / f'{name}.yaml'), **arm} for name, arm in arms.items()}}
    if contrasts is not None:
        pair['contrasts'] = contrasts
    spec = {'study': 'protocol', 'workdir': str(workspace / 'work'), 'select_seeds': list(select_seeds),
            'seeds': list(seeds), 'labels': {LR: 'lr', LAMBDA: 'lambda'}, 'pairs': {'p': pair}}
    if edge_rule is not None:
        spec['edge_rule'] = edge_rule
    path = workspace / 'protocol.yaml'
    path.write_text(json.dumps(spec))
    return study.load_study(path)


def _finder(score):
    """A ``find`` over synthetic records: ``score(arm, overrides, seed)`` -> validation accuracy, 'diverged',
    or None (no record)."""
    def find(name, overrides, seed, ident):
        value = score(name, overrides, seed)
        if value is None:
            return None
        if value == 'diverged':
            return {'status': 'diverged', 'metrics': {}}
        return {'status': 'ok', 'metrics': {'best_val_acc1': value}}
    return find


def _select(spec, score):
    return study.select_settings(spec.pairs[0], _finder(score), lambda arm, overrides, seed: None)


def test_selection_scores_a_point_by_its_mean_over_all_selection_seeds(workspace):
    spec = _select_spec(workspace, {'kd': {'grid': {LR: [0.05, 0.1, 0.2]}},
                                    'opdf': {'grid': {LR: [0.05, 0.1, 0.2]}}})
    by_seed = {100: {0.05: 90.0, 0.1: 80.0, 0.2: 84.0}, 101: {0.05: 70.0, 0.1: 85.0, 0.2: 81.0}}

    def score(name, overrides, seed):
        if name == 'opdf' and overrides[LR] == 0.1 and seed == 101:
            return 'diverged'  # the best mean of opdf, had it finished
        return by_seed[seed][overrides[LR]] + (10.0 if name == 'opdf' and overrides[LR] == 0.1 else 0.0)

    sel = _select(spec, score)
    # means 80.0, 82.5, 82.5: not seed 100's winner (0.05); the tie goes to the first in grid order
    assert [e['val'] for e in sel['kd']['points']] == [80.0, 82.5, 82.5]
    assert sel['kd']['selected'] == {LR: 0.1} and sel['kd']['state'] == 'selected' and sel['kd']['budget'] == 3
    assert sel['opdf']['selected'] == {LR: 0.2} and math.isnan(sel['opdf']['points'][1]['val'])
    # one seed missing anywhere: nothing is selected yet
    sel = _select(spec, lambda name, overrides, seed: None if (name, overrides[LR], seed) == ('kd', 0.2, 101)
                  else score(name, overrides, seed))
    assert sel['kd']['selected'] is None and sel['kd']['state'] == 'selecting' and sel['opdf']['selected'] == {LR: 0.2}
    # every point with a diverged seed: nothing is ever selected
    sel = _select(spec, lambda name, overrides, seed: 'diverged' if seed == 101 else 80.0)
    assert sel['kd']['selected'] is None and sel['kd']['state'] == 'diverged' and sel['kd']['complete']


def test_extension_values_step_geometrically_beyond_the_end_the_winner_sits_at():
    lrs = [0.025, 0.05, 0.1, 0.2, 0.4]
    assert study.extension_value(lrs, 0.4) == 0.8 and study.extension_value(lrs, 0.025) == 0.0125
    assert study.extension_value(lrs, 0.1) is None and study.extension_value(lrs, 0.3) is None
    assert study.extension_value([0.00025, 0.0005, 0.001, 0.002, 0.004], 0.004) == 0.008
    assert study.extension_value([0.1, 0.3, 1.0, 3.0], 3.0) == 9.0
    assert study.extension_value([0.1, 0.3, 1.0, 3.0], 0.1) == 0.0333333  # 6 significant digits
    assert study.extension_value([0.4, 0.2, 0.1], 0.4) == 0.8  # by value, whatever the order
    assert study.extension_value([1, 2, 4], 4) == 8 and isinstance(study.extension_value([1, 2, 4], 4), int)
    assert study.extension_value([1, 2, 4], 1) is None  # 0.5 rounds to 0: no integer step
    assert study.extension_value([0.0, 0.1, 1.0], 0.0) is None  # no ratio from a zero
    assert study.extension_value([0.0, 0.1, 1.0], 1.0) == 10.0
    assert study.extension_value(['sgd', 'adam'], 'adam') is None and study.extension_value([True, False], True) is None
    assert study.extension_value([0.1], 0.1) is None  # one value: no end to step from


def test_edge_rule_extends_a_winner_at_an_edge_once_in_its_direction(workspace):
    lrs = [0.025, 0.05, 0.1, 0.2, 0.4]
    spec = _select_spec(workspace, {'kd': {'grid': {LR: lrs}}, 'ce': {'grid': {LR: lrs}},
                                    'opdf': {'grid': {LR: lrs, LAMBDA: [0.1, 0.3, 1.0, 3.0]}}}, edge_rule='extend_once')
    assert spec.edge_rule == 'extend_once' and spec.pairs[0].edge_rule == 'extend_once'
    peaks, lambdas = {'kd': 0.4, 'ce': 0.1}, [0.1, 0.3, 1.0, 3.0]

    def score(opdf_peak=(0.4, 3.0), kd_beyond=-5.0, recorded=True):
        """kd peaks at 0.4 (90.0) and scores 90 + kd_beyond beyond the grid; ce at 0.1; opdf at opdf_peak."""
        def f(name, overrides, seed):
            lr, lam = overrides[LR], overrides.get(LAMBDA)
            beyond = lr not in lrs or (lam is not None and lam not in lambdas)
            if beyond and not recorded:
                return None
            if name == 'opdf':
                return 90.0 - abs(math.log(lr / opdf_peak[0])) - abs(math.log(lam / opdf_peak[1])) + seed % 2
            return 90.0 + kd_beyond if beyond else 90.0 - abs(math.log(lr / peaks[name]))
        return f

    # the grid's winners: kd at the upper end, ce inside, opdf at the upper end of both keys
    sel = _select(spec, score(recorded=False))
    assert sel['kd']['state'] == 'extending' and sel['kd']['selected'] is None
    assert [e['own'] for e in sel['kd']['extensions']] == [{LR: 0.8}] and sel['kd']['budget'] == 6
    assert sel['ce']['state'] == 'selected' and sel['ce']['extensions'] == [] and sel['ce']['selected'] == {LR: 0.1}
    assert sel['ce']['edge'] == [] and sel['ce']['budget'] == 5
    # two keys at an edge: one extension per key, the other key at the winner's value
    assert [(e['extension'], e['own']) for e in sel['opdf']['extensions']] == [
        (LR, {LR: 0.8, LAMBDA: 3.0}), (LAMBDA, {LR: 0.4, LAMBDA: 9.0})]
    # the extension is better (kd: +5 beyond the grid): it wins, flagged as an edge, and is not extended again
    sel = _select(spec, score(kd_beyond=5.0))
    assert sel['kd']['selected'] == {LR: 0.8} and sel['kd']['edge'] == [LR]
    assert [e['own'] for e in sel['kd']['extensions']] == [{LR: 0.8}] and len(sel['kd']['points']) == 6
    # the extension is worse: the grid's winner stays, no longer at an edge of the extended grid
    sel = _select(spec, score(kd_beyond=-5.0))
    assert sel['kd']['selected'] == {LR: 0.4} and sel['kd']['edge'] == []
    # the lower end: the step goes down; only the key at an edge is extended
    sel = _select(spec, score(opdf_peak=(0.025, 1.0)))
    assert [e['own'] for e in sel['opdf']['extensions']] == [{LR: 0.0125, LAMBDA: 1.0}]
    # a tie with the grid's winner keeps the grid's winner (extensions come after the grid)
    sel = _select(spec, score(kd_beyond=0.0))
    assert sel['kd']['points'][5]['val'] == sel['kd']['points'][4]['val'] and sel['kd']['selected'] == {LR: 0.4}
    # without the edge rule: no extension, the edge is only flagged
    plain = _select_spec(workspace, {'kd': {'grid': {LR: lrs}}})
    sel = _select(plain, score())
    assert sel['kd']['extensions'] == [] and sel['kd']['selected'] == {LR: 0.4} and sel['kd']['edge'] == [LR]


_NOISE = [0.3, -0.2, 0.1, -0.4, 0.25, -0.05, 0.15, -0.3]


def _protocol_execute(config, seed, overrides, workdir, device, isolate, threads=None):
    """mpo's validation accuracy rises with lr up to the grid's end 0.4 and falls beyond (0.8); opdf's
    rises with lambda beyond the grid (9.0 is best); ce peaks inside its grid. Test accuracy: opdf is
    mpo + 2 (different), rand is opdf within +-0.05 (equivalent), mpo - ce is noise of +-1 (inconclusive)."""
    name = config.rsplit('/', 1)[-1].split('.')[0]
    lr, lam = overrides.get(LR, 0.1), overrides.get(LAMBDA, 0.0)
    if seed >= 100:  # selection: validation only matters
        val = {'ce': lambda: 88.0 - abs(math.log(lr / 0.1)), 'mpo': lambda: 88.0 - abs(math.log(lr / 0.5)),
               'opdf': lambda: 86.0 + math.log(lam) - abs(math.log(lr / 0.4))}[name]() + 0.1 * (seed - 100)
        test = val
    else:
        base = 85.0 + _NOISE[seed]
        test = {'ce': base + 3 * _NOISE[(seed + 3) % 8], 'mpo': base, 'opdf': base + 2.0 + 0.1 * _NOISE[seed + 1],
                'rand': base + 2.0 + 0.1 * _NOISE[seed + 1] + (0.05 if seed % 2 else -0.05)}[name]
        val = test + 1.0
    return {'status': 'ok', 'error': None, 'metrics': {
        'test_acc1': round(test, 4), 'best_val_acc1': round(val, 4), 'train_params': 20 if name != 'ce' else 10,
        'inference_params': 10, 'ratio': 2.0 if name != 'ce' else 1.0, 'train_seconds': 1.0}}


PROTOCOL_ARMS = {'ce': {'grid': {LR: [0.025, 0.05, 0.1, 0.2, 0.4]}},
                 'mpo': {'grid': {LR: [0.025, 0.05, 0.1, 0.2, 0.4]}},
                 'opdf': {'inherit': 'mpo', 'grid': {LAMBDA: [0.1, 0.3, 1.0, 3.0]}},
                 'rand': {'inherit': 'opdf'}}
PROTOCOL_EXPECTED = """#### Protocol pair: selection on validation (seeds 100, 101)

| arm | lr | lambda | val acc@1 (%) | selected |
|---|---|---|---|---|
| ce | 0.025 | - | 86.66 |  |
| ce | 0.05 | - | 87.36 |  |
| ce | 0.1 | - | 88.05 | yes |
| ce | 0.2 | - | 87.36 |  |
| ce | 0.4 | - | 86.66 |  |
| mpo | 0.025 | - | 85.05 |  |
| mpo | 0.05 | - | 85.75 |  |
| mpo | 0.1 | - | 86.44 |  |
| mpo | 0.2 | - | 87.13 |  |
| mpo | 0.4 | - | 87.83 | yes |
| mpo | 0.8 (ext) | - | 87.58 |  |
| opdf | 0.4 | 0.1 | 83.75 |  |
| opdf | 0.4 | 0.3 | 84.85 |  |
| opdf | 0.4 | 1.0 | 86.05 |  |
| opdf | 0.4 | 3.0 | 87.15 |  |
| opdf | 0.4 | 9.0 (ext) | 88.25 | yes |
| rand | 0.4 | 9.0 | inherited from opdf | yes |

#### Protocol pair: tuning budget per arm

| arm | grid | points tuned | inherited | selected | val acc@1 (%) | edge |
|---|---|---|---|---|---|---|
| ce | lr: 0.025, 0.05, 0.1, 0.2, 0.4 | 5 | - | lr=0.1 | 88.05 |  |
| mpo | lr: 0.025, 0.05, 0.1, 0.2, 0.4, 0.8 (ext) | 6 (5 + 1 ext) | - | lr=0.4 | 87.83 |  |
| opdf | lambda: 0.1, 0.3, 1.0, 3.0, 9.0 (ext) | 5 (4 + 1 ext) | lr=0.4 from mpo | lambda=9.0 | 88.25 | edge (lambda) |
| rand | - | 0 | lr=0.4, lambda=9.0 from opdf | - | - |  |

Tuning budgets differ between arms (validation points each arm tuned itself, edge extensions included): ce 5, mpo 6, opdf 5 (+ lr from mpo), rand 0 (+ lr, lambda from opdf).

edge: the selected value is the lowest or highest of its grid (extensions included); a better value may lie beyond it.

#### Protocol pair: test accuracy at the selected setting (seeds 0, 1, 2, 3, 4, 5)

| arm | lr | lambda | n | test acc@1 (%) | 95 % CI | params x |
|---|---|---|---|---|---|---|
| ce | 0.1 | - | 6 | 84.97 | [84.27, 85.68] | 1.00 |
| mpo | 0.4 | - | 6 | 85.00 | [84.72, 85.28] | 2.00 |
| opdf | 0.4 | 9.0 | 6 | 87.00 | [86.73, 87.26] | 2.00 |
| rand | 0.4 | 9.0 | 6 | 87.00 | [86.78, 87.22] | 2.00 |

#### Protocol pair: contrasts (paired over the test seeds 0, 1, 2, 3, 4, 5)

| contrast | a - b | family | n | mean diff | 95 % CI | p (paired t) | p (Holm) | margin | p (TOST) | MDE (80 % power) | verdict |
|---|---|---|---|---|---|---|---|---|---|---|---|
| alignment | opdf - mpo | primary | 6 | +2.00 | [+1.97, +2.02] | <0.001 | <0.001 | +-0.5 | 1.000 | 0.03 | different |
| teacher | opdf - rand | primary | 6 | +0.00 | [-0.06, +0.06] | 1.000 | 1.000 | +-0.5 | <0.001 | 0.08 | equivalent |
| over-parameterization | mpo - ce | check | 6 | +0.03 | [-0.90, +0.95] | 0.947 | 0.947 | - | - | 1.25 | inconclusive |

Differences a - b in test accuracy points over the seeds both arms have; two-sided paired t-test; Holm correction within each family of this pair (comparisons per family: primary: 2, check: 1). TOST: the larger p of the two one-sided paired t-tests against -margin and +margin (Schuirmann 1987). Verdict: different if p (Holm) < 0.05, else equivalent if p (TOST) < 0.05, else inconclusive. MDE: the true difference the paired t-test detects with 80 % power at two-sided alpha 0.05, (t_0.975,n-1 + t_0.8,n-1) x SD / sqrt(n), from the observed SD of the differences.
"""
PROTOCOL_CONTRASTS = [{'name': 'alignment', 'arms': ['opdf', 'mpo'], 'family': 'primary', 'margin': 0.5},
                      {'name': 'teacher', 'arms': ['opdf', 'rand'], 'family': 'primary', 'margin': 0.5},
                      {'name': 'over-parameterization', 'arms': ['mpo', 'ce'], 'family': 'check'}]


def test_a_protocol_study_extends_inherits_resumes_and_reports(workspace, monkeypatch, capsys):
    """Rounds: the grids of ce and mpo (20 runs); mpo's edge extension lr 0.8 (2); opdf's lambda grid at
    mpo's lr (8); opdf's extension lambda 9.0 (2); rand tunes nothing; then 4 arms x 6 test seeds."""
    spec = _select_spec(workspace, PROTOCOL_ARMS, edge_rule='extend_once', contrasts=PROTOCOL_CONTRASTS,
                        seeds=range(6))
    pair = spec.pairs[0]
    calls = []

    def interrupted_after(n):
        def execute(*args):
            if len(calls) == n:
                raise KeyboardInterrupt  # a killed session: what was recorded stays
            calls.append(args)
            return _protocol_execute(*args)
        return execute

    plan = study.study_plan(spec, pair, [])
    assert len(plan['select']) == 20 and len(plan['waiting']) == 8 and plan['final'] == []
    assert [plan['selection'][a]['state'] for a in PROTOCOL_ARMS] == ['selecting', 'selecting', 'waiting', 'waiting']
    out = io.StringIO()
    study.run_study(spec, dry_run=True, stream=out)
    dry = out.getvalue()
    assert 'phase all: 0/52 runs done' in dry  # 20 + 8 waiting selection runs, 24 final runs (extensions unknown)
    assert "    opdf: waiting for mpo's selected setting (lr); then selection lambda (4) = 4 points x 2 seeds = 8 " \
           "runs; final 6 runs waiting" in dry
    assert "    rand: waiting for opdf's selected setting (lr, lambda); then no tuning of its own" in dry
    assert 'mpo: selection lr (5) = 5 points x 2 seeds: 10 runs (10 to go); edge extensions decided when the ' \
           'grid is done' in dry

    monkeypatch.setattr(runner, '_execute', interrupted_after(21))
    with pytest.raises(KeyboardInterrupt):
        study.run_study(spec, stream=io.StringIO())
    records = study.load_records(workspace / 'protocol.jsonl')
    assert len(records) == 21 and all(r['phase'] == 'select' for r in records)
    plan = study.study_plan(spec, pair, records)
    sel = plan['selection']
    assert sel['ce']['selected'] == {LR: 0.1} and sel['mpo']['state'] == 'extending'
    assert [e['own'] for e in sel['mpo']['extensions']] == [{LR: 0.8}] and len(plan['select']) == 22
    assert sel['opdf']['state'] == 'waiting' and sel['rand']['state'] == 'waiting' and len(plan['waiting']) == 8
    assert len(plan['final']) == 6 and len(plan['unplanned']) == 18  # ce's final runs are planned
    out = io.StringIO()
    study.run_study(spec, dry_run=True, stream=out)
    assert '; edge extension lr=0.8' in out.getvalue() and "opdf: waiting for mpo's" in out.getvalue()

    monkeypatch.setattr(runner, '_execute', interrupted_after(10 ** 6))
    out = io.StringIO()
    study.run_study(spec, stream=out)
    assert len(calls) == 20 + 2 + 8 + 2 + 24
    assert len({runner.canonical(c[:3]) for c in calls}) == len(calls)  # nothing trained twice
    selection_calls = [(c[0].rsplit('/', 1)[-1], c[2]) for c in calls if c[1] >= 100]
    assert selection_calls[20:22] == [('mpo.yaml', {LR: 0.8})] * 2  # the extension, before opdf's grid
    assert [o for _, o in selection_calls[22:30:2]] == [{LR: 0.4, LAMBDA: lam} for lam in (0.1, 0.3, 1.0, 3.0)]
    assert selection_calls[30:] == [('opdf.yaml', {LR: 0.4, LAMBDA: 9.0})] * 2
    finals = {(c[0].rsplit('/', 1)[-1], runner.canonical(c[2])) for c in calls if c[1] < 100}
    assert finals == {('ce.yaml', runner.canonical({LR: 0.1})), ('mpo.yaml', runner.canonical({LR: 0.4})),
                      ('opdf.yaml', runner.canonical({LR: 0.4, LAMBDA: 9.0})),
                      ('rand.yaml', runner.canonical({LR: 0.4, LAMBDA: 9.0}))}
    assert '[56/56 runs done' in out.getvalue()
    records = study.load_records(workspace / 'protocol.jsonl')
    assert len(records) == 56 and all(set(r) >= {'phase', 'pair'} and 'extension' not in r for r in records)
    study.run_study(spec, stream=io.StringIO())
    assert len(calls) == 56  # all recorded: nothing trains again

    # read mid-finals (two of opdf's final runs not recorded yet): the contrasts that need them give
    # numbers but no verdict, the complete one keeps its verdict, and the note counts what is missing
    path = workspace / 'protocol.jsonl'
    complete = path.read_text()
    lines = complete.splitlines(keepends=True)
    opdf_finals = [i for i, line in enumerate(lines) if json.loads(line)['phase'] == 'final'
                   and json.loads(line)['config'].endswith('opdf.yaml')]
    path.write_text(''.join(line for i, line in enumerate(lines) if i not in opdf_finals[-2:]))
    capsys.readouterr()
    assert ablate.main(['report', '--study', str(spec.path), '--tables', 'contrasts']) == 0
    partial = capsys.readouterr().out
    verdicts = {row.split(' | ')[0].lstrip('| '): row.rsplit(' | ', 1)[1].rstrip(' |')
                for row in partial.splitlines()[3:] if row.startswith('| ') and ' - ' in row.split(' | ')[1]}
    assert verdicts == {'alignment': 'incomplete', 'teacher': 'incomplete', 'over-parameterization': 'inconclusive'}
    assert 'incomplete: 2 declared final run(s) of these arms not recorded yet' in partial
    path.write_text(complete)

    capsys.readouterr()
    assert ablate.main(['report', '--study', str(spec.path), '--summary_json', str(workspace / 's.json')]) == 0
    first = capsys.readouterr()
    assert first.out == PROTOCOL_EXPECTED and first.err == ''
    assert ablate.main(['report', '--study', str(spec.path)]) == 0
    assert capsys.readouterr().out == PROTOCOL_EXPECTED  # the same bytes again
    rows = json.loads((workspace / 's.json').read_text())
    assert [r.get('arm') or r['contrast'] for r in rows] == ['ce', 'mpo', 'opdf', 'rand', 'alignment', 'teacher',
                                                             'over-parameterization']
    assert [r['verdict'] for r in rows[4:]] == ['different', 'equivalent', 'inconclusive']
    assert rows[2]['budget'] == 5 and rows[2]['inherit'] == 'mpo' and rows[2]['edge'] == [LAMBDA]

    from opdf_torchdistill.study import plots  # a pair with contrasts plots them (a forest plot), not vs baseline
    panels = []
    monkeypatch.setattr(plots, '_contrast_panel', lambda ax, declared, pair: panels.append((pair, declared)))
    assert ablate.main(['report', '--study', str(spec.path), '--plots', str(workspace / 'plots')]) == 0
    assert capsys.readouterr().out == PROTOCOL_EXPECTED
    assert (workspace / 'plots' / 'protocol.png').stat().st_size > 0
    assert [(pair, [r['contrast'] for r in declared]) for pair, declared in panels] == [
        ('p', ['alignment', 'teacher', 'over-parameterization'])]
    monkeypatch.undo()
    path = plots.plot_study(rows, {'p': 'Protocol pair'}, {'p': None}, workspace / 'plots' / 'real.png')
    assert path.stat().st_size > 0  # the real forest plot draws


def _tost_by_hand(diffs, margin):
    n, mean = len(diffs), sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) / math.sqrt(n)
    return max(stats.t.sf((mean + margin) / se, n - 1), stats.t.cdf((mean - margin) / se, n - 1))


def test_contrasts_holm_within_family_tost_and_verdicts_on_constructed_differences():
    seeds = range(10)
    noise = [0.31, -0.22, 0.13, -0.41, 0.27, -0.06, 0.18, -0.33, 0.09, 0.04]
    base = {s: 85.0 + noise[s] for s in seeds}
    shifted = {s: base[s] + 2.0 + 0.1 * noise[(s + 3) % 10] for s in seeds}  # clearly different
    close = {s: base[s] + 0.05 * noise[(s + 1) % 10] for s in seeds}  # clearly within +-0.5
    noisy = {s: base[s] + 0.2 + 3 * noise[(s + 5) % 10] for s in seeds}  # neither
    partial = {s: shifted[s] for s in range(8)}  # seeds 8, 9 missing (diverged): paired over 8 seeds
    items = [{'name': 'shift', 'family': 'primary', 'margin': 0.5, 'a': shifted, 'b': base},
             {'name': 'close', 'family': 'primary', 'margin': 0.5, 'a': close, 'b': base},
             {'name': 'noisy', 'family': 'primary', 'margin': 0.5, 'a': noisy, 'b': base},
             {'name': 'check', 'family': 'check', 'margin': None, 'a': noisy, 'b': base},
             {'name': 'partial', 'family': 'other', 'margin': 0.5, 'a': partial, 'b': base}]
    out = study.contrasts(items)
    primary_p = []
    for item, row in zip(items, out):
        common = sorted(set(item['a']) & set(item['b']))
        a, b = [item['a'][s] for s in common], [item['b'][s] for s in common]
        diffs = [x - y for x, y in zip(a, b)]
        assert row['n'] == len(common) and row['mean'] == pytest.approx(sum(diffs) / len(diffs))
        assert row['p'] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert row['sd'] == pytest.approx(stats.tstd(diffs))
        n = len(diffs)
        assert row['mde'] == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1))
                                           * stats.tstd(diffs) / math.sqrt(n))
        if item['margin'] is None:
            assert row['p_tost'] is None
        else:
            assert row['p_tost'] == pytest.approx(_tost_by_hand(diffs, item['margin']))
            lower = stats.ttest_1samp(diffs, -item['margin'], alternative='greater').pvalue
            upper = stats.ttest_1samp(diffs, item['margin'], alternative='less').pvalue
            assert row['p_tost'] == pytest.approx(max(lower, upper))
        if item['family'] == 'primary':
            primary_p.append(row['p'])
    # Holm within the family: the three primary contrasts together, the others alone
    assert [r['p_holm'] for r in out[:3]] == pytest.approx(study.holm(primary_p))
    assert out[2]['p_holm'] == pytest.approx(min(1.0, 2 * out[2]['p']))  # the 2nd smallest of 3: x2
    assert out[3]['p_holm'] == pytest.approx(out[3]['p'])  # the same data, alone in its family
    assert out[4]['p_holm'] == pytest.approx(out[4]['p'])
    assert [r['verdict'] for r in out] == ['different', 'equivalent', 'inconclusive', 'inconclusive', 'different']
    assert out[0]['p_holm'] < 0.05 and out[1]['p_tost'] < 0.05 and out[2]['p_tost'] > 0.05 and out[2]['p_holm'] > 0.05
    # the verdict rule itself: Holm first, then TOST (only with a margin), NaN: no verdict
    assert study.verdict(0.01, 0.01) == 'different' and study.verdict(0.2, 0.01) == 'equivalent'
    assert study.verdict(0.2, 0.2) == 'inconclusive' and study.verdict(0.2, None) == 'inconclusive'
    assert study.verdict(math.nan, None) == 'n/a'
    assert study.contrasts([{'name': 'x', 'family': 'f', 'margin': 0.5, 'a': {0: 1.0}, 'b': {0: 0.5}}])[0][
        'verdict'] == 'n/a'  # one paired seed: no test
    # an unfinished contrast (declared runs not recorded yet): numbers, but no verdict, and its family's
    # Holm counts the contrast that has no data at all yet
    unfinished = study.contrasts([dict(items[0], pending=2), dict(items[1], a={}, pending=10)])
    assert [r['verdict'] for r in unfinished] == ['incomplete', 'n/a'] and unfinished[0]['pending'] == 2
    assert unfinished[0]['p_holm'] == pytest.approx(min(1.0, 2 * out[0]['p']))
    assert study.verdict(0.01, 0.01, pending=1) == 'incomplete' and study.verdict(math.nan, None, pending=1) == 'n/a'
    # no spread: TOST is decided by the mean alone
    assert study.tost_paired([0.2, 0.2, 0.2], 0.5) == 0.0 and study.tost_paired([0.7, 0.7], 0.5) == 1.0


def test_mde_is_the_effect_a_paired_t_test_detects_with_80_percent_power():
    diffs = [0.5, -0.3, 0.2, 0.9, -0.6, 0.1, 0.4, -0.2, 0.3, 0.0, -0.4, 0.6]
    n, sd = len(diffs), stats.tstd(diffs)
    mde = study.mde_paired(diffs)
    assert mde == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n))
    # independent check: the power of the two-sided paired t-test at a true difference of MDE (noncentral t)
    crit, nc = stats.t.ppf(0.975, n - 1), mde / (sd / math.sqrt(n))
    power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=0.02)
    assert math.isnan(study.mde_paired([1.0])) and study.mde_paired([1.0, 1.0]) == 0.0
    assert study.mde_paired(diffs, power=0.9) > mde


@pytest.mark.parametrize('edit,message', [
    (lambda s: s.update(edge_rule='extend'), r"edge_rule must be one of \['none', 'extend_once'\], got 'extend'"),
    (lambda s: s['pairs']['p']['arms']['opdf'].update(inherit='mpoo'),
     r"arms.opdf.inherit: 'mpoo' is not another arm of the pair \(arms: \['ce', 'mpo', 'rand'\]\)"),
    (lambda s: s['pairs']['p']['arms']['opdf'].update(inherit='opdf'), r"'opdf' is not another arm of the pair"),
    (lambda s: s['pairs']['p']['arms']['mpo'].update(inherit='rand'),
     r'arms.mpo.inherit: an inheritance cycle \(mpo -> rand -> opdf -> mpo\)'),
    (lambda s: s['pairs']['p']['arms']['opdf']['grid'].update({LR: [0.1, 0.2]}),
     r"arms.opdf.grid: \['train.optimizer.kwargs.lr'\] is inherited \(from \['mpo'\]\)"),
    (lambda s: s['pairs']['p']['arms']['rand'].update(grid={LAMBDA: [1.0]}), r"arms.rand.grid: \[.*weight'\] is "
                                                                           r"inherited \(from \['opdf'\]\)"),
    (lambda s: s['pairs']['p']['arms']['rand'].update(inherit=['opdf']), r'inherit must name another arm'),
    (lambda s: s['pairs']['p']['contrasts'][0].update(arms=['opdf', 'kd']),
     r"contrasts\[0\].arms: \['kd'\] is not an arm of the pair \(arms: \['ce', 'mpo', 'opdf', 'rand'\]\)"),
    (lambda s: s['pairs']['p']['contrasts'][0].update(arms=['opdf']), r'contrasts\[0\].arms must be two different'),
    (lambda s: s['pairs']['p']['contrasts'][0].update(arms=['opdf', 'opdf']), r'must be two different arm names'),
    (lambda s: s['pairs']['p']['contrasts'][1].update(familly=s['pairs']['p']['contrasts'][1].pop('family')),
     r"contrasts\[1\]: unknown keys \['familly'\]; valid keys: \['arms', 'family', 'margin', 'name'\]"),
    (lambda s: s['pairs']['p']['contrasts'][1].pop('family'), r"contrasts\[1\]: missing \['family'\]"),
    (lambda s: s['pairs']['p']['contrasts'][1].update(name='alignment'), r"'alignment' names two contrasts"),
    (lambda s: s['pairs']['p']['contrasts'][0].update(margin=-0.5), r'margin must be a positive number'),
    (lambda s: s['pairs']['p']['contrasts'][0].update(margin=True), r'margin must be a positive number'),
    (lambda s: s['pairs']['p']['contrasts'][0].update(family=''), r'family must be a non-empty string'),
    (lambda s: s['pairs']['p'].update(contrasts={'alignment': ['opdf', 'mpo']}), r'contrasts must be a list'),
    (lambda s: s['pairs']['p']['arms']['opdf'].update(inherits='mpo'), r"arms.opdf: unknown keys \['inherits'\]"),
])
def test_protocol_spec_errors_name_the_key_and_the_choices(workspace, edit, message, capsys):
    _select_spec(workspace, PROTOCOL_ARMS, edge_rule='extend_once', contrasts=PROTOCOL_CONTRASTS)
    spec = json.loads((workspace / 'protocol.yaml').read_text())
    edit(spec)
    bad = workspace / 'bad.yaml'
    bad.write_text(json.dumps(spec))
    with pytest.raises(study.StudyError, match=message):
        study.load_study(bad)
    assert ablate.main(['study', str(bad), '--dry_run']) == 1
    assert re.match(r'error: .*bad.yaml: pairs.p|error: .*bad.yaml: edge_rule', _one_error_line(capsys))


def test_inheritance_order_and_inherited_axes(workspace):
    arms = {'rand': {'inherit': 'opdf'}, 'opdf': {'inherit': 'mpo', 'grid': {LAMBDA: [0.1, 1.0]}},
            'mpo': {'grid': {LR: [0.1, 0.2]}}}
    pair = _select_spec(workspace, arms).pairs[0]
    assert [a.name for a in study.inheritance_order(pair)] == ['mpo', 'opdf', 'rand']
    assert pair.inherited_axes(pair.arm('rand')) == [LR, LAMBDA] and pair.inherited_axes(pair.arm('mpo')) == []
    assert pair.edge_rule == 'none' and pair.contrasts == []
    sel = _select(_select_spec(workspace, arms), lambda name, overrides, seed: 80.0 + overrides[LR] * 10
                  + overrides.get(LAMBDA, 0.0))
    assert list(sel) == ['rand', 'opdf', 'mpo']  # the pair's order
    assert sel['opdf']['inherited'] == {LR: 0.2} and sel['opdf']['selected'] == {LR: 0.2, LAMBDA: 1.0}
    assert sel['rand']['selected'] == {LR: 0.2, LAMBDA: 1.0} and sel['rand']['points'] == [] and \
        sel['rand']['budget'] == 0
    waiting = _select(_select_spec(workspace, arms), lambda name, overrides, seed: None if name == 'mpo' else 80.0)
    assert waiting['opdf']['state'] == 'waiting' and [e['point'] for e in waiting['opdf']['points']] == [
        {LAMBDA: 0.1}, {LAMBDA: 1.0}] and waiting['rand']['state'] == 'waiting'


def test_the_confirmatory_fashion_study_plans_its_selection_runs_and_waits_for_inherited_settings(tmp_path):
    """The plan of the spec before any run (records pointed at an empty file: the committed ones grow
    while the study runs)."""
    path = ROOT / 'configs' / 'fashion' / 'confirm' / 'study.yaml'
    confirm = study.load_study(path)
    for pair in confirm.pairs:
        pair.records = tmp_path / f'{pair.name}.jsonl'
    assert confirm.edge_rule == 'extend_once' and [p.name for p in confirm.pairs] == ['cnn', 'vit']
    for pair in confirm.pairs:
        assert [c.family for c in pair.contrasts] == ['primary'] * 3 + ['check']
        assert pair.select_seeds == [100, 101]
        plan = study.study_plan(confirm, pair, [])
        assert len(plan['select']) == 4 * 5 * 2 and len(plan['waiting']) == 4 * 2
        assert {t.identity.name for t in plan['select']} == {'ce', 'kd', 'kd_split', 'kd_mpo'}
        assert plan['final'] == [] and len(plan['unplanned']) == 6 * len(pair.seeds)
        assert plan['selection']['kd_opdf']['state'] == plan['selection']['kd_opdf_random']['state'] == 'waiting'
    out = io.StringIO()
    study.run_study(confirm, dry_run=True, stream=out)
    text = out.getvalue()
    assert "    kd_opdf: waiting for kd_mpo's selected setting (lr); then selection lambda (4)" in text
    assert "    kd_opdf_random: waiting for kd_opdf's selected setting (lr, lambda); then no tuning" in text
    assert text.count('selection lr (5) = 5 points x 2 seeds: 10 runs') == 8


def test_reproduce_compares_every_metric_exactly_and_names_ambiguous_keys(workspace):
    from opdf_torchdistill.study.reproduce import choose_records, compare_metrics
    recorded = {'test_acc1': 88.18, 'test_loss': 0.33088525161743165, 'train_params': 10, 'train_seconds': 159.6,
                'grad_norms': {'kd': 1.7772296723311292, 'opdf': 0.5}}
    same = dict(recorded, train_seconds=1.0, train_params=10.0, grad_norms=dict(recorded['grad_norms']))
    assert compare_metrics(recorded, same) == ([], 5)  # timing left out; 10 and 10.0 are one JSON number
    now = dict(same, test_loss=0.3308852516174317, grad_norms={'kd': 1.7772296723311292}, alignment=1)
    assert compare_metrics(recorded, now) == ([('alignment', 'absent', 1), ('grad_norms.opdf', 0.5, 'absent'),
                                               ('test_loss', 0.33088525161743165, 0.3308852516174317)], 6)
    assert compare_metrics({'x': True}, {'x': 1})[0] == [('x', True, 1)]
    spec = _select_spec(workspace, {'kd': {'grid': {LR: [0.1]}}})
    base = {'config': str(workspace / 'kd.yaml'), 'name': 'kd', 'overrides': {LR: 0.1}, 'status': 'ok', 'metrics': {}}
    lines = [dict(base, key='abc1', seed=100, finished='2026-11-29T10:00:00Z'),
             dict(base, key='abc2', seed=101, finished='2026-11-29T09:00:00Z')]
    (workspace / 'protocol.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
    with pytest.raises(study.StudyError, match=r"prefix 'abc' matches 2 records \(abc1, abc2\); give more"):
        choose_records(spec, keys=['abc'])
    assert [r['key'] for _, r in choose_records(spec, each=True)] == ['abc2']  # the earliest finished
    assert [r['key'] for _, r in choose_records(spec, keys=['abc1', 'abc1'], each=True)] == ['abc1', 'abc2']

    from opdf_torchdistill.study.reproduce import reproduce_study  # a record whose config is gone: not trained
    (workspace / 'protocol.jsonl').write_text(json.dumps(dict(lines[0], config=str(workspace / 'gone.yaml'))) + '\n')
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, '_execute', lambda *a, **k: pytest.fail('a changed run was trained'))
        (outcome,) = reproduce_study(spec, keys=['abc1'], stream=out)
    assert outcome.status == 'changed' and 'gone.yaml does not exist' in outcome.note
    assert '[key abc1]: CHANGED, not trained: its config cannot be read as recorded' in out.getvalue()
    assert '0 of 1 run(s) reproduced exactly, 1 changed' in out.getvalue()
