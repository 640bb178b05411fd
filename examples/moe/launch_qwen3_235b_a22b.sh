#!/usr/bin/env bash
# GMPO on Qwen3-235B-A22B, TP4/PP8 (11 + 6x12 + 11 layers)/EP8/ETP1
# (examples/moe/qwen3_235b_a22b.yaml); 16 nodes of 8 GPUs by default, on each node, after the
# SGLang workers and router on the rollout nodes (launch_sglang_rollout.sh; see the config's header):
#   ROLLOUT_URLS=http://<rollout 0>:30000,... ROUTER_URL=http://<rollout 0>:31000 \
#     NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<host of node 0> \
#     bash examples/moe/launch_qwen3_235b_a22b.sh [key=value ...]
# Extra arguments (key=value overrides, --resume) go to gmpo_megatron.cli. DRY_RUN=1 prints the
# torchrun command instead of running it. Environment: see launch_common.sh; docs/models.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${CONFIG:=$HERE/qwen3_235b_a22b.yaml}"
: "${NNODES:=16}"
# shellcheck source=launch_common.sh
source "$HERE/launch_common.sh"
launch "$@"
