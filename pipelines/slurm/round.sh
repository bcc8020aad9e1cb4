#!/usr/bin/env bash
# One round of Algorithm 1 on a Slurm cluster, stage by stage, each stage a job that starts when the
# previous one succeeded. Copy and edit the #SBATCH lines of the job scripts for your cluster.
#   pipelines/slurm/round.sh RUN ROUND [WORKERS]
# rollout and teacher run as job arrays of WORKERS shards (one GPU each: worker i takes the parts
# p mod WORKERS = i; a failed task is rerun with `sbatch --array=i`), score on one CPU node, train on
# TRAIN_NODES x GPUS_PER_NODE GPUs (default 2 x 8) under torchrun (DeepSpeed), then the budget
# controller decides round ROUND + 1. The run directory must be on storage every node sees (see
# docs/scale.md on locking over NFS). Extra sbatch options for every job (a partition, an account):
# SBATCH_ARGS, e.g. SBATCH_ARGS="--partition=gpu --account=me". A training job bigger than its
# partition is accepted by sbatch and then pends forever (Reason=PartitionConfig), stalling the chain:
# set TRAIN_NODES / GPUS_PER_NODE to what the partition has.
set -euo pipefail
run="$1"; round="$2"; workers="${3:-8}"
here="$(cd "$(dirname "$0")" && pwd)"
export RUN="$run" ROUND="$round" TRAIN_NODES="${TRAIN_NODES:-2}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
submit() { sbatch --parsable --export=ALL ${SBATCH_ARGS:-} "$@"; }
rollout=$(submit --array="0-$((workers - 1))" "$here/rollout.sbatch")
teacher=$(submit --array="0-$((workers - 1))" --dependency="afterok:$rollout" "$here/teacher.sbatch")
score=$(submit --dependency="afterok:$teacher" "$here/score.sbatch")
train=$(submit --dependency="afterok:$score" --nodes="$TRAIN_NODES" --gpus-per-node="$GPUS_PER_NODE" \
    "$here/train.sbatch")
budget=$(submit --dependency="afterok:$train" "$here/budget.sbatch")
echo "round $round: rollout $rollout, teacher $teacher, score $score, train $train, budget $budget"
