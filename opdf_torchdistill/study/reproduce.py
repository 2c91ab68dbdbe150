"""Train recorded runs of a study again and compare every result with its record, exactly.

A record says what one run gave. ``opdf-ablate reproduce SPEC`` trains chosen runs again, each the way
the study trained it (the record's config, seed and overrides; the spec's device and ``threads``; the
pair's trainer, in a subprocess, in a fresh folder), and compares every metric of the new result with
the record's except timing (``train_seconds``): test and best validation accuracy, test loss and
top-5, parameter counts, the first-step gradient norms and alignment coverage. Floats are compared
exactly, because that is the claim: the same code, inputs, seed and thread count give the same bits on
the same kind of machine. What can break it is reported next to a mismatch: the package versions the
record was made with against the installed ones. A different CPU model or BLAS build can change the
last bits of a reduction, and then every later step; a mismatch on another machine is a finding about
that machine, not necessarily about the code.

A run whose config or inputs (teacher tensors) changed since the record is not the same run: it is
reported as ``changed`` (with the config hash and input hashes, then and now) and not trained. Records
are never written, so a reproduction cannot alter a study.

Which records: ``keys`` (unique prefixes of record keys), or ``each``: per pair and arm, the earliest
finished record (a sample that covers every arm, and the code each arm started with).

Example::

    python tools/ablate.py reproduce configs/fashion/confirm/study.yaml --each --pairs cnn
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._format import short_overrides
from .records import DONE, _TIMING, _record_key_is_current, environment, load_records, run_identity
from .spec import Pair, Study, StudyError, pick_pairs

__all__ = ['Reproduction', 'choose_records', 'compare_metrics', 'reproduce_study']


@dataclass
class Reproduction:
    """The outcome of training one recorded run again."""
    pair: str
    record: dict
    status: str  # 'same', 'different', 'failed' (the new run did not finish), 'changed' (not the same run)
    differences: list = field(default_factory=list)  # (metric, recorded, now)
    compared: int = 0  # metrics compared
    note: str = ''
    seconds: float = 0.0


def _flatten(metrics: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in metrics.items():
        name = f'{prefix}{key}'
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f'{name}.'))
        else:
            flat[name] = value
    return flat


def compare_metrics(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[tuple], int]:
    """``(differences, compared)``: every metric (nested ones by dotted name) that is not identical,
    as ``(name, recorded, now)`` (a metric only one side has counts as a difference), and how many
    were compared. Timing (``train_seconds``) is left out."""
    old = {k: v for k, v in _flatten(recorded).items() if k not in _TIMING}
    new = {k: v for k, v in _flatten(now).items() if k not in _TIMING}
    names = sorted(set(old) | set(new))
    differences = [(name, old.get(name, 'absent'), new.get(name, 'absent')) for name in names
                   if name not in old or name not in new or not _identical(old[name], new[name])]
    return differences, len(names)


def _identical(a: Any, b: Any) -> bool:
    """Equal and of one kind: 1 and 1.0 are one value (JSON does not keep the difference); True and 1 are not."""
    if a != b:
        return False
    return type(a) is type(b) or not isinstance(a, bool) and not isinstance(b, bool)


def choose_records(study: Study, pairs: Sequence[str] | None = None, keys: Sequence[str] = (),
                   each: bool = False) -> list[tuple[Pair, dict]]:
    """The records to reproduce, in pair and arm order; raises :class:`StudyError` for a key prefix that
    matches no record or several (naming them), or when neither ``keys`` nor ``each`` is given."""
    chosen = pick_pairs(study, pairs)
    by_pair = [(pair, [r for r in load_records(pair.records) if r.get('status') in DONE]) for pair in chosen]
    if not keys and not each:
        raise StudyError('reproduce: name the runs: --key KEY [KEY ...] (record key prefixes) or --each (the first '
                         'record of every arm)')
    picked: list[tuple[Pair, dict]] = []
    for prefix in keys:
        hits = [(pair, r) for pair, records in by_pair for r in records if str(r.get('key', '')).startswith(prefix)]
        if not hits:
            raise StudyError(f'reproduce: no finished record of {study.path} (pairs '
                             f'{", ".join(p.name for p in chosen)}) has a key starting with {prefix!r}')
        if len(hits) > 1:
            raise StudyError(f'reproduce: key prefix {prefix!r} matches {len(hits)} records ('
                             + ', '.join(r['key'] for _, r in hits[:5]) + (', ...' if len(hits) > 5 else '')
                             + '); give more of the key')
        picked.append(hits[0])
    if each:
        for pair, records in by_pair:
            for arm in pair.arms:
                own = sorted((r for r in records if r.get('name') == arm.name and r.get('status') == 'ok'),
                             key=lambda r: (str(r.get('finished', '')), r['key']))
                if own:
                    picked.append((pair, own[0]))
    seen, unique = set(), []
    for pair, record in picked:
        if record['key'] not in seen:
            seen.add(record['key'])
            unique.append((pair, record))
    return unique


def _check_same_run(record: dict, device: str) -> str:
    """'' when the record's run is still the run its config gives today, else why not."""
    now = run_identity(record['config'], record['seed'], record.get('overrides') or {}, device, record.get('name'))
    if _record_key_is_current(record) and now.key == record['key']:
        return ''
    if record.get('device') != device:
        return f'recorded on device {record.get("device")!r}, the spec trains on {device!r}'
    why = []
    if now.config_hash != record.get('config_hash'):
        why.append(f'config hash {record.get("config_hash")} then, {now.config_hash} now ({record["config"]} or '
                   f'its overrides changed)')
    if dict(now.inputs) != dict(record.get('inputs') or {}):
        why.append(f'inputs {record.get("inputs")} then, {dict(now.inputs)} now')
    return '; '.join(why) or 'its key was computed by an older rule'


