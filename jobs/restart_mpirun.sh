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
# Attempt k runs `mpiexec -n <k-th entry of NP_SEQUENCE> COMMAND --resume auto`
# (MPIEXEC and MPIEXEC_FLAGS change the launcher; NP_SEQUENCE defaults to $NP,
# else 1). Exit code 0 ends the loop; 2 (a user error) ends it without retry;
# anything else (a dead or aborted rank: hydra returns 9 for a SIGKILLed rank)
# relaunches. SIGTERM/SIGUSR1 sent to this script reach every rank through
# mpiexec; the trainer checkpoints and exits, and the loop stops.
# Settings and the rest of the logic: jobs/restart_common.sh.
set -euo pipefail

WRAPPER_NAME=restart_mpirun
NP_SEQUENCE=${NP_SEQUENCE:-${NP:-1}}

launch() {
    local np=$1
    shift
    # MPIEXEC_FLAGS is split on purpose: it holds several options.
    # shellcheck disable=SC2086
    exec "${MPIEXEC:-mpiexec}" -n "$np" ${MPIEXEC_FLAGS:-} "$@"
}

source "$(dirname "${BASH_SOURCE[0]}")/restart_common.sh"
restart_main "$@"
