"""Run records: what a run's key hashes, the JSON-lines record files, and stale records.

**Records.** Every finished run is one JSON object: its ``key``, ``config``, ``name`` (the arm or config
stem), ``seed``, ``overrides``, ``device``, ``config_hash``, ``versions``, ``inputs``, ``status`` (``ok``,
``diverged`` or ``failed``; a failed run is retried), ``metrics`` (``test_acc1``, ``best_val_acc1``,
parameter counts, ...), ``error``, ``wall_seconds``, ``finished``, and for a study its ``pair`` and
``phase``. A record file ``FILE`` (``docs/results/records/fashion_cnn.jsonl``) is read together with the
folder ``FILE.d/`` beside it, which holds one file per run, ``FILE.d/<key>.json``
(:func:`load_records` merges the two; :func:`run_dir`):

* ``FILE`` itself, one record per line, is written by runs on *one* machine (the ``local`` launcher):
  :func:`append_record` re-reads it under a lock and replaces it atomically, so concurrent runners of
  that machine lose nothing and the file is always complete;
* ``FILE.d/<key>.json`` is written by runs on a cluster (the ``slurm`` and ``submitit-local`` launchers,
  :mod:`~opdf_torchdistill.study.jobs`), many hosts at once, on a shared filesystem
  (:func:`write_run_record`). The file is first written completely under a temporary name in the same
  folder (starting with ``.``, never read), flushed and ``fsync``-ed, and then given its name with
  ``link()`` (exclusive: it fails if the name exists), or ``rename()`` when it replaces the failed
  attempt of the same run. Both are single, atomic operations of the file server, also on NFS, so a
  reader sees no file or a complete one, never a torn line; and since every run has its own file, no
  two writers ever write the same file, so nothing can be lost between them.
  **Why not one file and a lock:** on NFS, ``flock``/``fcntl`` locks depend on the client and the
  server (lockd; ``flock`` is emulated with ``fcntl`` or local to the client, depending on the kernel
  and mount options, e.g. ``nolock``/``local_lock``), and ``O_APPEND`` is not atomic across clients
  (each client computes the end of the file itself, so two appends can land on the same offset). A lock
  file created with ``O_EXCL`` works on NFSv3+ but leaves a stale lock behind a killed job, which then
  stops every other writer. ``link``/``rename`` into a per-run name needs neither.
  ``opdf-ablate compact FILE`` (:func:`compact_records`) folds ``FILE.d/`` into ``FILE`` on one
  machine (e.g. before committing the records), and removes the per-run files it folded.

**A record file is a set of runs, not a log.** One record per key: a second record of a run with the
same result (status and metrics; timings may differ) is a copy and is dropped; a failed attempt yields
to the record of its retry; two records of one run with *different* results are an error naming both
lines (:class:`RecordError`), never "the last one wins"; the same holds between ``FILE`` and ``FILE.d/``.
Every line must be a JSON object whose metrics are finite numbers (a NaN accuracy is an error naming the
line), except the *last* line of ``FILE``: an incomplete last line (what a process killed while
appending leaves) is reported in one warning and set aside (moved to ``FILE.incomplete`` by the next
append), so a study goes on. A per-run file must hold one such object whose ``key`` is its name.

**Record keys (provenance).** A run's key is the SHA-256 (first 16 hex digits) of exactly what decides
its result:

* its ``name`` (the arm or config stem), ``seed`` and ``device``;
* its ``config_hash``: the *resolved* config (the YAML as data, anchors expanded, overrides applied,
  ``dst_ckpt`` left out, tags kept as data, so nothing is executed);
* its ``inputs``: for every file the config names as ``src_ckpt`` or ``teacher_ckpt`` (the teacher), a
  hash of the checkpoint's *tensor contents*, ``tensors:<hash>``: the state dict (``ckpt['model']``
  when there is one, else the whole object), keys sorted, each tensor's dtype, shape and raw bytes,
  other values as canonical JSON. ``torch.save`` writes a random serialization id into every file,
  so an identically retrained teacher is a different *file* but the same *teacher*: hashing the
  contents lets a fresh machine that retrains it reuse every record. A file that is not a plain
  checkpoint (or cannot be read as one) is hashed as bytes, ``file:<sha256>``; ``missing`` when absent.

Editing a config or retraining a teacher into different weights changes the key, and the run is
trained again instead of silently reusing a stale record. Package versions (opdf-torchdistill,
torchdistill, torch) are *not* in the key, so that a version bump does not orphan every record; they
are stored in every record as ``versions``, and ``report`` lists the records made with other versions.

Records made before this rule (keys that also hashed the versions, inputs as a bare file SHA-256) stay
usable: such a record is reused for a run with the same name, seed, device and config hash whose
input files are byte for byte the ones it recorded (:func:`record_finder`); reports never depend on
keys (they match records by config hash).

**Stale records.** ``report`` recomputes the config hash of every record and leaves out (and lists on
stderr) records whose config has changed since (:func:`find_stale`); version or teacher differences are
listed but kept (a report may be made on another machine). Records written before config hashing
(the digits records of the first release) are read as they are and never reused by ``run``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from ..io import atomic_write_text
from ._format import short_overrides

__all__ = ['INPUT_KEYS', 'DONE', 'read_config_data', 'resolved_config', 'canonical', 'config_hash', 'input_hashes',
           'environment', 'RunIdentity', 'run_identity', 'run_key', 'RecordError', 'load_records', 'append_record',
           'run_dir', 'write_run_record', 'compact_records', 'find_stale', 'warn_stale', 'without_stale',
           'record_finder']

INPUT_KEYS = ('src_ckpt', 'teacher_ckpt')  # config keys naming files whose contents a run depends on
DONE = ('ok', 'diverged')  # statuses that are final (a failed run is retried)


# ----------------------------------------------------------------------------------------------
# Resolved configs
# ----------------------------------------------------------------------------------------------
class _DataLoader(yaml.SafeLoader):
    """Loads a torchdistill YAML as plain data: ``!import_call`` etc. become ``{'__tag__', 'value'}``.

    (This form enters every config hash: changing it would make every recorded run stale.)"""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {'__tag__': '!' + suffix, 'value': value}


_DataLoader.add_multi_constructor('!', _tagged)


def read_config_data(config: str | os.PathLike) -> Any:
    """A torchdistill YAML as plain data (tags recorded as ``{'__tag__': '!tag', 'value': ...}``, nothing
    imported or called). Raises ``FileNotFoundError`` naming a missing config."""
    path = Path(os.path.expanduser(str(config)))
    if not path.is_file():
        raise FileNotFoundError(f'config {path} does not exist')
    with open(path) as f:
        return yaml.load(f, Loader=_DataLoader)


def resolved_config(config: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """The config as data with ``overrides`` (``{dotted.key: value}``) applied; ``dst_ckpt`` removed
    (the runner chooses it). Raises ``FileNotFoundError`` naming a missing config."""
    # the trainer's override rules (did-you-mean errors included); a config function, not the command line
    from ..cli.common import apply_overrides
    data = read_config_data(config)
    if not isinstance(data, dict):
        raise ValueError(f'{Path(os.path.expanduser(str(config)))}: a config must be a mapping, got '
                         f'{type(data).__name__}')
    apply_overrides(data, [f'{k}={json.dumps(v)}' for k, v in (overrides or {}).items()])
    for model in (data.get('models') or {}).values():
        if isinstance(model, dict):
            model.pop('dst_ckpt', None)
    return data


def canonical(obj: Any) -> str:
    """The JSON text that is hashed: sorted keys, no spaces, anything else as ``str``."""
    return json.dumps(obj, sort_keys=True, separators=(',', ':'), default=str)


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(config: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> str:
    return _sha16(canonical(resolved_config(config, overrides)))


# ----------------------------------------------------------------------------------------------
# Inputs, environment and run identity
# ----------------------------------------------------------------------------------------------
def _input_paths(node: Any, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in INPUT_KEYS and isinstance(value, str):
                found.append(value)
            else:
                _input_paths(value, found)
    elif isinstance(node, list):
        for value in node:
            _input_paths(value, found)
    return found


@functools.lru_cache(maxsize=None)
def _file_sha(path: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _digest(obj: Any, digest: Any) -> None:
    """Feed ``obj`` to ``digest``: mappings by sorted key, sequences in order, tensors as dtype, shape and
    raw bytes, anything else as canonical JSON."""
    import torch
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to('cpu').contiguous()
        digest.update(canonical(['tensor', str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        digest.update(b'{')
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            digest.update(canonical([type(key).__name__, str(key)]).encode())
            _digest(obj[key], digest)
        digest.update(b'}')
    elif isinstance(obj, (list, tuple)):
        digest.update(b'[')
        for value in obj:
            _digest(value, digest)
        digest.update(b']')
    else:
        digest.update(canonical(obj).encode())


@functools.lru_cache(maxsize=None)
def _content_hash(path: str, stamp: tuple) -> str:
    """``tensors:<hash>`` of a checkpoint's state dict, or ``file:<sha256>`` of a file that is not a plain
    checkpoint (see the module docstring). Cached per (path, size, mtime)."""
    from ..io import load_checkpoint
    try:
        ckpt = load_checkpoint(path, trusted=False)  # weights_only: nothing in the file is executed
        state = ckpt['model'] if isinstance(ckpt, Mapping) and 'model' in ckpt else ckpt
        digest = hashlib.sha256()
        _digest(state, digest)
        return 'tensors:' + digest.hexdigest()[:16]
    except Exception:  # noqa: BLE001 - not a plain checkpoint (or an unusual tensor): its bytes are the input
        return 'file:' + _file_sha(path, stamp)


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def input_hashes(resolved: dict) -> dict[str, str]:
    """``{path: 'tensors:<hash>' | 'file:<sha256>' | 'missing'}`` of the files a resolved config reads
    (teacher checkpoints; see the module docstring)."""
    out = {}
    for raw in sorted(set(_input_paths(resolved, []))):
        path = os.path.expanduser(raw)
        out[raw] = _content_hash(os.path.abspath(path), _stamp(path)) if os.path.isfile(path) else 'missing'
    return out


def _input_matches(recorded: Any, raw: str, current: str | None) -> bool:
    """Whether a recorded input hash names the file at ``raw`` now (``current``: its hash today). A bare
    hex value is a record from before content hashing: the file SHA-256 it names must match the file's."""
    if recorded == current:
        return True
    if not isinstance(recorded, str) or ':' in recorded or recorded == 'missing' or current in (None, 'missing'):
        return False
    path = os.path.expanduser(raw)
    return os.path.isfile(path) and recorded == _file_sha(os.path.abspath(path), _stamp(path))


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """Versions stored in every record (not part of its key; ``report`` lists records made with others)."""
    import torch
    import torchdistill
    from .. import __version__
    return {'opdf_torchdistill': __version__, 'torchdistill': getattr(torchdistill, '__version__', 'unknown'),
            'torch': torch.__version__}


