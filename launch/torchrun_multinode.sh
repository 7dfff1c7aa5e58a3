#!/bin/bash
# fedrun on several machines without SLURM: run this same command on every node.
#
#   NNODES=2 NPROC=8 HEAD=node01 ./launch/torchrun_multinode.sh --config configs/cifar10.toml
#
# NNODES   number of machines (default 1)
# NPROC    ranks per machine, normally its GPU count (default: nvidia-smi's count, else 1)
# HEAD     host name or address of one of the machines, reachable from all of them; its torchrun
#          hosts the c10d rendezvous on HEAD_PORT (default 29500). Any node may be HEAD.
# JOB_ID   rendezvous id shared by the nodes of one job (default fedrun); change it when two
#          jobs share HEAD.
# Arguments go to fedrun. The nodes need the same code, config and data paths, and run.out_dir
# must be writable on each of them. Rank 0 writes the outputs, and the c10d rendezvous gives rank
# 0 to whichever node it likes: put run.out_dir on a shared file system so that a resume finds
# the checkpoints wherever rank 0 lands.
set -euo pipefail

NNODES="${NNODES:-1}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC:-0}" -ge 1 ]] || NPROC=1
fi
HEAD="${HEAD:-127.0.0.1}"
HEAD_PORT="${HEAD_PORT:-29500}"

# NCCL picks its network on its own; on machines with several interfaces, name the right one:
#   export NCCL_SOCKET_IFNAME=ib0   (and GLOO_SOCKET_IFNAME for CPU runs)
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_id="${JOB_ID:-fedrun}" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$HEAD_PORT" \
  -m fedrun "$@"
