# Sourced by examples/moe/launch_*.sh (not run on its own). Checks the torchrun environment, sets
# the NCCL / CUDA variables, then runs, or with DRY_RUN=1 prints,
#   torchrun ... -m gmpo_megatron.cli --config "$CONFIG" "$@"
# The caller sets CONFIG and may set defaults for NNODES / NPROC_PER_NODE before sourcing.
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  NPROC_PER_NODE [8]  MASTER_ADDR [none; required when NNODES > 1]
#   MASTER_PORT [29500]  TORCHRUN [torchrun]  DRY_RUN [0]
# Every node runs the same command with the same environment except NODE_RANK.

: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${NPROC_PER_NODE:=8}"
: "${MASTER_ADDR:=}"
: "${MASTER_PORT:=29500}"
: "${TORCHRUN:=torchrun}"
: "${DRY_RUN:=0}"

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
  export_nccl_env
  local cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
  if (( NNODES == 1 )) && [[ -z "$MASTER_ADDR" ]]; then
    cmd+=(--standalone)
  else
    cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  cmd+=(-m gmpo_megatron.cli --config "$CONFIG" "$@")
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
