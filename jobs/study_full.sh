#!/usr/bin/env bash
# The large-batch study's full grid (hpcdl study large-batch --grid full) on a
# Slurm cluster: a job array, each task one shard of the cells, every cell an
# `hpcdl train` run on the task's ranks through srun; then one more run of
# this script, after the array, writes the report over every finished cell.
#
#   sbatch --array=0-15 jobs/study_full.sh                     # 16 shards at once
#   sbatch --dependency=afterany:JOBID jobs/study_full.sh      # the report (runs any cell left over)
#   DRY_RUN=1 jobs/study_full.sh    # inside an allocation: print the study line, run nothing
#
# Each task: SLURM_NTASKS ranks per cell (global batches from 128 to 16K, all
# divisible by 1, 2, 4, 8, 16 ...), --cpus-per-task cores per rank, bound with
# --cpu-bind=cores and as many BLAS/Numba threads. The shard is the array
# index out of the array's size (SHARDS overrides the count). Cells that
# finished are skipped (--resume), so a requeued or resubmitted task carries
# on where it stopped, and an interrupted cell continues from its checkpoint.
# Settings (environment variables): OUT (default runs/study-full), SHARDS,
# THREADS_PER_RANK, SRUN (default srun), DATA_DIR (Fashion-MNIST IDX files).
#SBATCH --job-name=hpcdl-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=24
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
# shellcheck source-path=SCRIPTDIR/..
source jobs/binding.sh

[[ -n "${SLURM_NTASKS:-}" ]] || die "SLURM_NTASKS is not set: submit this with sbatch (for DRY_RUN=1, set SLURM_NTASKS and SLURM_CPUS_PER_TASK)"
positive_int SLURM_NTASKS "$SLURM_NTASKS"
CPUS_PER_RANK=${SLURM_CPUS_PER_TASK:-1}
export_threads "${THREADS_PER_RANK:-$CPUS_PER_RANK}"
OUT=${OUT:-runs/study-full}
SRUN=${SRUN:-srun}

study=(hpcdl study large-batch --grid full --out "$OUT" --resume --ranks "$SLURM_NTASKS"
       --mpiexec "$SRUN --kill-on-bad-exit=1 --cpus-per-task=$CPUS_PER_RANK --cpu-bind=cores")
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    shards=${SHARDS:-${SLURM_ARRAY_TASK_COUNT:-1}}
    positive_int SHARDS "$shards"
    (( SLURM_ARRAY_TASK_ID < shards )) || die "array task $SLURM_ARRAY_TASK_ID >= SHARDS=$shards: use --array=0-$((shards - 1))"
    study+=(--shard "$SLURM_ARRAY_TASK_ID/$shards")
fi
if [[ -n "${DATA_DIR:-}" ]]; then
    study+=(--data-dir "$DATA_DIR")
fi
run_or_print "${study[@]}"
