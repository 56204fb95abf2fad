#!/usr/bin/env bash
# Train on Xeon (CPU-only) nodes with mpirun, Open MPI or MPICH: one rank per
# socket, each bound to that socket's cores, one BLAS/Numba thread per core.
#
#   jobs/mpirun_xeon.sh --config jobs/configs/resnet50_imagenet_lars.toml
#   HOSTFILE=hosts jobs/mpirun_xeon.sh --config FILE --resume auto      # several nodes
#   BIND_UNIT=numa jobs/mpirun_xeon.sh --config FILE    # one rank per NUMA domain (SNC nodes)
#   DRY_RUN=1 jobs/mpirun_xeon.sh --config FILE         # print the launch line, run nothing
#
# On a 2-socket node with 24 cores per socket that is 2 ranks per node, each
# with 24 threads. To change it (environment variables):
#   BIND_UNIT=socket      socket (default), numa (one rank per NUMA domain: nodes with
#                         sub-NUMA clustering), node, or none (no binding)
#   RANKS_PER_UNIT=1      ranks per socket / NUMA domain (default 1)
#   THREADS_PER_RANK=N    cores and threads per rank (default: cores of the unit /
#                         RANKS_PER_UNIT); exported to every rank as OMP_NUM_THREADS
#                         and NUMBA_NUM_THREADS
#   HOSTFILE=FILE         hosts to run on (inside Slurm or PBS allocations mpirun finds them)
#   NODES=N               nodes (default: distinct hosts in HOSTFILE, $SLURM_JOB_NUM_NODES,
#                         distinct hosts in $PBS_NODEFILE, else 1)
#   NODE_CORES, NODE_SOCKETS, NODE_NUMA   a compute node's physical cores, sockets and
#                         NUMA domains, when this script runs elsewhere (default: lscpu here)
#   MPIEXEC=mpirun        the launcher (default mpirun); MPI_FLAVOR=openmpi|hydra when its
#                         --version does not say; MPIEXEC_FLAGS="..." extra options
# The launch line, for K ranks per unit of T cores:
#   Open MPI:      mpirun -n NP --map-by ppr:K:socket:PE=T --bind-to core -x OMP_NUM_THREADS ...
#   MPICH (Hydra): mpiexec -n NP -ppn K*units -bind-to core:T -map-by socket -genv OMP_NUM_THREADS T ...
# Check it: the run banner says how many threads each rank got and why, and
# `hpcdl info` under the same launch prints each rank's host, CPUs and threads
# (docs/threads-and-binding.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source jobs/binding.sh

MPIEXEC=${MPIEXEC:-mpirun}
BIND_UNIT=${BIND_UNIT:-socket}
RANKS_PER_UNIT=${RANKS_PER_UNIT:-1}
positive_int RANKS_PER_UNIT "$RANKS_PER_UNIT"
node_topology

distinct_hosts() {  # distinct_hosts FILE: hosts named in a hostfile (first word of each line)
    awk '!/^[[:space:]]*(#|$)/ { print $1 }' "$1" | sort -u | wc -l
}

HOST_FLAGS=()
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -r "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: cannot read it"
    NODES=${NODES:-$(distinct_hosts "$HOSTFILE")}
fi
if [[ -z "${NODES:-}" && -n "${SLURM_JOB_NUM_NODES:-}" ]]; then
    NODES=$SLURM_JOB_NUM_NODES
fi
if [[ -z "${NODES:-}" && -n "${PBS_NODEFILE:-}" && -r "${PBS_NODEFILE:-}" ]]; then
    NODES=$(distinct_hosts "$PBS_NODEFILE")
fi
NODES=${NODES:-1}
positive_int NODES "$NODES"

FLAVOR=$(mpi_flavor "$MPIEXEC")
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ "$FLAVOR" == openmpi ]]; then HOST_FLAGS=(--hostfile "$HOSTFILE"); else HOST_FLAGS=(-f "$HOSTFILE"); fi
fi

unit=$BIND_UNIT
[[ "$unit" == none ]] && unit=socket  # for the rank count only
UNITS=$(units_per_node "$unit")
CORES_PER_UNIT=$(cores_per_unit "$unit")
THREADS_PER_RANK=${THREADS_PER_RANK:-$(share "$CORES_PER_UNIT" "$RANKS_PER_UNIT")}
export_threads "$THREADS_PER_RANK"
NP=$((NODES * UNITS * RANKS_PER_UNIT))

mpirun_binding "$FLAVOR" "$BIND_UNIT" "$RANKS_PER_UNIT" "$THREADS_PER_RANK"
# MPIEXEC_FLAGS holds several options on purpose.
# shellcheck disable=SC2086
run_or_print "$MPIEXEC" -n "$NP" "${HOST_FLAGS[@]}" "${BIND_FLAGS[@]}" ${MPIEXEC_FLAGS:-} hpcdl train "$@"