@dataclass(frozen=True)
class RunIdentity:
    key: str
    name: str
    config_hash: str
    versions: dict = field(hash=False)
    inputs: dict = field(hash=False)
    seed: int | None = None
    device: str | None = None


def _key(name: str, chash: str, seed: Any, device: Any, inputs: Mapping[str, Any]) -> str:
    return _sha16(canonical({'name': name, 'config_hash': chash, 'seed': seed, 'device': device,
                             'inputs': dict(inputs)}))


def _record_key_is_current(record: dict) -> bool:
    """Whether a record's key was computed by today's rule (else it is a record from before content hashing)."""
    return record.get('key') == _key(record.get('name'), record.get('config_hash'), record.get('seed'),
                                     record.get('device'), record.get('inputs') or {})


def run_identity(config: str, seed: int, overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                 name: str | None = None) -> RunIdentity:
    """The key of one run (see the module docstring) and what went into it."""
    resolved = resolved_config(config, overrides)
    chash = _sha16(canonical(resolved))
    name = Path(config).stem if name is None else name
    inputs = input_hashes(resolved)
    return RunIdentity(_key(name, chash, seed, device, inputs), name, chash, dict(environment()), inputs, seed,
                       device)


def run_key(config: str, seed: int, overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
            name: str | None = None) -> str:
    return run_identity(config, seed, overrides, device, name).key


