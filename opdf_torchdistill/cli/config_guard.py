"""Configs are code: which of a torchdistill YAML's tags may run, checked before any of them runs.

torchdistill builds datasets, transforms and samplers while the YAML loads: ``!import_call {key:
'torchvision.transforms.Resize', init: ...}`` imports and calls any importable name. So does
``!import_call {key: 'os.system', init: {args: ['...']}}``: loading a config runs code, exactly as
unpickling a checkpoint does, and users share recipes the way they share checkpoints.

Our tools therefore load configs *restricted* by default (as they read checkpoints with
``weights_only=True`` by default): :func:`check_config_tags` walks the YAML's node tree (composing
builds nodes only; nothing is imported or called) and refuses, naming the tag, the target and the
line:

* an ``!import_get`` / ``!import_call`` / ``!import_call_method`` target outside
  :data:`ALLOWED_PACKAGES` and the config's own ``dependencies`` (a standard-library module named
  there does not count: ``dependencies: [os]`` must not open ``os.system``);
* a target inside an allowed package that loads or runs code anyway (:data:`DENIED`: ``torch.hub``,
  ``torch.load``, C++ extension builders, torchdistill's own import helpers, ...);
* a ``trust_remote_code`` key (Hugging Face would run code from the model folder);
* ``!setattr`` (it rewrites attributes of imported modules), and ``!getattr`` / ``!call_method``
  on private names (``_``-prefixed: the way to ``__globals__`` and friends).

This is a guard against a shared recipe that runs something it should not, not a sandbox: an
allowed package may hold other ways to run code. ``--trust_config`` turns the check off for a config
whose origin you know (your own recipes with other libraries' datasets, for example).
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator

import yaml

__all__ = ['ALLOWED_PACKAGES', 'DENIED', 'UnsafeConfigError', 'check_config_tags', 'yaml_error_text', 'compose_yaml',
           'walk_nodes']

#: packages whose names a restricted config may import and call
ALLOWED_PACKAGES = ('torch', 'torchvision', 'torchdistill', 'opdf_torchdistill', 'transformers', 'timm', 'datasets',
                    'torchaudio', 'torchtext')
#: names inside the allowed packages that load or run code (prefix match on the dotted name)
DENIED = ('torch.hub', 'torch.load', 'torch.serialization', 'torch.package', 'torch.jit.load', 'torch.utils.cpp_extension',
          'torch.ops', 'torch.multiprocessing', 'torch.distributed', 'torch.compiler', 'torch._',
          'torchdistill.common.main_util', 'torchdistill.common.yaml_util', 'torchdistill.common.file_util',
          'opdf_torchdistill.io', 'opdf_torchdistill.cli',
          'transformers.dynamic_module_utils', 'transformers.utils.hub', 'timm.models._hub',
          'datasets.load')
_IMPORT_TAGS = ('!import_get', '!import_call', '!import_call_method')


class UnsafeConfigError(ValueError):
    """A config tag would import or call something outside the allowed packages (``--trust_config`` allows it)."""


def yaml_error_text(path: str, exc: yaml.YAMLError) -> str:
    """``path:line: not valid YAML: problem`` in one line (PyYAML's own text spans several)."""
    mark = getattr(exc, 'problem_mark', None) or getattr(exc, 'context_mark', None)
    where = f':{mark.line + 1}:{mark.column + 1}' if mark is not None else ''
    problem = ' '.join(str(getattr(exc, 'problem', None) or exc).split())
    context = getattr(exc, 'context', None)
    return f'{path}{where}: not valid YAML: {problem}' + (f' ({" ".join(str(context).split())})' if context else '')


def compose_yaml(path: str, error: type[Exception] = ValueError) -> yaml.Node | None:
    """The YAML file's node tree (composing builds nodes only: no tag runs); a syntax error is ``error``
    with the file and line in one line."""
    with open(path, 'r') as fp:
        try:
            return yaml.compose(fp, Loader=yaml.FullLoader)
        except yaml.YAMLError as exc:
            raise error(yaml_error_text(path, exc)) from None


def walk_nodes(root: yaml.Node | None) -> Iterator[yaml.Node]:
    """Every node of a composed tree once (an alias shares its anchor's node), keys included."""
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _dependency_modules(root: yaml.Node | None) -> list[str]:
    """Top-level module names under ``dependencies:`` (strings, ``{name, package}`` mappings), stdlib left out."""
    if not isinstance(root, yaml.MappingNode):
        return []
    names: list[str] = []
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == 'dependencies':
            items = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for item in items:
                if isinstance(item, yaml.ScalarNode):
                    names.append(item.value)
                elif isinstance(item, yaml.MappingNode):
                    names += [v.value for k, v in item.value if isinstance(v, yaml.ScalarNode)
                              and k.value in ('name', 'package')]
    stdlib = set(getattr(sys, 'stdlib_module_names', ())) | set(sys.builtin_module_names)
    return [n for n in names if n and n.split('.')[0] not in stdlib]


def _fields(node: yaml.Node) -> dict[str, str]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: v.value for k, v in node.value if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode)}


