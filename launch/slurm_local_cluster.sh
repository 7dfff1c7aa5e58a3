#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying launch/slurm.sbatch and for the tests
# (tests/integration_tests/test_slurm_cluster.py). Debian's slurm-wlm and munge packages; runs
# munged, slurmctld and slurmd as root, no systemd needed (works in a container).
#
#   bash launch/slurm_local_cluster.sh install   # apt-get install slurm-wlm munge, if missing
#   bash launch/slurm_local_cluster.sh up        # start (idempotent); waits until the node is idle
#   export SLURM_CONF=/tmp/fedrun-slurm/slurm.conf   # what `up` prints; sbatch, srun, sinfo need it
#   sbatch --wait --nodes=1 --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 \
#          launch/slurm.sbatch --config ...
#   bash launch/slurm_local_cluster.sh status
#   bash launch/slurm_local_cluster.sh down      # cancel the jobs, stop the daemons (idempotent)
#
# Everything (slurm.conf, munge key and socket, spool, state, logs, pid files) lives in one
# folder, FEDRUN_SLURM_DIR (default: $TMPDIR/fedrun-slurm); /etc is left alone, so the cluster's
# commands need SLURM_CONF pointing into it. The one node is named after `hostname -s`, with the
# CPUs (nproc) and 95 % of the memory of this machine, in one partition "local".
# Other knobs: FEDRUN_SLURM_PORT (slurmctld's port, default 6817; slurmd takes the next one),
# FEDRUN_SLURM_WAIT (seconds `up` waits for the node, default 60).
set -euo pipefail

STATE="${FEDRUN_SLURM_DIR:-${TMPDIR:-/tmp}/fedrun-slurm}"
PORT="${FEDRUN_SLURM_PORT:-6817}"
WAIT="${FEDRUN_SLURM_WAIT:-60}"
NODE="$(hostname -s)"
PARTITION=local
CONF="$STATE/slurm.conf"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, munged
DAEMONS=(munged slurmctld slurmd)

die() { echo "slurm_local_cluster: $*" >&2; exit 1; }
say() { echo "slurm_local_cluster: $*" >&2; }

pid_of() {  # the live pid recorded for daemon $1, or nothing (a stale file's pid may be reused)
  local f="$STATE/$1.pid" pid
  [[ -s "$f" ]] || return 0
  pid=$(<"$f")
  if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]; then echo "$pid"; fi
}

installed() { command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
                && command -v slurmd >/dev/null && command -v munged >/dev/null; }

need_root() { [[ "$(id -u)" == 0 ]] || die "$1 needs root (the daemons run as root here)"; }

cmd_install() {
  if installed; then say "slurm and munge are installed"; return 0; fi
  need_root install
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  installed || die "apt-get ran but sbatch/slurmctld/slurmd/munged are still missing"
}

write_config() {
  local cpus mem_mb
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc would honour OMP_NUM_THREADS
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
  mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/munge"
  chmod 755 "$STATE/munge"  # the key inside is 0600
  cat > "$CONF" <<EOF
# written by launch/slurm_local_cluster.sh: one node, this machine
ClusterName=fedrun-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: processes are tracked through /proc, tasks are not bound, nothing is accounted
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=60
KillWait=5
InactiveLimit=0
# sbatch --wait polls every 2 s only while MinJobAge <= 5 (else 2 s, then 8 s, then 32 s)
MinJobAge=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  [[ -n "$(pid_of munged)" ]] && return 0
  if [[ ! -s "$STATE/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$STATE/munge/munge.key"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
         --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" --seed-file="$STATE/munge/seed" \
    || die "munged did not start; see $STATE/munged.log"
}

start_daemon() {  # $1: slurmctld or slurmd
  [[ -n "$(pid_of "$1")" ]] && return 0
  "$1" -f "$CONF" || die "$1 did not start; see $STATE/$1.log"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

cmd_up() {
  installed || die "SLURM is not installed (run: bash $0 install)"
  need_root up
  local running=0 d
  for d in "${DAEMONS[@]}"; do [[ -n "$(pid_of "$d")" ]] && running=$((running + 1)); done
  if [[ $running -gt 0 && $running -lt ${#DAEMONS[@]} ]]; then
    say "only some daemons are running; restarting all"
    cmd_down
  fi
  if [[ $running -lt ${#DAEMONS[@]} ]]; then
    mkdir -p "$STATE"
    write_config
    start_munged
    start_daemon slurmctld
    start_daemon slurmd
  fi
  if ! getent hosts "$NODE" >/dev/null; then  # jobs get it in SLURM_JOB_NODELIST and connect to it
    say "warning: this node's name '$NODE' does not resolve; launch/slurm.sbatch uses it as the" \
        "rendezvous address. Add '127.0.0.1 $NODE' to /etc/hosts."
  fi
  local deadline=$((SECONDS + WAIT)) state="" d
  while [[ $SECONDS -lt $deadline ]]; do
    for d in "${DAEMONS[@]}"; do
      if [[ -z "$(pid_of "$d")" ]]; then  # e.g. its port is taken
        echo "--- $STATE/$d.log" >&2; tail -n 15 "$STATE/$d.log" >&2 2>/dev/null || true
        cmd_down
        die "$d exited while starting (log above)"
      fi
    done
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated) say "node $NODE is $state; export SLURM_CONF=$CONF"; return 0 ;;
      down*|drain*)  # left down by an earlier run: slurmd is up now, so bring it back
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  sinfo -R >&2 2>/dev/null || true
  for d in slurmctld slurmd munged; do
    [[ -f "$STATE/$d.log" ]] && { echo "--- $STATE/$d.log" >&2; tail -n 15 "$STATE/$d.log" >&2; }
  done
  die "node $NODE not idle after ${WAIT}s (state: '${state:-no answer from slurmctld}')"
}

stop_all() {  # SIGTERM to every daemon at once (each takes 1-2 s to exit), wait 15 s, then SIGKILL
  local d pid i pids=() names=()
  for d in "${DAEMONS[@]}"; do
    pid=$(pid_of "$d")
    if [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; then pids+=("$pid"); names+=("$d"); fi
  done
  for i in $(seq 150); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      say "${names[$i]} (${pids[$i]}) ignored SIGTERM; killing it"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
  done
  for d in "${DAEMONS[@]}"; do rm -f "$STATE/$d.pid"; done
}

cmd_down() {
  local i
  if [[ -n "$(pid_of slurmctld)" && -f "$CONF" ]]; then
    # end the jobs first, so that no slurmstepd or task outlives the cluster
    scancel --partition="$PARTITION" >/dev/null 2>&1 || true
    for i in $(seq 100); do
      [[ -z "$(squeue -h -p "$PARTITION" -o %i 2>/dev/null)" ]] && break
      sleep 0.1
    done
  fi
  stop_all
  say "stopped"
}

cmd_status() {
  local d pid rc=0
  for d in munged slurmctld slurmd; do
    pid=$(pid_of "$d")
    if [[ -n "$pid" ]]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
  done
  echo "SLURM_CONF=$CONF"
  if [[ $rc == 0 ]]; then sinfo || rc=3; fi
  return $rc
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
