"""Factor planning, the target-ratio planner, width-aligned plans and layer matching."""
import math

import pytest

from opdf_torchdistill import planning
from opdf_torchdistill.matching import LayerInfo, MatchError, auto_match, explicit_match, role_of
from opdf_torchdistill.mpo import MPOError


def test_balanced_factors():
    assert planning.balanced_factors(4608, 2) == (72, 64)
    assert planning.balanced_factors(768, 2) == (32, 24)
    assert planning.balanced_factors(4608, 3) == (18, 16, 16)
    assert planning.balanced_factors(7, 2) == (7, 1)
    assert planning.balanced_factors(1, 3) == (1, 1, 1)
    for n in (1, 2, 12, 97, 1000, 3072):
        for k in (1, 2, 3, 4):
            assert math.prod(planning.balanced_factors(n, k)) == n


def test_insert_dummies_keeps_central_meaningful():
    assert planning.insert_dummies((8, 8), (6, 8), 2) == ((8, 1, 1, 8), (6, 1, 1, 8))
    rows, cols = planning.insert_dummies((2, 3, 4), (5, 6, 7), 3)
    assert rows == (2, 1, 3, 1, 1, 4)
    p = planning.MPOPlan(rows, cols)
    assert p.row_factors[p.central] == 3  # the real central factor stays the central core


def test_balanced_plan_factors_like_the_paper_or_for_the_largest_bond_and_handles_small_shapes():
    p = planning.balanced_plan((768, 768), num_dummy=1)
    assert p.bonds == (1, 576, 576, 1) and p.num_dummy == 1 and p.central == 1  # 32x1x24 | 32x1x24
    p = planning.balanced_plan((768, 768), num_dummy=1, order='largest_bond')
    assert p.bonds == (1, 768, 768, 1) and p.num_dummy == 1 and p.central == 1  # 32x1x24 | 24x1x32
    with pytest.raises(MPOError, match='factor order must be one of'):
        planning.balanced_plan((768, 768), order='random')
    assert planning.balanced_plan((10, 512)).num_params > 10 * 512
    assert planning.balanced_plan((16, 9), num_factors=2, num_dummy=0).num_cores == 2
    with pytest.raises(MPOError, match='no non-trivial'):
        planning.balanced_plan((1, 3))
    with pytest.raises(MPOError, match='no non-trivial'):
        planning.balanced_plan((1, 7))


def test_layer_params_formula():
    for L in range(4):
        p = planning.balanced_plan((64, 576), num_dummy=L)
        r = p.bonds[1]
        assert p.num_params == 64 * 576 + (L + 1) * r * r


@pytest.mark.parametrize('target', [1.3, 1.6, 2.0, 2.5])
def test_target_ratio_is_met_closely(target):
    shapes = [(64, 147)] + [(64, 576)] * 4 + [(128, 1152)] * 3 + [(256, 2304)] * 3 + [(512, 4608)] * 3 + [(10, 512)]
    other = 10_000
    plans = planning.plan_target_ratio(shapes, other, target)
    base = other + sum(a * b for a, b in shapes)
    ratio = (other + sum(p.num_params for p in plans)) / base
    assert abs(ratio - target) / target < 0.02


def test_target_ratio_errors_say_what_is_reachable():
    with pytest.raises(MPOError, match='reachable'):
        planning.plan_target_ratio([(8, 8)], 0, 50.0)
    with pytest.raises(MPOError, match='num_dummy=0'):
        planning.plan_target_ratio([(64, 64)], 0, 9.0, num_dummy=0)
    with pytest.raises(MPOError, match='> 1.0'):
        planning.plan_target_ratio([(64, 64)], 0, 0.5)


def test_aligned_plans_share_auxiliary_cores():
    for s_shape, t_shape in [((16, 144), (64, 576)), ((32, 288), (128, 1152)), ((10, 64), (10, 256)), ((64, 64), (128, 64))]:
        s_plan, t_plan = planning.aligned_plans(s_shape, t_shape, num_dummy=1)
        assert s_plan.shape == s_shape and t_plan.shape == t_shape
        for k in s_plan.auxiliary:
            assert s_plan.core_shapes[k] == t_plan.core_shapes[k]
        assert planning.teacher_plan(s_plan, t_shape) == t_plan
    assert planning.aligned_plans((7, 11), (13, 17)) is None


def test_teacher_plan_same_shape_and_indivisible():
    p = planning.balanced_plan((64, 576))
    assert planning.teacher_plan(p, (64, 576)) is p
    assert planning.teacher_plan(p, (65, 576)) is None


def test_roles_and_relative_depth_matching():
    assert role_of('layer2.1.conv1') == ('layer#.#.conv#', (2, 1, 1))
    s = [LayerInfo(f'enc.layers.encoder_layer_{i}.mlp.{j}', 'Linear', (4, 4)) for i in range(6) for j in (0, 3)]
    t = [LayerInfo(f'enc.layers.encoder_layer_{i}.mlp.{j}', 'Linear', (4, 4)) for i in range(12) for j in (0, 3)]
    pairs = auto_match(s, t)
    for i in range(6):
        for j in (0, 3):
            assert pairs[f'enc.layers.encoder_layer_{i}.mlp.{j}'] == f'enc.layers.encoder_layer_{2 * i + 1}.mlp.{j}'


def test_resnet18_from_resnet34_matches_stage_by_stage():
    torchvision = pytest.importorskip('torchvision')
    from opdf_torchdistill.surgery import weight_sites

    def info(m):
        return [LayerInfo(s.name, s.kind, s.matrix_shape) for _, s in weight_sites(m)[0]]
    pairs = auto_match(info(torchvision.models.resnet18()), info(torchvision.models.resnet34()))
    assert len(pairs) == 21
    for student, teacher in pairs.items():
        assert student.split('.')[0] == teacher.split('.')[0]  # same stage
    assert pairs['layer2.0.conv1'] == 'layer2.0.conv1'  # downsampling block pairs with its twin
    assert pairs['layer3.1.conv2'] == 'layer3.5.conv2'  # last of its share
    assert pairs['fc'] == 'fc'


def test_explicit_maps_and_their_errors():
    s = [LayerInfo('a.0', 'Linear', (4, 4)), LayerInfo('a.1', 'Linear', (4, 4))]
    t = [LayerInfo('b.0', 'Linear', (4, 4)), LayerInfo('b.1', 'Linear', (4, 4))]
    assert explicit_match({'a.0': 'b.1'}, s, t) == {'a.0': 'b.1'}
    assert explicit_match([[r'a\.(\d)', r'b.\1']], s, t) == {'a.0': 'b.0', 'a.1': 'b.1'}
    with pytest.raises(MatchError, match="student \\['a.9'\\]"):
        explicit_match({'a.9': 'b.0'}, s, t)
    with pytest.raises(MatchError, match="teacher \\['b.9'\\]"):
        explicit_match({'a.0': 'b.9'}, s, t)
    with pytest.raises(MatchError, match='not a teacher layer'):
        explicit_match([[r'a\.(\d)', r'c.\1']], s, t)
    with pytest.raises(MatchError, match='match no student layer'):
        explicit_match([[r'zzz', r'b.0']], s, t)
