# shellcheck shell=bash
# Relaunch loop shared by restart_mpirun.sh and restart_srun.sh; sourced, not run.
#
# The front end defines `launch NP COMMAND...` (start COMMAND on NP ranks)
# and WRAPPER_NAME, then calls `restart_main "$@"`. Settings, as environment
# variables or flags (flags win):
#
#   MAX_RESTARTS   --max-restarts N   relaunches after the first attempt (default 3)
#   NP_SEQUENCE    --np "4 2 1"       ranks per attempt; the last entry repeats
#   RESTART_DELAY  --delay SECONDS    pause before a relaunch (default 10)
#   RESTART_LOG    --log FILE         also append the attempt log to FILE
#
# DRY_RUN=1: the front end's `launch` prints the first attempt's launch line
# instead of running it, and the loop stops there.
#
# Every attempt runs with `--resume auto` (an explicit `--resume PATH` is kept
# for the first attempt only: later ones must start from the newest
# checkpoint) and with HPCDL_RESTART_ATTEMPT=k in its environment.
#
# Stops on exit code 0 (done), 2 (user error: a retry cannot fix it), 126/127
# (command not runnable), or after forwarding SIGTERM/SIGUSR1/SIGINT to the
# job: the trainer checkpoints and exits, and the signal meant "stop".

USER_ERROR_EXIT=2

log() {
    local line
    line="[$(date '+%Y-%m-%d %H:%M:%S')] ${WRAPPER_NAME}: $*"
    echo "$line" >&2
    if [[ -n "${RESTART_LOG:-}" ]]; then
        echo "$line" >>"$RESTART_LOG"
    fi
}

# ranks_for_attempt K: the K-th entry of NP_SEQUENCE (1-based), the last one after that.
ranks_for_attempt() {
    local -a sequence
    read -r -a sequence <<<"$NP_SEQUENCE"
    local index=$(($1 - 1))
    if ((index >= ${#sequence[@]})); then
        index=$((${#sequence[@]} - 1))
    fi
    echo "${sequence[$index]}"
}

# with_resume K ARGS...: ARGS with `--resume auto` appended, or an explicit
# --resume value replaced by auto from attempt 2 on. Result in RESUMED.
with_resume() {
    local attempt=$1
    shift
    RESUMED=()
    local found=0 replace_next=0 arg
    for arg in "$@"; do
        if ((replace_next)); then
            replace_next=0
            if ((attempt > 1)); then arg=auto; fi
        elif [[ "$arg" == --resume ]]; then
            found=1
            replace_next=1
        elif [[ "$arg" == --resume=* ]]; then
            found=1
            if ((attempt > 1)); then arg=--resume=auto; fi
        fi
        RESUMED+=("$arg")
    done
    if ((!found)); then
        RESUMED+=(--resume auto)
    fi
}

STOP_SIGNAL=""
CHILD=""

forward_signal() {
    STOP_SIGNAL=$1
    log "got SIG$1: passing it to the job (it checkpoints and exits); no relaunch after this attempt"
    if [[ -n "$CHILD" ]]; then
        kill -s "$1" "$CHILD" 2>/dev/null || true
    fi
}

restart_main() {
    while (($#)); do
        case "$1" in
            --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
            --np) NP_SEQUENCE=$2; shift 2 ;;
            --delay) RESTART_DELAY=$2; shift 2 ;;
            --log) RESTART_LOG=$2; shift 2 ;;
            --) shift; break ;;
            -*) echo "${WRAPPER_NAME}: unknown option $1 (see the header of $0)" >&2; return "$USER_ERROR_EXIT" ;;
            *) break ;;
        esac
    done
    if (($# == 0)); then
        echo "usage: $0 [--max-restarts N] [--np \"4 2 1\"] [--delay S] [--log FILE] [--] hpcdl train ..." >&2
        return "$USER_ERROR_EXIT"
    fi
    MAX_RESTARTS=${MAX_RESTARTS:-3}
    RESTART_DELAY=${RESTART_DELAY:-10}
    if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || ! [[ "$NP_SEQUENCE" =~ ^[[:space:]]*[1-9][0-9]*([[:space:]]+[1-9][0-9]*)*[[:space:]]*$ ]]; then
        echo "${WRAPPER_NAME}: MAX_RESTARTS=$MAX_RESTARTS must be a number and NP_SEQUENCE='$NP_SEQUENCE' positive numbers" >&2
        return "$USER_ERROR_EXIT"
    fi

    trap 'forward_signal TERM' TERM
    trap 'forward_signal USR1' USR1
    trap 'forward_signal INT' INT

    local attempts=$((MAX_RESTARTS + 1)) attempt rc=0 np started
    for ((attempt = 1; attempt <= attempts; attempt++)); do
        np=$(ranks_for_attempt "$attempt")
        with_resume "$attempt" "$@"
        log "attempt $attempt/$attempts on $np ranks: ${RESUMED[*]}"
        started=$SECONDS
        HPCDL_RESTART_ATTEMPT=$attempt launch "$np" "${RESUMED[@]}" &
        CHILD=$!
        while true; do
            if wait "$CHILD"; then rc=0; else rc=$?; fi
            # A trapped signal also ends `wait` (status > 128) while the job runs on.
            if ((rc > 128)) && kill -0 "$CHILD" 2>/dev/null; then
                continue
            fi
            break
        done
        CHILD=""
        if [[ "${DRY_RUN:-0}" == 1 ]]; then
            log "dry run: the launch line above was printed, nothing ran"
            return "$rc"
        fi
        log "attempt $attempt/$attempts exited with code $rc after $((SECONDS - started)) s"
        if ((rc == 0)); then
            log "finished"
            return 0
        fi
        if [[ -n "$STOP_SIGNAL" ]]; then
            log "stopped by SIG$STOP_SIGNAL; resume later with the same command"
            return "$rc"
        fi
        if ((rc == USER_ERROR_EXIT || rc == 126 || rc == 127)); then
            log "exit code $rc means a usage or input error: not retrying"
            return "$rc"
        fi
        if ((attempt < attempts)); then
            log "restarting from the newest valid checkpoint in ${RESTART_DELAY} s"
            sleep "$RESTART_DELAY" &
            CHILD=$!
            wait "$CHILD" || true
            kill "$CHILD" 2>/dev/null || true
            CHILD=""
            if [[ -n "$STOP_SIGNAL" ]]; then
                log "stopped by SIG$STOP_SIGNAL before relaunching"
                return "$rc"
            fi
        fi
    done
    log "giving up after $attempts attempts (last exit code $rc)"
    return "$rc"
}
