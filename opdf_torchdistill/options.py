"""Options of :func:`~opdf_torchdistill.overparameterize`, validated with errors that name the key.

Every option is a keyword argument of ``overparameterize`` / ``plan`` and a key of the ``mpo:`` mapping
of the ``opdf_student`` model (and of ``opdf_hf_student``) in YAML. Each field of :class:`MPOConfig`
documents itself (the attribute docstring below it); the documentation's options page is generated
from those fields, their defaults and docstrings, so this is the one place they are written.

Every invalid key or value raises :class:`OptionError` naming it, the value and the valid choices
(``unknown MPO option 'num_dumy' (did you mean 'num_dummy'?)``); patterns that match nothing are
errors, not no-ops.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from torch import nn

from .errors import OptionError
from .weight_sites import SUPPORTED_TYPES
from .planning import FACTOR_ORDERS

__all__ = ['MPOConfig', 'OptionError', 'FREEZE_CHOICES', 'OVERRIDE_KEYS']

FREEZE_CHOICES = (None, 'central', 'auxiliary')
OVERRIDE_KEYS = ('rows', 'cols', 'num_dummy', 'num_factors', 'max_bond', 'skip')


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f'{name} must be an integer >= {minimum}{" or None" if allow_none else ""}, got {value!r}')
    return value


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise OptionError(f'{name} must be a regex string or a list of them, got {value!r}')
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionError(f'{name}: invalid regular expression {pattern!r} ({exc})') from None
    return tuple(value)


def _expand_selection(options: dict) -> dict:
    """``selection: NAME`` -> its ``include``/``exclude``/``types`` unless those are given explicitly."""
    from .selections import NAMED_SELECTIONS
    name = options['selection']
    if not isinstance(name, str) or name not in NAMED_SELECTIONS:
        raise OptionError(f'selection must be one of {sorted(NAMED_SELECTIONS)}, got {name!r}'
                          f'{_suggest(str(name), NAMED_SELECTIONS)}')
    merged = dict(options)
    for key, value in NAMED_SELECTIONS[name].items():
        if merged.get(key) in (None, (), []):
            merged[key] = value
    return merged


@dataclass
class MPOConfig:
    """The validated options of one ``overparameterize`` / ``plan`` call (build it with :meth:`from_options`)."""

    include: tuple[str, ...] = ()
    """Regexes searched (``re.search``) in module paths, e.g. ``layer4`` or ``attention\\.self``; only
    matching modules are used. Default (empty): every supported module."""
    exclude: tuple[str, ...] = ()
    """Regexes searched in module paths; matching modules are left alone. Default: none."""
    types: tuple[str, ...] = tuple(SUPPORTED_TYPES)
    """Module kinds to use: ``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``, ``MultiheadAttention``
    (subclasses included). Default: all five."""
    min_numel: int = 0
    """Skip weights with fewer elements. Default 0."""
    num_factors: int = 2
    """Real factors per side, 1 to 8 (``MAX_NUM_FACTORS``). Default 2 (``W = A D.. B``)."""
    factor_order: str = 'paper'
    """``'paper'`` (default): rows and columns factored the same way, largest first, as in the paper
    (768 = 32 x 1^L x 24 on both sides; ratio 1 + 0.5625 (L + 1) for a 768 x 768 weight, the paper's).
    ``'largest_bond'`` (the first release's order): factors permuted for the largest bonds (768 x 768:
    32 x 24 | 24 x 32, ratio 1 + (L + 1))."""
    selection: str | None = None
    """A named selection from :mod:`opdf_torchdistill.selections` (presets of ``include``, ``exclude`` and
    ``types``; keys given explicitly refine it): ``'bert'`` (Q, K, V, attention output, FFN in and out of
    every encoder layer: the paper's Table 1), ``'tinyvit'`` (qkv, attention projection, FFN: the paper's
    Table 2). Default: none."""
    num_dummy: int | None = None
    """OPDF's scale L: size-1 factor pairs inserted in the middle, each adding an ``r x r`` core
    initialised to the identity. Unset: 1 (``DEFAULT_NUM_DUMMY``), or the value ``target_ratio`` picks."""
    target_ratio: float | None = None
    """Whole-model ratio of parameters while training to the plain model's (a number > 1); the planner
    picks each layer's bond (and ``num_dummy`` if unset) to meet it. Unreachable ratios are errors
    that give the reachable range. Default: none."""
    max_bond: int | None = None
    """Cap on bond dimensions (approximate, not exact: for compression studies only). Default: none."""
    freeze: str | None = None
    """``None`` (default: all cores train), ``'central'`` or ``'auxiliary'``: those cores become buffers,
    so no optimizer, weight decay or DDP sees them."""
    overrides: dict[str, dict] = field(default_factory=dict)
    """``{regex: {...}}``: per-layer ``rows``/``cols`` (explicit factors, ``1`` for dummies),
    ``num_dummy``, ``num_factors``, ``max_bond`` or ``skip: true``; the first matching pattern wins."""
    align_to: nn.Module | None = None
    """Plan against the teacher, so that every weight with a teacher partner is alignable whatever the
    widths, at the same scale as without it. In Python a teacher ``nn.Module`` (weights not needed: the
    ``meta`` device is fine); in YAML a teacher model config, e.g. ``*teacher_model`` (only its key and
    kwargs are read, on the meta device; no weights or checkpoint), or for ``opdf_hf_student`` the
    teacher's folder or Hub id (its config is read, no weights). Layers that match a teacher layer of
    another width get three real factors so that their auxiliary cores have the teacher's shapes (see
    ``planning.aligned_plans``). Default: none."""
    layer_map: Any = None
    """The student -> teacher map ``align_to`` plans with: ``'uniform'``, ``'first'``, a list or ``{i: j}``
    of layer indices, or names / regex rules (``matching.resolve_match``). Default: automatic (relative
    depth). Not the initialisation map (``init_from_teacher.layer_map``)."""
    verify: bool = True
    """Check every decomposition's reconstruction error against ``tolerance``. Default true."""
    tolerance: float | None = None
    """Relative reconstruction error ``verify`` allows; default by dtype (float64 1e-10, float32 1e-4,
    half types 1e-2)."""
    workers: int | None = None
    """Decomposition threads. Default ``torch.get_num_threads()``."""

    DEFAULT_NUM_DUMMY = 1
    MAX_NUM_FACTORS = 8  # beyond this every extra factor is a 1 (dimensions of 2^8 and less) or planning explodes

    @classmethod
    def from_options(cls, config: 'MPOConfig | Mapping[str, Any] | None' = None, **options: Any) -> 'MPOConfig':
        """Merge a config object or mapping with keyword options and validate everything."""
        merged: dict[str, Any] = {}
        if isinstance(config, MPOConfig):
            merged.update({f.name: getattr(config, f.name) for f in fields(cls)})
        elif isinstance(config, Mapping):
            merged.update(config)
        elif config is not None:
            raise OptionError(f'config must be an MPOConfig or a mapping of options, got {type(config).__name__}')
        merged.update(options)
        valid = [f.name for f in fields(cls)]
        for key in merged:
            if key not in valid:
                raise OptionError(f'unknown MPO option {key!r}{_suggest(str(key), valid)}; valid options: {", ".join(valid)}')
        if merged.get('selection') is not None:
            merged = _expand_selection(merged)
        cfg = cls(**merged)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        self.include = _patterns('include', self.include)
        self.exclude = _patterns('exclude', self.exclude)
        types = (self.types,) if isinstance(self.types, str) else self.types
        if not isinstance(types, (list, tuple)) or not types:
            raise OptionError(f'types must be a non-empty list of {list(SUPPORTED_TYPES)}, got {self.types!r}')
        for t in types:
            if t not in SUPPORTED_TYPES:
                raise OptionError(f'types: unknown module type {t!r}{_suggest(str(t), SUPPORTED_TYPES)}; '
                                  f'valid types: {", ".join(SUPPORTED_TYPES)}')
        self.types = tuple(types)
        _int('min_numel', self.min_numel, 0)
        _int('num_factors', self.num_factors, 1)
        if self.num_factors > self.MAX_NUM_FACTORS:
            raise OptionError(f'num_factors must be at most {self.MAX_NUM_FACTORS}, got {self.num_factors} '
                              f'(more real factors only add size-1 factors; use num_dummy for scale)')
        if self.factor_order not in FACTOR_ORDERS:
            raise OptionError(f'factor_order must be one of {list(FACTOR_ORDERS)}, got {self.factor_order!r}'
                              f'{_suggest(str(self.factor_order), FACTOR_ORDERS)}')
        _int('num_dummy', self.num_dummy, 0, allow_none=True)
        _int('max_bond', self.max_bond, 1, allow_none=True)
        _int('workers', self.workers, 1, allow_none=True)
        if self.target_ratio is not None:
            if isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, (int, float)) \
                    or not self.target_ratio > 1.0:
                raise OptionError(f'target_ratio must be a number > 1.0 (parameters while training / plain '
                                  f'parameters), got {self.target_ratio!r}')
            if self.num_factors != 2:
                raise OptionError(f'target_ratio plans two real factors per side; got num_factors={self.num_factors}')
        if self.freeze not in FREEZE_CHOICES:
            raise OptionError(f'freeze must be one of {list(FREEZE_CHOICES)}, got {self.freeze!r}')
        if self.tolerance is not None and (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                                           or not self.tolerance > 0):
            raise OptionError(f'tolerance must be a positive number, got {self.tolerance!r}')
        if not isinstance(self.verify, bool):
            raise OptionError(f'verify must be true or false, got {self.verify!r}')
        if self.align_to is not None and not isinstance(self.align_to, nn.Module):
            raise OptionError(f'align_to must be a teacher nn.Module, got {type(self.align_to).__name__}')
        if self.layer_map is not None and self.align_to is None:
            raise OptionError('layer_map is only used with align_to (the teacher to plan against)')
        from .matching import check_map_form
        check_map_form(self.layer_map, 'mpo.layer_map')
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, Mapping):
            raise OptionError(f'overrides must map regex -> options, got {type(self.overrides).__name__}')
        for pattern, spec in self.overrides.items():
            _patterns('overrides', pattern)
            if not isinstance(spec, Mapping):
                raise OptionError(f'overrides[{pattern!r}] must be a mapping with keys {list(OVERRIDE_KEYS)}, got {spec!r}')
            for key in spec:
                if key not in OVERRIDE_KEYS:
                    raise OptionError(f'overrides[{pattern!r}]: unknown key {key!r}{_suggest(str(key), OVERRIDE_KEYS)}; '
                                      f'valid keys: {", ".join(OVERRIDE_KEYS)}')
            if ('rows' in spec) != ('cols' in spec):
                raise OptionError(f'overrides[{pattern!r}]: give both rows and cols, or neither')
            for key in ('rows', 'cols'):
                if key in spec and (not isinstance(spec[key], (list, tuple)) or
                                    not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in spec[key])):
                    raise OptionError(f'overrides[{pattern!r}].{key} must be a list of positive integers, got {spec[key]!r}')
            if 'num_dummy' in spec:
                _int(f'overrides[{pattern!r}].num_dummy', spec['num_dummy'], 0)
            if 'num_factors' in spec:
                _int(f'overrides[{pattern!r}].num_factors', spec['num_factors'], 1)
                if spec['num_factors'] > self.MAX_NUM_FACTORS:
                    raise OptionError(f'overrides[{pattern!r}].num_factors must be at most {self.MAX_NUM_FACTORS}, '
                                      f'got {spec["num_factors"]}')
            if 'max_bond' in spec:
                _int(f'overrides[{pattern!r}].max_bond', spec['max_bond'], 1, allow_none=True)
            if 'skip' in spec and not isinstance(spec['skip'], bool):
                raise OptionError(f'overrides[{pattern!r}].skip must be true or false, got {spec["skip"]!r}')

    @property
    def effective_num_dummy(self) -> int:
        return self.DEFAULT_NUM_DUMMY if self.num_dummy is None else self.num_dummy

    def to_dict(self) -> dict[str, Any]:
        """The options as plain data (``align_to`` as its class name), for logs and run records."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out['align_to'] = None if self.align_to is None else type(self.align_to).__name__
        out['include'], out['exclude'], out['types'] = list(self.include), list(self.exclude), list(self.types)
        return out