# ----------------------------------------------------------------------------------------------
# Record files
# ----------------------------------------------------------------------------------------------
class RecordError(ValueError):
    """A record file line that cannot be used, or two records of one run that disagree (the message names
    the file and the line numbers)."""


_TIMING = ('train_seconds',)  # metrics that differ between two trainings of one run without changing its result
_WARNED: set = set()
_WARN_LOCK = threading.Lock()


def _warn_once(message: str) -> None:
    """One stderr line per distinct message and process (record files are re-read often during a study)."""
    with _WARN_LOCK:
        if message in _WARNED:
            return
        _WARNED.add(message)
    print(f'WARNING: {message}', file=sys.stderr, flush=True)


def _result(record: dict) -> str:
    metrics = {k: v for k, v in (record.get('metrics') or {}).items() if k not in _TIMING}
    return canonical([record.get('status'), metrics])


def _check_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f'{where}: a record must be a JSON object {{...}}, got a JSON {type(record).__name__}')
    metrics = record.get('metrics')
    if metrics is not None and not isinstance(metrics, dict):
        raise RecordError(f'{where}: metrics must be a JSON object, got {metrics!r}')
    bad = [f'{k}: {v}' for k, v in (metrics or {}).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RecordError(f'{where}: non-finite metrics ({", ".join(bad)}); a run with a NaN or infinite result is '
                          f'"diverged" with no metrics, not "ok": fix or remove this line')
    return record


def _read(path: Path) -> tuple[list[tuple[int, dict]], tuple[int, str] | None]:
    """``([(line number, record), ...], set_aside)``: ``set_aside`` is ``(number, text)`` of an incomplete
    last line (what a process killed while appending leaves), which is not a record."""
    if not path.exists():
        return [], None
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    entries, aside = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last:
                aside = (number, line)
                continue
            raise RecordError(f'{path}:{number}: not a JSON record ({exc}); only the last line may be incomplete '
                              f'(an interrupted append), so this file was edited: fix or remove the line') from None
        entries.append((number, _check_record(record, f'{path}:{number}')))
    if aside is not None:
        _warn_once(f'{path}:{aside[0]}: incomplete last line (not a JSON record: a run killed while appending?); '
                   f'set aside, not read (the next record appended moves it to {_aside_path(path)})')
    return entries, aside


def _aside_path(path: Path) -> Path:
    return path.with_name(path.name + '.incomplete')


def _merge(entries: Iterable[tuple[Path, int, dict]]) -> list[tuple[Path, int, dict]]:
    """One record per key: a record whose result (status and metrics, timings aside) equals an earlier
    one's is a copy and dropped; a failed attempt yields to a finished record of the same run (a retry);
    two finished records of one run with different results are an error naming both lines."""
    kept: dict[str, int] = {}
    out: list[tuple[Path, int, dict] | None] = []
    for path, number, record in entries:
        key = record.get('key')
        if key is None:
            out.append((path, number, record))
            continue
        if key not in kept:
            kept[key] = len(out)
            out.append((path, number, record))
            continue
        first_path, first_number, first = out[kept[key]]
        if _result(first) == _result(record):
            continue
        if record.get('status') == 'failed':
            continue
        if first.get('status') == 'failed':
            out[kept[key]] = None
            kept[key] = len(out)
            out.append((path, number, record))
            continue
        here = f'line {number}' if path == first_path else f'{path}:{number}'
        raise RecordError(f'{first_path}:{first_number} and {here}: two records of run {key} '
                          f'({record.get("name")} seed={record.get("seed")}) with different results '
                          f'({_describe(first)} vs {_describe(record)}); a record file is a set of runs: remove the '
                          f'one that is wrong')
    return [e for e in out if e is not None]


def _describe(record: dict) -> str:
    metrics = record.get('metrics') or {}
    if record.get('status') != 'ok':
        return str(record.get('status'))
    return ', '.join(f'{k} {metrics[k]}' for k in ('test_acc1', 'best_val_acc1') if k in metrics) or 'ok'


def load_records(*paths: str | os.PathLike) -> list[dict]:
    """The records of one or more record files (a missing file holds none) and of their per-run folders
    ``FILE.d/`` (:func:`run_dir`), one per run key.

    Raises :class:`RecordError` (naming the file and line) for a line that is not a JSON object, a record
    with non-finite metrics, or two records of one run that disagree (see :func:`_merge`); an incomplete
    *last* line is set aside with a warning."""
    entries = []
    for path in paths:
        path = Path(path)
        entries += [(path, number, record) for number, record in _read(path)[0]]
        entries += [(file, 1, record) for file, record in _read_runs(path)]
    return [record for _, _, record in _merge(entries)]


def _save_records(records: Sequence[dict], path: str | os.PathLike) -> None:
    atomic_write_text(''.join(json.dumps(r, sort_keys=True, default=str) + '\n' for r in records), path)


_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock per record file (other processes appending to the same file wait); the lock file
    lives in the temporary directory so that nothing is left next to the records."""
    import tempfile
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with _THREAD_LOCK:
        with open(os.path.join(tempfile.gettempdir(), f'opdf_ablate_{digest}.lock'), 'a') as handle:
            try:
                import fcntl
                fcntl.flock(handle, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover  (not POSIX: the thread lock still serialises this process)
                pass
            yield


def append_record(record: dict, path: str | os.PathLike) -> None:
    """Add one record: it replaces a failed record of the same run (a retry), and a copy of a record
    already there changes nothing; a record of a run that is there with another result is refused
    (:class:`RecordError`), never silently replaced.

    The file is re-read under a lock and replaced atomically, so it is always complete, and concurrent
    runners appending to it lose nothing. An incomplete last line found there is moved to
    ``FILE.incomplete`` (appended), so that nothing is lost.
    """
    path = Path(path)
    _check_record(record, f'{path}: the new record of {record.get("name")} seed={record.get("seed")}')
    with _locked(path):
        entries, aside = _read(path)
        for number, old in entries:
            if old.get('key') == record['key'] and old.get('status') != 'failed' and _result(old) != _result(record):
                raise RecordError(f'{path}:{number}: run {record["key"]} ({record.get("name")} seed='
                                  f'{record.get("seed")}) is recorded there with another result ({_describe(old)}); '
                                  f'the new one ({_describe(record)}) is not written: were two runners training it?')
        copy = any(old.get('key') == record['key'] and _result(old) == _result(record) for _, old in entries)
        if copy and aside is None:
            return
        records = [old for _, old in entries if copy or old.get('key') != record['key']]  # less failed attempts
        if not copy:
            records.append(record)
        if aside is not None:
            with open(_aside_path(path), 'a') as f:
                f.write(aside[1] + '\n')
        _save_records(records, path)


# ----------------------------------------------------------------------------------------------
# One file per run: what cluster jobs write (see the module docstring)
# ----------------------------------------------------------------------------------------------
_RUN_NAME = re.compile(r'^[A-Za-z0-9_-]+$')  # a key: the name of its file
_HOST = socket.gethostname()


def run_dir(path: str | os.PathLike) -> Path:
    """``FILE.d``: the folder of per-run record files beside the record file ``FILE``."""
    path = Path(path)
    return path.with_name(path.name + '.d')


def _run_file(path: Path) -> dict:
    """The record in a per-run file (a :class:`RecordError` naming the file if it is not one)."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f'{path}: not a JSON record ({exc}); per-run files are written whole (under another '
                          f'name, then linked), so this one was edited: fix or remove it') from None
    record = _check_record(record, str(path))
    if record.get('key') != path.stem:
        raise RecordError(f'{path}: holds the record of run {record.get("key")!r}, not of {path.stem!r} (its name); '
                          f'fix or remove it')
    return record


