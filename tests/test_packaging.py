"""The package as a user installs it: a wheel built from this tree, installed with ``pip install --no-deps
--target`` and used from another folder, runs the main job and ``opdf-train`` with exit status 0; its
runtime dependencies are what the plugin imports (demo, study and test needs are extras); the plugin
imports without the extras; the shipped recipes are the repository's ``configs/digits/``."""
import ast
import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / 'opdf_torchdistill'
# import name -> distribution, for the third-party modules the package may import
RUNTIME = {'torch': 'torch', 'torchvision': 'torchvision', 'torchdistill': 'torchdistill', 'yaml': 'pyyaml',
           'numpy': 'numpy'}
EXTRAS_ONLY = {'sklearn': 'scikit-learn', 'scipy': 'scipy', 'matplotlib': 'matplotlib', 'tensorly': 'tensorly',
               'tltorch': 'tensorly-torch', 'transformers': 'transformers', 'datasets': 'datasets', 'timm': 'timm',
               'safetensors': 'safetensors', 'submitit': 'submitit'}
# modules that exist for an extra and that nothing imports unless the user names them (a recipe's
# `dependencies: [opdf_torchdistill.hf]`): they may import that extra at module level
OPT_IN = {'opdf_torchdistill/hf.py': 'hf', 'opdf_torchdistill/timm_models.py': 'hf'}
PLOTTING_OR_STATISTICS = {'matplotlib', 'scipy', 'scikit-learn', 'tensorly', 'tensorly-torch', 'seaborn', 'pandas',
                          'statsmodels'}


def _run(argv, cwd, env=None, timeout=300):
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _requirement_name(line: str) -> str:
    name = line.split(';')[0].strip()
    for stop in '<>=!~[ (':
        name = name.split(stop)[0]
    return name.lower().replace('_', '-')


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """Build the wheel from a copy of the tree (nothing is written into the checkout) and install it with
    ``pip install --no-deps --target``; returns (wheel, target folder, a folder outside both)."""
    base = tmp_path_factory.mktemp('packaging')
    src = base / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy2(ROOT / name, src / name)
    # symlinks=True keeps opdf_torchdistill/recipes/digits a link to configs/digits, as in the checkout
    shutil.copytree(PACKAGE, src / 'opdf_torchdistill', symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    shutil.copytree(ROOT / 'configs' / 'digits', src / 'configs' / 'digits')
    wheels = base / 'wheels'
    # --no-build-isolation: offline, with the setuptools the test extra installs
    built = _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', src, '-w', wheels],
                 cwd=base)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob('opdf_torchdistill-*.whl')
    target = base / 'site'
    done = _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', target, wheel], cwd=base)
    assert done.returncode == 0, done.stdout + done.stderr
    elsewhere = base / 'elsewhere'
    elsewhere.mkdir()
    return wheel, target, elsewhere


def _env(target: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS='1')
    env.pop('PYTHONSAFEPATH', None)
    return env


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith('.dist-info/METADATA')]
        return Parser().parsestr(z.read(name).decode())


def test_wheel_requires_only_what_the_plugin_imports(installed):
    meta = _metadata(installed[0])
    requires = meta.get_all('Requires-Dist') or []
    runtime = {_requirement_name(r) for r in requires if 'extra ==' not in r}
    assert runtime == set(RUNTIME.values()), runtime
    assert not runtime & PLOTTING_OR_STATISTICS
    extras = {}
    for r in requires:
        if 'extra ==' in r:
            extras.setdefault(r.split('extra ==')[1].strip().strip('"\''), set()).add(_requirement_name(r))
    assert set(meta.get_all('Provides-Extra')) == {'demo', 'study', 'hf', 'docs', 'test'}
    assert extras['demo'] == {'scikit-learn'}
    assert extras['study'] == {'scikit-learn', 'scipy', 'matplotlib', 'submitit'}
    # the README's second command installs [test] and runs every test: it must hold the demo data too
    assert extras['hf'] == {'transformers', 'datasets', 'timm', 'safetensors'}
    assert extras['docs'] == {'mkdocs', 'mkdocs-material', 'mkdocstrings'}
    # the suite builds the documentation site (tests/test_docs.py)
    suite = {'tensorly', 'pytest', 'hypothesis', 'setuptools'}
    assert extras['study'] | extras['hf'] | extras['docs'] | suite <= extras['test']


