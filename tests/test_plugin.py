"""torchdistill integration: registries, the student model key, the alignment loss, the runner (KD,
FitNet-style sequential stages, DDP) and the export tool."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT
from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT, MODEL_DICT, get_model

import opdf_torchdistill  # noqa: F401
from opdf_torchdistill import mpo_modules
from opdf_torchdistill.alignment import MatchError
from opdf_torchdistill.plugin import AuxTensorAlignmentLoss, attach_probe
from conftest import ROOT, rel

CONFIGS = ROOT / 'tests' / 'configs'


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    return env


def _run(args, cwd, timeout=600):
    proc = subprocess.run([sys.executable] + [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_registries_hold_the_plugin_components():
    assert 'opdf_student' in MODEL_DICT
    assert 'opdf_probe' in AUXILIARY_MODEL_WRAPPER_DICT
    assert 'AuxTensorAlignmentLoss' in MIDDLE_LEVEL_LOSS_DICT


@pytest.mark.parametrize('base', ['resnet18', 'resnet20'])  # torchvision and torchdistill keys
def test_opdf_student_equals_its_base_with_the_same_weights(base):
    plain = get_model(base, num_classes=10) if base in MODEL_DICT else torchvision.models.__dict__[base](num_classes=10)
    student = get_model('opdf_student', base=base, num_classes=10, mpo={'num_dummy': 1})
    assert any(True for _ in mpo_modules(student))
    student.load_state_dict(plain.state_dict(), strict=True)  # dense checkpoint, decomposed on load
    plain.eval(), student.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(student(x), plain(x)) <= 1e-5
    assert not any(k.startswith('opdf') for k in student.state_dict())


def test_unknown_base_key_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown base model key 'resnet19'"):
        get_model('opdf_student', base='resnet19', num_classes=10)


def _probe_outputs(student, teacher, x):
    student(x)
    with torch.no_grad():
        teacher(x)
    return {'opdf': {'output': student.opdf.entries}}, {'opdf': {'output': teacher.opdf.entries}}


def test_alignment_loss_zero_for_identical_positive_otherwise_and_trains_the_student():
    torch.manual_seed(0)
    teacher = get_model('resnet20', num_classes=10)
    student = get_model('opdf_student', base='resnet20', num_classes=10)
    student.load_state_dict(teacher.state_dict())
    attach_probe(teacher)
    x = torch.randn(2, 3, 32, 32)
    loss = AuxTensorAlignmentLoss()
    s_io, t_io = _probe_outputs(student, teacher, x)
    assert loss(s_io, t_io).item() == 0.0

    deeper = get_model('resnet32', num_classes=10)
    attach_probe(deeper)
    loss = AuxTensorAlignmentLoss()
    s_io, t_io = _probe_outputs(student, deeper, x)
    value = loss(s_io, t_io)
    assert value.item() > 0
    value.backward()
    aligned = {p.student: p.cores for p in loss.aligner.pairs}
    assert len(aligned) == 22
    for name, module, tensor_name, p in mpo_modules(student):
        plist = module.parametrizations[tensor_name]
        for k in range(p.plan.num_cores):
            grad = getattr(plist, f'original{k}').grad
            if k in aligned.get(p.layer_name, ()):
                assert grad is not None and grad.abs().sum() > 0, (name, k)
            else:
                assert grad is None or grad.abs().sum() == 0, (name, k)
    assert all(p.grad is None for p in deeper.parameters())


def test_teacher_targets_are_cached_until_teacher_weights_change(monkeypatch):
    from opdf_torchdistill import mpo
    calls = []
    real = mpo.decompose_many
    monkeypatch.setattr(mpo, 'decompose_many', lambda jobs, *a, **k: calls.append(len(jobs)) or real(jobs, *a, **k))
    teacher = get_model('resnet32', num_classes=10)
    student = get_model('opdf_student', base='resnet20', num_classes=10)
    attach_probe(teacher)
    loss = AuxTensorAlignmentLoss()
    x = torch.randn(2, 3, 32, 32)
    calls.clear()  # building the student decomposed its own weights
    for _ in range(3):
        loss(*_probe_outputs(student, teacher, x))
    assert calls == [22]
    with torch.no_grad():
        teacher.fc.weight.mul_(2.0)  # e.g. a checkpoint loaded into the teacher
    loss(*_probe_outputs(student, teacher, x))
    assert calls == [22, 1]


def test_alignment_errors_are_clear():
    x = torch.randn(2, 3, 32, 32)
    plain = get_model('resnet20', num_classes=10)
    attach_probe(plain)
    other = get_model('resnet20', num_classes=10)
    attach_probe(other)
    with pytest.raises(MatchError, match='no MPO layers'):
        AuxTensorAlignmentLoss()(*_probe_outputs(plain, other, x))
    student = get_model('opdf_student', base='resnet20', num_classes=10)
    with pytest.raises(KeyError, match="add auxiliary_model_wrapper: {key: 'opdf_probe'}"):
        AuxTensorAlignmentLoss()({'opdf': {'output': student.opdf.entries}}, {})
    unrelated = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    unrelated(x)
    attach_probe(unrelated)
    with pytest.raises(MatchError, match=r'no student MPO layer can be aligned.*conv1: no teacher layer'):
        AuxTensorAlignmentLoss()(*_probe_outputs(student, unrelated, x))
    with pytest.raises(ValueError, match='cores must be one of'):
        AuxTensorAlignmentLoss(cores='middle')


def test_width_aligned_planning_matches_a_wider_teacher():
    # wide_resnet40_1 <- wide_resnet40_4: different widths, so auxiliary cores only coincide when the
    # student is planned against the teacher (three real factors, the central one absorbs the width).
    MODEL_DICT.setdefault('test_wide_resnet40_1', lambda **kw: MODEL_DICT['wide_resnet'](
        depth=40, k=1, dropout_p=0.0, pretrained=False, progress=False, **kw))
    spec = {'key': 'wide_resnet40_4', 'kwargs': {'num_classes': 10}}
    student = get_model('opdf_student', base='test_wide_resnet40_1', num_classes=10, mpo={'align_to': spec})
    report = student.opdf.report
    aligned_rows = [r for r in report.layers if r.partner]
    assert len(aligned_rows) >= 30
    teacher = get_model('wide_resnet40_4', num_classes=10)
    attach_probe(teacher)
    loss = AuxTensorAlignmentLoss()
    value = loss(*_probe_outputs(student, teacher, torch.randn(2, 3, 32, 32)))
    assert value.item() > 0 and len(loss.aligner.pairs) == len(aligned_rows)
    assert any(p.teacher_plan.shape != p2.plan.shape for p in loss.aligner.pairs
               for (_, _, _, p2) in mpo_modules(student) if p2.layer_name == p.student)


def test_runner_kd_opdf_end_to_end_with_export(tmp_path):
    out = _run([ROOT / 'tools' / 'train.py', '--config', CONFIGS / 'kd_opdf_fake.yaml', '--device', 'cpu',
                '--seed', '1', '--metrics_json', tmp_path / 'm.json', '--run_log', tmp_path / 'run.log',
                '--set', f'models.student_model.dst_ckpt={tmp_path}/student.pt'], cwd=tmp_path)
    assert 'weights over-parameterized' in out and 'OPDF alignment coverage: 22/22' in out
    assert 'loaded the best student checkpoint' in out
    metrics = json.loads((tmp_path / 'm.json').read_text())
    assert metrics['train_params'] > metrics['inference_params'] and 'test' in metrics
    # the first step's gradient norm of each weighted term on the aligned auxiliary cores, and the coverage
    assert set(metrics['grad_norms']) == {'kd', 'opdf', 'weight_decay'} and metrics['cores'] == 'aligned auxiliary cores'
    assert metrics['grad_norms']['opdf'] > 1e-3 * metrics['grad_norms']['kd'] > 0
    assert (metrics['alignment']['aligned_weights'], metrics['alignment']['mpo_weights']) == (22, 22)
    assert 'gradient norm of each weighted loss term' in out
    assert (tmp_path / 'student.pt').exists() and (tmp_path / 'student.last.pt').exists()
    assert 'Test [student' in (tmp_path / 'run.log').read_text()
    # -test_only builds a fresh MPO student and reloads the checkpoint strictly.
    out = _run([ROOT / 'tools' / 'train.py', '--config', CONFIGS / 'kd_opdf_fake.yaml', '--device', 'cpu',
                '-test_only', '--set', f'models.student_model.dst_ckpt={tmp_path}/student.pt',
                '--metrics_json', tmp_path / 'm2.json'], cwd=tmp_path)
    assert json.loads((tmp_path / 'm2.json').read_text())['test']['acc1'] == metrics['test']['acc1']
    _run([ROOT / 'tools' / 'export.py', '--config', CONFIGS / 'kd_opdf_fake.yaml', '--ckpt', tmp_path / 'student.pt',
          '--output', tmp_path / 'plain.pt'], cwd=tmp_path)
    summary = json.loads((tmp_path / 'plain.json').read_text())
    assert summary['base'] == 'resnet20' and summary['relative_output_difference'] <= 1e-5
    # The plain checkpoint loads into the base model in a process that never imports the plugin.
    check = ("import sys, torch; from torchdistill.models.registry import get_model; "
             "m = get_model('resnet20', num_classes=10); "
             f"m.load_state_dict(torch.load(r'{tmp_path / 'plain.pt'}', weights_only=True), strict=True); "
             "assert 'opdf_torchdistill' not in sys.modules; print('ok')")
    assert 'ok' in _run(['-c', check], cwd=tmp_path)


def test_runner_fitnet_sequential_stages(tmp_path):
    out = _run([ROOT / 'tools' / 'train.py', '--config', CONFIGS / 'fitnet_opdf_fake.yaml', '--device', 'cpu',
                '--seed', '1', '--set', f'models.student_model.dst_ckpt={tmp_path}/fitnet.pt'], cwd=tmp_path)
    assert 'Redesigning the student model' in out
    assert 'OPDF alignment coverage: 14/22' in out  # stage 1: the layers up to layer2 ...
    assert out.count('never called in this pass') >= 8  # ... and a warning for each layer it does not run
    assert 'OPDF alignment coverage: 22/22' in out  # stage 2: the whole model
    assert 'Advanced to stage 2' in out and 'loaded the best student checkpoint' in out


@pytest.mark.parametrize('freeze,port', [('central', 29533), ('auxiliary', 29534)])
def test_ddp_two_processes_keep_identical_cores(tmp_path, freeze, port):
    _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
          ROOT / 'tests' / 'ddp_worker.py', tmp_path / 'ddp', '--config', CONFIGS / 'kd_opdf_fake.yaml',
          '--device', 'cpu', '--seed', '1', '--set', f'models.student_model.dst_ckpt={tmp_path}/ddp.pt',
          '--set', f'+models.student_model.kwargs.mpo.freeze={freeze}'], cwd=tmp_path)
    rank0 = torch.load(tmp_path / 'ddp.rank0.pt')
    rank1 = torch.load(tmp_path / 'ddp.rank1.pt')
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(1)  # the runner's seed and build order (teacher, then student): the same initial model
    get_model('resnet32', num_classes=10)
    start = get_model('opdf_student', base='resnet20', num_classes=10, mpo={'freeze': freeze})
    changed = {k for k, v in start.state_dict().items() if 'original' in k and not torch.equal(rank0[k], v)}
    frozen = {f'{n}.parametrizations.{t}.original{i}' for n, _, t, p in mpo_modules(start) for i in p.frozen}
    assert changed and not (changed & frozen)  # trainable cores moved, frozen ones did not


def test_opdf_optimizer_puts_cores_in_their_own_group():
    from torchdistill.optim.registry import get_optimizer
    student = get_model('opdf_student', base='resnet20', num_classes=10, mpo={'num_dummy': 1})
    opt = get_optimizer(torch.nn.ModuleList([student]), 'OPDFOptimizer', lr=0.4, momentum=0.9, base='SGD')
    lrs = sorted({g['lr'] for g in opt.param_groups})
    assert lrs == [0.1, 0.4]  # cores at lr / 2(L + 1) with L = 1; BatchNorm and the rest at the base rate
    cores = {id(p) for _, m, t, _ in mpo_modules(student) for p in m.parametrizations[t].parameters()}
    for g in opt.param_groups:
        assert all((id(p) in cores) == (g['lr'] == 0.1) for p in g['params'])
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(student.parameters()))
    twin = copy.deepcopy(student)  # tags do not survive deepcopy; the module path finds the cores again
    opt = get_optimizer(torch.nn.ModuleList([twin]), 'OPDFOptimizer', filters_params=False, lr=0.4, base='SGD',
                        core_lr_scale=0.5)
    assert sorted({g['lr'] for g in opt.param_groups}) == [0.2, 0.4]
    with pytest.raises(ValueError, match='unknown base optimizer'):
        get_optimizer(torch.nn.ModuleList([student]), 'OPDFOptimizer', lr=0.1, base='Sgd')


def test_the_optimizer_control_gives_dense_weights_their_cores_rates():
    """kd_split: a dense student whose would-be-MPO weights train at the rate their cores get in the MPO
    arm (and everything else at lr), so kd_mpo vs kd_split isolates over-parameterization."""
    from torchdistill.optim.registry import get_optimizer
    torch.manual_seed(0)
    dense = get_model('resnet20', num_classes=10)
    mpo_student = get_model('opdf_student', base='resnet20', num_classes=10, mpo={'num_dummy': 1})
    opt = get_optimizer(torch.nn.ModuleList([dense]), 'OPDFOptimizer', filters_params=False, lr=0.4, base='SGD',
                        as_if_mpo={'num_dummy': 1})
    slow = {n for n, p in dense.named_parameters() for g in opt.param_groups if g['lr'] == 0.1
            and any(p is q for q in g['params'])}
    cores_of = {n for n, _, _, _ in mpo_modules(mpo_student)}
    assert slow == {f'{n}.weight' for n in cores_of} and len(slow) == 22
    assert sorted({g['lr'] for g in opt.param_groups}) == [0.1, 0.4]
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(dense.parameters()))
    with pytest.raises(ValueError, match='filters_params: False'):
        get_optimizer(torch.nn.ModuleList([dense]), 'OPDFOptimizer', lr=0.4, base='SGD', as_if_mpo={'num_dummy': 1})
    with pytest.raises(ValueError, match='without align_to'):
        get_optimizer(torch.nn.ModuleList([dense]), 'OPDFOptimizer', filters_params=False, lr=0.4, base='SGD',
                      as_if_mpo={'num_dummy': 1, 'align_to': {'key': 'resnet32'}})
    with pytest.raises(ValueError, match='already has MPO cores'):
        get_optimizer(torch.nn.ModuleList([mpo_student]), 'OPDFOptimizer', filters_params=False, lr=0.4, base='SGD',
                      as_if_mpo={'num_dummy': 1})
    with pytest.raises(ValueError, match='unknown MPO option'):
        get_optimizer(torch.nn.ModuleList([dense]), 'OPDFOptimizer', filters_params=False, lr=0.4, base='SGD',
                      as_if_mpo={'num_dumy': 1})
