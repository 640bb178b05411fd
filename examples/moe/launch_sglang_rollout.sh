#!/usr/bin/env bash
# SGLang rollout servers for the disaggregated layout: workers on dedicated rollout nodes, an
# sglang_router in front of them, and the trainer (launch_qwen3_*.sh) on nodes of its own, so no
# training GPU holds a copy of the model for generation.
#
#   # 1. on every rollout node: NUM_SERVERS servers of TP x DP GPUs each (default: fill the node)
#   MODEL_PATH=/data/Qwen3-30B-A3B LAYOUT=qwen3_30b_a3b HOST=10.0.1.1 \
#     bash examples/moe/launch_sglang_rollout.sh workers [extra sglang.launch_server flags]
#   # 2. on one rollout node: the router over every worker of every rollout node
#   ROLLOUT_URLS=http://10.0.1.1:30000,http://10.0.1.1:30001,http://10.0.1.2:30000,... HOST=10.0.1.1 \
#     bash examples/moe/launch_sglang_rollout.sh router [extra sglang_router.launch_router flags]
#   # 3. the trainer, with the same ROLLOUT_URLS and ROUTER_URL=http://10.0.1.1:31000
#
# `workers` starts the servers in the background (logs: LOG_DIR/server_<i>.log), prints their URLs
# as a `ROLLOUT_URLS=...` line, waits until each answers /health, prints `ready`, and stays in the
# foreground while any server runs; Ctrl-C or SIGTERM stops them all. A server that dies before it
# is ready stops the others (exit 1, with the end of its log); one that dies later is reported and
# the others keep serving (the trainer drops an attached server that stops answering).
# `router` runs `python -m sglang_router.launch_router` (sglang-router 0.3.x) in the foreground and
# prints its `ROUTER_URL=...`. With DRY_RUN=1 both print their commands (one line per server) and
# the URLs, and start nothing.
#
# Environment (defaults in brackets):
#   MODEL_PATH [none; required by workers]  the HF checkpoint directory the servers start from (the
#       trainer's model.hf_checkpoint; its first weight sync replaces these weights at once)
#   LAYOUT [none]  the server layout of an example config: qwen3_30b_a3b (TP4 EP4),
#       qwen3_235b_a22b (TP8 EP8, mem fraction 0.88), qwen3_32b (TP4); without it, set TP
#   TP  EP [1]  DP [1]  --tp-size / --ep-size / --dp-size of each server (TP and EP override the
#       LAYOUT's); sglang expert parallelism needs EP = TP (ep_size * moe_dp_size = tp_size)
#   GPUS_PER_NODE [8]  BASE_GPU_ID [0]  NUM_SERVERS [(GPUS_PER_NODE - BASE_GPU_ID) / (TP * DP)]
#       server i uses GPUs BASE_GPU_ID + i*TP*DP onwards
#   HOST [127.0.0.1]  the address the servers and the router bind to, and that their URLs name.
#       Loopback suits one node only; on a cluster set this node's address on the network the
#       training nodes reach (0.0.0.0 binds every interface; the URLs then name `hostname`)
#   BASE_PORT [30000]  server i listens on BASE_PORT + i
#   MEM_FRACTION [0.85]  --mem-fraction-static: weights + KV cache share of each (dedicated) GPU
#   CONTEXT_LENGTH [10240]  the configs' data.max_prompt_length + rollout.max_new_tokens (2048 + 8192)
#   ROUTED_EXPERTS [0]  1 adds --enable-return-routed-experts, which moe.routing_replay=r3 needs
#   WEIGHT_VERSION [0]  --weight-version of the starting weights (the trainer's syncs count from 1)
#   SGLANG_PYTHON [python]  an interpreter with sglang and sglang-router (the GPU image: /opt/sglang/bin/python)
#   LOG_DIR [sglang_logs]  STARTUP_TIMEOUT_S [1800]  how long workers wait for every /health
#   router: ROLLOUT_URLS [none; required]  ROUTER_PORT [31000]  ROUTER_POLICY [cache_aware]
#       ROUTER_TIMEOUT_S [3600]  --request-timeout-secs; keep it >= rollout.sglang.request_timeout_s
#   DRY_RUN [0]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# die, URL_PATTERN and split_urls (nothing runs on sourcing)
# shellcheck source=launch_common.sh
source "$HERE/launch_common.sh"

