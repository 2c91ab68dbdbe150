"""Student -> teacher layer matching by role and relative depth (names and shapes only).

A layer's *role* is its module path with every number replaced by ``#`` plus its module kind, e.g.
``layer2.1.conv1`` -> ``layer#.#.conv#`` (Conv2d). Layers of one role are paired position by position
along the numbers of the path, outermost first. At each position the student's values (among the
layers that agree so far) map to the teacher's:

* the same set of values on both sides (ResNet stages 1..4, ``conv1``/``conv2``, ``mlp.0``/``mlp.3``)
  maps to itself;
* different sets (blocks 0..1 vs 0..2, 6 vs 12 transformer layers) map by relative depth: the
  ``i``-th of ``n_s`` student values has the share of teacher ranks ``floor(i n_t / n_s)`` ..
  ``ceil((i + 1) n_t / n_s) - 1`` and takes the last of it, unless only an earlier one has the
  student's matrix shape. For 6 <- 12 layers this is the usual ``i <- 2i + 1``.

Whether a pair can actually be aligned (same auxiliary core shapes) is decided by the caller.

An explicit alignment map (the ``layer_map`` of ``AuxTensorAlignmentLoss`` and of ``mpo:``, see
:func:`resolve_match`) is either a *name* map (``{student_name: teacher_name}`` or
``[[regex, replacement], ...]``, :func:`explicit_match`) or a *layer-index* map (:func:`index_match`):
``'uniform'`` (student layer ``i`` <- teacher layer ``(i + 1) T // S - 1``, i.e. ``2i + 1`` for
6 <- 12, the paper's alignment), ``'first'`` (``i`` <- ``i``), a list of teacher layer indices (one
per student layer) or a mapping ``{student_index: teacher_index}`` (integer keys). The same forms as
the *initialisation* map (``init_from_teacher.layer_map``), but a separate key: which teacher layers a
student starts from and which it is aligned to are independent choices.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import MatchError

__all__ = ['LayerInfo', 'role_of', 'auto_match', 'explicit_match', 'index_match', 'resolve_match', 'is_index_map',
           'describe_pairing', 'check_map_form', 'INDEX_MAP_CHOICES', 'MatchError']

_NUMBER = re.compile(r'\d+')


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    shape: tuple[int, int]


def role_of(name: str) -> tuple[str, tuple[int, ...]]:
    """``('layer#.#.conv#', (2, 1, 1))`` for ``'layer2.1.conv1'``."""
    return _NUMBER.sub('#', name), tuple(int(v) for v in _NUMBER.findall(name))


def _shares(student_values: Sequence[int], teacher_values: Sequence[int]) -> dict[int, list[int]]:
    """Teacher values each student value may take, preferred first (see module docstring)."""
    s, t = sorted(set(student_values)), sorted(set(teacher_values))
    if s == t:
        return {v: [v] for v in s}
    shares = {}
    for i, v in enumerate(s):
        last = math.ceil((i + 1) * len(t) / len(s)) - 1
        first = min(last, (i * len(t)) // len(s))
        shares[v] = [t[r] for r in range(last, first - 1, -1)]
    return shares


def auto_match(student: Sequence[LayerInfo], teacher: Sequence[LayerInfo]) -> dict[str, str]:
    """Pair every student layer with the teacher layer of the same role at the same relative depth.

    Within a student value's share of teacher values the last one is preferred (``i <- 2i + 1``);
    an earlier one is taken only when it has the student's matrix shape and the last does not (the
    first, downsampling block of a ResNet stage pairs with the teacher's first block).
    """
    groups_s: dict[tuple[str, str], list[tuple[int, ...]]] = defaultdict(list)
    groups_t: dict[tuple[str, str], list[tuple[int, ...]]] = defaultdict(list)
    by_key_s: dict[tuple[str, str, tuple[int, ...]], LayerInfo] = {}
    by_key_t: dict[tuple[str, str, tuple[int, ...]], LayerInfo] = {}
    for layers, groups, by_key in ((student, groups_s, by_key_s), (teacher, groups_t, by_key_t)):
        for layer in layers:
            pattern, numbers = role_of(layer.name)
            groups[(layer.kind, pattern)].append(numbers)
            by_key[(layer.kind, pattern, numbers)] = layer
    result: dict[str, str] = {}
    for key, s_numbers in groups_s.items():
        t_numbers = groups_t.get(key, [])
        for numbers in s_numbers:
            layer = by_key_s[(key[0], key[1], numbers)]
            candidates: list[tuple[int, ...]] = [()]
            for pos in range(len(numbers)):
                s_vals = [n[pos] for n in s_numbers if n[:pos] == numbers[:pos]]
                extended = []
                for prefix in candidates:
                    t_vals = [n[pos] for n in t_numbers if n[:pos] == prefix]
                    if t_vals:
                        extended += [prefix + (v,) for v in _shares(s_vals, t_vals)[numbers[pos]]]
                candidates = extended
            found = [by_key_t[(key[0], key[1], c)] for c in candidates if (key[0], key[1], c) in by_key_t]
            if found:
                same_shape = [t for t in found if t.shape == layer.shape]
                result[layer.name] = (same_shape or found)[0].name
    return result


def explicit_match(layer_map: Mapping[str, str] | Sequence[Sequence[str]], student: Sequence[LayerInfo],
                   teacher: Sequence[LayerInfo]) -> dict[str, str]:
    """A user's map: ``{student_name: teacher_name}`` pairs, or ``[[regex, replacement], ...]`` rules
    applied with ``re.fullmatch`` / ``Match.expand`` to every student layer name (first rule wins).

    Raises:
        MatchError: a named student/teacher layer does not exist, or a rule matches nothing.
    """
    s_names = [layer.name for layer in student]
    t_names = {layer.name for layer in teacher}
    result: dict[str, str] = {}
    if isinstance(layer_map, Mapping):
        missing_s = [s for s in layer_map if s not in s_names]
        missing_t = [t for t in layer_map.values() if t not in t_names]
        if missing_s or missing_t:
            raise MatchError(
                'layer_map names layers that are not over-parameterizable weights: '
                + (f'student {missing_s} (valid: {s_names}) ' if missing_s else '')
                + (f'teacher {missing_t} (valid: {sorted(t_names)})' if missing_t else ''))
        return dict(layer_map)
    rules = []
    for rule in layer_map:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not all(isinstance(v, str) for v in rule):
            raise MatchError(f'layer_map rules must be [regex, replacement] pairs of strings, got {rule!r}')
        try:
            rules.append((re.compile(rule[0]), rule[1], rule))
        except re.error as exc:
            raise MatchError(f'layer_map rule {rule!r}: invalid regex ({exc})') from None
    used = set()
    for name in s_names:
        for pattern, repl, rule in rules:
            m = pattern.fullmatch(name)
            if m:
                used.add(id(rule))
                target = m.expand(repl)
                if target not in t_names:
                    raise MatchError(f'layer_map rule {list(rule)} maps student {name!r} to {target!r}, which is '
                                     f'not a teacher layer (valid: {sorted(t_names)})')
                result[name] = target
                break
    unused = [list(rule) for _, _, rule in rules if id(rule) not in used]
    if unused:
        raise MatchError(f'layer_map rules {unused} match no student layer (student layers: {s_names})')
    return result


# ------------------------------------------------------------------------------------------------
# Layer-index maps ('uniform', 'first', [j0, j1, ...], {i: j}) for stacks of layers
# ------------------------------------------------------------------------------------------------
INDEX_MAP_CHOICES = ('uniform', 'first')
_FIRST_NUMBER = re.compile(r'^(.*?)(\d+)(.*)$')
ALIGN_MAP_FORMS = ("'uniform' (student layer i <- teacher layer (i+1)T//S - 1: 2i+1 for 6 <- 12), 'first' "
                   "(i <- i), a list of teacher layer indices (one per student layer), a mapping {student index: "
                   "teacher index}, a mapping {student layer name: teacher layer name} or [[regex, replacement], "
                   "...] rules")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_index_map(layer_map) -> bool:
    """Whether ``layer_map`` is a layer-index map (see the module docstring), not a name map."""
    if isinstance(layer_map, str):
        return True
    if isinstance(layer_map, Mapping):
        return bool(layer_map) and all(_is_int(k) for k in layer_map)
    if isinstance(layer_map, (list, tuple)):
        return bool(layer_map) and all(_is_int(v) for v in layer_map)
    return False


def _stack_of(name: str) -> tuple[str, int, str] | None:
    """``('bert.encoder.layer.', 3, '.attention.self.query')``: the text before the first number of
    the path (the stack), the number (the layer index) and the rest; ``None`` without a number."""
    m = _FIRST_NUMBER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _resolve_indices(layer_map, num_student: int, num_teacher: int, key: str, stack: str) -> list[int]:
    where = f'{key} (stack {stack}#: student layers 0..{num_student - 1}, teacher layers 0..{num_teacher - 1})'
    if isinstance(layer_map, str):
        if layer_map == 'uniform':
            if num_teacher < num_student:
                raise MatchError(f"{where}: 'uniform' needs a teacher at least as deep as the student")
            return [(i + 1) * num_teacher // num_student - 1 for i in range(num_student)]
        if layer_map == 'first':
            if num_teacher < num_student:
                raise MatchError(f"{where}: 'first' needs a teacher at least as deep as the student")
            return list(range(num_student))
        raise MatchError(f'{key}: unknown layer map {layer_map!r}; valid: {ALIGN_MAP_FORMS}')
    if isinstance(layer_map, Mapping):
        if set(layer_map) != set(range(num_student)):
            missing = sorted(set(range(num_student)) - set(layer_map))
            extra = sorted(set(layer_map) - set(range(num_student)))
            raise MatchError(f'{where}: the mapping must name every student layer once; missing {missing}, not '
                             f'student layers {extra}')
        mapped = [layer_map[i] for i in range(num_student)]
    else:
        mapped = list(layer_map)
        if len(mapped) != num_student:
            raise MatchError(f'{where}: lists {len(mapped)} teacher layers for {num_student} student layers')
    bad = [j for j in mapped if not _is_int(j) or not 0 <= j < num_teacher]
    if bad:
        raise MatchError(f'{where}: teacher layers {bad} do not exist')
    return mapped


def index_match(layer_map, student: Sequence[LayerInfo], teacher: Sequence[LayerInfo],
                key: str = 'layer_map') -> dict[str, str]:
    """Pair layers by a layer-index map (``'uniform'``, ``'first'``, a list, ``{i: j}``).

    A layer's *stack* is its path up to its first number and its *layer index* that number
    (``bert.encoder.layer.3.attention.self.query``: stack ``bert.encoder.layer.``, index 3;
    ``blocks.2.mlp.fc1``: ``blocks.``, 2). In every stack the student has, student layer ``i`` is
    paired with the teacher layer of the same stack, index ``map(i)`` and the same rest of the path
    (and module kind); a stack's depth is its largest index plus one. Layers without a number
    (embeddings, a head) pair with the teacher layer of the same name (as :func:`auto_match`).

    Raises:
        MatchError: an unknown choice, a list or mapping of the wrong length, teacher indices out of
            range, or a student stack the teacher does not have; the message names ``key``.
    """
    if not is_index_map(layer_map):
        raise MatchError(f'{key} must be {ALIGN_MAP_FORMS}; got {layer_map!r}')
    teacher_by_name = {t.name: t for t in teacher}
    s_depth: dict[str, int] = {}
    t_depth: dict[str, int] = {}
    for layers, depth in ((student, s_depth), (teacher, t_depth)):
        for layer in layers:
            parts = _stack_of(layer.name)
            if parts is not None:
                depth[parts[0]] = max(depth.get(parts[0], 0), parts[1] + 1)
    maps = {}
    for stack, n_s in s_depth.items():
        if stack not in t_depth:
            raise MatchError(f'{key}: the student has layers {stack}0..{n_s - 1} but the teacher has no {stack}# '
                             f'layers (teacher stacks: {sorted(t_depth)})')
        maps[stack] = _resolve_indices(layer_map, n_s, t_depth[stack], key, stack)
    result: dict[str, str] = {}
    plain = []
    for layer in student:
        parts = _stack_of(layer.name)
        if parts is None:
            plain.append(layer)
            continue
        stack, index, rest = parts
        target = teacher_by_name.get(f'{stack}{maps[stack][index]}{rest}')
        if target is not None and target.kind == layer.kind:
            result[layer.name] = target.name
    result.update(auto_match(plain, list(teacher)))
    return result


def check_map_form(layer_map, key: str = 'layer_map') -> None:
    """Validate the form of an alignment map (not the layers it names: that needs the models);
    errors name ``key`` and the valid forms."""
    if layer_map is None:
        return
    if isinstance(layer_map, str):
        if layer_map not in ('uniform', 'first'):
            raise MatchError(f'{key}: unknown layer map {layer_map!r}; valid: {ALIGN_MAP_FORMS}')
        return
    if isinstance(layer_map, Mapping):
        ints = [isinstance(k, int) and not isinstance(k, bool) for k in layer_map]
        vals = [isinstance(v, int) and not isinstance(v, bool) for v in layer_map.values()]
        strs = [isinstance(k, str) for k in layer_map] + [isinstance(v, str) for v in layer_map.values()]
        if layer_map and not (all(ints) and all(vals)) and not all(strs):
            raise MatchError(f'{key}: a mapping must be {{student index: teacher index}} (integers) or {{student '
                             f'layer name: teacher layer name}} (strings), got {dict(layer_map)!r}')
        return
    if isinstance(layer_map, (list, tuple)):
        if layer_map and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_map):
            return
        if all(isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, str) for v in r) for r in layer_map):
            return
        raise MatchError(f'{key}: a list must be teacher layer indices (one per student layer) or [regex, '
                         f'replacement] rules, got {layer_map!r}')
    raise MatchError(f'{key} must be {ALIGN_MAP_FORMS}; got {type(layer_map).__name__} {layer_map!r}')


def resolve_match(layer_map, student: Sequence[LayerInfo], teacher: Sequence[LayerInfo],
                  key: str = 'layer_map') -> dict[str, str]:
    """The student -> teacher pairs of ``layer_map``: automatic (:func:`auto_match`) when ``None``,
    else a layer-index map (:func:`index_match`) or a name map (:func:`explicit_match`)."""
    if layer_map is None:
        return auto_match(student, teacher)
    if is_index_map(layer_map):
        return index_match(layer_map, student, teacher, key)
    if isinstance(layer_map, (Mapping, list, tuple)):
        try:
            return explicit_match(layer_map, student, teacher)
        except MatchError as exc:
            raise MatchError(f'{key}: {exc}') from None
    raise MatchError(f'{key} must be {ALIGN_MAP_FORMS}; got {type(layer_map).__name__} {layer_map!r}')


def describe_pairing(pairs: Mapping[str, str]) -> str:
    """A one-line summary of student -> teacher pairs by stack: ``'bert.encoder.layer.#: 0<-1, 1<-3;
    other layers: 2 by name'`` (used in the logs that say which map aligns what)."""
    stacks: dict[str, set[tuple[int, int]]] = defaultdict(set)
    others, same = 0, 0
    for s_name, t_name in pairs.items():
        s_parts, t_parts = _stack_of(s_name), _stack_of(t_name)
        if s_parts and t_parts and s_parts[0] == t_parts[0]:
            stacks[s_parts[0]].add((s_parts[1], t_parts[1]))
        elif s_name == t_name:
            same += 1
        else:
            others += 1
    parts = [f'{stack}#: ' + ', '.join(f'{i}<-{j}' for i, j in sorted(p)) for stack, p in sorted(stacks.items())]
    if same:
        parts.append(f'{same} unnumbered layer(s) with the same name')
    if others:
        parts.append(f'{others} other pair(s)')
    return '; '.join(parts) or 'no pairs'
