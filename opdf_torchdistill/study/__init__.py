"""Ablations and studies: configs x seeds x override grids -> one JSON record per run, then statistics.

The package behind ``opdf-ablate`` (``tools/ablate.py``), one concept per module:

``spec``
    study specs (``configs/fashion/study.yaml``): pairs, arms, grids, seeds, the edge rule, inheritance
    and contrasts; :func:`load_study`.
``records``
    run identity (what a record key hashes, and why), record files, stale records.
``runner``
    training the runs an ablation or study still needs (teachers first), progress and ETA.
``selection``
    the selection phase of a study: the grid point with the best mean validation score per arm, edge
    extensions, inherited settings.
``stats``
    95 % t-intervals, paired differences over seeds, Holm's correction, TOST, minimal detectable
    effects and verdicts of contrasts, per-config summaries.
``report``
    the tables (Markdown for studies, plain text for ablations), byte for byte from the records.
``reproduce``
    recorded runs trained again and compared with their records, metric by metric, exactly.
``plots``
    matplotlib figures (the ``study`` extra).
``trainers``
    the programs a run is (``opdf-train``, ``opdf-glue``): arguments, files, results.
``launchers``
    where runs train: ``local``, ``slurm`` and ``submitit-local`` (submitit; the ``study`` extra), the
    study driver for clusters, ``status``, GPU-hour estimates, sbatch scripts.
``jobs``
    one run as one submitit job: the distributed environment, requeue on preemption, events.

Nothing here imports the command-line layer (``opdf_torchdistill.cli``) at import time; the runner
starts the trainer as a program (see :mod:`~opdf_torchdistill.study.runner`).

Examples::

    python tools/ablate.py study configs/fashion/study.yaml --jobs 2
    python tools/ablate.py study configs/ilsvrc2012/study.yaml --launcher slurm --dry_run
    python tools/ablate.py status configs/ilsvrc2012/study.yaml
    python tools/ablate.py report --study configs/fashion/study.yaml
    python tools/ablate.py run --configs configs/digits/kd.yaml configs/digits/kd_opdf.yaml \\
        --seeds 0 1 2 3 4 --grid train.optimizer.kwargs.lr=0.05,0.1,0.2 --out runs/ablation/digits.jsonl
    python tools/ablate.py report --out runs/ablation/digits.jsonl --tune train.optimizer.kwargs.lr \\
        --baseline kd --plots runs/ablation
"""
from .records import (DONE, INPUT_KEYS, RecordError, RunIdentity, append_record, compact_records, config_hash,
                      environment, find_stale, input_hashes, load_records, record_finder, resolved_config, run_dir,
                      run_identity, run_key, without_stale, write_run_record)
from .report import SECTIONS, format_summary, report_records, report_study, study_tables
from .reproduce import reproduce_study
from .runner import Progress, Task, prepare_teachers, run_ablation, run_study, study_plan, teacher_state
from .selection import edge_keys, extension_value, inheritance_order, select_settings
from .spec import (EDGE_RULES, LAUNCHERS, TRAINERS, Arm, Contrast, Launcher, Pair, Study, StudyError, load_study,
                   parse_launcher, pick_pairs)
from .stats import contrasts, holm, mde_paired, mean_ci, paired_difference, summarize, tost_paired, verdict

__all__ = ['DONE', 'INPUT_KEYS', 'RecordError', 'RunIdentity', 'append_record', 'config_hash', 'environment', 'find_stale',
           'input_hashes', 'load_records', 'record_finder', 'resolved_config', 'run_identity', 'run_key',
           'without_stale', 'SECTIONS', 'format_summary', 'report_records', 'report_study', 'study_tables', 'reproduce_study', 'Progress', 'Task',
           'prepare_teachers', 'run_ablation', 'run_study', 'study_plan', 'teacher_state', 'edge_keys',
           'extension_value', 'inheritance_order', 'select_settings', 'EDGE_RULES', 'Arm', 'Contrast', 'Pair', 'Study',
           'StudyError', 'load_study', 'pick_pairs', 'contrasts', 'holm', 'mde_paired', 'mean_ci', 'paired_difference',
           'summarize', 'tost_paired', 'verdict', 'compact_records', 'run_dir', 'write_run_record', 'LAUNCHERS',
           'TRAINERS', 'Launcher', 'parse_launcher']
