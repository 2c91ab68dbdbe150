#!/usr/bin/env bash
# The digits ablation behind the README's tables and plots (about 30 minutes on 2 CPU cores).
# Resumable: re-running skips every run already recorded in runs/ablation/*.jsonl (record keys hash the
# resolved configs and versions, so records written before that, or before a config edit, train again).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="0 1 2 3 4 5 6 7 8 9"
D=configs/digits
OUT=${OUT:-runs/ablation}
LR=train.optimizer.kwargs.lr
LAMBDA=train.criterion.kwargs.sub_terms.opdf.weight

# A: methods without the alignment term, learning rate grid.
python tools/ablate.py run --configs $D/student_ce.yaml $D/kd.yaml $D/kd_mpo.yaml $D/at.yaml --seeds $SEEDS \
  --grid $LR=0.025,0.05,0.1,0.2,0.4,0.8 --out $OUT/digits_a.jsonl --prepare $D/teacher.yaml --threads 1
# B: methods with the alignment term, learning rate x lambda grid.
python tools/ablate.py run --configs $D/kd_svd.yaml $D/kd_opdf.yaml $D/at_opdf.yaml --seeds $SEEDS \
  --grid $LR=0.025,0.05,0.1,0.2,0.4 --grid $LAMBDA=0.1,0.3,1.0 --out $OUT/digits_b.jsonl --threads 1
# C: the scale of KD+OPDF (0..3 dummy factors) x learning rate (the paper's Figure 2 a/b).
python tools/ablate.py run --configs $D/kd_opdf.yaml --seeds $SEEDS \
  --grid models.student_model.kwargs.mpo.num_dummy=0,1,2,3 --grid $LR=0.0125,0.025,0.05,0.1,0.2,0.4 \
  --out $OUT/digits_c.jsonl --threads 1
# D: 60 instead of 30 epochs. E: OPDFOptimizer, cores at lr / 2(L + 1), the rest at lr.
python tools/ablate.py run --configs $D/kd.yaml $D/kd_mpo.yaml $D/kd_opdf.yaml --seeds $SEEDS \
  --set train.num_epochs=60 --set train.scheduler.kwargs.T_max=60 --grid $LR=0.05,0.1,0.2,0.4,0.8 \
  --out $OUT/digits_d.jsonl --threads 1
python tools/ablate.py run --configs $D/kd_mpo.yaml $D/kd_opdf.yaml --seeds $SEEDS --set train.optimizer.key=OPDFOptimizer \
  --set +train.optimizer.kwargs.base=SGD --set +train.optimizer.kwargs.core_lr_scale=auto --grid $LR=0.1,0.2,0.4,0.8 \
  --out $OUT/digits_e.jsonl --threads 1

ORDER="student_ce kd kd_svd kd_mpo kd_opdf at at_opdf"
R=docs/results
python tools/ablate.py report --out $OUT/digits_a.jsonl $OUT/digits_b.jsonl --only $ORDER --tune $LR $LAMBDA \
  --baseline kd --summary_json $R/digits_tuned.json --plots $R/tuned --title "digits, 10 seeds, lr tuned on val"
python tools/ablate.py report --out $OUT/digits_a.jsonl $OUT/digits_b.jsonl --only $ORDER --where $LR=0.05 \
  --where $LAMBDA=0.3 --baseline kd --summary_json $R/digits_fixed_lr.json --plots $R/fixed_lr \
  --title "digits, 10 seeds, lr 0.05 for all"
python tools/ablate.py report --out $OUT/digits_c.jsonl $OUT/digits_a.jsonl --only kd kd_opdf --tune $LR \
  --baseline kd --plots $R/scale --title "digits, KD+OPDF scale" --summary_json $R/digits_scale.json
python tools/ablate.py report --out $OUT/digits_d.jsonl --only kd kd_mpo kd_opdf --tune $LR --baseline kd \
  --summary_json $R/digits_60epochs.json
python tools/ablate.py report --out $OUT/digits_e.jsonl $OUT/digits_a.jsonl --only kd kd_mpo kd_opdf --tune $LR \
  --baseline kd --summary_json $R/digits_core_lr.json
