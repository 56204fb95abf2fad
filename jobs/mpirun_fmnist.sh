#!/usr/bin/env bash
# The main job on one machine (a laptop, a workstation, one node): N ranks of
# hpcdl train on Fashion-MNIST, one BLAS thread per rank.
#
#   jobs/mpirun_fmnist.sh            # 2 ranks
#   NP=4 jobs/mpirun_fmnist.sh --set train.epochs=5
#
# With Open MPI instead of the MPICH wheel, as root or with more ranks than cores:
#   MPIEXEC_FLAGS="--oversubscribe --allow-run-as-root" jobs/mpirun_fmnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# MPIEXEC_FLAGS holds several options on purpose.
# shellcheck disable=SC2086
exec "${MPIEXEC:-mpiexec}" -n "${NP:-2}" ${MPIEXEC_FLAGS:-} \
    hpcdl train --config jobs/configs/fmnist_cnn.toml --out "${OUT:-runs/fmnist_cnn}" "$@"
