#!/usr/bin/env bash
# Run an hpcdl training job under mpiexec and relaunch it after a crash,
# resuming from the newest valid checkpoint, possibly on fewer ranks.
#
#   MAX_RESTARTS=3 NP_SEQUENCE="4 2 1" jobs/restart_mpirun.sh \
#       hpcdl train --config jobs/configs/fmnist_cnn.toml --out runs/fmnist
#
#   jobs/restart_mpirun.sh --max-restarts 2 --np "2 1" --delay 5 -- \
#       hpcdl train --config jobs/configs/fmnist_cnn.toml --out runs/fmnist
#
# Attempt k runs `mpiexec -n <k-th entry of NP_SEQUENCE> $MPIEXEC_FLAGS COMMAND
# --resume auto` (MPIEXEC changes the launcher; NP_SEQUENCE defaults to $NP,
# else 1). It binds nothing itself: the job scripts that use it (pbs_train.pbs)
# put their binding options in MPIEXEC_FLAGS. DRY_RUN=1 prints the first
# attempt's launch line instead of running it.
# Exit code 0 ends the loop; 2 (a user error) ends it without retry; anything
# else (a dead or aborted rank: hydra returns 9 for a SIGKILLed rank)
# relaunches. SIGTERM/SIGUSR1 sent to this script reach every rank through
# mpiexec; the trainer checkpoints and exits, and the loop stops.
# Settings and the rest of the logic: jobs/restart_common.sh.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/binding.sh"

WRAPPER_NAME=restart_mpirun
NP_SEQUENCE=${NP_SEQUENCE:-${NP:-1}}

# Called by restart_main (restart_common.sh), in the background, once per attempt.
launch() {
    local np=$1
    shift
    # MPIEXEC_FLAGS is split on purpose: it holds several options.
    # shellcheck disable=SC2086
    run_or_print "${MPIEXEC:-mpiexec}" -n "$np" ${MPIEXEC_FLAGS:-} "$@"
}

# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/restart_common.sh"
restart_main "$@"
