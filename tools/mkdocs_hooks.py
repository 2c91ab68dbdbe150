"""MkDocs hooks (``mkdocs.yml``: ``hooks:``): the parts of the documentation that the code defines are
generated from the code when the site is built, so nothing is written twice.

A page asks for generated content with a marker on a line of its own:

``<!-- opdf:options -->``
    the ``mpo:`` options: every field of :class:`opdf_torchdistill.options.MPOConfig`, its type, its
    default (from the dataclass) and its documentation (the attribute docstring under the field), with
    the valid choices read from the constants the validation uses.
``<!-- opdf:registry -->``
    every key the package registers in torchdistill's registries, read from the registries after
    importing each module a recipe can name in ``dependencies:``, with the summary of its docstring.
``<!-- opdf:cli -->``
    every console script of ``pyproject.toml``'s ``[project.scripts]``: the argparse parser its module
    builds (``get_parser()``; sub-commands included), or the docstring of its ``main`` where it has no
    parser, and the ``tools/*.py`` launcher that runs the same code from a checkout.

API pages use mkdocstrings (``::: module``). The docstrings are written with reStructuredText's inline
markup; :class:`SphinxRoles`, a griffe extension (``mkdocs.yml``: the handler's ``extensions``), turns
their roles (``:func:`~a.b```) into code that links to the target where the site documents it, and
``.. code-block::`` examples into fenced code, before mkdocstrings parses them.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r'^<!--\s*opdf:(options|cli|registry)\s*-->[ \t]*$', re.M)
ROLE = re.compile(r':(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([\w.]+)(\(\))?`')
CODE_BLOCK = re.compile(r'^(?P<indent>[ \t]*)\.\. code-block::[ \t]*(?P<lang>\w*)[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)+)',
                        re.M)


# -- helpers ----------------------------------------------------------------------------------------
def _role(match, module: str = 'opdf_torchdistill') -> str:
    """``:func:`~a.b.c``` -> ``c`` in code, an optional cross-reference: a link where the site documents the
    target, plain code where it does not (a name relative to ``module`` is looked up there)."""
    short, target, call = match.group(1), match.group(2), match.group(3) or ''
    shown = (target.rsplit('.', 1)[-1] if short else target) + call
    if target.startswith('opdf_torchdistill'):
        identifier = target
    elif '.' in target:
        identifier = f'opdf_torchdistill.{target}'
    else:
        identifier = f'{module}.{target}'
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def _code_block(match) -> str:
    body = inspect.cleandoc(match.group('body'))
    indent = match.group('indent')
    fence = [f'```{match.group("lang")}', *body.splitlines(), '```']
    return '\n'.join(indent + line if line else line for line in fence) + '\n\n'


def docstring_markdown(text: str, module: str = 'opdf_torchdistill') -> str:
    """A docstring written in reStructuredText's inline markup as the Markdown mkdocstrings renders."""
    text = CODE_BLOCK.sub(_code_block, text if text.endswith('\n') else text + '\n')
    text = re.sub(r'(\S)::\n([ \t]*\n)', r'\1:\n\2', text)  # 'In a config::' before a literal block
    return ROLE.sub(lambda m: _role(m, module), text).rstrip('\n')


def _rst_to_md(text: str) -> str:
    """Docstring text as Markdown for the generated tables: ``x`` -> `x`, roles as cross-references."""
    text = re.sub(r'``(.+?)``', lambda m: '`' + m.group(1).replace('`', "'") + '`', text, flags=re.S)
    return ROLE.sub(_role, text)


def _one_line(text: str) -> str:
    return ' '.join(text.split()).replace('|', '\\|')


