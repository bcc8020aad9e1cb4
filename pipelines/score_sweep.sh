#!/usr/bin/env bash
# Re-score a run's cached rounds under several overlap thresholds (paper Fig. 8 / Table 3) and
# print effective length per round for each; no model is called.
#   pipelines/score_sweep.sh RUN [GAMMA ...]        (default: 0.6 0.7 0.8)
set -euo pipefail
run="$1"; shift
gammas=("${@:-0.6 0.7 0.8}")
opd="${OPDCACHE:-opdcache}"
for g in ${gammas[@]}; do
  "$opd" score "$run" --variant "gamma-$g" --metric overlap --gamma "$g" --quiet
done
"$opd" query "$run" --file "$(dirname "$0")/../analysis/effective_len_per_round.sql"
