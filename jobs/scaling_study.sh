#!/usr/bin/env bash
# Communication vs compute, measured then predicted: the allreduce sweep at each
# rank count, crossovers for `auto`, then the step-time model fitted to it.
#
#   jobs/scaling_study.sh                      # ranks 2 and 3 on this machine
#   RANKS="2 4 8 16" MODEL=resnet50 SHAPE=3,224,224 jobs/scaling_study.sh   # on a cluster
#
# Writes runs/scaling/allreduce-P.json, crossovers.json and scaling-P.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scaling}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for p in ${RANKS:-2 3}; do
    # MPIEXEC_FLAGS holds several options on purpose.
    # shellcheck disable=SC2086
    "${MPIEXEC:-mpiexec}" -n "$p" ${MPIEXEC_FLAGS:-} hpcdl bench allreduce \
        --json "$OUT/allreduce-$p.json" --save-crossovers "$OUT/crossovers.json"
done
for p in ${RANKS:-2 3}; do
    # shellcheck disable=SC2086
    "${MPIEXEC:-mpiexec}" -n "$p" ${MPIEXEC_FLAGS:-} hpcdl scaling --model "${MODEL:-resnet18}" \
        --input-shape "${SHAPE:-3,32,32}" --per-rank-batch "${BATCH:-32}" \
        --bench-json "$OUT"/allreduce-*.json --json "$OUT/scaling-$p.json"
done
