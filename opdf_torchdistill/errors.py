"""The package's user-facing errors, in one place so every layer (pure math included) can raise them."""
from __future__ import annotations

__all__ = ['OptionError', 'MatchError']


class OptionError(ValueError):
    """An option of ``overparameterize`` / ``mpo:`` / a plugin component has an invalid key or value."""


class MatchError(OptionError):
    """A layer map names layers that do not exist, or no student layer can be paired with the teacher."""
