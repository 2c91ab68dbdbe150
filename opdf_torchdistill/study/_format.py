"""Short names of overrides, shared by the progress lines, the warnings and the tables."""
from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ['short_key', 'short_overrides', 'label']


def short_key(key: str) -> str:
    """``train.optimizer.kwargs.lr`` -> ``lr``; ``...sub_terms.opdf.weight`` -> ``opdf.weight``."""
    parts = key.split('.')
    return '.'.join(parts[-2:]) if parts[-1] in ('weight', 'kwargs') and len(parts) > 1 else parts[-1]


def short_overrides(overrides: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    if not overrides:
        return '-'
    return ', '.join(f'{(labels or {}).get(k, short_key(k))}={v}' for k, v in overrides.items())


def label(name: str, overrides_json: str) -> str:
    """``name [lr=0.1, weight=1.0]`` from a config name and its overrides as sorted JSON pairs."""
    overrides = dict(json.loads(overrides_json))
    if not overrides:
        return name
    short = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in overrides.items())
    return f'{name} [{short}]'
