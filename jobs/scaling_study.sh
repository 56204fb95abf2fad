#!/usr/bin/env bash
# Communication vs compute, measured then predicted: the allreduce sweep at each
# rank count, crossovers for `auto`, then the step-time model fitted to it.
#
#   jobs/scaling_study.sh                      # ranks 2 and 3 on this machine
#   RANKS="2 4 8 16" RANKS_PER_NODE=2 MODEL=resnet50 SHAPE=3,224,224 jobs/scaling_study.sh   # on a cluster
#   DRY_RUN=1 jobs/scaling_study.sh            # print the launch lines, run nothing
#
# Writes runs/scaling/allreduce-P.json, crossovers.json and scaling-P.json.
#
# Binding: each run of P ranks puts RANKS_PER_NODE ranks on a node (default P:
# all on this machine), each bound to its own block of cores/RANKS_PER_NODE
# cores with that many BLAS/Numba threads (OMP_NUM_THREADS and
# NUMBA_NUM_THREADS, exported to every rank), so that measured compute is what
# a job script's layout would get. When the ranks need more cores than a node
# has (P=3 on 2 cores) they are not bound and get one thread each.
# To change it: RANKS_PER_NODE=2 (one rank per socket on 2-socket nodes),
# THREADS_PER_RANK=N, BIND_UNIT=none (no binding), MPIEXEC, MPI_FLAVOR
# (openmpi|hydra), MPIEXEC_FLAGS (extra options), NODE_CORES (physical cores
# of a node; default lscpu here).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source jobs/binding.sh

OUT=${OUT:-runs/scaling}
MPIEXEC=${MPIEXEC:-mpiexec}
node_topology
BIND_UNIT=${BIND_UNIT:-node}
[[ "$BIND_UNIT" == node || "$BIND_UNIT" == none ]] || die "BIND_UNIT=$BIND_UNIT: expected node or none"
FLAVOR=$(mpi_flavor "$MPIEXEC")

# launch_line P ARGS...: the launch of P ranks, with binding and thread exports, in LAUNCH.
launch_line() {
    local p=$1
    shift
    local per_node=${RANKS_PER_NODE:-$p}
    positive_int RANKS_PER_NODE "$per_node"
    export_threads "${THREADS_PER_RANK:-$(share "$NODE_CORES" "$per_node")}"
    mpirun_binding "$FLAVOR" "$BIND_UNIT" "$per_node" "$OMP_NUM_THREADS"
    # MPIEXEC_FLAGS holds several options on purpose.
    # shellcheck disable=SC2206
    LAUNCH=("$MPIEXEC" -n "$p" "${BIND_FLAGS[@]}" ${MPIEXEC_FLAGS:-} "$@")
}

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        print_launch "${LAUNCH[@]}"
    else
        "${LAUNCH[@]}"
    fi
}

if [[ "${DRY_RUN:-0}" != 1 ]]; then
    mkdir -p "$OUT"
fi
for p in ${RANKS:-2 3}; do
    launch_line "$p" hpcdl bench allreduce --json "$OUT/allreduce-$p.json" --save-crossovers "$OUT/crossovers.json"
    run
done
for p in ${RANKS:-2 3}; do
    launch_line "$p" hpcdl scaling --model "${MODEL:-resnet18}" --input-shape "${SHAPE:-3,32,32}" \
        --per-rank-batch "${BATCH:-32}" --bench-json "$OUT"/allreduce-*.json --json "$OUT/scaling-$p.json"
    run
done
