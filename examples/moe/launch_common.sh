# Sourced by examples/moe/launch_qwen3_*.sh (not run on its own). Checks the torchrun and rollout
# environment, sets the NCCL / CUDA variables, then runs, or with DRY_RUN=1 prints,
#   torchrun ... -m gmpo_megatron.cli --config "$CONFIG" <rollout overrides> "$@"
# The caller sets CONFIG and may set defaults for NNODES / NPROC_PER_NODE before sourcing.
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  NPROC_PER_NODE [8]  MASTER_ADDR [none; required when NNODES > 1]
#   MASTER_PORT [29500]  TORCHRUN [torchrun]  DRY_RUN [0]
#   ROLLOUT_URLS [none; required]  the SGLang workers on the rollout nodes, comma-separated
#       http://host:port, as `launch_sglang_rollout.sh workers` prints them; they become
#       rollout.sglang.urls. Or `launch`: the trainer starts its own servers on its rank-0 node from
#       your rollout.sglang.launch.* overrides (SGLANG_PYTHON, if set, becomes launch.python).
#   ROUTER_URL [none; required with worker URLs]  the sglang_router in front of them
#       (`launch_sglang_rollout.sh router`), which becomes rollout.sglang.router_url; `none`: no
#       router, the trainer spreads the requests over the workers itself.
# Every node runs the same command with the same environment except NODE_RANK. Overrides given on
# the command line come after the rollout ones, so they win.

: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${NPROC_PER_NODE:=8}"
: "${MASTER_ADDR:=}"
: "${MASTER_PORT:=29500}"
: "${TORCHRUN:=torchrun}"
: "${DRY_RUN:=0}"
: "${ROLLOUT_URLS:=}"
: "${ROUTER_URL:=}"
: "${SGLANG_PYTHON:=}"

# host:port only: the list goes into a YAML override ([a,b]), where brackets or commas would split it.
URL_PATTERN='^https?://[A-Za-z0-9._-]+:[0-9]+/?$'

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

