#!/usr/bin/env bash
# The digits ablation behind the tables and plots of docs/results-digits.md (about 40 minutes on 2 CPU
# cores with one run at a time; the parts are independent and can run in parallel shells).
# Resumable: re-running skips every run already recorded in $OUT/*.jsonl (record keys hash the resolved
# configs and the teacher's tensors, not package versions: a config edit makes the affected runs train
# again, and `report` leaves the old records out, saying so; see opdf_torchdistill/study/records.py).
# The first release's records and tables are in docs/results/v0.1/.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="0 1 2 3 4 5 6 7 8 9"
D=configs/digits
OUT=${OUT:-docs/results/records}
LR=train.optimizer.kwargs.lr
LAMBDA=train.criterion.kwargs.sub_terms.opdf.weight

# A: methods without the alignment term, learning rate grid.
python tools/ablate.py run --configs $D/student_ce.yaml $D/kd.yaml $D/kd_mpo.yaml $D/at.yaml --seeds $SEEDS \
  --grid $LR=0.025,0.05,0.1,0.2,0.4,0.8 --out $OUT/digits_a.jsonl --prepare $D/teacher.yaml --threads 1
# B: methods with the alignment term (relative reduction), learning rate x lambda grid.
python tools/ablate.py run --configs $D/kd_svd.yaml $D/kd_opdf.yaml $D/at_opdf.yaml --seeds $SEEDS \
  --grid $LR=0.025,0.05,0.1,0.2,0.4 --grid $LAMBDA=0.1,0.3,1.0 --out $OUT/digits_b.jsonl --threads 1
# C: the scale of KD+OPDF (0..3 dummy factors) x learning rate (the paper's Figure 2 a/b), lambda 1.0.
python tools/ablate.py run --configs $D/kd_opdf.yaml --seeds $SEEDS \
  --grid models.student_model.kwargs.mpo.num_dummy=0,1,2,3 --grid $LR=0.0125,0.025,0.05,0.1,0.2,0.4 \
  --out $OUT/digits_c.jsonl --threads 1
# E: OPDFOptimizer, cores at lr / 2(L + 1), the rest at lr.
python tools/ablate.py run --configs $D/kd_mpo.yaml $D/kd_opdf.yaml --seeds $SEEDS --set train.optimizer.key=OPDFOptimizer \
  --set +train.optimizer.kwargs.base=SGD --set +train.optimizer.kwargs.core_lr_scale=auto --grid $LR=0.1,0.2,0.4,0.8 \
  --out $OUT/digits_e.jsonl --threads 1
# F: controls of the alignment term: the paper-literal reduction, and random targets instead of the teacher's.
python tools/ablate.py run --configs $D/kd_opdf_paper.yaml $D/kd_opdf_random.yaml --seeds $SEEDS \
  --grid $LR=0.025,0.05,0.1,0.2,0.4 --grid $LAMBDA=0.1,0.3,1.0 --out $OUT/digits_f.jsonl --threads 1

ORDER="student_ce kd kd_svd kd_mpo kd_opdf at at_opdf"
R=docs/results
python tools/ablate.py report --out $OUT/digits_a.jsonl $OUT/digits_b.jsonl --only $ORDER --tune $LR $LAMBDA \
  --baseline kd --summary_json $R/digits_tuned.json --plots $R/tuned --title "digits, 10 seeds, lr tuned on val" \
  > $R/digits_tuned.txt
python tools/ablate.py report --out $OUT/digits_a.jsonl $OUT/digits_b.jsonl $OUT/digits_f.jsonl \
  --only kd kd_mpo kd_opdf kd_opdf_paper kd_opdf_random --tune $LR $LAMBDA --baseline kd \
  --summary_json $R/digits_controls.json > $R/digits_controls.txt
python tools/ablate.py report --out $OUT/digits_a.jsonl $OUT/digits_b.jsonl --only $ORDER --where $LR=0.05 \
  --where $LAMBDA=1.0 --baseline kd --summary_json $R/digits_fixed_lr.json --plots $R/fixed_lr \
  --title "digits, 10 seeds, lr 0.05 for all" > $R/digits_fixed_lr.txt
python tools/ablate.py report --out $OUT/digits_c.jsonl $OUT/digits_a.jsonl --only kd kd_opdf --tune $LR \
  --baseline kd --plots $R/scale --title "digits, KD+OPDF scale" --summary_json $R/digits_scale.json > $R/digits_scale.txt
python tools/ablate.py report --out $OUT/digits_e.jsonl $OUT/digits_a.jsonl --only kd kd_mpo kd_opdf --tune $LR \
  --baseline kd --summary_json $R/digits_core_lr.json > $R/digits_core_lr.txt
