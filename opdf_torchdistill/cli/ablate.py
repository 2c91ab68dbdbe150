"""Ablations and studies: configs x seeds x override grids -> one JSON record per run, then statistics.

Three commands:

``run``
    trains every (config, seed, grid point) that ``--out`` does not hold yet and appends one record
    per finished run (so an interrupted ablation resumes where it stopped).
``study SPEC``
    the two-phase protocol of a study spec (``configs/fashion/study.yaml``): for every arm, each point
    of its grid (learning rate, alignment weight, ...) is trained with the selection seeds and scored
    on *validation* accuracy; then the best point (ties: the first in grid order; a point with a
    diverged or failed seed is never chosen) is trained with the final seeds. Resumable across
    sessions; ``--jobs 2`` trains two runs at a time (one subprocess each, ``threads`` torch threads).
``report``
    prints the tables: with ``--study SPEC`` the selection table and the final table per pair
    (test accuracy mean and 95 % t-interval, the paired difference to the baseline over the same
    seeds with its 95 % t-interval, the two-sided paired t-test p-value and the Holm-corrected
    p-value over the comparisons in that table), as Markdown, reproducible byte for byte from the
    records; with ``--out FILES`` the older per-config summary (``--tune``, ``--baseline``, plots).

**Record keys.** A run's key hashes its arm name, seed, device, the *resolved* config (the YAML as
data, anchors expanded, overrides applied, ``dst_ckpt`` left out, tags kept as data, so nothing is
executed), the versions of opdf-torchdistill, torchdistill and torch, and the SHA-256 of every file
the config names as ``src_ckpt`` or ``teacher_ckpt`` (the teacher). Editing a config, upgrading, or
retraining a teacher therefore changes the key, and the run is trained again instead of silently
reusing a stale record. ``report`` recomputes the config hash of every record and leaves out (and
lists on stderr) records whose config has changed since; version or teacher differences are
listed but kept (a report may be made on another machine). Records written before config hashing
(the digits records) are read as they are and never reused by ``run``.

Examples::

    python tools/ablate.py study configs/fashion/study.yaml --jobs 2
    python tools/ablate.py report --study configs/fashion/study.yaml
    python tools/ablate.py run --configs configs/digits/kd.yaml configs/digits/kd_opdf.yaml \\
        --seeds 0 1 2 3 4 --grid train.optimizer.kwargs.lr=0.05,0.1,0.2 --out runs/ablation/digits.jsonl
    python tools/ablate.py report --out runs/ablation/digits.jsonl --tune train.optimizer.kwargs.lr \\
        --baseline kd --plots runs/ablation
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from ..io import atomic_write_json, atomic_write_text
from .common import parse_value

__all__ = ['main', 'run_key', 'run_identity', 'resolved_config', 'config_hash', 'load_records', 'append_record',
           'find_stale', 'summarize', 'format_summary', 'mean_ci', 'paired_difference', 'holm', 'load_study',
           'study_plan', 'select_settings', 'study_tables', 'run_study', 'Progress']

logger = logging.getLogger('opdf_torchdistill.ablate')

INPUT_KEYS = ('src_ckpt', 'teacher_ckpt')  # config keys naming files whose contents a run depends on
DONE = ('ok', 'diverged')  # statuses that are final (a failed run is retried)


# ----------------------------------------------------------------------------------------------
# Resolved configs and record keys
# ----------------------------------------------------------------------------------------------
class _DataLoader(yaml.SafeLoader):
    """Loads a torchdistill YAML as plain data: ``!import_call`` etc. become ``{'__tag__', 'value'}``."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {'__tag__': '!' + suffix, 'value': value}


_DataLoader.add_multi_constructor('!', _tagged)


def resolved_config(config: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """The config as data with ``overrides`` (``{dotted.key: value}``) applied; ``dst_ckpt`` removed
    (the runner chooses it). Raises ``FileNotFoundError`` naming a missing config."""
    from .common import apply_overrides
    path = Path(os.path.expanduser(str(config)))
    if not path.is_file():
        raise FileNotFoundError(f'config {path} does not exist')
    with open(path) as f:
        data = yaml.load(f, Loader=_DataLoader)
    if not isinstance(data, dict):
        raise ValueError(f'{path}: a config must be a mapping, got {type(data).__name__}')
    apply_overrides(data, [f'{k}={json.dumps(v)}' for k, v in (overrides or {}).items()])
    for model in (data.get('models') or {}).values():
        if isinstance(model, dict):
            model.pop('dst_ckpt', None)
    return data


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(',', ':'), default=str)


