"""The documentation stays true: the site builds with ``mkdocs build --strict`` (a broken link or anchor, a
page left out of the navigation or a missing included file fails), its generated pages hold what the code
defines (every ``mpo:`` option, every flag of every console script, every registered key), the results
page shows the Fashion-MNIST tables the report reproduces, and the recipe diff shown in the README and on
the recipe page is the diff between the two configs it names."""
import difflib
import html
import importlib
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import ROOT

DOCS = ROOT / 'docs'
DIFF_BASE = ROOT / 'configs' / 'ilsvrc2012' / 'kd-resnet18_from_resnet34.yaml'
DIFF_OPDF = ROOT / 'configs' / 'ilsvrc2012' / 'opdf-kd-resnet18_from_resnet34.yaml'


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The site built from the checkout into a temporary folder (nothing is written into the tree)."""
    out = tmp_path_factory.mktemp('site')
    env = dict(os.environ, NO_MKDOCS_2_WARNING='1', OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--config-file',
                           str(ROOT / 'mkdocs.yml'), '--site-dir', str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _page(site, name: str) -> str:
    text = (site / name / 'index.html').read_text()
    return text[text.index('<article'):text.index('</article>')]


def test_the_site_builds_strict_with_every_page(site):
    nav = (ROOT / 'mkdocs.yml').read_text()
    for name in ('getting-started', 'recipes', 'options', 'mpo', 'design', 'alignment', 'results',
                 'results-fashion', 'results-digits', 'performance', 'reliability', 'paper-settings',
                 'running-at-scale', 'cli', 'api', 'changelog'):
        assert f'{name}.md' in nav and (site / name / 'index.html').exists(), name


def test_options_page_is_generated_from_mpoconfig(site):
    from opdf_torchdistill.options import MPOConfig
    page = _page(site, 'options')
    for f in fields(MPOConfig):
        assert f'id="{f.name}"' in page, f.name
    assert 'opdf:options' not in page


def _parsers():
    """(script, parser) for every console script with an argparse parser, sub-commands included."""
    import argparse
    try:
        import tomllib
        scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
    except ModuleNotFoundError:  # Python < 3.11
        block = (ROOT / 'pyproject.toml').read_text().split('[project.scripts]', 1)[1].split('\n[', 1)[0]
        scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', block, re.M))
    out = []
    for name, target in scripts.items():
        module = importlib.import_module(target.split(':')[0])
        if not hasattr(module, 'get_parser'):
            out.append((name, None))
            continue
        stack = [(name, module.get_parser())]
        while stack:
            prog, parser = stack.pop()
            out.append((prog, parser))
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack += [(f'{prog} {sub}', p) for sub, p in action.choices.items()]
    return out


def test_cli_page_is_generated_from_every_parser(site):
    page = _page(site, 'cli')
    for prog, parser in _parsers():
        assert f'id="{prog.replace(" ", "-")}"' in page, prog
        for action in parser._actions if parser else ():
            for flag in action.option_strings:
                if flag not in ('-h', '--help'):
                    assert f'<code>{html.escape(flag, quote=False)}' in page, f'{prog} {flag}'
    assert 'opdf:cli' not in page


def test_registry_table_lists_every_registered_key(site):
    import opdf_torchdistill  # noqa: F401  (registers)
    from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT
    from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT, MODEL_DICT
    from torchdistill.optim.registry import OPTIM_DICT
    page = _page(site, 'recipes')
    for table in (MODEL_DICT, AUXILIARY_MODEL_WRAPPER_DICT, MIDDLE_LEVEL_LOSS_DICT, OPTIM_DICT):
        for key, obj in table.items():
            if getattr(obj, '__module__', '').startswith('opdf_torchdistill'):
                assert f'<td><code>{key}</code></td>' in page, key
    assert 'opdf:registry' not in page


def test_api_page_documents_the_core_functions(site):
    page = _page(site, 'api')
    for name in ('surgery.overparameterize', 'surgery.contract', 'surgery.plan', 'options.MPOConfig',
                 'plugin.losses.AuxTensorAlignmentLoss', 'plugin.models.opdf_student', 'study.records'):
        assert f'id="opdf_torchdistill.{name}"' in page, name


@pytest.mark.parametrize('tables_file, page_name, least', [('fashion.md', 'results-fashion', 60),
                                                            ('fashion_confirm.md', 'results-confirm', 60)])
def test_results_pages_show_the_tables_the_report_reproduces(site, tables_file, page_name, least):
    """``docs/results/<study>.md`` (reproduced byte for byte from the records by test_ablate) is the one
    copy of a study's tables; its results page includes it, and every row is in the built page."""
    tables = (DOCS / 'results' / tables_file).read_text()
    assert f'--8<-- "docs/results/{tables_file}"' in (DOCS / f'{page_name}.md').read_text()
    page = _page(site, page_name)
    lines = tables.splitlines()
    headers = {line for line, below in zip(lines, lines[1:]) if below.startswith('|---')}
    rows = [line for line in lines if line.startswith('| ') and line not in headers]
    assert len(rows) > least
    for row in rows:
        cells = [html.escape(c.strip(), quote=False) for c in row.strip('|').split('|')]
        assert '<tr>\n' + ''.join(f'<td>{c}</td>\n' for c in cells) + '</tr>' in page, row