def _read_runs(path: Path) -> list[tuple[Path, dict]]:
    """``[(file, record), ...]`` of ``FILE.d/<key>.json``, in the order the runs finished (then by key).

    Temporary files (their names start with ``.``) are not records and are never read."""
    folder = run_dir(path)
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith('.') or not name.endswith('.json') or not _RUN_NAME.match(name[:-len('.json')]):
            continue
        try:
            found.append((Path(entry.path), _run_file(Path(entry.path))))
        except FileNotFoundError:  # replaced or folded meanwhile
            continue
    return sorted(found, key=lambda e: (str(e[1].get('finished') or ''), e[0].name))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover  (not POSIX)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover  (some filesystems do not sync directories)
        pass
    finally:
        os.close(fd)


def write_run_record(record: dict, path: str | os.PathLike) -> bool:
    """Write one run's record as ``FILE.d/<key>.json`` (see the module docstring): safe with any number of
    writers on any number of hosts sharing the folder, NFS included. Returns whether it was written.

    The same rules as :func:`append_record`: a copy of a record already there (in ``FILE`` or ``FILE.d/``)
    changes nothing, a finished record replaces a failed one of the same run, a failed attempt never
    replaces a finished record, and a record of a run that is there with another result is refused
    (:class:`RecordError`)."""
    path = Path(path)
    _check_record(record, f'{path}: the new record of {record.get("name")} seed={record.get("seed")}')
    key = record.get('key')
    if not isinstance(key, str) or not _RUN_NAME.match(key):
        raise RecordError(f'{path}: a per-run record needs a key of letters, digits, _ and -, got {key!r}')
    for number, old in _read(path)[0]:  # the run may be in FILE already (a local run, or folded)
        if old.get('key') != key:
            continue
        if _result(old) == _result(record) or (record.get('status') == 'failed' and old.get('status') != 'failed'):
            return False
        if old.get('status') != 'failed':
            raise RecordError(f'{path}:{number}: run {key} ({record.get("name")} seed={record.get("seed")}) is '
                              f'recorded there with another result ({_describe(old)}); the new one '
                              f'({_describe(record)}) is not written: were two runners training it?')
    folder = run_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f'{key}.json'
    tmp = folder / f'.{key}.json.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
    with open(tmp, 'w') as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + '\n')
        f.flush()
        os.fsync(f.fileno())
    try:
        for _ in range(5):
            try:
                os.link(tmp, target)  # exclusive: fails if the run has a file already
                linked = True
            except FileExistsError:
                linked = False
            except OSError:  # NFS may report a link whose reply was lost (the link count says), or no hard links
                linked = os.stat(tmp).st_nlink >= 2
                if not linked and not target.exists():
                    os.replace(tmp, target)  # a filesystem without hard links: rename (atomic too)
                    linked = True
            if linked:
                _fsync_dir(folder)
                return True
            try:
                old = _run_file(target)
            except FileNotFoundError:
                continue  # removed meanwhile (folded): try again
            if _result(old) == _result(record) or record.get('status') == 'failed':
                return False  # a copy, or a failed attempt after a finished record: nothing to add
            if old.get('status') != 'failed':
                raise RecordError(f'{target}: run {key} ({record.get("name")} seed={record.get("seed")}) is recorded '
                                  f'there with another result ({_describe(old)}); the new one ({_describe(record)}) '
                                  f'is not written: were two runners training it?')
            os.replace(tmp, target)  # the retry of a failed attempt replaces it
            _fsync_dir(folder)
            return True
        raise RecordError(f'{target}: could not write the record (the file kept changing)')
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def compact_records(path: str | os.PathLike) -> int:
    """Fold ``FILE.d/`` into ``FILE`` (one machine; e.g. before committing records): the merged set is
    written to ``FILE`` atomically, then the per-run files that were folded (and not changed since) are
    removed. Returns the number of per-run files folded. Conflicts are errors, as for :func:`load_records`."""
    path = Path(path)
    with _locked(path):
        entries, aside = _read(path)
        runs = _read_runs(path)
        if not runs:
            return 0
        merged = _merge([(path, number, r) for number, r in entries] + [(f, 1, r) for f, r in runs])
        if aside is not None:
            with open(_aside_path(path), 'a') as f:
                f.write(aside[1] + '\n')
        _save_records([r for _, _, r in merged], path)
        for file, record in runs:
            try:
                if _run_file(file) == record:
                    file.unlink()
            except (FileNotFoundError, RecordError):
                continue
        try:
            run_dir(path).rmdir()
        except OSError:
            pass
    return len(runs)