def _imports(tree: ast.AST):
    """(top-level module name, imported at module level?) for every absolute import in a module."""
    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name.split('.')[0], not lazy
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module.split('.')[0], not lazy
            yield from visit(child, inner)
    yield from visit(tree, False)


@pytest.mark.skipif(sys.version_info < (3, 10), reason='needs sys.stdlib_module_names (Python 3.10+)')
def test_package_imports_map_to_declared_dependencies(installed):
    meta = _metadata(installed[0])
    declared = {_requirement_name(r) for r in meta.get_all('Requires-Dist') if 'extra ==' not in r}
    in_extras = {}
    for r in meta.get_all('Requires-Dist'):
        if 'extra ==' in r:
            in_extras.setdefault(_requirement_name(r), set()).add(r.split('extra ==')[1].strip().strip('"\''))
    problems, lazy_seen = [], set()
    for path in sorted(PACKAGE.rglob('*.py')):
        for module, eager in _imports(ast.parse(path.read_text(), str(path))):
            if module in sys.stdlib_module_names or module in ('opdf_torchdistill', '__future__'):
                continue
            where = path.relative_to(ROOT).as_posix()
            if module in RUNTIME:
                if RUNTIME[module] not in declared:
                    problems.append(f'{where}: imports {module} but {RUNTIME[module]} is not a dependency')
            elif module in EXTRAS_ONLY:
                if not eager:
                    lazy_seen.add(module)
                if eager and OPT_IN.get(where) in in_extras.get(EXTRAS_ONLY[module], ()):
                    continue
                if eager:
                    problems.append(f'{where}: imports {module} at module level; it is an extra: import it inside '
                                    f'the function that needs it')
                elif EXTRAS_ONLY[module] not in in_extras:
                    problems.append(f'{where}: imports {module}, which no extra declares')
            else:
                problems.append(f'{where}: imports {module}, which is neither a dependency nor an extra')
    assert not problems, '\n'.join(problems)
    assert {'scipy', 'matplotlib'} <= lazy_seen  # the scan does see function-level imports
    for where in OPT_IN:
        assert (ROOT / where).is_file(), f'{where} is listed as an opt-in module but does not exist'



def test_plugin_imports_without_the_extras():
    """With scikit-learn, scipy, matplotlib, tensorly, submitit and the Hugging Face packages marked absent, the
    plugin, every CLI module but the GLUE runner and the recipes still import, and only the digits data asks
    for the ``demo`` extra, by name."""
    code = '''
import importlib, sys
BLOCKED = {'sklearn', 'scipy', 'matplotlib', 'tensorly', 'tltorch', 'transformers', 'datasets', 'timm', 'safetensors',
           'submitit'}
for name in BLOCKED:  # as if not installed: importing raises ImportError, find_spec returns None
    sys.modules[name] = None
import opdf_torchdistill, opdf_torchdistill.plugin, opdf_torchdistill.recipes
for cli in ('train', 'export', 'inspect', 'demo', 'ablate', 'bench'):
    importlib.import_module('opdf_torchdistill.cli.' + cli)
from torchdistill.models.registry import MODEL_DICT
assert 'opdf_student' in MODEL_DICT
loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED and sys.modules[m] is not None)
assert not loaded, loaded
from opdf_torchdistill.data import Digits
try:
    Digits('train')
except ImportError as exc:
    print('DIGITS:', exc)
'''
    done = _run([sys.executable, '-c', code], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'DIGITS:' in done.stdout and 'scikit-learn' in done.stdout and 'opdf-torchdistill[demo]' in done.stdout, \
        done.stdout


def test_shipped_recipes_are_the_repository_configs(installed):
    from opdf_torchdistill import recipes
    repo = sorted((ROOT / 'configs' / 'digits').glob('*.yaml'))
    assert recipes.available() == [f'digits/{p.stem}' for p in repo]
    for p in repo:
        assert recipes.recipe_path(f'digits/{p.stem}').read_bytes() == p.read_bytes(), p.name
    with zipfile.ZipFile(installed[0]) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith('opdf_torchdistill/recipes/digits/')}
    assert shipped == {f'opdf_torchdistill/recipes/digits/{p.name}': p.read_bytes() for p in repo}
    with pytest.raises(FileNotFoundError, match=r"no shipped recipe 'digits/kd_opfd'.*digits/kd_opdf"):
        recipes.recipe_path('digits/kd_opfd')


