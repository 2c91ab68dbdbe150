"""OPDF as the paper means it (issue 10): the paper's factorisation and scale by default, teacher-aware
planning that aligns every student weight, an alignment term whose gradient is not negligible, the
MultiheadAttention out_proj and stale-probe fixes, and the inspect tool's pairing report."""
import json
import logging
import math
import time

import pytest
import torch
import torchvision
from torch import nn

import opdf_torchdistill  # noqa: F401
from opdf_torchdistill import overparameterize, plan
from opdf_torchdistill.alignment import NOT_REPORTED, CoreAligner, MatchError, pair_layers
from opdf_torchdistill.options import OptionError
from opdf_torchdistill.plugin import AuxTensorAlignmentLoss, attach_probe
from opdf_torchdistill.plugin.models import build_base_model
from opdf_torchdistill.surgery import plan_alignment


def _linear(rows, cols):
    with torch.device('meta'):
        return nn.Linear(cols, rows, bias=False)


# -- 1. the paper's factorisation --------------------------------------------------------------------
@pytest.mark.parametrize('shape,L,ratio', [((768, 768), 1, 2.125), ((768, 768), 3, 3.25), ((768, 768), 0, 1.5625),
                                           ((3072, 768), 1, 2.125), ((768, 3072), 1, 2.125), ((3072, 768), 3, 3.25)])
def test_num_dummy_is_the_papers_L(shape, L, ratio):
    report = plan(_linear(*shape), num_dummy=L)
    assert report.ratio == pytest.approx(ratio, abs=1e-12)
    assert report.ratio == pytest.approx(1 + 0.5625 * (L + 1), abs=1e-12)  # the paper's formula


def test_paper_factor_shapes_and_the_largest_bond_alternative():
    row = plan(_linear(768, 768), num_dummy=1).layers[0]
    assert (row.plan.row_factors, row.plan.col_factors) == ((32, 1, 24), (32, 1, 24))
    assert row.plan.bonds == (1, 576, 576, 1)
    ffn = plan(_linear(3072, 768), num_dummy=3).layers[0].plan
    assert (ffn.row_factors, ffn.col_factors) == ((64, 1, 1, 1, 48), (32, 1, 1, 1, 24))
    old = plan(_linear(768, 768), num_dummy=1, factor_order='largest_bond')
    assert old.layers[0].plan.bonds == (1, 768, 768, 1) and old.ratio == pytest.approx(3.0)
    assert plan(_linear(768, 768), num_dummy=3, factor_order='largest_bond').ratio == pytest.approx(5.0)
    with pytest.raises(OptionError, match="factor_order must be one of \\['paper', 'largest_bond'\\]"):
        plan(_linear(768, 768), factor_order='papr')


