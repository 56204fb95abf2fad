#!/usr/bin/env bash
# Run an hpcdl training job with srun inside a Slurm allocation and relaunch
# it after a crash, resuming from the newest valid checkpoint, possibly on
# fewer ranks (e.g. after losing a node under `sbatch --no-kill`).
#
#   sbatch jobs/slurm_train.sbatch                        # the usual way, see there
#   NP_SEQUENCE="8 4" jobs/restart_srun.sh hpcdl train --config jobs/configs/fmnist_cnn.toml
#
# Attempt k runs `srun --ntasks=<k-th entry of NP_SEQUENCE> --kill-on-bad-exit=1
# $SRUN_FLAGS COMMAND --resume auto`; NP_SEQUENCE defaults to $SLURM_NTASKS.
# --kill-on-bad-exit=1 makes srun end every task when one dies, which is what
# hydra's mpiexec does by itself; without it the survivors hang.
# SRUN_FLAGS defaults to the binding `--cpus-per-task=$SLURM_CPUS_PER_TASK
# --cpu-bind=cores`, and OMP_NUM_THREADS and NUMBA_NUM_THREADS, when unset, to
# $SLURM_CPUS_PER_TASK. DRY_RUN=1 prints the first attempt's srun line instead
# of running it.
#
# Run it with `exec` from the batch script and ask Slurm for
# `#SBATCH --signal=B:USR1@120`: the USR1 then reaches this script, which
# passes it to srun, which passes it to every rank; the trainer checkpoints
# and exits, and with REQUEUE_ON_SIGNAL=1 this script requeues the job so it
# continues in a new allocation from that checkpoint.
# Settings and the rest of the logic: jobs/restart_common.sh.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/binding.sh"

WRAPPER_NAME=restart_srun
NP_SEQUENCE=${NP_SEQUENCE:-${SLURM_NTASKS:-1}}
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    SRUN_FLAGS=${SRUN_FLAGS-"--cpus-per-task=$SLURM_CPUS_PER_TASK --cpu-bind=cores"}
    export_threads "${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
else
    SRUN_FLAGS=${SRUN_FLAGS-"--cpu-bind=cores"}
fi

# Called by restart_main (restart_common.sh), in the background, once per attempt.
launch() {
    local np=$1
    shift
    # SRUN_FLAGS is split on purpose: it holds several options.
    # shellcheck disable=SC2086
    run_or_print "${SRUN:-srun}" --ntasks="$np" --kill-on-bad-exit=1 ${SRUN_FLAGS:-} "$@"
}

# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/restart_common.sh"
rc=0
restart_main "$@" || rc=$?
if [[ -n "$STOP_SIGNAL" && "${REQUEUE_ON_SIGNAL:-0}" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
    log "requeueing job $SLURM_JOB_ID: it will resume from its checkpoint"
    "${SCONTROL:-scontrol}" requeue "$SLURM_JOB_ID"
fi
exit "$rc"