check_launch_env() {
  local var
  for var in NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var=${!var} is not a non-negative integer"
  done
  (( NNODES >= 1 )) || die "NNODES=$NNODES: need at least one node"
  (( NPROC_PER_NODE >= 1 )) || die "NPROC_PER_NODE=$NPROC_PER_NODE: need at least one process"
  (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES)"
  if (( NNODES > 1 )) && [[ -z "$MASTER_ADDR" ]]; then
    die "NNODES=$NNODES needs MASTER_ADDR: the address of the NODE_RANK=0 host, reachable" \
        "from every node; e.g. NNODES=$NNODES NODE_RANK=<0..$((NNODES - 1))>" \
        "MASTER_ADDR=10.0.0.1 bash $0"
  fi
  [[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist (set CONFIG=path/to/a.yaml)"
  [[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN=$DRY_RUN: use 1 (print the command) or 0"
}

# split_urls NAME "$LIST" VAR: the array NAME gets LIST's comma- or space-separated URLs, each checked
# (VAR: the variable's name, for the error).
split_urls() {
  local -n _urls="$1"
  local url
  IFS=', ' read -r -a _urls <<< "$2"
  (( ${#_urls[@]} >= 1 )) || die "$3='$2' names no URL (e.g. $3=http://10.0.1.1:30000,http://10.0.1.1:30001)"
  for url in "${_urls[@]}"; do
    [[ "$url" =~ $URL_PATTERN ]] || die "$3 entry '$url' is not http://host:port" \
        "(e.g. $3=http://10.0.1.1:30000,http://10.0.1.1:30001)"
  done
}

# ROLLOUT_OVERRIDES: the rollout.sglang.* overrides from ROLLOUT_URLS / ROUTER_URL ("$@": the
# command line's overrides, to check that ROLLOUT_URLS=launch comes with a server layout).
rollout_overrides() {
  local example="e.g. ROLLOUT_URLS=http://10.0.1.1:30000,http://10.0.1.1:30001 ROUTER_URL=http://10.0.1.1:31000"
  ROLLOUT_OVERRIDES=()
  if [[ -z "$ROLLOUT_URLS" ]]; then
    die "ROLLOUT_URLS is not set: the rollout engine is SGLang, on servers that" \
        "'launch_sglang_rollout.sh workers' starts on the rollout nodes; give their URLs," \
        "comma-separated, and the router's ($example; ROUTER_URL=none for no router)," \
        "or ROLLOUT_URLS=launch with rollout.sglang.launch.* overrides. See docs/models.md"
  fi
  if [[ "$ROLLOUT_URLS" == launch ]]; then
    if [[ -n "$ROUTER_URL" && "$ROUTER_URL" != none ]]; then
      die "ROUTER_URL=$ROUTER_URL with ROLLOUT_URLS=launch: the servers the trainer starts are not" \
          "behind a router; unset ROUTER_URL"
    fi
    local arg has_layout=0
    for arg in "$@"; do
      [[ "$arg" == rollout.sglang.launch.* ]] && has_layout=1
    done
    if (( ! has_layout )); then
      die "ROLLOUT_URLS=launch needs rollout.sglang.launch.* overrides that place the servers on" \
          "GPUs the trainer does not use, e.g. rollout.sglang.launch.num_servers=1" \
          "rollout.sglang.launch.tp=4 rollout.sglang.launch.base_gpu_id=4 (with NPROC_PER_NODE=4)"
    fi
    ROLLOUT_OVERRIDES=("rollout.sglang.urls=[]" "rollout.sglang.router_url=null")
    [[ -z "$SGLANG_PYTHON" ]] || ROLLOUT_OVERRIDES+=("rollout.sglang.launch.python=$SGLANG_PYTHON")
    return 0
  fi
  local urls=()
  split_urls urls "$ROLLOUT_URLS" ROLLOUT_URLS
  if [[ -z "$ROUTER_URL" ]]; then
    die "ROUTER_URL is not set: the sglang_router in front of the ROLLOUT_URLS workers, as" \
        "'launch_sglang_rollout.sh router' printed it ($example), or ROUTER_URL=none to send" \
        "requests to the workers directly"
  fi
  local router=null
  if [[ "$ROUTER_URL" != none ]]; then
    [[ "$ROUTER_URL" =~ $URL_PATTERN ]] || die "ROUTER_URL=$ROUTER_URL is not http://host:port or none ($example)"
    router="$ROUTER_URL"
  fi
  ROLLOUT_OVERRIDES=("rollout.sglang.urls=[$(IFS=,; echo "${urls[*]}")]" "rollout.sglang.router_url=$router")
}

# The trainer's NCCL groups share the GPUs with the rollout engine and its weight-update group.
# Each default can be overridden from the environment.
export_nccl_env() {
  # The rollout engines (SGLang, vLLM) run NCCL with cuMem allocations off; the weight-update group
  # spans trainer and engine, so both sides must agree.
  export NCCL_CUMEM_ENABLE="${NCCL_CUMEM_ENABLE:-0}"
  # NVLink SHARP buffers cost GPU memory for every communicator, and the weight-update group is one
  # more communicator on GPUs that are already full.
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
  # Megatron's TP / sequence-parallel communication overlap needs kernels to run in issue order.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # Free NCCL buffers without recordStream: memory comes back sooner, less fragmentation.
  export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
}

launch() {
  check_launch_env
  rollout_overrides "$@"
  export_nccl_env
  local cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
  if (( NNODES == 1 )) && [[ -z "$MASTER_ADDR" ]]; then
    cmd+=(--standalone)
  else
    cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  cmd+=(-m gmpo_megatron.cli --config "$CONFIG" "${ROLLOUT_OVERRIDES[@]}" "$@")
  if [[ "$DRY_RUN" == 1 ]]; then
    local var
    for var in NCCL_CUMEM_ENABLE NCCL_NVLS_ENABLE CUDA_DEVICE_MAX_CONNECTIONS \
               TORCH_NCCL_AVOID_RECORD_STREAMS; do
      printf '%s=%q ' "$var" "${!var}"
    done
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  exec "${cmd[@]}"
}