def _summary(text: str) -> str:
    """The first sentence, and the sentences that state the default (``Default ...``, ``Unset: ...``)."""
    spans = []  # code spans are never split

    def hide(match):
        spans.append(match.group(0))
        return f'\0{len(spans) - 1}\0'
    flat = re.sub(r'`[^`]*`', hide, ' '.join(text.split()))
    sentences = re.split(r'(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s+(?=[A-Z\0(])', flat)
    chosen = [sentences[0]] + [s for s in sentences[1:] if s.startswith(('Default', 'Unset'))]
    return re.sub(r'\0(\d+)\0', lambda m: spans[int(m.group(1))], ' '.join(chosen))


def _attribute_docstrings(path: Path, class_name: str) -> dict[str, str]:
    """``{field: docstring}`` of the string literals that follow annotated fields in a class body."""
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    docs, body = {}, cls.body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = after.value.value
    return docs


def _clean(doc: str) -> str:
    return inspect.cleandoc(doc)


# -- options ----------------------------------------------------------------------------------------
def options_markdown() -> str:
    from opdf_torchdistill import options
    from opdf_torchdistill.planning import FACTOR_ORDERS
    from opdf_torchdistill.selections import NAMED_SELECTIONS
    from opdf_torchdistill.weight_sites import SUPPORTED_TYPES

    docs = _attribute_docstrings(Path(options.__file__), 'MPOConfig')
    # the constants the validation checks each option against (options.MPOConfig._validate)
    choices = {'types': list(SUPPORTED_TYPES), 'factor_order': list(FACTOR_ORDERS),
               'selection': sorted(NAMED_SELECTIONS), 'freeze': list(options.FREEZE_CHOICES),
               'overrides': [f'{k} (key)' for k in options.OVERRIDE_KEYS]}
    rows, sections = [], []
    for f in fields(options.MPOConfig):
        if f.name not in docs:
            raise ValueError(f'MPOConfig.{f.name} has no docstring: document it under the field '
                             f'(opdf_torchdistill/options.py), the options page is generated from it')
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        default_md = f'`{list(default) if isinstance(default, tuple) else default!r}`'
        doc = _rst_to_md(_clean(docs[f.name]))
        rows.append(f'| [`{f.name}`](#{f.name}) | {default_md} | {_one_line(_summary(doc))} |')
        lines = [f'### `{f.name}` {{#{f.name}}}', '', f'Type `{f.type}`, default {default_md}.']
        if f.name in choices:
            lines[-1] += ' Choices: ' + ', '.join(f'`{c!r}`' if not str(c).endswith('(key)') else
                                                  f'`{str(c)[:-6]}`' for c in choices[f.name]) + '.'
        lines += ['', doc, '']
        sections.append('\n'.join(lines))
    table = ['| option | default | summary |', '|---|---|---|', *rows]
    return '\n'.join(table) + '\n\n' + '\n'.join(sections)


# -- torchdistill registry keys ----------------------------------------------------------------------
# modules a recipe names in `dependencies:` (the extras they need in brackets)
REGISTERING_MODULES = (('opdf_torchdistill', None), ('opdf_torchdistill.hf', 'hf'),
                       ('opdf_torchdistill.timm_models', 'hf'))
REGISTRY_MODULES = ('torchdistill.models.registry', 'torchdistill.losses.registry', 'torchdistill.optim.registry',
                    'torchdistill.datasets.registry')
REGISTRY_NAMES = {'MODEL_DICT': 'model', 'AUXILIARY_MODEL_WRAPPER_DICT': 'auxiliary model wrapper',
                  'MIDDLE_LEVEL_LOSS_DICT': 'middle-level loss', 'HIGH_LEVEL_LOSS_DICT': 'high-level loss',
                  'LOW_LEVEL_LOSS_DICT': 'low-level loss', 'FUNC2EXTRACT_MODEL_OUTPUT_DICT': 'model-output function',
                  'OPTIM_DICT': 'optimizer', 'SCHEDULER_DICT': 'scheduler', 'DATASET_DICT': 'dataset'}


def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ''
    return _one_line(_rst_to_md(doc.split('\n\n', 1)[0]))


