# shellcheck shell=bash
# Binding and thread settings shared by the job scripts; sourced, not run.
#
#   node_topology                  NODE_CORES, NODE_SOCKETS, NODE_NUMA of this node
#                                  (physical cores, from lscpu); set them yourself when
#                                  the script runs on a node unlike the compute nodes
#   mpi_flavor LAUNCHER            prints openmpi or hydra (MPICH, Intel MPI); MPI_FLAVOR overrides
#   cores_per_unit UNIT            cores in one socket, NUMA domain or node
#   share CORES RANKS              cores per rank, at least 1
#   mpirun_binding FLAVOR UNIT K T sets BIND_FLAGS: K ranks per UNIT (socket, numa, node;
#                                  none = no binding), each bound to T cores of it, and
#                                  OMP_NUM_THREADS and NUMBA_NUM_THREADS = T passed to every rank
#   export_threads T               exports OMP_NUM_THREADS and NUMBA_NUM_THREADS = T
#   run_or_print COMMAND...        DRY_RUN=1: print the thread exports and COMMAND, run
#                                  nothing; otherwise exec COMMAND
#
# Open MPI (4 and 5): --map-by ppr:K:UNIT:PE=T --bind-to core ("socket" is
# accepted by both; Open MPI 5 calls it "package"). MPICH's Hydra has no ppr:
# -map-by UNIT places consecutive ranks on consecutive units, -bind-to core:T
# binds each to T cores there, -ppn sets ranks per node.

die() {
    echo "${0##*/}: $*" >&2
    exit 2
}

positive_int() {  # positive_int NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1=$2 must be a positive whole number"
}

node_topology() {
    local parsed=""
    if [[ -z "${NODE_CORES:-}" || -z "${NODE_SOCKETS:-}" || -z "${NODE_NUMA:-}" ]]; then
        # One line per logical CPU: core,socket,node. The hardware threads of one core share its number.
        parsed=$(lscpu -p=CORE,SOCKET,NODE 2>/dev/null | grep -v '^#') || parsed=""
    fi
    if [[ -n "$parsed" ]]; then
        NODE_CORES=${NODE_CORES:-$(count_distinct 1 <<<"$parsed")}
        NODE_SOCKETS=${NODE_SOCKETS:-$(count_distinct 2 <<<"$parsed")}
        NODE_NUMA=${NODE_NUMA:-$(count_distinct 3 <<<"$parsed")}
    fi
    NODE_CORES=${NODE_CORES:-$(nproc)}
    NODE_SOCKETS=${NODE_SOCKETS:-1}
    if [[ -z "${NODE_NUMA:-}" || "$NODE_NUMA" == 0 ]]; then
        NODE_NUMA=1  # lscpu leaves NODE empty without NUMA support
    fi
    positive_int NODE_CORES "$NODE_CORES"
    positive_int NODE_SOCKETS "$NODE_SOCKETS"
    positive_int NODE_NUMA "$NODE_NUMA"
}

count_distinct() {  # count_distinct FIELD < lines: distinct non-empty values of a comma-separated field
    cut -d, -f"$1" | { grep . || true; } | sort -u | wc -l
}

share() {  # share CORES RANKS: cores per rank, at least 1
    local n=$(($1 / $2))
    echo $((n > 0 ? n : 1))
}

units_per_node() {  # units_per_node UNIT
    case "$1" in
        socket) echo "$NODE_SOCKETS" ;;
        numa) echo "$NODE_NUMA" ;;
        node) echo 1 ;;
        *) die "BIND_UNIT=$1: expected socket, numa or node" ;;
    esac
}

cores_per_unit() {  # cores_per_unit UNIT
    local units
    units=$(units_per_node "$1")
    echo $((NODE_CORES / units))
}

mpi_flavor() {  # mpi_flavor LAUNCHER
    if [[ -n "${MPI_FLAVOR:-}" ]]; then
        case "$MPI_FLAVOR" in
            openmpi | hydra) echo "$MPI_FLAVOR"; return ;;
            *) die "MPI_FLAVOR=$MPI_FLAVOR: expected openmpi or hydra" ;;
        esac
    fi
    local version
    version=$("$1" --version 2>&1) || true
    case "$version" in
        *"Open MPI"* | *OpenRTE* | *prterun* | *PRRTE*) echo openmpi ;;
        *HYDRA* | *Hydra* | *"Intel(R) MPI"*) echo hydra ;;
        *) die "cannot tell which MPI '$1 --version' belongs to; set MPI_FLAVOR=openmpi or MPI_FLAVOR=hydra" ;;
    esac
}

mpirun_binding() {  # mpirun_binding FLAVOR UNIT RANKS_PER_UNIT THREADS
    local flavor=$1 unit=$2 per_unit=$3 threads=$4 ranks_per_node=0
    BIND_FLAGS=()
    if [[ "$unit" == none ]]; then
        unit=""
    else
        ranks_per_node=$(($(units_per_node "$unit") * per_unit))
    fi
    if [[ -n "$unit" ]] && ((per_unit * threads > $(cores_per_unit "$unit"))); then
        echo "${0##*/}: $per_unit rank(s) x $threads thread(s) need more cores than the $(cores_per_unit "$unit") of a $unit: not binding" >&2
        unit=""
    fi
    if [[ "$flavor" == openmpi ]]; then
        if [[ -n "$unit" ]]; then
            BIND_FLAGS+=(--map-by "ppr:$per_unit:$unit:PE=$threads" --bind-to core)
        fi
        BIND_FLAGS+=(-x OMP_NUM_THREADS -x NUMBA_NUM_THREADS)
    else
        if [[ "$unit" == node ]]; then
            BIND_FLAGS+=(-ppn "$ranks_per_node" -bind-to "core:$threads" -map-by "core:$threads")
        elif [[ -n "$unit" ]]; then
            BIND_FLAGS+=(-ppn "$ranks_per_node" -bind-to "core:$threads" -map-by "$unit")
        fi
        BIND_FLAGS+=(-genv OMP_NUM_THREADS "$threads" -genv NUMBA_NUM_THREADS "$threads")
    fi
}

export_threads() {  # export_threads THREADS
    positive_int THREADS_PER_RANK "$1"
    export OMP_NUM_THREADS=$1 NUMBA_NUM_THREADS=$1
}

print_launch() {
    local var
    for var in OMP_NUM_THREADS NUMBA_NUM_THREADS; do
        if [[ -n "${!var:-}" ]]; then
            echo "export $var=${!var}"
        fi
    done
    local word line=""
    for word in "$@"; do
        if [[ ! "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            word="'${word//\'/\'\\\'\'}'"  # single-quoted, so the line can be pasted into a shell
        fi
        line+="${line:+ }$word"
    done
    echo "$line"
}

run_or_print() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        print_launch "$@"
        exit 0
    fi
    exec "$@"
}
