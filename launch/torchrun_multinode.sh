#!/bin/bash
# fedrun on several machines without SLURM: run this same command on every node.
#
#   NNODES=2 NPROC=8 HEAD=node01 ./launch/torchrun_multinode.sh --config configs/cifar10.toml
#   DRY_RUN=1 NNODES=2 HEAD=10.0.0.1 ./launch/torchrun_multinode.sh --fed.rounds 3   # print, run nothing
#
# Every variable it reads (all optional but HEAD on more than one node):
# NNODES        number of machines (default 1)
# NPROC         ranks per machine, normally its GPU count (default: nvidia-smi's count, else 1)
# HEAD          host name or address of one of the machines, reachable from all of them; its
#               torchrun hosts the c10d rendezvous on HEAD_PORT. Any node may be HEAD. Default
#               127.0.0.1 (all nodes on this machine).
# HEAD_PORT     the rendezvous port on HEAD (default 29500)
# JOB_ID        rendezvous id shared by the nodes of one job (default fedrun); give every job
#               (and every resubmission of a job) its own when they share HEAD
# IS_HEAD       1 on the node that hosts the rendezvous, 0 on the others. Default: 1 where HEAD
#               is one of this machine's own non-loopback addresses (or resolves to one), else
#               torch decides. torch compares HEAD with the address this machine's *name*
#               resolves to, which on Debian/Ubuntu is 127.0.1.1: with HEAD given as an address,
#               no node would host the rendezvous and every node would wait for it.
# MAX_RESTARTS  torchrun --max-restarts (default 0). With restarts, export
#               TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/guide.md "Restarts and resume").
# PYTHON        the interpreter with fedrun installed (default python)
# DRY_RUN       1: print the command this node would run (prefixed by its host name) and exit
# GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  the network interface the ranks talk over. Unset,
#               fedrun binds gloo (CPU runs) to the interface that reaches the master
#               (fedrun/dist.py, gloo_interface); NCCL picks its own.
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
PYTHON="${PYTHON:-python}"

RDZV_CONF=()
IS_HEAD="${IS_HEAD:-}"
if [[ -z "$IS_HEAD" ]] && "$PYTHON" -c 'import sys; from fedrun.dist import is_own_address
sys.exit(0 if is_own_address(sys.argv[1]) else 1)' "$HEAD"; then
  IS_HEAD=1
fi
case "$IS_HEAD" in
  "") ;;
  0|1) RDZV_CONF=(--rdzv_conf="is_host=$IS_HEAD") ;;
  *) echo "torchrun_multinode.sh: IS_HEAD must be 1 or 0, got '$IS_HEAD'" >&2; exit 2 ;;
esac

CMD=("$PYTHON" -m torch.distributed.run
     --nnodes="$NNODES" --nproc_per_node="$NPROC"
     --rdzv_id="${JOB_ID:-fedrun}" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$HEAD_PORT"
     "${RDZV_CONF[@]}" --max_restarts="${MAX_RESTARTS:-0}"
     -m fedrun "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s:' "$(hostname)"; printf ' %q' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