def record_finder(records: Sequence[dict], by: str) -> Callable[[str, dict, int, Any], dict | None]:
    """``find(name, overrides, seed, ident)``: the finished record of that run, or ``None``.

    ``by='key'`` matches the run key (``ident`` a :class:`RunIdentity`); a record whose key was computed
    by the rule before content hashing matches when its name, seed, device and config hash are the
    run's and its recorded input files are byte for byte today's. ``by='hash'`` matches the config hash
    (``ident`` the hash), as reports do."""
    index: dict[tuple, dict] = {}
    older: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get('status') not in DONE or 'config_hash' not in r:
            continue
        if by != 'key':
            index[(r['name'], r['seed'], r['config_hash'], canonical(r.get('overrides') or {}))] = r
        elif _record_key_is_current(r):
            index[('key', r['key'])] = r
        else:
            older.setdefault((r.get('name'), r.get('seed'), r.get('device'), r['config_hash']), []).append(r)

    def find(name: str, overrides: dict, seed: int, ident: Any) -> dict | None:
        if by != 'key':
            return index.get((name, seed, ident, canonical(overrides)))
        found = index.get(('key', ident.key))
        if found is None:
            for r in older.get((ident.name, seed, ident.device, ident.config_hash), ()):
                recorded = r.get('inputs') or {}
                if set(recorded) == set(ident.inputs) and all(
                        _input_matches(v, p, ident.inputs[p]) for p, v in recorded.items()):
                    return r
        return found
    return find


