#!/usr/bin/env bash
# Lower-clip MoE stability sweep on Qwen3-30B-A3B: one GMPO run per clip range (log space,
# symmetric: clip_eps_low = clip_eps_high = eps), one after the other, each through
# launch_qwen3_30b_a3b.sh with its own output_dir. The authors saw an official 30B-A3B run at 0.4
# collapse after ~80 steps and advise 0.2 (docs/models.md, Recipe); compare reward, log_ratio_min/max,
# clipfrac_low/high, entropy and grad_norm across the runs' metrics.jsonl.
#
#   bash examples/moe/clip_sweep_30b_a3b.sh [key=value ...]        # on every node, same environment
#   CLIP_EPS_VALUES="0.1 0.2" OUTPUT_ROOT=/data/sweeps bash examples/moe/clip_sweep_30b_a3b.sh
#
# Extra key=value overrides apply to every run; the sweep's own keys (clip range, output_dir) come
# last and win. The launch environment (NNODES, NODE_RANK, MASTER_ADDR, ..., DRY_RUN=1 to print
# the commands) passes through.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${CLIP_EPS_VALUES:=0.1 0.2 0.4}"
: "${OUTPUT_ROOT:=outputs/qwen3_30b_a3b_clip_sweep}"

for eps in $CLIP_EPS_VALUES; do
  if ! [[ "$eps" =~ ^[0-9]*\.?[0-9]+$ ]]; then
    echo "$(basename "$0"): CLIP_EPS_VALUES entry '$eps' is not a non-negative number" \
         "(e.g. CLIP_EPS_VALUES=\"0.1 0.2 0.4\")" >&2
    exit 2
  fi
done
for eps in $CLIP_EPS_VALUES; do
  bash "$HERE/launch_qwen3_30b_a3b.sh" "$@" \
    "algorithm.clip_eps_low=$eps" "algorithm.clip_eps_high=$eps" "output_dir=$OUTPUT_ROOT/eps_$eps"
done