def _target(tag: str, node: yaml.Node) -> str | None:
    """The dotted name a torchdistill import tag resolves (as ``main_util`` does), or None if not static."""
    fields = _fields(node)
    if tag == '!import_call_method':
        package, cls, method = fields.get('package'), fields.get('class_name'), fields.get('method_name')
        if package is None:
            return None
        return '.'.join(p for p in (package, cls, method) if p)
    key, package = fields.get('key'), fields.get('package')
    if key is None:
        return None
    return f'{package}.{key}' if package else key


def _allowed(target: str, allowed: Iterable[str]) -> bool:
    if any(target == d or target.startswith(d + '.') or (d.endswith('_') and target.startswith(d)) for d in DENIED):
        return False
    return any(target == a or target.startswith(a + '.') for a in allowed)


def check_config_tags(path: str) -> None:
    """Refuse a config whose tags would run code outside :data:`ALLOWED_PACKAGES` (see the module docstring)."""
    root = compose_yaml(path, UnsafeConfigError)
    allowed = tuple(ALLOWED_PACKAGES) + tuple(_dependency_modules(root))
    advice = 'if you trust this config (it runs code when loaded), pass --trust_config'
    for node in walk_nodes(root):
        where = f'{path}:{node.start_mark.line + 1}'
        tag = node.tag or ''
        if tag in _IMPORT_TAGS:
            target = _target(tag, node)
            if target is None:
                raise UnsafeConfigError(f'{where}: {tag} without a plain key/package; cannot tell what it runs; '
                                        f'{advice}')
            if not _allowed(target, allowed):
                why = 'loads or runs code' if any(target.startswith(d) for d in DENIED) else \
                    f'is outside the allowed packages {list(allowed)}'
                raise UnsafeConfigError(f'{where}: {tag} {target!r} {why}; {advice}')
        elif tag == '!setattr':
            raise UnsafeConfigError(f'{where}: !setattr changes attributes of imported objects; {advice}')
        elif tag in ('!getattr', '!call_method'):
            names = [n.value for n in (node.value if isinstance(node, yaml.SequenceNode) else [])[1:2]
                     if isinstance(n, yaml.ScalarNode)] if tag == '!getattr' else \
                [_fields(node).get('method_name', '')]
            if any(str(n).startswith('_') for n in names):
                raise UnsafeConfigError(f'{where}: {tag} on the private name {names[0]!r}; {advice}')
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == 'trust_remote_code' and \
                        getattr(value, 'value', 'false') not in ('false', 'False', '0', 'null', '~', ''):
                    raise UnsafeConfigError(f'{path}:{key.start_mark.line + 1}: trust_remote_code would run code '
                                            f'from the model folder; {advice}')