usage="usage: [environment] bash $0 workers|router [extra flags]; see the comments at the top of $0"
(( $# >= 1 )) || die "$usage"
MODE="$1"
shift

: "${LAYOUT:=}"
case "$LAYOUT" in
  "") ;;
  qwen3_30b_a3b) : "${TP:=4}" "${EP:=4}" ;;
  qwen3_235b_a22b) : "${TP:=8}" "${EP:=8}" "${MEM_FRACTION:=0.88}" ;;
  qwen3_32b) : "${TP:=4}" "${EP:=1}" ;;
  *) die "LAYOUT=$LAYOUT is not one of qwen3_30b_a3b, qwen3_235b_a22b, qwen3_32b (or leave it unset and set TP)" ;;
esac
: "${TP:=}"
: "${EP:=1}"
: "${DP:=1}"
: "${GPUS_PER_NODE:=8}"
: "${BASE_GPU_ID:=0}"
: "${HOST:=127.0.0.1}"
: "${BASE_PORT:=30000}"
: "${MEM_FRACTION:=0.85}"
: "${CONTEXT_LENGTH:=10240}"
: "${ROUTED_EXPERTS:=0}"
: "${WEIGHT_VERSION:=0}"
: "${SGLANG_PYTHON:=python}"
: "${LOG_DIR:=sglang_logs}"
: "${STARTUP_TIMEOUT_S:=1800}"
: "${ROUTER_PORT:=31000}"
: "${ROUTER_POLICY:=cache_aware}"
: "${ROUTER_TIMEOUT_S:=3600}"
: "${MODEL_PATH:=}"

check_int() {
  local var
  for var in "$@"; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var=${!var} is not a non-negative integer"
  done
}

[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN=$DRY_RUN: use 1 (print the commands) or 0"
[[ -n "$HOST" && "$HOST" =~ ^[A-Za-z0-9._:-]+$ ]] || die "HOST='$HOST' is not an address (e.g. HOST=10.0.1.1)"
# What the URLs name: the bind address, except a wildcard, which no client can connect to.
if [[ "$HOST" == 0.0.0.0 || "$HOST" == "::" ]]; then
  URL_HOST="$(hostname)"
  PROBE_HOST=127.0.0.1
else
  URL_HOST="$HOST"
  PROBE_HOST="$HOST"
fi
[[ -n "$SGLANG_PYTHON" ]] || die "SGLANG_PYTHON is empty: give an interpreter with sglang installed"

# Flags this script sets from its environment; given again as extra flags they would fight it.
OWN_FLAGS=" --model-path --host --port --tp-size --tp --ep-size --ep --dp-size --dp --base-gpu-id \
--mem-fraction-static --context-length --weight-version --enable-return-routed-experts --worker-urls \
--policy --request-timeout-secs "
for arg in "$@"; do
  if [[ "$OWN_FLAGS" == *" ${arg%%=*} "* ]]; then
    die "extra flag ${arg%%=*} is set by this script: use its environment variable instead" \
        "(TP, EP, DP, HOST, BASE_PORT, MEM_FRACTION, CONTEXT_LENGTH, ROUTED_EXPERTS, ROUTER_PORT, ...)"
  fi
done

print_command() {
  printf '%q ' "$@"
  printf '\n'
}

run_router() {
  check_int ROUTER_PORT ROUTER_TIMEOUT_S
  (( ROUTER_PORT >= 1 && ROUTER_PORT <= 65535 )) || die "ROUTER_PORT=$ROUTER_PORT is not a port"
  case "$ROUTER_POLICY" in
    cache_aware|round_robin|random|power_of_two) ;;
    *) die "ROUTER_POLICY=$ROUTER_POLICY is not one of cache_aware, round_robin, random, power_of_two" ;;
  esac
  [[ -n "$ROLLOUT_URLS" ]] || die "ROLLOUT_URLS is not set: the router needs every worker's URL," \
      "comma-separated, as 'launch_sglang_rollout.sh workers' printed them on each rollout node" \
      "(e.g. ROLLOUT_URLS=http://10.0.1.1:30000,http://10.0.1.2:30000)"
  local urls=()
  split_urls urls "$ROLLOUT_URLS" ROLLOUT_URLS
  # /ready: sglang's /health runs a one-token generation, which waits while the trainer has paused
  # generation for a weight update; a router probing /health could drop every worker then.
  local cmd=("$SGLANG_PYTHON" -m sglang_router.launch_router --worker-urls "${urls[@]}"
             --policy "$ROUTER_POLICY" --host "$HOST" --port "$ROUTER_PORT"
             --request-timeout-secs "$ROUTER_TIMEOUT_S" --health-check-endpoint /ready "$@")
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command "${cmd[@]}"
    echo "ROUTER_URL=http://$URL_HOST:$ROUTER_PORT"
    return 0
  fi
  echo "ROUTER_URL=http://$URL_HOST:$ROUTER_PORT"
  exec "${cmd[@]}"
}

