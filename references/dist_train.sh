#!/usr/bin/env bash
# Train with N processes per node through torchrun: one per GPU, or N CPU processes (gloo) without GPUs.
#   references/dist_train.sh GPUS [train.py flags...]
# Multi-node: run it on every node with NNODES, NODE_RANK and MASTER_ADDR (the rank-0 node) set; PORT is shared.
set -euo pipefail
GPUS=${1:?usage: $0 GPUS [train.py flags...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-29500}
HERE=$(cd "$(dirname "$0")" && pwd)
exec python -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    "$HERE/../train.py" "$@"