def registry_markdown() -> str:
    registries = []
    for name in REGISTRY_MODULES:
        module = importlib.import_module(name)
        registries += [(REGISTRY_NAMES.get(k, k.lower().replace('_dict', '').replace('_', ' ')), d)
                       for k, d in vars(module).items() if k.isupper() and isinstance(d, dict)]
    seen, rows, missing = set(), [], []
    for module_name, extra in REGISTERING_MODULES:
        try:
            importlib.import_module(module_name)
        except ImportError as exc:  # built without the extra: say so instead of listing too little
            missing.append(f'`{module_name}` (needs the `[{extra}]` extra: {exc})')
            continue
        for registry, table in registries:
            for key, obj in table.items():
                where = getattr(obj, '__module__', '') or ''
                if not where.startswith('opdf_torchdistill') or (registry, key) in seen:
                    continue
                seen.add((registry, key))
                path = f'{where}.{obj.__qualname__}'
                rows.append(f'| `{key}` | {registry} | `{module_name}` | {_rst_to_md(f":func:`~{path}`")} | {_first_paragraph(obj)} |')
    out = ['| key | registry | `dependencies:` | defined as | what |', '|---|---|---|---|---|', *rows, '']
    if missing:
        out += ['!!! warning "Incomplete"', f'    Not listed: {", ".join(missing)}.', '']
    return '\n'.join(out)


# -- command-line tools -----------------------------------------------------------------------------
def _scripts() -> dict[str, str]:
    text = (ROOT / 'pyproject.toml').read_text()
    try:
        import tomllib
        return dict(tomllib.loads(text)['project']['scripts'])
    except ModuleNotFoundError:  # Python < 3.11: the table is simple `name = "module:function"` lines
        block = text.split('[project.scripts]', 1)[1].split('\n[', 1)[0]
        return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', block, re.M))


def _launchers() -> dict[str, str]:
    """module -> ``tools/<file>.py`` for the checkout's launchers (``from <module> import main``)."""
    out = {}
    for path in sorted((ROOT / 'tools').glob('*.py')):
        match = re.search(r'^from (opdf_torchdistill[\w.]*) import main$', path.read_text(), re.M)
        if match:
            out[match.group(1)] = f'tools/{path.name}'
    return out


@contextmanager
def _argv0(name: str):
    saved = sys.argv[:]
    sys.argv[:] = [name]
    try:
        yield
    finally:
        sys.argv[:] = saved


