#!/usr/bin/env bash
# Train on a SLURM cluster with srun: one task per GPU; train.py reads SLURM_PROCID / SLURM_NTASKS / SLURM_NODELIST.
#   references/slurm_train.sh PARTITION JOB_NAME WORK_DIR [GPUS] [train.py flags...]
# Environment: GPUS_PER_NODE (default 8; 0 = CPU tasks only, no --gres), CPUS_PER_TASK (default 5),
# SRUN_ARGS (extra srun options, e.g. "--time=24:00:00"). GPUS (default 8) is the total number of tasks.
# Preemption: SLURM's SIGTERM, or the SIGUSR1 asked for here 120 s before the time limit, makes train.py save a
# checkpoint at the next step and exit; train.py runs with --resume auto, so running this again (or a job requeued
# by sbatch --requeue) continues where it stopped.
set -euo pipefail
PARTITION=${1:?usage: $0 PARTITION JOB_NAME WORK_DIR [GPUS] [train.py flags...]}
JOB_NAME=${2:?missing JOB_NAME}
WORK_DIR=${3:?missing WORK_DIR}
shift 3
GPUS=8
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    GPUS=$1
    shift
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
HERE=$(cd "$(dirname "$0")" && pwd)

if [[ $GPUS_PER_NODE -gt 0 ]]; then
    TASKS_PER_NODE=$(( GPUS < GPUS_PER_NODE ? GPUS : GPUS_PER_NODE ))
    RESOURCES=(--gres="gpu:$TASKS_PER_NODE" --ntasks-per-node="$TASKS_PER_NODE")
else
    RESOURCES=()  # CPU processes: SLURM places the tasks wherever cores are free
fi

# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --ntasks="$GPUS" --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 --signal=USR1@120 "${RESOURCES[@]}" $SRUN_ARGS \
    python -u "$HERE/../train.py" --output-dir "$WORK_DIR" --resume auto "$@"
