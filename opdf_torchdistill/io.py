"""Atomic file output: a checkpoint, export or record is either complete or absent, never half-written.

Everything is written to a hidden temporary file (``.<name>.<random>.tmp``) in the destination
directory, flushed to disk, then renamed over the destination (``os.replace`` is atomic on POSIX and
Windows within one filesystem). An exception removes the temporary file; a process killed outright
(SIGKILL, power loss) can leave it behind, never a partial destination, and the next write to the
same destination removes it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

__all__ = ['atomic_write', 'atomic_torch_save', 'atomic_write_text', 'atomic_write_json']


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f'.{path.name}.*.tmp'):  # left by a writer that was killed
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n', path)