def _recipe_diffs(text: str):
    """The ```diff blocks that turn a recipe into an OPDF one (those that add the dependency)."""
    return [b for b in re.findall(r'```diff\n(.*?)```', text, re.S) if "+dependencies: ['opdf_torchdistill']" in b]


def _changes(a: str, b: str):
    """Lines removed from a and added in b (YAML comments aside), as ('-'|'+', line) pairs."""
    strip = [line for line in a.splitlines() if not line.lstrip().startswith('#')]
    new = [line for line in b.splitlines() if not line.lstrip().startswith('#')]
    return sorted((tag, line) for tag, line in ((d[0], d[2:]) for d in difflib.ndiff(strip, new)) if tag in '+-')


@pytest.mark.parametrize('where', ['README.md', 'docs/recipes.md'])
def test_recipe_diff_is_the_diff_between_the_configs(where):
    text = (ROOT / where).read_text()
    (diff,) = _recipe_diffs(text)
    base, opdf = DIFF_BASE.read_text().splitlines(), DIFF_OPDF.read_text().splitlines()
    shown = []
    for line in diff.splitlines():
        tag, body = line[:1], line[1:]
        if body.strip() == '...':
            continue
        if tag == '-':
            assert body in base, line
        elif tag == '+':
            assert body in opdf, line
        else:
            assert body in base and body in opdf, line
        if tag in '+-':
            shown.append((tag, body))
    assert sorted(shown) == _changes(DIFF_BASE.read_text(), DIFF_OPDF.read_text())
    count = re.search(r'(\d+) changed lines', text)
    if count:
        assert int(count.group(1)) == len(shown)


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / 'README.md').read_text()
    links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', readme)
    local = [link for link in links if not re.match(r'[a-z]+://', link)]
    assert local, 'the README links to the documentation'
    for link in local:
        assert (ROOT / link).exists(), link
    for page in ('docs/getting-started.md', 'docs/recipes.md', 'docs/results.md', 'docs/cli.md', 'docs/api.md'):
        assert page in local, page


def _quote_outputs():
    spec = importlib.util.spec_from_file_location('quote_outputs', ROOT / 'tools' / 'quote_outputs.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quoted_command_outputs_are_what_the_commands_print_now(capsys):
    """Every ``<!-- output of: COMMAND -->`` block of the README and the documentation holds, byte for byte,
    what COMMAND prints from the committed files now: the README's contrast tables of the confirmatory
    study are ``opdf-ablate report --study ... --tables contrasts`` over the committed records."""
    quote = _quote_outputs()
    readme = (ROOT / 'README.md').read_text()
    commands = [command for command, _, _ in quote.blocks(readme, 'README.md')]
    assert 'opdf-ablate report --study configs/fashion/confirm/study.yaml --tables contrasts' in commands
    assert quote.main(['--check']) == 0, capsys.readouterr().out


def test_quoting_rewrites_stale_blocks_only_and_names_bad_markers(tmp_path, capsys):
    quote = _quote_outputs()
    command = 'opdf-recipes digits/kd'
    now = quote.run(command)
    assert now.strip().endswith('kd.yaml')
    page = tmp_path / 'page.md'
    text = (f'# Title\n\n<!-- output of: {command} -->\nstale text\n<!-- end of output -->\n\nafter\n\n'
            f'<!-- output of: {command} -->\n{now}<!-- end of output -->\n')
    page.write_text(text)
    assert quote.main(['--check', str(page)]) == 1
    out = capsys.readouterr()
    assert '-stale text' in out.out and '1 quoted output(s) differ' in out.err
    assert page.read_text() == text  # --check changes nothing
    assert quote.main([str(page)]) == 0
    assert page.read_text() == text.replace('stale text\n', now)  # the stale block only; the rest kept
    assert quote.main(['--check', str(page)]) == 0
    # bad markers and commands: one error naming the page (and the line), exit 2, the page untouched
    cases = {f'x\n<!-- output of: {command} -->\nno end\n': 'page.md:2: "<!-- output of: opdf-recipes digits/kd -->" '
                                                             'has no "<!-- end of output -->" line',
             '<!-- output of: rm -rf / -->\n<!-- end of output -->\n': '"rm -rf /" does not start with one of this '
                                                                          "project's programs (opdf-ablate,",
             '<!-- output of: opdf-recipes "x -->\n<!-- end of output -->\n': 'cannot parse',
             '<!-- output of: opdf-recipes digits/nope -->\n<!-- end of output -->\n': "exited with 2",
             f'<!-- output of: {command} -->\na<!-- end of output -->\n': 'must be on a line of its own'}
    for bad, message in cases.items():
        page.write_text(bad)
        assert quote.main(['--check', str(page)]) == 2
        assert message in capsys.readouterr().err
        assert quote.main([str(page)]) == 2 and page.read_text() == bad
        capsys.readouterr()
    with pytest.raises(SystemExit):
        quote.main([str(tmp_path / 'missing.md')])
    assert 'missing.md: no such file' in capsys.readouterr().err