def config_hash(config: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> str:
    return hashlib.sha256(_canonical(resolved_config(config, overrides)).encode()).hexdigest()[:16]


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


def input_hashes(resolved: dict) -> dict[str, str]:
    """``{path: sha256[:16] or 'missing'}`` of the files a resolved config reads (teacher checkpoints)."""
    out = {}
    for raw in sorted(set(_input_paths(resolved, []))):
        path = os.path.expanduser(raw)
        if os.path.isfile(path):
            st = os.stat(path)
            out[raw] = _file_sha(os.path.abspath(path), (st.st_size, st.st_mtime_ns))
        else:
            out[raw] = 'missing'
    return out


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """Versions that enter every record key."""
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


def run_identity(config: str, seed: int, overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
                 name: str | None = None) -> RunIdentity:
    """The key of one run (see the module docstring) and what went into it."""
    resolved = resolved_config(config, overrides)
    chash = hashlib.sha256(_canonical(resolved).encode()).hexdigest()[:16]
    name = Path(config).stem if name is None else name
    versions, inputs = environment(), input_hashes(resolved)
    blob = _canonical({'name': name, 'config_hash': chash, 'seed': seed, 'device': device, 'versions': versions,
                       'inputs': inputs})
    return RunIdentity(hashlib.sha256(blob.encode()).hexdigest()[:16], name, chash, dict(versions), inputs)


def run_key(config: str, seed: int, overrides: Mapping[str, Any] | None = None, device: str = 'cpu',
            name: str | None = None) -> str:
    return run_identity(config, seed, overrides, device, name).key


# ----------------------------------------------------------------------------------------------
# Record files
# ----------------------------------------------------------------------------------------------
def load_records(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f'{path}:{number}: not a JSON record ({exc})') from None
    return records


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
    """Add one record, replacing an earlier one with the same key (a failed run that was retried).

    The file is re-read under a lock and replaced atomically, so it is always complete, and
    concurrent runners appending to it lose nothing.
    """
    path = Path(path)
    with _locked(path):
        records = [r for r in load_records(path) if r.get('key') != record['key']]
        records.append(record)
        _save_records(records, path)


def _parse_grid(items: Sequence[str]) -> list[dict]:
    axes = []
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--grid {item!r} must look like dotted.key=v1,v2,...')
        key, values = item.split('=', 1)
        axes.append([(key, parse_value(v)) for v in values.split(',')])  # 1e-3 is a float, as in --set
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _parse_sets(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        if '=' not in item:
            raise ValueError(f'--set {item!r} must look like dotted.key=value')
        key, value = item.split('=', 1)
        out[key] = parse_value(value)
    return out


def _execute(config: str, seed: int, overrides: dict, workdir: Path, device: str, isolate: bool,
             threads: int | None = None) -> dict:
    """Train one run through the runner; returns its record fields (status, metrics, error)."""
    stem = hashlib.sha1(_canonical([config, seed, overrides, device]).encode()).hexdigest()[:16]
    ckpt = workdir / f'{stem}.pt'
    metrics_path = workdir / f'{stem}.metrics.json'
    argv = ['--config', config, '--device', device, '--seed', str(seed), '--metrics_json', str(metrics_path),
            '--dst_ckpt', str(ckpt), '-student_only']  # the teacher's test accuracy is not recorded: skip it
    if threads:
        argv += ['--threads', str(threads)]
    for k, v in overrides.items():
        argv += ['--set', f'{k}={json.dumps(v)}']
    try:
        if isolate:
            import subprocess
            proc = subprocess.run([sys.executable, '-m', 'opdf_torchdistill.cli.train'] + argv, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ['failed']
                raise RuntimeError(tail[0])
            metrics = json.loads(metrics_path.read_text())
        else:
            from .train import get_parser, run
            metrics = run(get_parser().parse_args(argv))[0]
    except FloatingPointError as exc:
        return {'status': 'diverged', 'metrics': {}, 'error': str(exc)}
    except Exception as exc:  # a failed run is recorded, not fatal: the rest of the ablation goes on
        text = str(exc)
        status = 'diverged' if any(s in text for s in ('loss is nan', 'loss is inf', 'FloatingPointError',
                                                       'non-finite')) else 'failed'
        return {'status': status, 'metrics': {}, 'error': f'{type(exc).__name__}: {exc}'}
    finally:
        for path in (ckpt, ckpt.with_name(ckpt.stem + '.last.pt'), metrics_path):
            if path.exists():
                path.unlink()
    test = metrics.get('test', {})
    out = {'test_acc1': test.get('acc1'), 'test_acc5': test.get('acc5'), 'test_loss': test.get('loss'),
           'best_val_acc1': metrics.get('best_val_acc1'), 'train_params': metrics.get('train_params'),
           'inference_params': metrics.get('inference_params'),
           'ratio': metrics['train_params'] / metrics['inference_params'] if metrics.get('inference_params') else None,
           'train_seconds': metrics.get('train_seconds')}
    for extra in ('alignment', 'grad_norms'):  # coverage and first-step gradient norms, when the runner logs them
        if metrics.get(extra) is not None:
            out[extra] = metrics[extra]
    return {'status': 'ok', 'error': None, 'metrics': out}


@dataclass
class Task:
    """One planned run."""
    config: str
    seed: int
    overrides: dict
    identity: RunIdentity
    out: Path
    extra: dict = field(default_factory=dict)  # record fields of a study (pair, phase)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return 'unknown'
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Runs done / total, mean run time and an ETA over everything planned (all pairs and phases).

    The time of a remaining run is estimated by the mean wall time of its arm's recorded runs, else of
    every recorded run; the ETA divides their sum by ``jobs`` (runs trained at a time).
    """

    def __init__(self, total: int, done: int, times: Mapping[str, Sequence[float]] | None = None,
                 stream=None, jobs: int = 1):
        self.total, self.done, self.jobs = total, done, max(1, jobs)
        self.times: dict[str, list[float]] = defaultdict(list, {k: list(v) for k, v in (times or {}).items()})
        self.stream = stream if stream is not None else sys.stdout
        self.session: list[float] = []

    def mean(self, name: str | None = None) -> float | None:
        values = self.times.get(name) if name is not None else None
        if not values:
            values = [t for ts in self.times.values() for t in ts]
        return statistics.fmean(values) if values else None

    def eta(self, remaining: Iterable[str]) -> float | None:
        total = 0.0
        for name in remaining:
            m = self.mean(name)
            if m is None:
                return None
            total += m
        return total / self.jobs

    def line(self, remaining: Iterable[str]) -> str:
        m = self.mean()
        return (f'{self.done}/{self.total} runs done, mean run {_fmt_duration(m) if m is not None else "unknown"}, '
                f'ETA {_fmt_duration(self.eta(remaining))}')

    def finished(self, record: dict, remaining: Iterable[str]) -> None:
        self.done += 1
        self.times[record['name']].append(record['wall_seconds'])
        self.session.append(record['wall_seconds'])
        acc = record['metrics'].get('test_acc1')
        val = record['metrics'].get('best_val_acc1')
        phase = f' {record["phase"]}' if record.get('phase') else ''
        result = (f' val {val:.2f} test {acc:.2f}' if acc is not None and val is not None else
                  f' ({record["error"]})')
        print(f'[{self.line(remaining)}]{phase} {record["name"]} seed={record["seed"]} '
              f'{_short_overrides(record["overrides"])}: {record["status"]}{result} ({record["wall_seconds"]:.1f} s)',
              file=self.stream, flush=True)


def _short_overrides(overrides: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    if not overrides:
        return '-'
    return ', '.join(f'{(labels or {}).get(k, _short_key(k))}={v}' for k, v in overrides.items())


def _short_key(key: str) -> str:
    parts = key.split('.')
    return '.'.join(parts[-2:]) if parts[-1] in ('weight', 'kwargs') and len(parts) > 1 else parts[-1]


def _times_by_name(records: Iterable[dict]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get('status') == 'ok' and r.get('wall_seconds') is not None:
            times[r['name']].append(float(r['wall_seconds']))
    return times


def _run_tasks(tasks: Sequence[Task], device: str, workdir: Path, progress: Progress, jobs: int = 1,
               threads: int | None = None, isolate: bool = False, later: Sequence[str] = ()) -> list[dict]:
    """Train ``tasks`` (``jobs`` at a time, each in its own subprocess when ``jobs > 1``), appending each
    record as it finishes; ``later`` names runs still to come after these (for the ETA)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pending = [t.identity.name for t in tasks]

    def one(task: Task) -> dict:
        start = time.perf_counter()
        result = _execute(task.config, task.seed, task.overrides, workdir, device, isolate or jobs > 1, threads)
        return {'key': task.identity.key, 'config': task.config, 'name': task.identity.name, 'seed': task.seed,
                'overrides': task.overrides, 'device': device, 'config_hash': task.identity.config_hash,
                'versions': task.identity.versions, 'inputs': task.identity.inputs, **task.extra,
                'wall_seconds': round(time.perf_counter() - start, 3),
                'finished': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'), **result}

    records = []

    def finish(task: Task, record: dict) -> None:
        append_record(record, task.out)
        records.append(record)
        pending.remove(task.identity.name)
        progress.finished(record, list(pending) + list(later))

    if jobs <= 1:
        for task in tasks:
            finish(task, one(task))
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(one, task): task for task in tasks}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    return records


def run_ablation(configs: Sequence[str], seeds: Sequence[int], grid: Sequence[dict], fixed: dict, out: str,
                 device: str = 'cpu', isolate: bool = False, jobs: int = 1, threads: int | None = None,
                 workdir: str | None = None) -> list[dict]:
    records = load_records(out)
    done = {r['key'] for r in records if r.get('status') in DONE}
    legacy = sum(1 for r in records if 'config_hash' not in r)
    plan = []
    for c, g, s in itertools.product(configs, grid, seeds):
        overrides = {**fixed, **g}
        plan.append(Task(c, s, overrides, run_identity(c, s, overrides, device), Path(out)))
    todo = [t for t in plan if t.identity.key not in done]
    print(f'{len(plan)} runs planned, {len(plan) - len(todo)} already recorded in {out}, {len(todo)} to go'
          + (f' ({legacy} older records without a config hash are not reused)' if legacy else ''), flush=True)
    progress = Progress(len(plan), len(plan) - len(todo), _times_by_name(records), jobs=jobs)
    _run_tasks(todo, device, Path(workdir) if workdir else Path(out).with_suffix('.runs'), progress, jobs, threads,
               isolate)
    return load_records(out)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def _t_quantile(df: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of the 95 % t confidence interval."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    return mean, std, _t_quantile(n - 1) * std / math.sqrt(n)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` over the seeds both have: mean, 95 % CI half-width, two-sided paired t-test p-value."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, _, half = mean_ci(diffs)
    p = math.nan
    if len(diffs) >= 2:
        from scipy import stats
        if any(d != diffs[0] for d in diffs):
            p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
        else:
            p = 1.0 if diffs[0] == 0 else 0.0
    return {'n': len(seeds), 'mean': mean, 'ci95': half, 'p': p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN and
    does not count as a comparison."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


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
        memo = _canonical([r['config'], r.get('overrides') or {}])
        if memo not in cache:
            try:
                resolved = resolved_config(r['config'], r.get('overrides') or {})
                cache[memo] = (hashlib.sha256(_canonical(resolved).encode()).hexdigest()[:16], input_hashes(resolved))
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
        if any(inputs.get(p) not in (None, 'missing', sha) for p, sha in (r.get('inputs') or {}).items()):
            out['other_inputs'].append(r)
    return out


def _warn_stale(kinds: Mapping[str, list[dict]], stream=None) -> None:
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
            print(f'  {r.get("config")} {r["name"]} seed={r["seed"]} {_short_overrides(r.get("overrides") or {})}'
                  f'{detail}', file=stream)
        if shown and len(shown) < len(members):
            print(f'  ... and {len(members) - len(shown)} more', file=stream)


def without_stale(records: Sequence[dict], warn: bool = True) -> list[dict]:
    kinds = find_stale(records)
    if warn:
        _warn_stale(kinds)
    stale = {id(r) for r in kinds['stale']}
    return [r for r in records if id(r) not in stale]


def _group_key(record: dict, drop: str | None = None) -> tuple:
    overrides = {k: v for k, v in record['overrides'].items() if k != drop}
    return record['name'], json.dumps(sorted(overrides.items()), default=str)


def _label(name: str, overrides_json: str) -> str:
    overrides = dict(json.loads(overrides_json))
    if not overrides:
        return name
    short = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in overrides.items())
    return f'{name} [{short}]'


def summarize(records: Iterable[dict], tune: Sequence[str] = (), baseline: str | None = None) -> list[dict]:
    """One row per group (config name + overrides). With ``tune`` (override keys), each (name, other
    overrides) keeps only the values of those keys with the best mean *validation* accuracy (groups
    with a diverged seed are never selected)."""
    tune = [tune] if isinstance(tune, str) else list(tune or ())
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get('status') in ('ok', 'diverged'):
            groups[_group_key(r)].append(r)
    rows = []
    for (name, overrides_json), members in groups.items():
        ok = [r for r in members if r['status'] == 'ok']
        test = {r['seed']: r['metrics']['test_acc1'] for r in ok}
        val = [r['metrics']['best_val_acc1'] for r in ok]
        mean, std, ci = mean_ci(list(test.values()))
        ratios = [r['metrics']['ratio'] for r in ok if r['metrics'].get('ratio')]
        rows.append({'name': name, 'overrides': dict(json.loads(overrides_json)), 'label': _label(name, overrides_json),
                     'n': len(ok), 'diverged': len(members) - len(ok), 'test_mean': mean, 'test_std': std,
                     'test_ci95': ci, 'val_mean': statistics.fmean(val) if val else math.nan,
                     'ratio': statistics.fmean(ratios) if ratios else math.nan, 'per_seed': test,
                     'seconds': statistics.fmean([r['wall_seconds'] for r in members])})
    if tune:
        best: dict[tuple, dict] = {}
        for row in rows:
            rest = {k: v for k, v in row['overrides'].items() if k not in tune}
            key = (row['name'], json.dumps(sorted(rest.items()), default=str))
            score = row['val_mean'] if row['diverged'] == 0 and row['n'] else -math.inf
            if key not in best or score > best[key][0]:
                best[key] = (score, row)
        rows = [row for _, row in best.values()]
    if baseline:
        bases = [r for r in rows if r['name'] == baseline]
        if not bases:
            raise ValueError(f'baseline {baseline!r} has no records; names: {sorted({r["name"] for r in rows})}')
        base = bases[0]
        for row in rows:
            row['vs_baseline'] = paired_difference(row['per_seed'], base['per_seed']) if row is not base else None
    return rows


def format_summary(rows: Sequence[dict], tune: Sequence[str] = (), baseline: str | None = None) -> str:
    from ..tables import format_table
    tune = [tune] if isinstance(tune, str) else list(tune or ())
    headers = ['method', 'n', 'test acc@1', 'std', '95% CI', 'val acc@1', 'ratio']
    for k, key in enumerate(tune):
        headers.insert(1 + k, 'tuned ' + '.'.join(key.split('.')[-2:]))
    if baseline:
        headers += [f'diff vs {baseline}', 'p (paired t)']
    table = []
    for row in rows:
        cells = [_label(row['name'], json.dumps(sorted(
            (k, v) for k, v in row['overrides'].items() if k not in tune)))]
        cells += [row['overrides'].get(key, '-') for key in tune]
        cells += [f'{row["n"]}' + (f' (+{row["diverged"]} diverged)' if row['diverged'] else ''),
                  f'{row["test_mean"]:.2f}', f'{row["test_std"]:.2f}',
                  f'[{row["test_mean"] - row["test_ci95"]:.2f}, {row["test_mean"] + row["test_ci95"]:.2f}]',
                  f'{row["val_mean"]:.2f}', f'{row["ratio"]:.2f}' if not math.isnan(row['ratio']) else '1.00']
        if baseline:
            d = row.get('vs_baseline')
            cells += ['-', '-'] if d is None else [f'{d["mean"]:+.2f} +- {d["ci95"]:.2f}', f'{d["p"]:.3f}']
        table.append(cells)
    return format_table(headers, table)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write a figure through a temporary file and a rename (never a half-written plot), then close it."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp.png')
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _accuracy_panel(ax, labels: Sequence[str], means: Sequence[float], cis: Sequence[float],
                    per_seed: Sequence[Iterable[float]]) -> None:
    """Test accuracy per method: mean with its 95 % interval, each seed as a grey dot."""
    xs = list(range(len(labels)))
    ax.errorbar(xs, means, yerr=cis, fmt='o', capsize=4)
    for x, seeds in zip(xs, per_seed):
        seeds = list(seeds)
        ax.scatter([x] * len(seeds), seeds, s=10, alpha=0.4, color='gray')
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha='right')
    ax.set_ylabel('test accuracy (%)')
    ax.grid(axis='y', alpha=0.3)


def plot_methods(rows: Sequence[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 4))
    _accuracy_panel(ax, [r['name'] for r in rows], [r['test_mean'] for r in rows], [r['test_ci95'] for r in rows],
                    [r['per_seed'].values() for r in rows])
    ax.set_title(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_ratio(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    series = defaultdict(list)
    for r in rows:
        if r['n']:
            series[r['name']].append(r)
    series = {k: sorted(v, key=lambda r: 1.0 if math.isnan(r['ratio']) else r['ratio']) for k, v in series.items()}
    if not any(len({round(r['ratio'], 3) for r in v}) > 1 for v in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, members in series.items():
        xs = [1.0 if math.isnan(r['ratio']) else r['ratio'] for r in members]
        ax.errorbar(xs, [r['test_mean'] for r in members], yerr=[r['test_ci95'] for r in members], marker='o',
                    capsize=3, label=name)
    ax.set_xlabel('parameters while training / inference parameters')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_lr(rows: Sequence[dict], lr_key: str, path: Path, title: str) -> Path | None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    series = defaultdict(list)
    for r in rows:
        if lr_key in r['overrides']:
            rest = {k: v for k, v in r['overrides'].items() if k != lr_key}
            series[(r['name'], json.dumps(sorted(rest.items()), default=str))].append(r)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, rest), members in sorted(series.items()):
        members.sort(key=lambda r: r['overrides'][lr_key])
        ratio = next((r['ratio'] for r in members if not math.isnan(r['ratio'])), 1.0)
        label = f'{_label(name, rest)} (x{ratio:.2f} params)'
        xs = [r['overrides'][lr_key] for r in members]
        ys = [r['test_mean'] if r['n'] else math.nan for r in members]
        line = ax.plot(xs, ys, marker='o', label=label)[0]
        bad = [(x, r) for x, r in zip(xs, members) if r['diverged']]
        if bad:
            ax.scatter([x for x, _ in bad], [10.0] * len(bad), marker='x', color=line.get_color())
    ax.set_xscale('log')
    ticks = sorted({r['overrides'][lr_key] for members in series.values() for r in members})
    ax.minorticks_off()
    ax.set_xticks(ticks)
    ax.set_xticklabels([f'{t:g}' for t in ticks])
    ax.set_xlabel(f'learning rate ({lr_key.split(".")[-1]})')
    ax.set_ylabel('test accuracy (%)  (x: a seed diverged)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)




# ----------------------------------------------------------------------------------------------
# Studies: selection on validation, then seeds at the selected setting
# ----------------------------------------------------------------------------------------------
_STUDY_KEYS = {'study', 'description', 'workdir', 'device', 'threads', 'baseline', 'select_seeds', 'seeds',
               'select_metric', 'labels', 'pairs'}
_PAIR_KEYS = {'title', 'records', 'prepare', 'fixed', 'arms', 'select_seeds', 'seeds', 'baseline'}
_ARM_KEYS = {'config', 'grid', 'title'}
_METRICS = ('best_val_acc1',)


class StudyError(ValueError):
    """A study spec that is not well formed (the message names the key)."""


@dataclass
class Arm:
    name: str
    config: str
    grid: list[dict]  # grid points in order (the cross product of the grid's axes)
    axes: list[str]
    title: str = ''


@dataclass
class Pair:
    name: str
    title: str
    records: Path
    prepare: list[str]
    fixed: dict
    arms: list[Arm]
    select_seeds: list[int]
    seeds: list[int]
    baseline: str


@dataclass
class Study:
    name: str
    path: Path
    workdir: Path
    device: str
    threads: int | None
    labels: dict
    pairs: list[Pair]


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value) or len(set(value)) != len(value):
        raise StudyError(f'{where} must be a non-empty list of distinct integers, got {value!r}')
    return list(value)


def _unknown(where: str, given: Mapping, valid: set) -> None:
    extra = {k for k in given if not str(k).startswith('x-')} - valid  # x-*: free keys for YAML anchors
    if extra:
        raise StudyError(f'{where}: unknown keys {sorted(extra)}; valid keys: {sorted(valid)} (and x-* for anchors)')


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study spec (YAML; paths relative to the working directory, the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'study spec {path} does not exist')
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise StudyError(f'{path}: a study spec must be a mapping')
    _unknown(str(path), spec, _STUDY_KEYS)
    for key in ('study', 'pairs', 'seeds', 'select_seeds'):
        if key not in spec:
            raise StudyError(f'{path}: missing key {key!r}')
    if spec.get('select_metric', 'best_val_acc1') not in _METRICS:
        raise StudyError(f'{path}: select_metric must be one of {list(_METRICS)}')
    seeds, select_seeds = _seeds(spec['seeds'], f'{path}: seeds'), _seeds(spec['select_seeds'], f'{path}: select_seeds')
    if not isinstance(spec['pairs'], dict) or not spec['pairs']:
        raise StudyError(f'{path}: pairs must be a non-empty mapping of pair name -> pair')
    pairs = []
    for pair_name, p in spec['pairs'].items():
        where = f'{path}: pairs.{pair_name}'
        if not isinstance(p, dict):
            raise StudyError(f'{where} must be a mapping')
        _unknown(where, p, _PAIR_KEYS)
        if 'records' not in p or 'arms' not in p:
            raise StudyError(f'{where}: needs records (the JSON-lines file) and arms')
        if not isinstance(p['arms'], dict) or not p['arms']:
            raise StudyError(f'{where}.arms must be a non-empty mapping of arm name -> {{config, grid}}')
        arms = []
        for arm_name, a in p['arms'].items():
            w = f'{where}.arms.{arm_name}'
            if not isinstance(a, dict) or 'config' not in a:
                raise StudyError(f'{w} must be a mapping with a config')
            _unknown(w, a, _ARM_KEYS)
            if not Path(a['config']).is_file():
                raise StudyError(f'{w}.config: {a["config"]} does not exist')
            grid = a.get('grid') or {}
            if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
                raise StudyError(f'{w}.grid must map override keys to non-empty lists of values, got {grid!r}')
            axes = list(grid)
            points = [dict(zip(axes, combo)) for combo in itertools.product(*(grid[k] for k in axes))]
            arms.append(Arm(str(arm_name), str(a['config']), points, axes, str(a.get('title', ''))))
        baseline = p.get('baseline', spec.get('baseline'))
        if baseline is not None and baseline not in [a.name for a in arms]:
            raise StudyError(f'{where}: baseline {baseline!r} is not an arm (arms: {[a.name for a in arms]})')
        prepare = list(p.get('prepare') or [])
        for config in prepare:
            if not Path(config).is_file():
                raise StudyError(f'{where}.prepare: {config} does not exist')
        fixed = dict(p.get('fixed') or {})
        pairs.append(Pair(str(pair_name), str(p.get('title', pair_name)), Path(p['records']), prepare, fixed, arms,
                          _seeds(p['select_seeds'], f'{where}.select_seeds') if 'select_seeds' in p else select_seeds,
                          _seeds(p['seeds'], f'{where}.seeds') if 'seeds' in p else seeds, baseline))
    threads = spec.get('threads')
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise StudyError(f'{path}: threads must be a positive integer, got {threads!r}')
    return Study(str(spec['study']), path, Path(spec.get('workdir', f'runs/{spec["study"]}/ablation')),
                 str(spec.get('device', 'cpu')), threads, dict(spec.get('labels') or {}), pairs)


def _pick(study: Study, names: Sequence[str] | None) -> list[Pair]:
    if not names:
        return study.pairs
    known = {p.name: p for p in study.pairs}
    bad = [n for n in names if n not in known]
    if bad:
        raise StudyError(f'{study.path}: no pairs {bad}; pairs: {list(known)}')
    return [known[n] for n in names]


def _matcher(records: Sequence[dict], by: str) -> Callable[[str, dict, int, Any], dict | None]:
    """``find(name, overrides, seed, ident)``: the last finished record of that run; ``by='key'`` matches
    the full key (``ident`` a RunIdentity), ``by='hash'`` the config hash (``ident`` the hash)."""
    index: dict[tuple, dict] = {}
    for r in records:
        if r.get('status') not in DONE or 'config_hash' not in r:
            continue
        if by == 'key':
            index[('key', r['key'])] = r
        else:
            index[(r['name'], r['seed'], r['config_hash'], _canonical(r.get('overrides') or {}))] = r

    def find(name: str, overrides: dict, seed: int, ident: Any) -> dict | None:
        if by == 'key':
            return index.get(('key', ident.key))
        return index.get((name, seed, ident, _canonical(overrides)))
    return find


def select_settings(pair: Pair, find: Callable[[str, dict, int, Any], dict | None],
                    ident: Callable[[Arm, dict, int], Any]) -> dict[str, dict]:
    """Per arm: every grid point's validation scores and the selected point (``None`` until every
    point has all its selection seeds; a point with a diverged seed is never selected)."""
    result = {}
    for arm in pair.arms:
        points, complete, best = [], True, None
        for point in arm.grid:
            overrides = {**pair.fixed, **point}
            found = [find(arm.name, overrides, s, ident(arm, overrides, s)) for s in pair.select_seeds]
            scores = [r['metrics'].get('best_val_acc1') for r in found if r is not None and r['status'] == 'ok']
            diverged = sum(1 for r in found if r is not None and r['status'] != 'ok')
            missing = sum(1 for r in found if r is None)
            complete &= missing == 0
            ok = missing == 0 and diverged == 0 and all(s is not None for s in scores)
            mean = statistics.fmean(scores) if ok else math.nan
            points.append({'point': point, 'scores': scores, 'diverged': diverged, 'missing': missing, 'val': mean})
            if ok and (best is None or mean > best['val']):
                best = points[-1]
        result[arm.name] = {'points': points, 'selected': best['point'] if complete and best else None,
                            'complete': complete}
    return result


def study_plan(study: Study, pair: Pair, records: Sequence[dict]) -> dict:
    """Tasks of a pair: ``select`` (all), ``final`` (arms whose selection is complete), the selection,
    and ``unplanned`` (arms still selecting: their final runs, counted for the ETA)."""
    cache: dict[str, RunIdentity] = {}

    def ident(arm: Arm, overrides: dict, seed: int) -> RunIdentity:
        memo = _canonical([arm.name, overrides, seed])
        if memo not in cache:
            cache[memo] = run_identity(arm.config, seed, overrides, study.device, arm.name)
        return cache[memo]

    select = [Task(arm.config, s, {**pair.fixed, **point}, ident(arm, {**pair.fixed, **point}, s), pair.records,
                   {'pair': pair.name, 'phase': 'select'})
              for arm in pair.arms for point in arm.grid for s in pair.select_seeds]
    find = _matcher(records, 'key')
    selection = select_settings(pair, find, ident)
    final, unplanned = [], []
    for arm in pair.arms:
        chosen = selection[arm.name]['selected']
        if chosen is None:
            unplanned += [arm.name] * len(pair.seeds)
            continue
        overrides = {**pair.fixed, **chosen}
        final += [Task(arm.config, s, overrides, ident(arm, overrides, s), pair.records,
                       {'pair': pair.name, 'phase': 'final'}) for s in pair.seeds]
    done = {t.identity.key for t in select + final if find(t.identity.name, t.overrides, t.seed, t.identity)}
    return {'select': select, 'final': final, 'selection': selection, 'unplanned': unplanned, 'done': done}


def _total_epochs(config: dict) -> int | None:
    """Epochs a training config runs in all (the sum over ``stage*`` blocks), ``None`` if it does not say."""
    train = config.get('train') or {}
    if 'num_epochs' in train:
        return int(train['num_epochs'])
    stages = [v for k, v in train.items() if k.startswith('stage') and isinstance(v, dict)]
    return sum(int(v.get('num_epochs', 0)) for v in stages) if stages else None


def teacher_state(config: str) -> tuple[str, str]:
    """``('done' | 'resume' | 'missing', dst_ckpt)`` of a ``prepare`` config.

    A best checkpoint exists from the first epoch on, so its presence alone does not mean the run
    finished: when the ``.last.pt`` beside it says fewer epochs than the config asks for, the run was
    interrupted and is resumed (reusing a half-trained teacher would silently change every record)."""
    from ..io import load_checkpoint
    from .common import load_config, student_config_of
    from .train import last_ckpt_path
    loaded = load_config(config)
    dst = os.path.expanduser(student_config_of(loaded)['dst_ckpt'])
    last = last_ckpt_path(dst)
    if last.exists():
        epoch = load_checkpoint(last, trusted=False).get('epoch')
        total = _total_epochs(loaded)
        if total is not None and epoch is not None and epoch < total:
            return 'resume', dst
    return ('done' if os.path.exists(dst) else 'missing'), dst


def _prepare(configs: Sequence[str], device: str, threads: int | None = None, jobs: int = 1) -> None:
    """Train the teachers a study needs, ``jobs`` at a time (one subprocess each, log beside the checkpoint).

    A finished teacher is reused, an interrupted one resumed from its ``.last.pt``; a failure stops the
    study with the end of the teacher's log."""
    import subprocess
    pending = []
    for config in configs:
        state, dst = teacher_state(config)
        if state == 'done':
            print(f'{config}: {dst} exists (training finished), reused', flush=True)
        else:
            pending.append((config, state, dst))

    def train(item: tuple[str, str, str]) -> str:
        config, state, dst = item
        log = Path(dst).with_suffix('.train.log')
        os.makedirs(log.parent, exist_ok=True)
        metrics = log.with_suffix('.metrics.json')
        argv = [sys.executable, '-m', 'opdf_torchdistill.cli.train', '--config', config, '--device', device,
                '--seed', '0', '--metrics_json', str(metrics)] + (['--threads', str(threads)] if threads else [])
        argv += ['--resume'] if state == 'resume' else []
        print(f'{config}: {"resuming" if state == "resume" else "training"} ({dst} '
              f'{"unfinished" if state == "resume" else "missing"}); log {log}', flush=True)
        start = time.perf_counter()
        with open(log, 'a') as out:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = '\n'.join(log.read_text().splitlines()[-15:])
            raise StudyError(f'{config}: teacher training failed (exit status {code}); end of {log}:\n{tail}')
        acc = json.loads(metrics.read_text()).get('test', {}).get('acc1', math.nan)
        return f'{config}: test acc@1 {acc:.2f} ({_fmt_duration(time.perf_counter() - start)})'

    with ThreadPoolExecutor(max(1, min(jobs, len(pending)))) as pool:
        for line in pool.map(train, pending):
            print(line, flush=True)


def run_study(study: Study, pairs: Sequence[str] | None = None, phase: str = 'all', jobs: int = 1,
              dry_run: bool = False, stream=None) -> None:
    """Prepare the teachers, then per pair: selection runs, selection, final runs (see the module docstring)."""
    stream = stream if stream is not None else sys.stdout
    chosen = _pick(study, pairs)
    if not dry_run:
        teachers = list(dict.fromkeys(c for pair in chosen for c in pair.prepare))  # pairs may share one
        _prepare(teachers, study.device, study.threads, jobs)
    plans = {pair.name: study_plan(study, pair, load_records(pair.records)) for pair in chosen}
    all_records = [r for pair in chosen for r in load_records(pair.records)]

    def remaining(after: str | None = None) -> list[str]:
        """Names of the runs not done yet (for the ETA), in the phases asked for."""
        names = []
        for pair in chosen:
            plan = plans[pair.name]
            todo = [t for t in plan['select'] if t.identity.key not in plan['done']] if phase != 'final' else []
            if phase != 'select':
                todo += [t for t in plan['final'] if t.identity.key not in plan['done']]
            names += [t.identity.name for t in todo]
            if phase != 'select':
                names += plan['unplanned']
        return names

    total_planned = sum(len(p['select']) * (phase != 'final') + (len(p['final']) + len(p['unplanned'])) *
                        (phase != 'select') for p in plans.values())
    rest = remaining()
    progress = Progress(total_planned, total_planned - len(rest), _times_by_name(all_records), stream, jobs)
    print(f'study {study.name} ({study.path}), pairs {[p.name for p in chosen]}, phase {phase}: '
          f'{progress.line(rest)}', file=stream, flush=True)
    for pair in chosen:
        plan = plans[pair.name]
        n_select = sum(1 for t in plan['select'] if t.identity.key not in plan['done'])
        print(f'  {pair.name}: {len(pair.arms)} arms, selection {len(plan["select"])} runs ({n_select} to go), '
              f'final {len(pair.arms) * len(pair.seeds)} runs; records {pair.records}', file=stream, flush=True)
    if dry_run:
        return
    for pair in chosen:
        workdir = study.workdir / pair.name
        for step in ('select', 'final'):
            if phase not in ('all', step):
                continue
            plan = plans[pair.name] = study_plan(study, pair, load_records(pair.records))
            todo = [t for t in plan[step] if t.identity.key not in plan['done']]
            if step == 'final':
                waiting = [a for a, s in plan['selection'].items() if s['selected'] is None]
                if waiting:
                    print(f'{pair.name}: no selected setting yet for {waiting} (selection runs missing, or every '
                          f'grid point diverged); their final runs wait', file=stream, flush=True)
            later = remaining()
            progress.total = progress.done + len(later)
            for task in todo:  # what comes after this batch: the remaining runs minus the batch itself
                later.remove(task.identity.name)
            _run_tasks(todo, study.device, workdir, progress, jobs, study.threads, later=later)
            plans[pair.name] = study_plan(study, pair, load_records(pair.records))
    print(f'study {study.name}: {progress.line(remaining())}', file=stream, flush=True)


# ----------------------------------------------------------------------------------------------
# Study report
# ----------------------------------------------------------------------------------------------
def _fmt(value: float, spec: str = '.2f') -> str:
    return 'n/a' if value is None or math.isnan(value) else format(value, spec)


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return 'n/a'
    return '<0.001' if p < 0.001 else f'{p:.3f}'


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def study_tables(study: Study, records_by_pair: Mapping[str, Sequence[dict]],
                 pairs: Sequence[str] | None = None) -> tuple[str, list[dict]]:
    """The Markdown tables of a study (selection and final per pair) and their rows as data.

    Records are matched by config hash (``find_stale``'s stale ones never match); everything printed is
    a function of the records and the spec, so the text is reproduced byte for byte.
    """
    out, summary = [], []
    for pair in _pick(study, pairs):
        records = records_by_pair.get(pair.name, [])
        hashes: dict[str, str | None] = {}

        def ident(arm: Arm, overrides: dict, seed: int) -> str | None:
            memo = _canonical([arm.config, overrides])
            if memo not in hashes:
                try:
                    hashes[memo] = config_hash(arm.config, overrides)
                except FileNotFoundError:
                    hashes[memo] = None
            return hashes[memo]

        find = _matcher(records, 'hash')
        selection = select_settings(pair, find, ident)
        axes = list(dict.fromkeys(k for arm in pair.arms for k in arm.axes))
        labels = [study.labels.get(k, _short_key(k)) for k in axes]
        seeds_txt = ', '.join(map(str, pair.select_seeds))
        out.append(f'#### {pair.title}: selection on validation (seed{"s" if len(pair.select_seeds) > 1 else ""} '
                   f'{seeds_txt})')
        out.append('')
        rows = []
        for arm in pair.arms:
            sel = selection[arm.name]
            for entry in sel['points']:
                if entry['missing']:
                    val = f'missing {entry["missing"]}/{len(pair.select_seeds)}'
                elif entry['diverged']:
                    val = f'diverged {entry["diverged"]}/{len(pair.select_seeds)}'
                else:
                    val = _fmt(entry['val'])
                rows.append([arm.name] + [str(entry['point'].get(k, '-')) for k in axes]
                            + [val, 'yes' if sel['selected'] == entry['point'] else ''])
        out.append(_markdown(['arm'] + labels + ['val acc@1 (%)', 'selected'], rows))
        out.append('')
        # final table
        per_arm = {}
        for arm in pair.arms:
            chosen = selection[arm.name]['selected']
            if chosen is None:
                per_arm[arm.name] = None
                continue
            overrides = {**pair.fixed, **chosen}
            found = {s: find(arm.name, overrides, s, ident(arm, overrides, s)) for s in pair.seeds}
            ok = {s: r for s, r in found.items() if r is not None and r['status'] == 'ok'}
            test = {s: r['metrics']['test_acc1'] for s, r in ok.items()}
            ratios = [r['metrics']['ratio'] for r in ok.values() if r['metrics'].get('ratio')]
            per_arm[arm.name] = {'chosen': chosen, 'test': test, 'diverged': sum(
                1 for r in found.values() if r is not None and r['status'] != 'ok'),
                'missing': sum(1 for r in found.values() if r is None),
                'ratio': statistics.fmean(ratios) if ratios else 1.0}
        base = per_arm.get(pair.baseline) if pair.baseline else None
        comparisons = {}
        for arm in pair.arms:
            entry = per_arm[arm.name]
            if base is not None and entry is not None and arm.name != pair.baseline:
                comparisons[arm.name] = paired_difference(entry['test'], base['test'])
        names = list(comparisons)
        for name, adjusted in zip(names, holm([comparisons[n]['p'] for n in names])):
            comparisons[name]['p_holm'] = adjusted
        m = sum(1 for c in comparisons.values() if not math.isnan(c['p']))
        headers = ['arm'] + labels + ['n', 'test acc@1 (%)', '95 % CI', 'params x']
        if pair.baseline:
            headers += [f'vs {pair.baseline} (paired, 95 % CI)', 'p (paired t)', 'p (Holm)']
        rows = []
        for arm in pair.arms:
            entry = per_arm[arm.name]
            if entry is None:
                rows.append([arm.name] + ['-'] * (len(headers) - 1))
                continue
            mean, std, half = mean_ci(list(entry['test'].values()))
            n = f'{len(entry["test"])}' + (f' (+{entry["diverged"]} diverged)' if entry['diverged'] else '') \
                + (f' ({entry["missing"]} missing)' if entry['missing'] else '')
            ci = f'[{_fmt(mean - half)}, {_fmt(mean + half)}]'
            row = [arm.name] + [str(entry['chosen'].get(k, '-')) for k in axes] + [n, _fmt(mean), ci,
                                                                                   f'{entry["ratio"]:.2f}']
            if pair.baseline:
                c = comparisons.get(arm.name)
                row += ['-', '-', '-'] if c is None else [f'{_fmt(c["mean"], "+.2f")} +- {_fmt(c["ci95"])}',
                                                          _fmt_p(c['p']), _fmt_p(c['p_holm'])]
            rows.append(row)
            summary.append({'pair': pair.name, 'arm': arm.name, 'setting': entry['chosen'], 'n': len(entry['test']),
                            'diverged': entry['diverged'], 'missing': entry['missing'], 'test_mean': mean,
                            'test_std': std, 'test_ci95': half, 'ratio': entry['ratio'], 'per_seed': entry['test'],
                            'vs_baseline': comparisons.get(arm.name)})
        out.append(f'#### {pair.title}: test accuracy at the selected setting (seeds {", ".join(map(str, pair.seeds))})')
        out.append('')
        out.append(_markdown(headers, rows))
        if pair.baseline:
            out.append('')
            out.append(f'Paired differences to {pair.baseline} over the same seeds; two-sided paired t-test; Holm '
                       f'correction over the {m} comparison{"s" if m != 1 else ""} in this table.')
        out.append('')
    return '\n'.join(out), summary


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _common_report_args(q: argparse.ArgumentParser) -> None:
    q.add_argument('--tune', nargs='*', default=[],
                   help='override keys to select per config on validation accuracy (e.g. the lr)')
    q.add_argument('--baseline', help='config name (file stem) to compare every group with')
    q.add_argument('--only', nargs='*', help='report only these config names (in this order)')
    q.add_argument('--where', action='append', default=[], metavar='KEY=VALUE',
                   help='report only records whose override KEY is VALUE (or that do not set KEY)')
    q.add_argument('--plots', help='directory for PNG plots (with --study: SPEC_NAME.png there)')
    q.add_argument('--lr_key', default='train.optimizer.kwargs.lr', help='override key of the learning rate')
    q.add_argument('--title', default='', help='prefix of plot titles')
    q.add_argument('--summary_json', '--json', dest='summary_json', help='write the summary rows here')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Run ablations and studies (configs x seeds x grids) and summarise them')
    sub = p.add_subparsers(dest='command', required=True)
    q = sub.add_parser('run', help='configs x seeds x grid, resumable')
    q.add_argument('--out', required=True, help='JSON-lines record file (resumable)')
    _common_report_args(q)
    q.add_argument('--configs', nargs='+', required=True)
    q.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    q.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2',
                   help='a grid axis over an override (repeat for a cross product)')
    q.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE')
    q.add_argument('--prepare', nargs='*', default=[],
                   help='configs to train once first if their dst_ckpt is missing (e.g. the teacher)')
    q.add_argument('--device', default='cpu')
    q.add_argument('--threads', type=int, default=None, help='torch threads per run')
    q.add_argument('--jobs', type=int, default=1, help='runs at a time (each in a subprocess when > 1)')
    q.add_argument('--isolate', action='store_true', help='one subprocess per run')
    q.add_argument('--workdir', help='checkpoints of runs in flight (default: OUT with suffix .runs)')

    q = sub.add_parser('study', help='selection on validation, then seeds at the selected setting (a study spec)')
    q.add_argument('spec', help='study spec (YAML), e.g. configs/fashion/study.yaml')
    q.add_argument('--pairs', nargs='*', help='only these pairs of the spec (default: all)')
    q.add_argument('--phase', choices=['all', 'select', 'final'], default='all')
    q.add_argument('--jobs', type=int, default=1, help='runs at a time (each in a subprocess when > 1)')
    q.add_argument('--dry_run', action='store_true', help='print the plan, progress and ETA; train nothing')

    q = sub.add_parser('report', help='tables from record files (--out) or of a study (--study)')
    q.add_argument('--out', nargs='+', help='one or more JSON-lines record files')
    q.add_argument('--study', help='a study spec: print its selection and final tables (Markdown)')
    q.add_argument('--pairs', nargs='*', help='with --study: only these pairs')
    _common_report_args(q)
    return p


def report(args, records: list[dict]) -> list[dict]:
    records = without_stale(records)
    if args.only:
        records = [r for r in records if r['name'] in args.only]
    for key, value in _parse_sets(args.where).items():
        records = [r for r in records if r['overrides'].get(key, value) == value]
    rows = summarize(records, args.tune, args.baseline)
    if args.only:
        rows.sort(key=lambda r: args.only.index(r['name']))
    print(format_summary(rows, args.tune, args.baseline))
    if args.summary_json:
        atomic_write_json(rows, args.summary_json)
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        title = (args.title + ': ') if args.title else ''
        written = [plot_methods(rows, out / 'methods.png', f'{title}test accuracy, mean and 95% CI')]
        all_rows = summarize(records)
        written.append(plot_ratio(all_rows if not args.tune else rows, out / 'ratio.png',
                                  f'{title}accuracy vs over-parameterization'))
        written.append(plot_lr(all_rows, args.lr_key, out / 'lr.png', f'{title}accuracy vs learning rate'))
        for path in written:
            if path is not None:
                print(f'wrote {path}', file=sys.stderr)  # stdout is the table (README, tests)
    return rows


def plot_study(summary: Sequence[dict], titles: Mapping[str, str], baselines: Mapping[str, str | None],
               path: Path) -> Path:
    """One row per pair: test accuracy per arm (mean, 95 % interval, seeds as dots) and, where the pair
    has a baseline, each arm's paired difference to it over the same seeds (mean and 95 % interval)."""
    import textwrap
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pairs = list(dict.fromkeys(r['pair'] for r in summary))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 3.9 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        rows = [r for r in summary if r['pair'] == pair]
        xs = list(range(len(rows)))
        labels = [r['arm'] for r in rows]
        _accuracy_panel(row[0], labels, [r['test_mean'] for r in rows], [r['test_ci95'] for r in rows],
                        [r['per_seed'].values() for r in rows])
        row[0].set_title(textwrap.fill(titles.get(pair, pair), 60), fontsize=8)
        baseline, ax = baselines.get(pair), row[1]
        if not baseline:
            ax.axis('off')
            continue
        diffs = [(x, r['vs_baseline']) for x, r in zip(xs, rows) if r['vs_baseline']]
        ax.axhline(0.0, color='gray', lw=1)
        ax.errorbar([x for x, _ in diffs], [d['mean'] for _, d in diffs], yerr=[d['ci95'] for _, d in diffs],
                    fmt='o', capsize=4, color='C1')
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=30, ha='right')
        ax.set_xlim(row[0].get_xlim())  # the same arm under the same tick in both panels
        ax.set_ylabel(f'paired difference to {baseline} (points)')
        ax.set_title(f'{pair}: each arm minus {baseline} over the same seeds, 95 % CI', fontsize=8)
        ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=100)


def report_study(spec: str, pairs: Sequence[str] | None = None, summary_json: str | None = None,
                 plots: str | None = None) -> str:
    study = load_study(spec)
    chosen = _pick(study, pairs)
    by_pair = {}
    for pair in chosen:
        records = load_records(pair.records)
        _warn_stale(find_stale(records))
        by_pair[pair.name] = records
    text, rows = study_tables(study, by_pair, [p.name for p in chosen])
    sys.stdout.write(text)
    sys.stdout.flush()
    if summary_json:
        atomic_write_json(rows, summary_json)
    if plots:
        written = plot_study(rows, {p.name: p.title for p in chosen}, {p.name: p.baseline for p in chosen},
                             Path(plots) / f'{study.name}.png')
        print(f'wrote {written}', file=sys.stderr)  # stdout is the tables (README, tests)
    return text


@contextlib.contextmanager
def _quiet_training_logs():
    quiet = [logging.getLogger(name) for name in ('torchdistill', 'opdf_torchdistill')]
    levels = [log.level for log in quiet]
    for log in quiet:  # one progress line per run instead of every run's training log
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (0: done, 1: a clear error was printed)."""
    from .train import _USER_ERRORS
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return _main(args)
    except _USER_ERRORS as exc:  # a wrong path, spec key or pair name: the message says which
        print(f'error: {exc}', file=sys.stderr)
        return 1


def _main(args) -> int:
    if args.command == 'study':
        study = load_study(args.spec)
        if args.jobs < 1:
            raise SystemExit('--jobs must be >= 1')
        if study.threads and args.jobs == 1:
            import torch
            torch.set_num_threads(study.threads)
        with _quiet_training_logs():
            run_study(study, args.pairs, args.phase, args.jobs, args.dry_run)
        if not args.dry_run:
            report_study(args.spec, args.pairs)
        return 0
    if args.command == 'run':
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        with _quiet_training_logs():
            _prepare(args.prepare, args.device, args.threads, args.jobs)
            records = run_ablation(args.configs, args.seeds, _parse_grid(args.grid), _parse_sets(args.sets),
                                   args.out, args.device, args.isolate, args.jobs, args.threads, args.workdir)
        report(args, records)
        return 0
    if args.study:
        if args.out:
            raise SystemExit('report: give --study SPEC or --out FILES, not both')
        ignored = [flag for flag, value in (('--tune', args.tune), ('--baseline', args.baseline), ('--only', args.only),
                                            ('--where', args.where), ('--title', args.title),
                                            ('--lr_key', args.lr_key != 'train.optimizer.kwargs.lr')) if value]
        if ignored:
            raise SystemExit(f'report --study: {", ".join(ignored)} appl{"y" if len(ignored) > 1 else "ies"} to '
                             f'--out reports only (a study spec sets its own baseline and grids); with --study give '
                             f'--pairs, --summary_json, --plots')
        report_study(args.study, args.pairs, args.summary_json, args.plots)
        return 0
    if not args.out:
        raise SystemExit('report: give --study SPEC or --out FILES')
    if args.pairs:
        raise SystemExit('report: --pairs applies to --study reports only')
    report(args, [r for path in args.out for r in load_records(path)])
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
