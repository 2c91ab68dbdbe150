"""overparameterize / contract on real models: exactness in eval(), training, checkpoints, options."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from opdf_torchdistill import (MPOError, OptionError, contract, is_overparameterized, mpo_modules, overparameterize,
                               plan)
from opdf_torchdistill import mpo as mpo_math
from conftest import rel
from models import BertLikeStack, small_vit, zoo

ZOO = zoo()


@pytest.mark.parametrize('name,build,make_input', ZOO, ids=[z[0] for z in ZOO])
def test_equivalence_training_and_contraction(name, build, make_input):
    torch.manual_seed(0)
    model = build().eval()
    reference = copy.deepcopy(model)
    x = make_input()
    keys = list(model.state_dict().keys())
    report = overparameterize(model)
    assert len(report.layers) > 0 and report.ratio > 1.0
    assert is_overparameterized(model)
    # Parameter counts in the report are the model's.
    assert report.params_training == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert rel(model(x), reference(x)) <= 1e-5
    # A few optimizer steps in train mode (BatchNorm statistics move too).
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(x)
    assert rel(trained, reference(x)) > 1e-6  # it did train
    contract(model)
    assert not is_overparameterized(model)
    assert list(model.state_dict().keys()) == keys  # same keys, same order
    assert type(model) is type(reference)
    fresh = copy.deepcopy(reference)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel(fresh(x), trained) <= 1e-5
        assert rel(model(x), trained) <= 1e-5


def test_float64_model_is_exact_to_1e12():
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    report = overparameterize(model)
    assert max(r.error for r in report.layers) <= 1e-12
    with torch.no_grad():
        assert rel(model(x), reference(x)) <= 1e-12
        contract(model)
        assert rel(model(x), reference(x)) <= 1e-12


def test_report_table_and_skips():
    model = small_vit()
    nn.init.zeros_(model.encoder.layers.encoder_layer_0.mlp[3].weight)
    report = overparameterize(model, exclude=[r'conv_proj'])
    text = str(report)
    assert 'encoder.layers.encoder_layer_0.self_attention.in_proj_weight' in text
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped['conv_proj'] == "excluded by 'conv_proj'"
    assert 'all-zero' in skipped['encoder.layers.encoder_layer_0.mlp.3']
    assert 'class_token' not in text  # not a weight matrix
    assert f'ratio {report.ratio:.3f}' in text
    for row, (_, module, tensor_name, _) in zip(report.layers, mpo_modules(model)):
        assert row.params_after == sum(t.numel() for t in module.parametrizations[tensor_name].parameters())


def test_unsupported_modules_are_listed_with_reasons():
    model = nn.Sequential(nn.Embedding(10, 8), nn.ConvTranspose2d(8, 8, 3), nn.Linear(8, 8))
    report = overparameterize(model)
    reasons = {s.name: s.reason for s in report.skipped}
    assert 'not a supported type' in reasons['0'] and 'not a supported type' in reasons['1']
    assert [r.name for r in report.layers] == ['2']


def test_selection_options():
    model = torchvision.models.resnet18(num_classes=10)
    r = plan(model, include=[r'^layer4'], types=['Conv2d'], min_numel=200_000)
    assert {row.name for row in r.layers} == {'layer4.0.conv1', 'layer4.0.conv2', 'layer4.1.conv1', 'layer4.1.conv2'}
    r = plan(model, overrides={r'^fc$': {'rows': [2, 1, 5], 'cols': [16, 1, 32]}, r'layer1': {'skip': True},
                               r'layer2': {'num_dummy': 3}})
    rows = {row.name: row for row in r.layers}
    assert rows['fc'].plan.row_factors == (2, 1, 5)
    assert 'layer1.0.conv1' not in rows
    assert rows['layer2.0.conv1'].plan.num_dummy == 3 and rows['layer3.0.conv1'].plan.num_dummy == 1
    r = plan(model, num_dummy=0)
    assert all(row.plan.num_cores == 2 for row in r.layers)


def test_target_ratio_option_reaches_the_model_ratio():
    model = torchvision.models.resnet18(num_classes=10)
    for target in (1.5, 2.0):
        assert abs(plan(model, target_ratio=target).ratio - target) < 0.02


def test_idempotent_and_dense_checkpoint_loading():
    base = torchvision.models.resnet18(num_classes=10).eval()
    model = torchvision.models.resnet18(num_classes=10).eval()
    overparameterize(model)
    again = overparameterize(model)
    assert len(again.layers) == 0 and all('already over-parameterized' in s.reason for s in again.skipped)
    model.load_state_dict(base.state_dict(), strict=True)  # dense -> MPO, decomposed on the fly
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(model(x), base(x)) <= 1e-5
    # Per-module hook path: a submodule loaded on its own (no model-level hook above it).
    other = torchvision.models.resnet18(num_classes=10).eval()
    layer = copy.deepcopy(model.layer1)
    layer.load_state_dict(other.layer1.state_dict(), strict=True)
    h = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert rel(layer(h), other.layer1(h)) <= 1e-5


def test_mpo_checkpoint_roundtrip_is_bitwise_and_shape_mismatch_is_named():
    model = torchvision.models.resnet18(num_classes=10)
    overparameterize(model)
    sd = model.state_dict()
    twin = torchvision.models.resnet18(num_classes=10)
    overparameterize(twin)
    twin.load_state_dict(sd, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), twin.state_dict().values()))
    other = torchvision.models.resnet18(num_classes=10)
    overparameterize(other, num_dummy=2)
    with pytest.raises(ValueError, match=r'conv1: checkpoint MPO cores .* do not match'):
        other.load_state_dict(sd, strict=True)


def test_frozen_cores_are_buffers_and_survive_unfreezing():
    model = torchvision.models.resnet18(num_classes=10)
    overparameterize(model, freeze='central')
    for _, module, tensor_name, p in mpo_modules(model):
        plist = module.parametrizations[tensor_name]
        names = dict(plist.named_parameters(recurse=False))
        assert f'original{p.plan.central}' not in names
        assert f'original{p.plan.central}' in dict(plist.named_buffers(recurse=False))
    for param in model.parameters():  # what torchdistill's clean_modules does between stages
        param.requires_grad = True
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    contract(model)
    assert all(p.requires_grad for p in model.parameters())
    overparameterize(model, freeze='auxiliary')
    row = next(mpo_modules(model))[3]
    assert row.frozen == row.plan.auxiliary


def test_caching_contracts_once_per_need(monkeypatch):
    calls = []
    original = mpo_math.reconstruct
    monkeypatch.setattr(mpo_math, 'reconstruct', lambda cores: calls.append(1) or original(cores))
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # the same module twice per forward
    overparameterize(model)
    x = torch.randn(4, 16)
    calls.clear()
    model(x).sum().backward()
    assert len(calls) == 1  # shared within a step
    model(x).sum().backward()  # gradient accumulation: the freed graph is not reused
    assert len(calls) == 2
    model.eval()
    with torch.no_grad():
        model(x)
        model(x)
    assert len(calls) == 3  # validation reuses the weight ...
    with torch.no_grad():
        lin.parametrizations.weight.original0.add_(1.0)  # ... until a core changes
        model(x)
    assert len(calls) == 4


def test_deepcopy_of_overparameterized_models():
    model = BertLikeStack()
    overparameterize(model)
    x = torch.randn(2, 6, 32)
    model(x).sum()  # leaves a cached weight with a graph, which deepcopy could not copy
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert rel(clone(x), model(x)) == 0
    with torch.no_grad():
        clone.encoder.layer[0].attention.self.query.parametrizations.weight.original0.zero_()
        assert rel(clone(x), model(x)) > 0  # independent cores


def test_contracting_a_model_leaves_its_deep_copies_intact():
    model = torchvision.models.resnet18(num_classes=10).eval()
    overparameterize(model)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = twin(x)
        contract(model)
        assert torch.equal(twin(x), before) and is_overparameterized(twin)
        contract(twin)
        assert rel(twin(x), model(x)) == 0


def test_writes_through_data_need_clear_caches():
    from opdf_torchdistill import clear_caches
    model = nn.Linear(8, 8)
    overparameterize(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model(x)
        model.parametrizations.weight.original0.data.zero_()  # bypasses the version counter
        assert torch.equal(model(x), before)  # documented: the cached weight is still used
        clear_caches(model)
        assert not torch.equal(model(x), before)


@pytest.mark.parametrize('options,message', [
    ({'num_dumy': 1}, "unknown MPO option 'num_dumy' \\(did you mean 'num_dummy'\\?\\)"),
    ({'include': ['nothing_like_this']}, "include pattern 'nothing_like_this' matches no supported weight"),
    ({'exclude': ['zzz']}, "exclude pattern 'zzz' matches no supported weight"),
    ({'types': ['Conv4d']}, "unknown module type 'Conv4d'.*valid types: Linear, Conv1d"),
    ({'num_dummy': -1}, 'num_dummy must be an integer >= 0'),
    ({'num_dummy': 1.5}, 'num_dummy must be an integer >= 0'),
    ({'target_ratio': 0.9}, 'target_ratio must be a number > 1.0'),
    ({'target_ratio': 40.0}, 'target_ratio 40.0 cannot be met'),
    ({'freeze': 'middle'}, "freeze must be one of \\[None, 'central', 'auxiliary'\\]"),
    ({'overrides': {'fc': {'row': [2, 5]}}}, "overrides\\['fc'\\]: unknown key 'row' \\(did you mean 'rows'\\?\\)"),
    ({'overrides': {'^fc$': {'rows': [3, 5], 'cols': [16, 32]}}}, 'do not fit the 10x512 matrix'),
    ({'overrides': {'fc': {'rows': [2, 5]}}}, 'give both rows and cols'),
    ({'include': ['(']}, 'invalid regular expression'),
])
def test_bad_options_are_refused_with_clear_messages(options, message):
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(OptionError, match=message):
        plan(model, **options)


def test_nan_weight_names_the_layer():
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.layer2[1].conv1.weight[0, 0, 0, 0] = float('inf')
    with pytest.raises(MPOError, match='layer2.1.conv1: weight contains NaN or Inf'):
        overparameterize(model)


def test_reconstruction_check_fails_loudly_above_tolerance():
    model = nn.Linear(64, 48)
    with pytest.raises(MPOError, match='reconstruction error .* exceeds tolerance 1.0e-30'):
        overparameterize(model, tolerance=1e-30)
