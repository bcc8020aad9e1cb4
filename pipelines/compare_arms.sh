#!/usr/bin/env bash
# Run the comparison arms from one config (paper §4.1) and print training wall time per arm.
#   pipelines/compare_arms.sh CONFIG OUTDIR ROUNDS [--set section.key=value ...]
# Arms: prune (config's score.*), opd (fixed budget.max), truncate (fixed arm.truncate_tokens),
# random (matched to prune's kept fraction; arm.random_match=mass for reward mass).
set -euo pipefail
config="$1"; out="$2"; rounds="$3"; shift 3
opd="${OPDCACHE:-opdcache}"
for arm in prune opd truncate random; do
  "$opd" run "$config" "$out/$arm" --rounds "$rounds" --set "arm.name=$arm" "$@" --quiet
done
for arm in prune opd truncate random; do
  printf '%-9s ' "$arm"
  "$opd" query "$out/$arm" "select round(sum(seconds), 1) as seconds from stage_times where stage <> 'budget'" --format csv | tail -1
done
