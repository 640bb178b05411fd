#!/usr/bin/env bash
# GMPO on dense Qwen3-32B, TP8/PP2 (examples/moe/qwen3_32b.yaml); 2 nodes of 8 GPUs by default,
# on each node, after the SGLang workers and router on the rollout nodes (launch_sglang_rollout.sh;
# see the config's header):
#   ROLLOUT_URLS=http://<rollout 0>:30000,... ROUTER_URL=http://<rollout 0>:31000 \
#     NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<host of node 0> \
#     bash examples/moe/launch_qwen3_32b.sh [key=value ...]
# Extra arguments (key=value overrides, --resume) go to gmpo_megatron.cli. DRY_RUN=1 prints the
# torchrun command instead of running it. Environment: see launch_common.sh; docs/models.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${CONFIG:=$HERE/qwen3_32b.yaml}"
: "${NNODES:=2}"
# shellcheck source=launch_common.sh
source "$HERE/launch_common.sh"
launch "$@"
