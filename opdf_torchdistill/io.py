"""Checkpoint input and atomic file output.

Input: :func:`load_checkpoint` reads every checkpoint the project loads with
``torch.load(..., weights_only=True)``: tensors and plain Python data only, so a file whose unpickling
would run code is refused (naming the file and the offending objects) instead of executed. A user who
knows a file's origin opts in for that one file (``trusted=True``; ``--trust_checkpoint FILE`` on the
command line).

Output: a checkpoint, export or record is either complete or absent, never half-written. Everything is
written to a hidden temporary file (``.<name>.<host>.<pid>.<random>.tmp``) in the destination directory,
flushed to disk, given the permissions of the user's umask, then renamed over the destination
(``os.replace`` is atomic on POSIX and Windows within one filesystem). An exception removes the
temporary file; a process killed outright (SIGKILL, power loss) can leave it behind, never a partial
destination, and a later write to the same destination removes it once its writer is gone (a dead
PID on this host; on another host, a day without change), so concurrent writers never lose theirs.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import pickle
import re
import socket
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, IO, Iterable

import torch

__all__ = ['atomic_write', 'atomic_torch_save', 'atomic_write_text', 'atomic_write_json', 'load_checkpoint',
           'is_trusted', 'trusted_checkpoints', 'declared_tensor_bytes', 'checkpoint_size_limit', 'check_state_dict_fits',
           'CheckpointError', 'UnsafeCheckpointError']

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints safely
# ----------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, or not a PyTorch checkpoint (the message names it)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that cannot be read as plain data: loading it would run code from the file."""


_TRUSTED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar('opdf_trusted_checkpoints', default=())


@contextlib.contextmanager
def trusted_checkpoints(paths: Iterable[str | os.PathLike] | None):
    """Within the block, :func:`load_checkpoint` also trusts ``paths`` (the command line's
    ``--trust_checkpoint``), so loads deep inside model factories (a ``teacher_ckpt``, timm ``weights``)
    honour it without passing it through every layer."""
    token = _TRUSTED.set(tuple(str(p) for p in paths or ()) + _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted(path: str | os.PathLike, trusted: Iterable[str | os.PathLike] | None = None) -> bool:
    """Whether ``path`` is one of the files the user trusted (``trusted``, or the enclosing
    :func:`trusted_checkpoints`); paths are compared after resolving them."""
    candidates = list(trusted or ()) + list(_TRUSTED.get())
    if not candidates:
        return False
    target = Path(path).expanduser().resolve()
    return any(Path(t).expanduser().resolve() == target for t in candidates)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only for the message; the refusal does not depend on it
        return []


def declared_tensor_bytes(path: str | os.PathLike) -> int:
    """Bytes the tensors of a checkpoint will occupy once loaded, read from the file's table of contents
    without inflating anything: the sum of the declared (uncompressed) sizes of a ``torch.save`` zip's
    storage entries; for other formats (legacy pickle, safetensors) the file size, which bounds them."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist() if '/data/' in info.filename)
    return path.stat().st_size


def _check_size(path: Path, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    try:
        declared = declared_tensor_bytes(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f'{path}: cannot read the checkpoint\'s table of contents ({exc}); the file is '
                              f'truncated or not a PyTorch checkpoint') from None
    if declared > max_bytes:
        raise CheckpointError(f'{path}: declares {declared / 2**20:.1f} MiB of tensors, more than the '
                              f'{max_bytes / 2**20:.1f} MiB the model it is loaded into can use; refusing to inflate '
                              f'it (a wrong file, or a crafted one)')


def _looks_like_pytorch(path: Path) -> bool:
    """A ``torch.save`` zip, or a legacy pickle (protocol 2+ header); anything else is not a checkpoint."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        return f.read(1) == b'\x80'


def load_checkpoint(path: str | os.PathLike, *, trusted: bool = False, map_location: Any = 'cpu',
                    max_bytes: int | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what to do.

    ``max_bytes``: refuse, before inflating anything, a file whose tensors would occupy more than this
    (see :func:`declared_tensor_bytes`). A path inside :func:`trusted_checkpoints` counts as trusted.

    Raises:
        FileNotFoundError: no file at ``path``.
        IsADirectoryError: ``path`` is a directory.
        UnsafeCheckpointError: the file holds pickled objects other than tensors and plain data (it could
            run code when loaded); nothing from it was executed. ``trusted=True`` loads it anyway.
        CheckpointError: the file is truncated, empty, too large for its use or not a PyTorch checkpoint.
    """
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise IsADirectoryError(f'{path}: is a directory, not a checkpoint file')
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such checkpoint file')
    trusted = trusted or is_trusted(path)
    _check_size(path, max_bytes)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if 'weights_only' not in str(exc) and 'Weights only' not in str(exc) or not _looks_like_pytorch(path):
            raise CheckpointError(f'{path}: cannot read the checkpoint; the file is truncated or not a PyTorch '
                                  f'checkpoint ({str(exc).strip().splitlines()[0][:200]})') from None
        if not trusted:
            found = _unsafe_globals(path)
            what = f'it references {found}' if found else str(exc).strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f'{path}: refusing to load this checkpoint: it is not plain tensor data ({what}), and unpickling '
                f'it could run code from the file. If you know where it comes from, pass --trust_checkpoint '
                f'{path} (or load_checkpoint(..., trusted=True)); better, re-save its tensors as a plain '
                f'state_dict') from None
        logger.warning('%s: loading a checkpoint that is not plain data, because it was trusted explicitly', path)
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, IndexError) as exc:
        raise CheckpointError(f'{path}: cannot read the checkpoint ({type(exc).__name__}: '
                              f'{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""}); the file is '
                              f'truncated, empty or not a PyTorch checkpoint') from None


def checkpoint_size_limit(model: 'torch.nn.Module') -> int:
    """The most tensor bytes a checkpoint loaded into ``model`` may declare: its parameters and buffers
    four times over (a training checkpoint also holds optimizer moments) plus 64 MiB of slack."""
    state = model.state_dict()
    need = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return 4 * need + 64 * 2 ** 20


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ', '.join(keys[:limit]) + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def check_state_dict_fits(model: 'torch.nn.Module', state: dict, what: str) -> None:
    """A one-line error naming the missing, unexpected and mis-shaped keys when ``state`` does not fit
    ``model`` (``load_state_dict`` reports them over many lines, after copying what fits)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}' for k in expected
              if k in state and torch.is_tensor(state[k]) and torch.is_tensor(expected[k])
              and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = ([f'missing keys {_listed(missing)}'] if missing else []) + \
                ([f'unexpected keys {_listed(unexpected)}'] if unexpected else []) + \
                ([f'size mismatch {_listed(shapes, 3)}'] if shapes else [])
        raise CheckpointError(f'{what} does not fit the {type(model).__name__} the config builds: '
                              f'{"; ".join(parts)} (a checkpoint of another model or width?)')


# ----------------------------------------------------------------------------------------------
# Atomic output
# ----------------------------------------------------------------------------------------------
_HOST = re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:40] or 'host'
_STALE_OTHER_HOST_S = 24 * 3600
_umask_lock = threading.Lock()


