"""The files of one training run, and the rules that keep a run from destroying files.

A run of ``opdf-train`` (or ``opdf-glue``) reads a config and checkpoints (its *inputs*) and writes the
best checkpoint ``dst_ckpt``, ``<dst stem>.last.pt`` beside it, and optionally ``--metrics_json`` and
``--run_log`` (its *outputs*). Before anything is opened:

* :func:`check_outputs`: no output may be an input (the config, a ``src_ckpt``, a teacher file, any file
  the config names) or another output; paths are compared after resolving symlinks, and existing files
  by inode, so a symlink or a hard link to an input is caught too;
* :func:`refuse_existing`: a fresh run onto an existing ``dst_ckpt`` or ``.last.pt`` is refused (another
  run's best model would be replaced by a new one without a word); ``--resume`` continues it, ``--force``
  replaces it;
* :func:`check_existing_kind`: an existing ``--metrics_json`` that is not JSON, or a ``--run_log`` that
  is not text, is someone's other file and is not overwritten without ``--force``;
* :class:`RunLock`: one run per ``dst_ckpt``: ``<dst_ckpt>.lock`` is created exclusively (``O_EXCL``,
  atomic on local filesystems and NFSv3+) and holds the owner's pid, host and start time. A second run is
  refused with the first one's pid and host. A lock whose process is gone (same host, pid dead or reused)
  is stale and is taken over; a lock from another host cannot be checked and is never broken
  automatically (the message says which file to remove).

:func:`run_state` tells a finished run from an interrupted one by the epoch its ``.last.pt`` records.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Mapping

from .io import pid_alive

__all__ = ['OutputError', 'RunLockedError', 'last_ckpt_path', 'check_outputs', 'refuse_existing',
           'check_existing_kind', 'config_input_files', 'RunLock', 'run_state', 'total_epochs']

#: config keys whose string values name files a run reads (compared against outputs even if absent)
INPUT_KEYS = ('src_ckpt', 'teacher_ckpt', 'weights', 'ckpt', 'file', 'files', 'path')
#: keys whose values are outputs, never inputs
OUTPUT_KEYS = ('dst_ckpt',)


class OutputError(ValueError):
    """An output path that would destroy an input, another output or an earlier run's files; nothing was
    opened or written."""


class RunLockedError(OutputError):
    """Another live run holds the ``dst_ckpt`` (the message names its pid, host and lock file)."""


def last_ckpt_path(dst_ckpt: str | os.PathLike) -> Path:
    """``<dst stem>.last<suffix>``: the resume checkpoint written after every epoch."""
    path = Path(os.path.expanduser(str(dst_ckpt)))
    return path.with_name(path.stem + '.last' + path.suffix)


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output that is an input, another output, or a directory (``{role: path}``; ``None`` skipped)."""
    outs = {role: Path(os.path.expanduser(str(p))) for role, p in outputs.items() if p is not None}
    ins = {role: Path(os.path.expanduser(str(p))) for role, p in inputs.items() if p is not None}
    for role, path in outs.items():
        if path.is_dir():
            raise OutputError(f'{role}: {path} is a directory; give a file path')
        for in_role, in_path in ins.items():
            if _same(path, in_path):
                raise OutputError(f'{role} {path} is also {in_role} ({in_path.resolve()}), which this run reads: '
                                  f'writing it would destroy it; choose another path')
            if in_path.is_dir() and path.exists() and in_path.resolve() in path.resolve().parents:
                raise OutputError(f'{role} {path} is a file inside {in_role} ({in_path.resolve()}), which this run '
                                  f'reads: writing it would destroy it; choose another path')
    roles = list(outs)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            if _same(outs[a], outs[b]):
                raise OutputError(f'{a} and {b} are the same file ({outs[a].resolve()}); give them different paths')


def refuse_existing(paths: Mapping[str, str | os.PathLike], advice: str) -> None:
    """Refuse when any of ``{role: path}`` exists (``advice`` says how to proceed, e.g. --resume or --force)."""
    existing = [f'{role} {Path(os.path.expanduser(str(p)))}' for role, p in paths.items()
                if Path(os.path.expanduser(str(p))).exists()]
    if existing:
        raise OutputError(f'{" and ".join(existing)} already exist(s); {advice}')


def check_existing_kind(path: str | os.PathLike | None, kind: str, role: str) -> None:
    """An existing output must be the kind of file this run writes there (``'json'`` or ``'text'``)."""
    if path is None:
        return
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, 'rb') as f:
        head = f.read(8192)
    if kind == 'json':
        try:
            json.loads(path.read_text(encoding='utf-8'))
            return
        except (UnicodeDecodeError, ValueError):
            what = 'not a JSON file'
    else:
        if b'\0' not in head and not head.startswith((b'PK\x03\x04', b'\x80')):  # zip (torch.save), pickle
            return
        what = 'a binary file, not a log'
    raise OutputError(f'{role} {path} exists and is {what} (a checkpoint or another file of yours?); refusing to '
                      f'overwrite it. Choose another {role}, or pass --force')


