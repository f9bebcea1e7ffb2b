#!/usr/bin/env bash
# Start a private single-node Slurm (munge + slurmctld + slurmd) for the real requeue test.
# Root on Debian/Ubuntu only; installs slurm-wlm and munge if missing. Everything it
# writes lives under $GUARDIAN_SLURM_DIR (default /tmp/guardian-slurm); it prints the
# SLURM_CONF to export. Safe to run twice. scripts/test.sh runs it only under CI=true.
set -euo pipefail
DIR=${GUARDIAN_SLURM_DIR:-/tmp/guardian-slurm}
[ "$(id -u)" = 0 ] || { echo "slurm-localhost: needs root" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm-localhost: no apt-get" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
mkdir -p "$DIR/state" "$DIR/spool" /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1k count=1 status=none
fi
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || munged --force
HOST=$(hostname -s)
CPUS=$(nproc)
cat > "$DIR/slurm.conf" <<CONF
ClusterName=guardian
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
ReturnToService=2
JobRequeue=1
MpiDefault=none
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
pgrep -x slurmctld >/dev/null || slurmctld -f "$SLURM_CONF"
pgrep -x slurmd >/dev/null || slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 1
done
echo "slurm-localhost: the node never became idle; see $DIR/*.log" >&2
exit 1