def _reproduce_one(study: Study, pair: Pair, record: dict, workdir: Path) -> Reproduction:
    from .runner import _execute
    try:
        changed = _check_same_run(record, study.device)
    except (OSError, ValueError) as exc:  # its config is gone, or no longer takes its overrides
        changed = f'its config cannot be read as recorded: {exc}'
    if changed:
        return Reproduction(pair.name, record, 'changed', note=changed)
    start = time.perf_counter()
    result = _execute(record['config'], record['seed'], record.get('overrides') or {}, workdir, study.device,
                      True, study.threads, pair.trainer)
    seconds = time.perf_counter() - start
    status = result.get('status')
    if status == 'failed':
        return Reproduction(pair.name, record, 'failed', note=str(result.get('error')), seconds=seconds)
    if status != record.get('status'):  # diverged now and not then, or the other way round
        return Reproduction(pair.name, record, 'different', [('status', record.get('status'), status)], 1,
                            note=str(result.get('error') or ''), seconds=seconds)
    differences, compared = compare_metrics(record.get('metrics') or {}, result['metrics'])
    return Reproduction(pair.name, record, 'different' if differences else 'same', differences, compared,
                        seconds=seconds)


def _fmt_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def describe(outcome: Reproduction, labels: Mapping[str, str] | None = None) -> str:
    """One line (more for differences) about one reproduction."""
    r = outcome.record
    head = (f'  {outcome.pair} {r.get("name")} seed={r.get("seed")} {short_overrides(r.get("overrides") or {}, labels)}'
            f' [key {r["key"]}]')
    recorded = r.get('versions') or {}
    installed = environment()
    versions = [f'{k} {recorded.get(k)} (installed {installed[k]})' for k in sorted(installed)
                if recorded.get(k) != installed[k]]
    made = f'; recorded with {", ".join(versions)}' if versions else ''
    if outcome.status == 'changed':
        return f'{head}: CHANGED, not trained: {outcome.note}'
    if outcome.status == 'failed':
        return f'{head}: FAILED after {outcome.seconds:.0f} s: {outcome.note}'
    metrics = r.get('metrics') or {}
    shown = ', '.join(f'{k} {metrics[k]}' for k in ('best_val_acc1', 'test_acc1', 'test_loss') if k in metrics)
    if outcome.status == 'same':
        return f'{head}: same, {outcome.compared} metrics identical ({shown}){made} ({outcome.seconds:.0f} s)'
    lines = [f'{head}: DIFFERENT in {len(outcome.differences)} of {outcome.compared} metrics{made} '
             f'({outcome.seconds:.0f} s)']
    lines += [f'      {name}: recorded {_fmt_value(old)}, now {_fmt_value(new)}' for name, old, new in outcome.differences]
    return '\n'.join(lines)


def reproduce_study(study: Study, pairs: Sequence[str] | None = None, keys: Sequence[str] = (), each: bool = False,
                    jobs: int = 1, stream=None) -> list[Reproduction]:
    """Train the chosen records' runs again (``jobs`` at a time) and print one line per run as it is
    compared, then a summary; returns the outcomes (see the module docstring)."""
    stream = stream if stream is not None else sys.stdout
    chosen = choose_records(study, pairs, keys, each)
    if not chosen:
        raise StudyError(f'reproduce: {study.path} has no finished record to reproduce (pairs '
                         f'{", ".join(p.name for p in pick_pairs(study, pairs))})')
    study.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix='reproduce-', dir=study.workdir))  # its own: never another's files
    print(f'reproduce {study.name}: {len(chosen)} run(s), device {study.device}, threads '
          f'{study.threads or "torch default"}, {jobs} at a time; records are read, never written', file=stream,
          flush=True)
    outcomes: list[Reproduction] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(_reproduce_one, study, pair, record, workdir / pair.name) for pair, record in chosen]
            for future in futures:  # in the order chosen, so the output is in pair and arm order
                outcome = future.result()
                outcomes.append(outcome)
                print(describe(outcome, study.labels), file=stream, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    counts = {s: sum(o.status == s for o in outcomes) for s in ('same', 'different', 'failed', 'changed')}
    print(f'reproduce {study.name}: {counts["same"]} of {len(outcomes)} run(s) reproduced exactly'
          + ''.join(f', {n} {s}' for s, n in counts.items() if s != 'same' and n), file=stream, flush=True)
    return outcomes