def test_six_layer_bert_student_scale_matches_table_1():
    """The paper's 6-layer BERT student: 66 M inference parameters, about 160 M while training at L = 3."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Embedding(30522, 768)
            self.position = nn.Embedding(512, 768)
            self.layers = nn.ModuleList(nn.ModuleDict({
                'query': nn.Linear(768, 768), 'key': nn.Linear(768, 768), 'value': nn.Linear(768, 768),
                'output': nn.Linear(768, 768), 'intermediate': nn.Linear(768, 3072), 'ffn_out': nn.Linear(3072, 768)})
                for _ in range(6))
    with torch.device('meta'):
        model = Encoder()
    report = plan(model, num_dummy=3)
    assert 66e6 < report.model_params < 67e6
    matrices = 6 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert report.params_training - report.model_params == 2.25 * matrices
    assert 160e6 < report.params_training < 163e6


def test_num_factors_is_bounded_and_planning_stays_fast():
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(OptionError, match='num_factors must be at most 8, got 12'):
        plan(mlp, num_factors=12)
    start = time.perf_counter()
    for order in ('paper', 'largest_bond'):
        plan(mlp, num_factors=8, factor_order=order)
    assert time.perf_counter() - start < 30  # was minutes (n!^2 permutations) before the bound


# -- 2. teacher-aware planning and coverage ----------------------------------------------------------
def _digits(widths):
    return build_base_model('digits_cnn', widths=widths, num_classes=10)


def test_coverage_is_partial_without_align_to_and_complete_with_it():
    teacher = _digits([32, 64, 64])
    alone = plan(_digits([4, 8, 8]))
    _, coverage = plan_alignment(alone, teacher)
    assert (coverage.aligned_weights, coverage.mpo_weights) == (1, 4)
    assert set(coverage.unaligned and dict(coverage.unaligned)) == {'features.3', 'features.7', 'classifier'}
    planned = plan(_digits([4, 8, 8]), align_to=teacher)
    pairs, coverage = plan_alignment(planned, teacher)
    assert (coverage.aligned_weights, coverage.mpo_weights, coverage.aligned_param_share) == (4, 4, 1.0)
    assert coverage.to_dict()['unaligned'] == {}


def _small_vit(num_layers):
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=num_layers, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=4)


def _nonzero_head(model):
    with torch.no_grad():  # torchvision zero-initialises the head; a zero weight is not over-parameterized
        model.heads.head.weight.normal_()
    return model


def test_vit_pair_aligns_every_weight_including_mha_out_proj_at_run_time(caplog):
    torch.manual_seed(0)
    teacher, student = _nonzero_head(_small_vit(4)), _nonzero_head(_small_vit(2))
    overparameterize(student, align_to=teacher)
    attach_probe(student), attach_probe(teacher)
    x = torch.randn(2, 3, 16, 16)
    student(x)
    with torch.no_grad():
        teacher(x)
    loss = AuxTensorAlignmentLoss()
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill.alignment'):
        value = loss({'opdf': {'output': student.opdf.entries}}, {'opdf': {'output': teacher.opdf.entries}})
    coverage = loss.aligner.coverage
    names = {p.student for p in loss.aligner.pairs}
    assert 'encoder.layers.encoder_layer_1.self_attention.out_proj' in names
    assert coverage.aligned_weights == coverage.mpo_weights == 2 * 4 + 2  # per layer in_proj, out_proj, 2 MLP
    assert 'coverage: 10/10 MPO weights aligned' in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    value.backward()
    out_proj = student.encoder.layers.encoder_layer_1.self_attention.out_proj.parametrizations.weight
    assert out_proj.original0.grad is not None and out_proj.original0.grad.abs().sum() > 0


def test_unaligned_and_unreported_weights_are_warned_about_by_name(caplog):
    teacher, student = _digits([32, 64, 64]), _digits([4, 8, 8])
    overparameterize(student)  # not planned against the teacher: 1 of 4 aligns
    attach_probe(student), attach_probe(teacher)
    x = torch.randn(2, 1, 8, 8)
    student.features[:3](x)  # a stage that runs the first block only
    with torch.no_grad():
        teacher(x)
    with caplog.at_level(logging.INFO, logger='opdf_torchdistill.alignment'):
        AuxTensorAlignmentLoss()({'opdf': {'output': student.opdf.entries}}, {'opdf': {'output': teacher.opdf.entries}})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all('is over-parameterized but not aligned' in w for w in warned)
    assert any('features.7' in w and 'never called in this pass' in w for w in warned)
    assert 'coverage: 1/4 MPO weights aligned' in caplog.text


def test_zero_aligned_weights_is_an_error_naming_the_reasons():
    teacher = nn.Sequential(nn.Linear(7, 13))
    student = nn.Sequential(nn.Linear(5, 11))
    with pytest.raises(MatchError, match='no student MPO layer can be aligned'):
        plan_alignment(plan(student), teacher)


# -- 3. an alignment term that trains ----------------------------------------------------------------
def _aligned_pair(reduction, rows=256, cols=256):
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(cols, rows)), nn.Sequential(nn.Linear(cols, rows))
    overparameterize(student, align_to=teacher)
    attach_probe(student), attach_probe(teacher)
    x = torch.randn(4, cols)
    student(x)
    with torch.no_grad():
        teacher(x)
    aligner = CoreAligner(reduction=reduction)
    value = aligner.loss(student.opdf.entries, teacher.opdf.entries)
    return student, aligner, value


def test_gradient_reaches_only_auxiliary_cores_and_one_step_closes_a_predictable_share():
    student, aligner, value = _aligned_pair('relative')
    value.backward()
    (pair,) = aligner.pairs
    plist = student[0].parametrizations.weight
    cores = [getattr(plist, f'original{k}') for k in range(3)]
    assert cores[1].grad is None or cores[1].grad.abs().sum() == 0  # the central core is not aligned
    targets = aligner.targets(pair)
    lr = 0.1
    for k in pair.cores:
        before = (cores[k] - targets[k]).norm().item()
        after = (cores[k] - lr * cores[k].grad - targets[k]).norm().item()
        expected = 2 * lr / targets[k].pow(2).sum().item()  # d/dS ||S - T||^2 / ||T||^2 = 2 (S - T) / ||T||^2
        assert 1 - after / before == pytest.approx(expected, rel=2e-3)  # float32 cores
        assert expected > 1e-4


def test_paper_literal_mean_is_orders_of_magnitude_weaker():
    """The paper's Eq. 5 divides each core's gradient by its element count and the number of cores."""
    norms = {}
    for reduction in ('relative', 'paper'):
        student, aligner, value = _aligned_pair(reduction)
        cores = [student[0].parametrizations.weight.original0, student[0].parametrizations.weight.original2]
        grads = torch.autograd.grad(value, cores)
        norms[reduction] = math.sqrt(sum(g.pow(2).sum().item() for g in grads))
    assert norms['paper'] * 1e3 < norms['relative']


def test_random_targets_keep_shapes_and_norms_but_not_the_teachers_cores():
    _, teacher_aligner, _ = _aligned_pair('relative')
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(256, 256)), nn.Sequential(nn.Linear(256, 256))
    overparameterize(student, align_to=teacher)
    attach_probe(student), attach_probe(teacher)
    x = torch.randn(4, 256)
    student(x), teacher(x)
    control = CoreAligner(targets='random', targets_seed=3)
    control.loss(student.opdf.entries, teacher.opdf.entries)
    random_cores = control.targets(control.pairs[0])
    real_cores = teacher_aligner.targets(teacher_aligner.pairs[0])
    assert [c.shape for c in random_cores] == [c.shape for c in real_cores]
    w_random = opdf_torchdistill.mpo.reconstruct(random_cores)
    assert w_random.norm().item() == pytest.approx(teacher[0].weight.norm().item(), rel=1e-5)
    assert (random_cores[0] - real_cores[0]).norm() > 0.1 * real_cores[0].norm()
    again = CoreAligner(targets='random', targets_seed=3)
    again.loss(student.opdf.entries, teacher.opdf.entries)
    assert torch.equal(again.targets(again.pairs[0])[0], random_cores[0])
    with pytest.raises(ValueError, match="targets must be one of \\['teacher', 'random'\\]"):
        CoreAligner(targets='noise')
    with pytest.raises(ValueError, match="reduction must be one of \\['relative', 'paper'\\]"):
        AuxTensorAlignmentLoss(reduction='sum')


# -- 4. stale probe entries --------------------------------------------------------------------------
def test_probe_reports_only_the_layers_of_the_current_pass():
    model = _digits([4, 8, 8])
    overparameterize(model)
    probe = attach_probe(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model.eval()(x)  # validation fills every layer
    assert set(probe.entries) == {'features.0', 'features.3', 'features.7', 'classifier'}
    model.train()
    model.features[:3](x)  # a sequential stage running the first block, with grad
    assert set(probe.entries) == {'features.0'}
    probe.entries.consume()  # the loss used it
    model.features[:3](x)
    assert set(probe.entries) == {'features.0'}
    assert probe.entries.expected == ('features.0', 'features.3', 'features.7', 'classifier')


def test_pair_layers_counts_unreported_weights_as_unaligned():
    teacher = _digits([4, 8, 8])
    report = plan(_digits([4, 8, 8]))
    from opdf_torchdistill.alignment import ProbeEntry
    from opdf_torchdistill.matching import LayerInfo
    from opdf_torchdistill.surgery import weight_sites
    student = [ProbeEntry(r.name, r.kind, r.plan.shape, (), r.plan) for r in report.layers[:2]]
    t_layers = [LayerInfo(s.name, s.kind, s.matrix_shape) for _, s in weight_sites(teacher)[0]]
    pairs, coverage = pair_layers(student, t_layers, expected=[r.name for r in report.layers])
    assert len(pairs) == 2 and coverage.mpo_weights == 4
    assert dict(coverage.unaligned) == {'features.7': NOT_REPORTED, 'classifier': NOT_REPORTED}


# -- 5. opdf-inspect --teacher -----------------------------------------------------------------------
def test_inspect_prints_the_pairing_and_writes_coverage_json(tmp_path, capsys):
    from opdf_torchdistill.cli.inspect import main
    out = tmp_path / 'plan.json'
    rc = main(['digits_cnn', '--kwargs', '{"widths": [4, 8, 8]}', '--teacher', 'digits_cnn',
               '--teacher_kwargs', '{"widths": [32, 64, 64]}', '--json', str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert 'coverage: 4/4 MPO weights aligned' in text and 'aligned cores' in text
    alignment = json.loads(out.read_text())['alignment']
    assert (alignment['mpo_weights'], alignment['aligned_weights']) == (4, 4)
    assert len(alignment['pairs']) == 4 and alignment['unaligned'] == {}
    rc = main(['digits_cnn', '--kwargs', '{"widths": [4, 8, 8]}', '--teacher', 'digits_cnn',
               '--teacher_kwargs', '{"widths": [32, 64, 64]}', '--no_align_to'])
    captured = capsys.readouterr()
    assert rc == 0 and 'coverage: 1/4' in captured.out and captured.err.count('not aligned') == 3
    assert main(['digits_cnn', '--teacher', 'digits_cnn', '--teacher_kwargs', '{"widthz": [1]}']) == 2


# -- 6. named selections ---------------------------------------------------------------------------
def test_bert_selection_takes_the_papers_six_matrices_per_layer():
    from models import BertLikeStack
    report = plan(BertLikeStack(num_layers=2), selection='bert', num_dummy=1)
    names = {r.name for r in report.layers}
    assert len(names) == 12 and 'classifier' not in names
    assert {n.split('layer.0.')[-1] for n in names if 'layer.0.' in n} == {
        'attention.self.query', 'attention.self.key', 'attention.self.value', 'attention.output.dense',
        'intermediate.dense', 'output.dense'}
    assert any(s.name == 'classifier' and 'include' in s.reason for s in report.skipped)
    with pytest.raises(OptionError, match="selection must be one of .*'bert'.*got 'bret' \\(did you mean 'bert'\\?\\)"):
        plan(BertLikeStack(), selection='bret')
    with pytest.raises(OptionError, match='matches no supported weight'):
        plan(nn.Sequential(nn.Linear(8, 8)), selection='bert')  # another family: loud, not a no-op
