#!/usr/bin/env bash
# The main job on one machine (a laptop, a workstation, one node): NP ranks of
# hpcdl train on Fashion-MNIST, the machine's cores split evenly among them,
# each rank bound to its own block of cores with one BLAS/Numba thread per core.
#
#   jobs/mpirun_fmnist.sh                          # 2 ranks
#   NP=4 jobs/mpirun_fmnist.sh --set train.epochs=5
#   DRY_RUN=1 jobs/mpirun_fmnist.sh                # print the launch line, run nothing
#
# To change it (environment variables):
#   NP=4                  ranks (default 2)
#   THREADS_PER_RANK=3    cores and threads per rank (default: $OMP_NUM_THREADS if
#                         set, else cores / NP); exported to every rank as
#                         OMP_NUM_THREADS and NUMBA_NUM_THREADS
#   BIND_UNIT=none        no binding (the OS places the ranks; hpcdl still divides the cores)
#   MPIEXEC=mpirun        another launcher; MPI_FLAVOR=openmpi|hydra when its --version does not say
#   MPIEXEC_FLAGS="..."   extra options, e.g. "--oversubscribe --allow-run-as-root" for Open MPI
#   NODE_CORES=8          physical cores when lscpu cannot tell
#   OUT=runs/x            run directory (default runs/fmnist_cnn)
# Binding: Open MPI --map-by ppr:NP:node:PE=T --bind-to core; MPICH (Hydra)
# -bind-to core:T -map-by core:T. Check it: the run banner says how many
# threads each rank got and why (docs/threads-and-binding.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source jobs/binding.sh

NP=${NP:-2}
positive_int NP "$NP"
MPIEXEC=${MPIEXEC:-mpiexec}
node_topology
THREADS_PER_RANK=${THREADS_PER_RANK:-${OMP_NUM_THREADS:-$(share "$NODE_CORES" "$NP")}}
export_threads "$THREADS_PER_RANK"
BIND_UNIT=${BIND_UNIT:-node}
[[ "$BIND_UNIT" == node || "$BIND_UNIT" == none ]] || die "BIND_UNIT=$BIND_UNIT: expected node or none"
mpirun_binding "$(mpi_flavor "$MPIEXEC")" "$BIND_UNIT" "$NP" "$THREADS_PER_RANK"
# MPIEXEC_FLAGS holds several options on purpose.
# shellcheck disable=SC2086
run_or_print "$MPIEXEC" -n "$NP" "${BIND_FLAGS[@]}" ${MPIEXEC_FLAGS:-} \
    hpcdl train --config jobs/configs/fmnist_cnn.toml --out "${OUT:-runs/fmnist_cnn}" "$@"
