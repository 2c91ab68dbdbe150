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
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import MatchError

__all__ = ['LayerInfo', 'role_of', 'auto_match', 'explicit_match', 'MatchError']

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