def config_input_files(config: object, config_path: str | os.PathLike | None = None,
                       directories: bool = False) -> dict[str, str]:
    """``{where: path}`` of the files a plain-data config names: values of :data:`INPUT_KEYS`, and any other
    string that names an existing file (or, with ``directories``, folder: a Hugging Face model folder).
    ``dst_ckpt`` values are outputs and are left out."""
    found: dict[str, str] = {}
    if config_path is not None:
        found['--config'] = str(config_path)

    def walk(node: object, where: str, key: str | None) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if str(k) in OUTPUT_KEYS:
                    continue
                walk(v, f'{where}.{k}' if where else str(k), str(k))
        elif isinstance(node, (list, tuple)):
            for k, v in enumerate(node):
                walk(v, f'{where}.{k}', key)
        elif isinstance(node, str) and node and not node.startswith(('http://', 'https://')) and len(node) < 4096:
            path = os.path.expanduser(node)
            try:
                named = key in INPUT_KEYS or os.path.isfile(path) or (directories and os.path.isdir(path))
            except (OSError, ValueError):
                return
            if named and '\n' not in node:
                found[where] = node

    walk(config, '', None)
    return found


def total_epochs(config: Mapping) -> int | None:
    """Epochs a training config runs in all (the sum over ``stage*`` blocks); ``None`` if it does not say."""
    train = config.get('train') or {}
    if 'num_epochs' in train:
        return int(train['num_epochs'])
    stages = [v for k, v in train.items() if str(k).startswith('stage') and isinstance(v, Mapping)]
    return sum(int(v.get('num_epochs', 0)) for v in stages) if stages else None


def run_state(dst_ckpt: str | os.PathLike, epochs: int | None) -> tuple[str, int | None]:
    """``('done' | 'resume' | 'missing', epoch reached)`` of the run writing ``dst_ckpt``.

    A best checkpoint exists from the first epoch on, so its presence alone does not mean the run
    finished: when the ``.last.pt`` beside it records fewer than ``epochs`` epochs, the run was
    interrupted (reusing it would silently use a half-trained model)."""
    from .io import load_checkpoint
    dst = Path(os.path.expanduser(str(dst_ckpt)))
    last = last_ckpt_path(dst)
    if last.exists():
        epoch = load_checkpoint(last, trusted=False).get('epoch')
        if epochs is not None and epoch is not None and epoch < epochs:
            return 'resume', epoch
        if not dst.exists():
            return 'resume', epoch
        return 'done', epoch
    return ('done' if dst.exists() else 'missing'), None


# ----------------------------------------------------------------------------------------------
# One run per dst_ckpt
# ----------------------------------------------------------------------------------------------
_HOST = socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid from the owner."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """Exclusive ownership of a run's ``dst_ckpt`` through ``<dst_ckpt>.lock`` (see the module docstring).

    Use as a context manager; :meth:`acquire` raises :class:`RunLockedError` naming the holder."""

    def __init__(self, dst_ckpt: str | os.PathLike, argv: Iterable[str] = ()):
        self.dst = Path(os.path.expanduser(str(dst_ckpt)))
        self.path = self.dst.with_name(self.dst.name + '.lock')
        self.argv = [str(a) for a in argv]
        self.record: dict | None = None

    def _read(self, path: Path | None = None) -> dict | None:
        try:
            text = (path or self.path).read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
            return data if isinstance(data, dict) else {}
        except ValueError:
            return {}

    def _stale(self, info: dict) -> bool:
        if not info:  # empty or unreadable: a writer between O_EXCL and its write, or a kill in between
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if info.get('host') != _HOST:
            return False  # a pid on another machine cannot be checked
        pid = info.get('pid')
        if not isinstance(pid, int) or not pid_alive(pid):
            return True
        start = info.get('proc_start')
        return start is not None and _process_start(pid) not in (None, start)

    def _take_over(self, info: dict) -> None:
        """Remove a stale lock, unless another process replaced it meanwhile (then it is put back)."""
        aside = self.path.with_name(f'{self.path.name}.stale.{os.getpid()}')
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) == info:
            aside.unlink()
            return
        try:  # not the file we judged stale: a new owner took it; restore it unless yet another exists
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink()

    def acquire(self) -> 'RunLock':
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {'pid': os.getpid(), 'host': _HOST, 'proc_start': _process_start(os.getpid()),
                  'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'argv': self.argv}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read()
                if info is None:
                    continue  # released meanwhile
                if self._stale(info):
                    self._take_over(info)
                    continue
                holder = (f'pid {info.get("pid")} on {info.get("host")}, started {info.get("started")}'
                          if info else 'a run that is starting')
                raise RunLockedError(f'{self.dst} is in use by another run ({holder}; lock {self.path}). Two runs '
                                     f'on one checkpoint overwrite each other\'s files: wait for it, or choose '
                                     f'another dst_ckpt. If that run is certainly gone (e.g. killed on another '
                                     f'machine), remove {self.path}') from None
            with os.fdopen(fd, 'w') as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self.record = record
            return self
        raise RunLockedError(f'{self.dst}: could not take the lock {self.path} (other processes keep taking it); '
                             f'is another run starting on the same dst_ckpt?')

    def release(self) -> None:
        if self.record is not None and self._read() == self.record:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.record = None

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