def test_every_console_script_returns_an_int_status(installed):
    with zipfile.ZipFile(installed[0]) as z:
        (name,) = [n for n in z.namelist() if n.endswith('.dist-info/entry_points.txt')]
        lines = z.read(name).decode().splitlines()
    scripts = dict(line.split(' = ') for line in lines[lines.index('[console_scripts]') + 1:] if ' = ' in line)
    assert {'opdf-train', 'opdf-export', 'opdf-demo', 'opdf-recipes'} <= set(scripts)
    import importlib
    wrong = []
    for script, target in scripts.items():
        module, func = target.split(':')
        annotation = inspect.signature(getattr(importlib.import_module(module), func)).return_annotation
        if annotation not in (int, 'int'):
            wrong.append(f'{script} -> {target} returns {annotation}')
    assert not wrong, wrong


def test_installed_wheel_runs_the_main_job_and_opdf_train_from_another_folder(installed):
    _, target, elsewhere = installed
    env, bin_dir = _env(target), target / 'bin'
    where = _run([sys.executable, '-c', 'import opdf_torchdistill; print(opdf_torchdistill.__file__)'], elsewhere, env)
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr

    demo = _run([bin_dir / 'opdf-demo', '--epochs', '1', '--threads', '1'], elsewhere, env)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert 'KD + OPDF exported (plain)' in demo.stdout and 'same predictions on all 360 test images' in demo.stdout
    runs = elsewhere / 'runs' / 'digits'  # the default --out, relative to the working directory
    assert {'teacher.pt', 'kd_opdf.pt', 'kd_opdf_exported.pt'} <= {p.name for p in runs.iterdir()}

    found = _run([bin_dir / 'opdf-recipes', 'digits/kd_opdf'], elsewhere, env)
    recipe = Path(found.stdout.strip())
    assert found.returncode == 0 and recipe.is_relative_to(target) and recipe.is_file(), found.stdout + found.stderr
    train = _run([bin_dir / 'opdf-train', '--config', recipe, '--device', 'cpu', '--seed', '0', '--threads', '1',
                  '--set', 'train.num_epochs=1', '--set', 'train.scheduler.kwargs.T_max=1',
                  '--set', f'models.teacher_model.src_ckpt={runs / "teacher.pt"}', '--dst_ckpt', 'train_check.pt'],
                 elsewhere, env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (elsewhere / 'train_check.pt').is_file()


def test_demo_refuses_bad_input(tmp_path, capsys):
    from opdf_torchdistill.cli import demo
    (tmp_path / 'teacher.yaml').write_text('{}')
    assert demo.main(['--configs', str(tmp_path), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'missing student_ce.yaml, kd.yaml, kd_opdf.yaml' in err and str(tmp_path) in err
    assert not (tmp_path / 'out').exists()
    with pytest.raises(SystemExit) as exit_info:
        demo.main(['--epochs', '0'])
    assert exit_info.value.code == 2 and 'must be a positive integer, got 0' in capsys.readouterr().err