def _parsers(module, name: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser built as on a machine without CUDA and as on one with it (defaults may differ)."""
    import torch
    built = []
    for cuda in (False, True):
        with _argv0(name), mock.patch.object(torch.cuda, 'is_available', lambda cuda=cuda: cuda):
            built.append(module.get_parser())
    return built[0], built[1]


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f'`{action.metavar or action.dest}`'
    takes = action.nargs != 0
    metavar = ''
    if takes:
        if action.choices is not None:
            metavar = '{' + ','.join(map(str, action.choices)) + '}'
        else:
            metavar = action.metavar or action.dest.upper()
        if isinstance(metavar, tuple):
            metavar = ' '.join(metavar)
        if action.nargs == '?':
            metavar = f'[{metavar}]'
        elif action.nargs in ('*', '+'):
            metavar = f'{metavar} ...' if action.nargs == '+' else f'[{metavar} ...]'
        elif isinstance(action.nargs, int) and action.nargs > 1:
            metavar = ' '.join([metavar] * action.nargs)
    return ', '.join(f'`{s}{" " + metavar if metavar else ""}`' for s in action.option_strings)


def _default(action: argparse.Action, other: argparse.Action) -> str:
    if action.required:
        return 'required'
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)):
        return ''
    if action.default != other.default:
        return f'`{action.default}`; `{other.default}` where CUDA is available'
    if action.default is None or action.default is argparse.SUPPRESS or action.default == []:
        return ''
    if action.default == '':
        return "`''`"
    if isinstance(action.default, (list, tuple)):
        return '`' + ' '.join(map(str, action.default)) + '`'
    return f'`{action.default}`'


def _plain(text: str) -> str:
    """Help text as Markdown that shows it as written: no HTML tags, emphasis or links from it."""
    text = text.replace('\\', '\\\\')
    for char in '*[]`':
        text = text.replace(char, '\\' + char)
    return _one_line(text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;'))


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ''
    return _plain(parser._get_formatter()._expand_help(action))


def _parser_markdown(parser: argparse.ArgumentParser, other: argparse.ArgumentParser, level: int) -> list[str]:
    out = ['```text', parser.format_usage().strip(), '```', '']
    if parser.description:
        out += [_plain(parser.description), '']
    rows, subparsers = [], []
    for action, twin in zip(parser._actions, other._actions):
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for (name, sub), (_, sub_other) in zip(action.choices.items(), twin.choices.items()):
                subparsers.append((name, helps.get(name), sub, sub_other))
            continue
        rows.append(f'| {_flags(action)} | {_default(action, twin)} | {_help(parser, action)} |')
    if rows:
        out += ['| argument | default | what |', '|---|---|---|', *rows, '']
    for name, help_text, sub, sub_other in subparsers:
        out += [f'{"#" * (level + 1)} `{sub.prog}` {{#{sub.prog.replace(" ", "-")}}}', '']
        if help_text:
            out += [_plain(help_text[:1].upper() + help_text[1:]) + '.', '']
        out += _parser_markdown(sub, sub_other, level + 1)
    return out


def cli_markdown() -> str:
    old_columns = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = '100'  # argparse wraps usage lines at the terminal width
    try:
        launchers = _launchers()
        out = []
        for name, target in _scripts().items():
            module_name, func = target.split(':')
            module = importlib.import_module(module_name)
            where = f'Entry point `{module_name}:{func}`' + (f'; in a checkout, `python {launchers[module_name]}`'
                                                            if module_name in launchers else '')
            out += [f'## `{name}` {{#{name}}}', '', f'{where}.', '']
            if hasattr(module, 'get_parser'):
                out += _parser_markdown(*_parsers(module, name), level=2)
            else:
                out += [_rst_to_md(_clean(getattr(module, func).__doc__ or '')), '']
                usage = re.search(r'^\s*(' + re.escape(name) + r'.*)$', module.__doc__ or '', re.M)
                example = re.search(r'^\s+(opdf-\S+ .*)$', module.__doc__ or '', re.M)
                if example:
                    out += ['```bash', example.group(1).strip(), '```', '']
                elif usage:
                    out += ['```bash', usage.group(1).strip(), '```', '']
        return '\n'.join(out)
    finally:
        if old_columns is None:
            os.environ.pop('COLUMNS', None)
        else:
            os.environ['COLUMNS'] = old_columns


# -- MkDocs events ----------------------------------------------------------------------------------
GENERATORS = {'options': options_markdown, 'cli': cli_markdown, 'registry': registry_markdown}


def on_config(config, **kwargs):
    if str(ROOT) not in sys.path:  # the package is imported from this checkout
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    if 'opdf:' not in markdown:
        return markdown
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


# -- griffe extension (the API reference) ----------------------------------------------------------
try:
    import griffe
except ImportError:  # pragma: no cover - only the API pages need it (mkdocstrings brings it)
    griffe = None

if griffe is not None:
    class SphinxRoles(griffe.Extension):
        """Docstrings' reStructuredText roles and code-block directives as Markdown, before parsing (a
        role's colon would otherwise split a ``Returns:`` line into a type and a description)."""

        def on_instance(self, *, obj, **kwargs):
            if obj.docstring is not None:
                module = obj.module.path if hasattr(obj, 'module') else 'opdf_torchdistill'
                obj.docstring.value = docstring_markdown(obj.docstring.value, module)