SERVER_PIDS=()

stop_servers() {
  local pid waited=0
  for pid in "${SERVER_PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true  # its process group: sglang's scheduler workers too
  done
  for pid in "${SERVER_PIDS[@]}"; do
    while kill -0 -- "-$pid" 2>/dev/null && (( waited < 30 )); do
      sleep 1
      waited=$((waited + 1))
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}

# CMD: the command of server $1 ("${@:2}": extra flags for every server).
server_command() {
  local i="$1"
  shift
  CMD=("$SGLANG_PYTHON" -m sglang.launch_server --model-path "$MODEL_PATH" --host "$HOST"
       --port "$((BASE_PORT + i))" --tp-size "$TP")
  if (( EP > 1 )); then CMD+=(--ep-size "$EP"); fi
  if (( DP > 1 )); then CMD+=(--dp-size "$DP"); fi
  CMD+=(--base-gpu-id "$((BASE_GPU_ID + i * TP * DP))" --mem-fraction-static "$MEM_FRACTION"
        --context-length "$CONTEXT_LENGTH" --weight-version "$WEIGHT_VERSION")
  if (( ROUTED_EXPERTS )); then CMD+=(--enable-return-routed-experts); fi
  CMD+=("$@")
}

run_workers() {
  check_int EP DP GPUS_PER_NODE BASE_GPU_ID BASE_PORT CONTEXT_LENGTH WEIGHT_VERSION STARTUP_TIMEOUT_S
  [[ -n "$TP" ]] || die "set LAYOUT=qwen3_30b_a3b|qwen3_235b_a22b|qwen3_32b or TP=<tensor-parallel size of each server>"
  check_int TP
  (( TP >= 1 && DP >= 1 )) || die "TP=$TP DP=$DP: both must be at least 1"
  if (( EP != 1 && EP != TP )); then
    die "EP=$EP with TP=$TP: sglang's expert parallelism spans the tensor-parallel group" \
        "(ep_size * moe_dp_size = tp_size), so use EP=$TP or EP=1"
  fi
  local per_server=$((TP * DP))
  : "${NUM_SERVERS:=$(((GPUS_PER_NODE - BASE_GPU_ID) / per_server))}"
  check_int NUM_SERVERS
  (( NUM_SERVERS >= 1 )) || die "NUM_SERVERS=$NUM_SERVERS: a server needs TP*DP=$per_server GPUs," \
      "GPUS_PER_NODE=$GPUS_PER_NODE BASE_GPU_ID=$BASE_GPU_ID leaves $((GPUS_PER_NODE - BASE_GPU_ID))"
  if (( BASE_GPU_ID + NUM_SERVERS * per_server > GPUS_PER_NODE )); then
    die "NUM_SERVERS=$NUM_SERVERS servers of TP*DP=$per_server GPUs from BASE_GPU_ID=$BASE_GPU_ID need" \
        "$((BASE_GPU_ID + NUM_SERVERS * per_server)) GPUs; this node has GPUS_PER_NODE=$GPUS_PER_NODE"
  fi
  (( BASE_PORT >= 1 && BASE_PORT + NUM_SERVERS - 1 <= 65535 )) || die "BASE_PORT=$BASE_PORT: ports out of range"
  [[ "$MEM_FRACTION" =~ ^0?\.[0-9]+$ ]] || die "MEM_FRACTION=$MEM_FRACTION is not a fraction in (0, 1), e.g. 0.85"
  [[ "$ROUTED_EXPERTS" == 0 || "$ROUTED_EXPERTS" == 1 ]] || die "ROUTED_EXPERTS=$ROUTED_EXPERTS: use 1 (for moe.routing_replay=r3) or 0"
  [[ -n "$MODEL_PATH" ]] || die "MODEL_PATH is not set: the HF checkpoint directory the servers start" \
      "from, the trainer's model.hf_checkpoint (e.g. MODEL_PATH=/data/Qwen3-30B-A3B)"
  [[ -d "$MODEL_PATH" ]] || die "MODEL_PATH=$MODEL_PATH is not a directory on this node"

  local urls=() i
  for ((i = 0; i < NUM_SERVERS; i++)); do
    urls+=("http://$URL_HOST:$((BASE_PORT + i))")
  done
  local joined
  joined="$(IFS=,; echo "${urls[*]}")"
  if [[ "$DRY_RUN" == 1 ]]; then
    for ((i = 0; i < NUM_SERVERS; i++)); do
      server_command "$i" "$@"
      print_command "${CMD[@]}"
    done
    echo "ROLLOUT_URLS=$joined"
    return 0
  fi
  command -v curl >/dev/null || die "curl is needed to wait for the servers' /health"

  # The log-probs must be log_softmax(logits / T), what the trainer recomputes: sglang's switch for
  # pre-temperature log-probs must be off. Torch-distributed variables of an enclosing launcher
  # would make the servers join a group that is not theirs.
  unset SGLANG_RETURN_ORIGINAL_LOGPROB RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
  mkdir -p "$LOG_DIR"
  trap 'stop_servers' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  for ((i = 0; i < NUM_SERVERS; i++)); do
    server_command "$i" "$@"
    # setsid: each server leads its own process group (pid = group id), which stop_servers
    # signals as a whole
    setsid "${CMD[@]}" > "$LOG_DIR/server_$i.log" 2>&1 < /dev/null &
    SERVER_PIDS+=("$!")
    echo "server $i: pid $! port $((BASE_PORT + i)) log $LOG_DIR/server_$i.log"
  done
  echo "ROLLOUT_URLS=$joined"

  local deadline=$((SECONDS + STARTUP_TIMEOUT_S)) code
  for ((i = 0; i < NUM_SERVERS; i++)); do
    until curl -sf -m 30 -o /dev/null "http://$PROBE_HOST:$((BASE_PORT + i))/health"; do
      if ! kill -0 "${SERVER_PIDS[i]}" 2>/dev/null; then
        code=0
        wait "${SERVER_PIDS[i]}" || code=$?
        echo "$(basename "$0"): server $i (port $((BASE_PORT + i))) exited with code $code before it" \
             "was ready; the end of $LOG_DIR/server_$i.log:" >&2
        tail -n 30 "$LOG_DIR/server_$i.log" >&2 || true
        exit 1
      fi
      if (( SECONDS >= deadline )); then
        echo "$(basename "$0"): server $i (port $((BASE_PORT + i))) did not answer /health within" \
             "STARTUP_TIMEOUT_S=$STARTUP_TIMEOUT_S s; the end of $LOG_DIR/server_$i.log:" >&2
        tail -n 30 "$LOG_DIR/server_$i.log" >&2 || true
        exit 1
      fi
      sleep 2
    done
  done
  echo "ready: $NUM_SERVERS servers (TP$TP EP$EP DP$DP) at ROLLOUT_URLS=$joined"

  local live=("${SERVER_PIDS[@]}") next pid done_pid
  while (( ${#live[@]} > 0 )); do
    code=0
    wait -n -p done_pid "${live[@]}" || code=$?
    next=()
    for pid in "${live[@]}"; do
      [[ "$pid" == "$done_pid" ]] || next+=("$pid")
    done
    live=("${next[@]}")
    echo "$(basename "$0"): server pid $done_pid exited with code $code (${#live[@]} still serving)" >&2
  done
  exit 1
}

case "$MODE" in
  workers) run_workers "$@" ;;
  router) run_router "$@" ;;
  *) die "unknown mode '$MODE'; $usage" ;;
esac
