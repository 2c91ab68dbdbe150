"""Fashion-MNIST: the idx reader and splits (on tiny files written here), the model pairs, the recipes."""
import gzip
import sys

import numpy as np
import pytest
import torch

from opdf_torchdistill import data
from opdf_torchdistill.data import FashionMNIST, IdxFormatError, fashion_split_indices, read_idx
from opdf_torchdistill.matching import LayerInfo, auto_match
from opdf_torchdistill.zoo import fashion_cnn, fashion_vit, fashion_vit_from_teacher
from conftest import ROOT

FASHION = ROOT / 'configs' / 'fashion'
ARMS = ('kd', 'kd_svd', 'kd_mpo', 'kd_opdf', 'kd_opdf_paper', 'kd_opdf_random')


def _idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 + array.ndim).to_bytes(4, 'big') + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(root, n_train=200, n_test=50, gz=True, seed=0):
    """The four idx files, ``n_train / 10`` images per class (labels shuffled), gzipped or raw."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, n in (('train', n_train), ('t10k', n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # makes each image traceable to its label
        for kind, array in (('images-idx3', images), ('labels-idx1', labels)):
            name = f'{part}-{kind}-ubyte'
            blob = _idx_bytes(array)
            if gz:
                (root / f'{name}.gz').write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)
        parts[part] = (images, labels)
    return parts


@pytest.mark.parametrize('gz', [True, False])
def test_reads_gzipped_and_raw_idx_files(tmp_path, gz):
    parts = write_fashion(tmp_path / 'raw', gz=gz)
    images, labels = parts['train']
    assert np.array_equal(read_idx(tmp_path / 'raw' / ('train-images-idx3-ubyte' + ('.gz' if gz else '')), 3), images)
    test = FashionMNIST('test', root=tmp_path / 'raw', val_size=50, normalize=False)
    assert len(test) == 50 and test.targets.tolist() == parts['t10k'][1].tolist()
    x, y = test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x, torch.from_numpy(parts['t10k'][0][3].astype(np.float32) / 255).unsqueeze(0))


def test_validation_split_is_stratified_deterministic_disjoint_and_rng_free(tmp_path):
    parts = write_fashion(tmp_path)
    labels = parts['train'][1].astype(np.int64)
    torch.manual_seed(0)
    np.random.seed(0)
    train = FashionMNIST('train', root=tmp_path, val_size=50)
    torch.manual_seed(123)
    np.random.seed(123)
    val = FashionMNIST('val', root=tmp_path, val_size=50)
    again = fashion_split_indices(labels, 50)
    assert np.array_equal(val.indices, again['val']) and np.array_equal(train.indices, again['train'])
    assert not set(train.indices) & set(val.indices) and len(train) + len(val) == 200
    assert np.bincount(val.targets.numpy()).tolist() == [5] * 10  # stratified
    assert val.targets.tolist() == labels[val.indices].tolist()
    assert not np.array_equal(fashion_split_indices(labels, 50, split_seed=1)['val'], again['val'])
    # subsamples: stratified, inside the training split, nested, validation unchanged
    small = FashionMNIST('train', root=tmp_path, val_size=50, train_size=30)
    assert np.bincount(small.targets.numpy()).tolist() == [3] * 10 and set(small.indices) <= set(train.indices)
    larger = fashion_split_indices(labels, 50, train_size=60)['train']
    assert set(small.indices) <= set(larger)
    assert len(FashionMNIST('train', root=tmp_path, val_size=50, train_fraction=0.2)) == 30
    assert np.array_equal(FashionMNIST('val', root=tmp_path, val_size=50, train_size=30).indices, val.indices)
    # normalisation: the whole training split's statistics, shared by every split and subsample
    assert abs(train.images.mean().item()) < 1e-4 and abs(train.images.std().item() - 1) < 1e-3
    assert (val.mean, val.std) == (train.mean, train.std) == (small.mean, small.std)


def test_bad_arguments_are_errors(tmp_path):
    write_fashion(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        FashionMNIST('training', root=tmp_path)
    with pytest.raises(ValueError, match='val_size must be an integer in 1..199'):
        FashionMNIST('val', root=tmp_path, val_size=200)
    with pytest.raises(ValueError, match='train_size must be an integer in 1..150'):
        FashionMNIST('train', root=tmp_path, val_size=50, train_size=151)
    with pytest.raises(ValueError, match='not both'):
        FashionMNIST('train', root=tmp_path, val_size=50, train_size=10, train_fraction=0.5)
    with pytest.raises(ValueError, match='normalize must be'):
        FashionMNIST('train', root=tmp_path, val_size=50, normalize=[0.5])


def test_wrong_magic_truncated_and_unmarked_gzip_name_the_file(tmp_path):
    write_fashion(tmp_path, gz=False)
    labels = tmp_path / 'train-labels-idx1-ubyte'
    good = labels.read_bytes()
    labels.write_bytes(b'\x00\x00\x08\x03' + good[4:])  # an images magic number on a labels file
    with pytest.raises(IdxFormatError, match=r'train-labels-idx1-ubyte: magic number 0x00000803, expected 0x00000801'):
        FashionMNIST('train', root=tmp_path, val_size=50)
    labels.write_bytes(good[:-3])
    with pytest.raises(IdxFormatError, match=r'train-labels-idx1-ubyte: header says 200 = 200 bytes of data, found 197'):
        FashionMNIST('train', root=tmp_path, val_size=50)
    labels.write_bytes(gzip.compress(good))  # gzipped, but not named .gz
    with pytest.raises(IdxFormatError, match=r'name it \*\.gz'):
        FashionMNIST('train', root=tmp_path, val_size=50)
    labels.write_bytes(good[:8 + 100])  # a consistent header for 100 labels: count mismatch with the images
    labels.write_bytes((0x801).to_bytes(4, 'big') + (100).to_bytes(4, 'big') + good[8:108])
    with pytest.raises(IdxFormatError, match='holds 200 images but .*train-labels-idx1-ubyte 100 labels'):
        FashionMNIST('train', root=tmp_path, val_size=50)


def test_missing_files_name_both_ways_to_get_them(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / 't10k-labels-idx1-ubyte.gz').unlink()
    (tmp_path / 'train-images-idx3-ubyte.gz').unlink()
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST('test', root=tmp_path, val_size=50)
    message = str(info.value)
    assert 'train-images-idx3-ubyte, t10k-labels-idx1-ubyte' in message and str(tmp_path) in message
    assert 'apt-get install dataset-fashion-mnist' in message and 'torchvision.datasets.FashionMNIST' in message
    with pytest.raises(FileNotFoundError, match='is not a folder'):
        FashionMNIST('test', root=tmp_path / 'nowhere')


def test_default_root_is_the_debian_folder_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    assert data._resolve_root(None) == data.Path('/usr/share/datasets/fashion-mnist')
    write_fashion(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    assert len(FashionMNIST('test', val_size=50)) == 50


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    data._load.cache_clear()
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)  # import fails as if not installed
    try:
        with pytest.raises(ImportError, match=r'pip install "opdf-torchdistill\[demo\]"'):
            data.Digits('train')
    finally:
        data._load.cache_clear()


def test_registered_for_recipes():
    import opdf_torchdistill  # noqa: F401
    from torchdistill.datasets.registry import DATASET_DICT
    from torchdistill.models.registry import MODEL_DICT
    assert DATASET_DICT['OPDFFashionMNIST'] is FashionMNIST
    assert DATASET_DICT['FashionMNIST'].__module__.startswith('torchvision')  # torchvision's key stays its own
    assert {'fashion_cnn', 'fashion_vit', 'fashion_vit_from_teacher'} <= set(MODEL_DICT)


# -- models -------------------------------------------------------------------------------------
def _layers(model):
    return [LayerInfo(n, type(m).__name__, (m.weight.shape[0], m.weight[0].numel()))
            for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


@pytest.mark.parametrize('make_pair', [
    lambda: (fashion_cnn(depth=1), fashion_cnn(depth=2)),
    lambda: (fashion_vit(depth=3), fashion_vit(depth=6)),
], ids=['cnn', 'vit'])
def test_every_student_layer_has_a_same_shaped_teacher_partner(make_pair):
    student, teacher = make_pair()
    x = torch.randn(2, 1, 28, 28)
    assert student(x).shape == teacher(x).shape == (2, 10)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    s_layers, t_layers = _layers(student), _layers(teacher)
    matched = auto_match(s_layers, t_layers)
    shapes = {layer.name: layer.shape for layer in t_layers}
    assert set(matched) == {layer.name for layer in s_layers}
    assert all(shapes[matched[layer.name]] == layer.shape for layer in s_layers)
    if isinstance(student, type(fashion_vit())):  # i <- 2i + 1, as the student is initialised
        assert matched['blocks.0.attn.query'] == 'blocks.1.attn.query'
        assert matched['blocks.2.mlp.fc2'] == 'blocks.5.mlp.fc2'


def test_vit_student_is_initialised_from_teacher_layers(tmp_path):
    torch.manual_seed(0)
    teacher = fashion_vit(depth=6)
    path = tmp_path / 'teacher.pt'
    torch.save({'model': teacher.state_dict(), 'best_value': 80.0, 'args': {'seed': 0}}, path)
    for layer_map, expected in (('odd', [1, 3, 5]), ('even', [0, 2, 4]), ('first', [0, 1, 2]), ('uniform', [1, 3, 5]),
                                ([5, 0, 2], [5, 0, 2])):
        student = fashion_vit_from_teacher(str(path), layer_map=layer_map, depth=3)
        for i, t in enumerate(expected):
            s_state, t_state = student.blocks[i].state_dict(), teacher.blocks[t].state_dict()
            assert s_state.keys() == t_state.keys() and all(torch.equal(s_state[k], t_state[k]) for k in s_state)
        for name in ('patch_embed.weight', 'patch_embed.bias', 'cls_token', 'pos_embed', 'norm.weight', 'head.weight',
                     'head.bias'):
            assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    x = torch.randn(3, 1, 28, 28)
    torch.save(teacher.state_dict(), tmp_path / 'bare.pt')  # a bare state dict works too
    same_depth = fashion_vit_from_teacher(str(tmp_path / 'bare.pt'), layer_map=list(range(6)), depth=6)
    assert torch.allclose(same_depth(x), teacher.eval()(x))


def test_vit_student_init_errors(tmp_path):
    torch.save({'model': fashion_vit(depth=4).state_dict()}, tmp_path / 't.pt')
    with pytest.raises(FileNotFoundError, match='missing.pt does not exist'):
        fashion_vit_from_teacher(str(tmp_path / 'missing.pt'))
    with pytest.raises(ValueError, match=r'teacher blocks \[5\] do not exist \(the teacher has blocks 0..3\)'):
        fashion_vit_from_teacher(str(tmp_path / 't.pt'), depth=3)
    with pytest.raises(ValueError, match="layer_map must be 'odd'"):
        fashion_vit_from_teacher(str(tmp_path / 't.pt'), layer_map='every other', depth=2)
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc1.weight' has shape \(128, 64\), the student's "
                                         r"'blocks.0.mlp.fc1.weight' \(256, 64\)"):
        fashion_vit_from_teacher(str(tmp_path / 't.pt'), depth=2, mlp_dim=256)
    with pytest.raises(TypeError, match='unexpected arguments'):
        fashion_vit_from_teacher(str(tmp_path / 't.pt'), depth=2, width=3)


# -- recipes ------------------------------------------------------------------------------------
def test_recipes_and_study_spec_are_consistent():
    from opdf_torchdistill import study as studies
    study = studies.load_study(FASHION / 'study.yaml')
    assert [p.name for p in study.pairs] == ['cnn', 'cnn_at', 'vit']
    for pair in study.pairs:
        if pair.name == 'cnn_at':  # attention transfer with and without OPDF, on the CNN pair's teacher
            assert [a.name for a in pair.arms] == ['at', 'at_opdf'] and pair.baseline == 'at'
            assert pair.prepare == study.pairs[0].prepare
        else:
            assert [a.name for a in pair.arms] == list(ARMS) and pair.baseline == 'kd'
        assert len(pair.seeds) >= 5 and not set(pair.seeds) & set(pair.select_seeds)
        for arm in pair.arms:
            lrs = {point['train.optimizer.kwargs.lr'] for point in arm.grid}
            assert len(lrs) >= 3
            for point in arm.grid:  # every grid key exists in the config (a typo would be an error here)
                config = studies.resolved_config(arm.config, point)
            student = config['models']['student_model']
            terms = config['train']['criterion']['kwargs']['sub_terms']
            mpo = student['kwargs'].get('mpo') if student['key'] == 'opdf_student' else None
            assert (mpo is None) == (arm.name in ('kd', 'at'))
            if mpo is not None:  # planned against the teacher, so every weight has an aligned partner
                assert mpo['align_to']['key'] == config['models']['teacher_model']['key']
                assert mpo['num_dummy'] == (0 if arm.name == 'kd_svd' else 1)
            aligned = 'opdf' in terms
            assert aligned == (arm.name not in ('kd', 'kd_mpo', 'at'))
            assert ('at' in terms) == arm.name.startswith('at') and ('kd' in terms) == arm.name.startswith('kd')
            if aligned:
                kwargs = terms['opdf']['criterion']['kwargs']
                assert kwargs['reduction'] == ('paper' if arm.name == 'kd_opdf_paper' else 'relative')
                assert kwargs.get('targets', 'teacher') == ('random' if arm.name == 'kd_opdf_random' else 'teacher')
                assert any('train.criterion.kwargs.sub_terms.opdf.weight' in p for p in arm.grid)
            if pair.name == 'vit':
                assert student['kwargs']['teacher_ckpt'] == config['models']['teacher_model']['src_ckpt']
                assert student['kwargs'].get('base', student['key']) == 'fashion_vit_from_teacher'


@pytest.mark.parametrize('pair,arm', [('cnn', 'kd_opdf_random'), ('cnn', 'at_opdf'), ('vit', 'kd_opdf')])
def test_a_recipe_trains_on_tiny_written_data(pair, arm, tmp_path, monkeypatch):
    """One epoch of a real recipe on random idx files (the recipes read the default root, here the
    environment variable): builds the teacher-planned MPO student, aligns and tests. The recipes'
    5,000 + 5,000 images are shrunk to 100 + 50 to keep the test fast."""
    from opdf_torchdistill.cli.train import get_parser, run
    write_fashion(tmp_path / 'data', n_train=200, n_test=20, gz=False)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / 'data'))
    built = []
    original = FashionMNIST.__init__

    def smaller(self, split='train', **kwargs):
        assert kwargs.get('train_size') in (None, 5000) and 'root' not in kwargs  # as the recipes say
        built.append(split)
        original(self, split, **{**kwargs, 'val_size': 50, 'train_size': 100 if kwargs.get('train_size') else None})
    monkeypatch.setattr(FashionMNIST, '__init__', smaller)
    teacher = fashion_cnn(depth=2) if pair == 'cnn' else fashion_vit(depth=6)
    torch.save({'model': teacher.state_dict()}, tmp_path / 'teacher.pt')
    argv = ['--config', str(FASHION / pair / f'{arm}.yaml'), '--device', 'cpu', '--seed', '0', '-student_only',
            '--dst_ckpt', str(tmp_path / 'student.pt'), '--set', 'train.num_epochs=1',
            '--set', f'models.teacher_model.src_ckpt={tmp_path / "teacher.pt"}',
            '--set', 'train.train_data_loader.kwargs.batch_size=50']
    if pair == 'vit':
        argv += ['--set', f'models.student_model.kwargs.teacher_ckpt={tmp_path / "teacher.pt"}']
    metrics, student, _ = run(get_parser().parse_args(argv))
    assert sorted(built) == ['test', 'train', 'val']
    assert metrics['test']['samples'] == 20 and metrics['train_params'] > metrics['inference_params']
    assert len(student.opdf.report.layers) == (7 if pair == 'cnn' else 20)