def _umask() -> int:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        old = os.umask(0o022)
        os.umask(old)
    return old


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (also one owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _sweep_stale(path: Path) -> None:
    """Remove temporary files of killed writers to ``path``; never one a live writer is filling."""
    pattern = re.compile(rf'^\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[^.]+\.tmp$')
    now = time.time()
    for stale in path.parent.glob(f'.{_glob_escape(path.name)}.*.tmp'):
        m = pattern.match(stale.name)
        if m is None:
            continue
        try:
            age = now - stale.stat().st_mtime
        except FileNotFoundError:
            continue
        if m.group('pid') is None:
            dead = age > 3600  # old-style name (no writer id): only when long untouched
        elif m.group('host') == _HOST:
            dead = int(m.group('pid')) != os.getpid() and not pid_alive(int(m.group('pid')))
        else:
            dead = age > _STALE_OTHER_HOST_S  # a PID on another machine cannot be checked
        if dead:
            try:
                stale.unlink()
            except FileNotFoundError:
                pass


def _glob_escape(name: str) -> str:
    return re.sub(r'([*?\[])', r'[\1]', name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.{_HOST}.{os.getpid()}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            if hasattr(os, 'fchmod'):  # POSIX: mkstemp makes 0600; outputs follow the umask
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. ENOSPC from inside torch.save: name the file
            raise OSError(exc.errno, f'{exc.strerror or exc} while writing {path} (nothing was replaced)',
                          str(path)) from exc
        if isinstance(exc, RuntimeError) and 'write' in str(exc).lower():  # torch's stream writer wraps OSError
            raise OSError(getattr(exc.__cause__, 'errno', None),
                          f'{str(exc).splitlines()[0]} while writing {path} (nothing was replaced)', str(path)) from exc
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + '\n', path)
