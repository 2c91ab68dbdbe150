"""Options of :func:`~opdf_torchdistill.overparameterize`, validated with errors that name the key.

Every option is a keyword argument of ``overparameterize`` and a key of the ``mpo:`` mapping of the
``opdf_student`` model in YAML.

=================  ===========================================================================
``include``        regexes (``re.search`` on the module path); only matching modules are used.
                   Default: every supported module.
``exclude``        regexes; matching modules are left alone.
``types``          module kinds to use: ``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``,
                   ``MultiheadAttention`` (subclasses included). Default: all.
``min_numel``      skip weights with fewer elements. Default 0.
``num_factors``    real factors per side, 1 to 8. Default 2 (``W = A D.. B``).
``factor_order``   ``'paper'`` (default): rows and columns factored the same way, largest first, as
                   in the paper (768 = 32 x 1^L x 24 on both sides; ratio 1 + 0.5625 (L + 1) for
                   768 x 768). ``'largest_bond'``: factors permuted for the largest bonds (768 x 768:
                   32 x 24 | 24 x 32, ratio 1 + (L + 1)).
``selection``      a named selection (``include``/``exclude``/``types`` presets) from
                   :mod:`opdf_torchdistill.selections`, e.g. ``'bert'``; explicit keys refine it.
``num_dummy``      OPDF's scale ``L``: size-1 factor pairs inserted in the middle, each adding an
                   ``r x r`` core initialised to the identity. Default 1.
``target_ratio``   whole-model ratio of parameters while training to the plain model's; the planner
                   picks each layer's bond (and ``num_dummy`` if unset) to meet it.
``max_bond``       cap on bond dimensions (approximate, not exact: for compression studies only).
``freeze``         ``None`` (all cores train, default), ``'central'`` or ``'auxiliary'``. Frozen
                   cores are stored as buffers, so no optimizer, weight decay or DDP sees them.
``overrides``      ``{regex: {...}}``: per-layer ``rows``/``cols`` (explicit factors, ``1`` for dummies),
                   ``num_dummy``, ``num_factors``, ``max_bond`` or ``skip: true``; first match wins.
``align_to``       a teacher ``nn.Module`` (weights not needed, ``meta`` device is fine): layers that
                   match a teacher layer of another width get three real factors so that their
                   auxiliary cores have the teacher's shapes (see ``planning.aligned_plans``).
``layer_map``      explicit student -> teacher map for ``align_to``: ``'uniform'``, ``'first'``, a list
                   or ``{i: j}`` of layer indices, or names / regex rules (``matching.resolve_match``).
                   Default: automatic (relative depth). Not the initialisation map.
``verify``         check every decomposition's reconstruction error. Default True.
``tolerance``      relative error allowed by ``verify``; default by dtype (float64 1e-10,
                   float32 1e-4, half types 1e-2).
``workers``        decomposition threads. Default ``torch.get_num_threads()``.
=================  ===========================================================================
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
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = tuple(SUPPORTED_TYPES)
    min_numel: int = 0
    num_factors: int = 2
    factor_order: str = 'paper'
    selection: str | None = None
    num_dummy: int | None = None
    target_ratio: float | None = None
    max_bond: int | None = None
    freeze: str | None = None
    overrides: dict[str, dict] = field(default_factory=dict)
    align_to: nn.Module | None = None
    layer_map: Any = None
    verify: bool = True
    tolerance: float | None = None
    workers: int | None = None

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
