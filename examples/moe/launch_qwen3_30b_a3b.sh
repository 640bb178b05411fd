#!/usr/bin/env bash
# GMPO on Qwen3-30B-A3B, TP4/PP1/EP8/ETP1 (examples/moe/qwen3_30b_a3b.yaml); one node of 8 GPUs by
# default, with the SGLang workers and router started first on the rollout nodes
# (launch_sglang_rollout.sh; layout in the config's header):
#   ROLLOUT_URLS=http://<rollout 0>:30000,... ROUTER_URL=http://<rollout 0>:31000 \
#     bash examples/moe/launch_qwen3_30b_a3b.sh [key=value ...]
# two nodes (see the memory note in the config), on each node, with the same ROLLOUT_URLS/ROUTER_URL:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<host of node 0> bash examples/moe/launch_qwen3_30b_a3b.sh
# Extra arguments (key=value overrides, --resume) go to gmpo_megatron.cli. DRY_RUN=1 prints the
# torchrun command instead of running it. Environment: see launch_common.sh; docs/models.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${CONFIG:=$HERE/qwen3_30b_a3b.yaml}"
: "${NNODES:=1}"
# shellcheck source=launch_common.sh
source "$HERE/launch_common.sh"
launch "$@"
