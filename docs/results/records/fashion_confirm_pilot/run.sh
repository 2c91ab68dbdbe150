#!/usr/bin/env bash
# (Copied from runs/fashion/pilot/run.sh. The last three ViT runs were stopped unfinished to free the cores
# for the study; the finished runs' histories are the JSON files beside this script.)
# Pilot for the training length of the confirmatory study (not a study run): KD and MPO arms at one lr,
# num_epochs E with the cosine schedule's T_max = E, selection seed 100, on validation only.
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
one() {  # pair arm lr epochs
  local cfg=$1 arm=$2 lr=$3 e=$4 out=runs/fashion/pilot/$2_$4
  python -m opdf_torchdistill.cli.train --config $cfg --device cpu --seed 100 --threads 1 --force -student_only \
    --set train.num_epochs=$e --set train.scheduler.kwargs.T_max=$e --set train.optimizer.kwargs.lr=$lr \
    --dst_ckpt $out.pt --metrics_json $out.json > $out.log 2>&1
}
export -f one
printf '%s\n' \
  "configs/fashion/confirm/cnn/kd.yaml cnn_kd 0.1 8" "configs/fashion/confirm/cnn/kd.yaml cnn_kd 0.1 16" \
  "configs/fashion/confirm/cnn/kd_mpo.yaml cnn_kd_mpo 0.1 8" "configs/fashion/confirm/cnn/kd_mpo.yaml cnn_kd_mpo 0.1 16" \
  "configs/fashion/confirm/cnn/kd.yaml cnn_kd 0.1 24" "configs/fashion/confirm/cnn/kd_mpo.yaml cnn_kd_mpo 0.1 24" \
  "configs/fashion/vit_theseus/kd.yaml vit_kd 0.001 8" "configs/fashion/vit_theseus/kd.yaml vit_kd 0.001 16" \
  "configs/fashion/vit_theseus/kd_mpo.yaml vit_kd_mpo 0.001 8" "configs/fashion/vit_theseus/kd_mpo.yaml vit_kd_mpo 0.001 16" \
  | xargs -P 2 -L 1 bash -c 'one $0 $1 $2 $3'