# ----------------------------------------------------------------------------------------------
# Stale records
# ----------------------------------------------------------------------------------------------
def find_stale(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Sort records by what can be said of them today.

    Returns ``{'stale': ..., 'unchecked': ..., 'legacy': ..., 'other_env': ..., 'other_inputs': ...}``:
    ``stale`` records' config (with their overrides) resolves to another hash now (the config was
    edited); ``unchecked`` name a config that no longer exists; ``legacy`` records carry no hash
    (written before config hashing); ``other_env`` were made with other package versions, and
    ``other_inputs`` with a teacher checkpoint that differs from the one on disk (both still usable).
    """
    out: dict[str, list[dict]] = {k: [] for k in ('stale', 'unchecked', 'legacy', 'other_env', 'other_inputs')}
    cache: dict[str, Any] = {}
    for r in records:
        if 'config_hash' not in r:
            out['legacy'].append(r)
            continue
        memo = canonical([r['config'], r.get('overrides') or {}])
        if memo not in cache:
            try:
                resolved = resolved_config(r['config'], r.get('overrides') or {})
                cache[memo] = (_sha16(canonical(resolved)), input_hashes(resolved))
            except FileNotFoundError:
                cache[memo] = None
        if cache[memo] is None:
            out['unchecked'].append(r)
            continue
        current, inputs = cache[memo]
        if r['config_hash'] != current:
            out['stale'].append(r)
            continue
        if r.get('versions') != environment():
            out['other_env'].append(r)
        if any(inputs.get(p) not in (None, 'missing') and not _input_matches(recorded, p, inputs.get(p))
               for p, recorded in (r.get('inputs') or {}).items()):
            out['other_inputs'].append(r)
    return out


def warn_stale(kinds: Mapping[str, list[dict]], stream=None) -> None:
    """Say on ``stream`` (stderr) which records :func:`find_stale` sorted out, and what is done with them."""
    stream = stream if stream is not None else sys.stderr
    text = {'stale': 'left out: their config changed since they ran (rerun them)',
            'unchecked': 'kept, unchecked: their config file no longer exists',
            'legacy': 'kept, unchecked: written before config hashing',
            'other_env': 'kept: made with other package versions than installed here',
            'other_inputs': 'kept: made with a teacher checkpoint that differs from the one on disk'}
    for kind, members in kinds.items():
        if not members:
            continue
        print(f'WARNING: {len(members)} record(s) {text[kind]}:', file=stream)
        shown = members if kind in ('stale', 'other_inputs') else [] if kind == 'legacy' else members[:5]
        for r in shown:
            detail = f' (recorded config hash {r["config_hash"]})' if kind == 'stale' else ''
            if kind == 'other_env':
                detail = f' ({r.get("versions")})'
            print(f'  {r.get("config")} {r["name"]} seed={r["seed"]} {short_overrides(r.get("overrides") or {})}'
                  f'{detail}', file=stream)
        if shown and len(shown) < len(members):
            print(f'  ... and {len(members) - len(shown)} more', file=stream)


def without_stale(records: Sequence[dict], warn: bool = True) -> list[dict]:
    """``records`` less the stale ones (a warning lists what was left out or is doubtful)."""
    kinds = find_stale(records)
    if warn:
        warn_stale(kinds)
    stale = {id(r) for r in kinds['stale']}
    return [r for r in records if id(r) not in stale]
