#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests and CI (Debian 12, root, no systemd needed):
# munged, MariaDB + slurmdbd (so sacct works), slurmctld, slurmd. Installs missing packages (apt, ~10 s).
# Daemons run in the foreground under setsid; their PIDs go to $SLURM_ROOT/run/*.pid for down.sh.
# Measured recipe and pitfalls: ../shared/notes/slurm-local.md. Usage: scripts/slurm/up.sh  (then down.sh)
set -euo pipefail
SLURM_ROOT=${SLURM_ROOT:-/tmp/visor-slurm}
NODE=$(hostname -s)
t0=$(date +%s.%N)
log() { printf "[slurm-up +%ss] %s\n" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')" "$*"; }
wait_for() {  # wait_for SECONDS what command...
  local n=$(( $1 * 10 )) what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm-up: $what did not come up; logs in $SLURM_ROOT/log" >&2; tail -5 "$SLURM_ROOT"/log/*.out >&2 || true; exit 1
}

if scontrol ping 2>/dev/null | grep -q "is UP" && [ -f "$SLURM_ROOT/run/slurmd.pid" ]; then
  log "already up"; sinfo; exit 0
fi

PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  log "apt-get install $PKGS"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $PKGS >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $PKGS >/dev/null; }
fi
log "packages ready: $(dpkg-query -W -f='${Version}' slurmctld)"

mkdir -p "$SLURM_ROOT"/{state,spool,log,run}
CPUS=$(nproc)
MEM=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=5
MailProg=/bin/true
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool
SlurmctldPidFile=$SLURM_ROOT/run/slurmctld.daemon.pid
SlurmdPidFile=$SLURM_ROOT/run/slurmd.daemon.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
LogFile=$SLURM_ROOT/log/slurmdbd.log
PidFile=$SLURM_ROOT/run/slurmdbd.daemon.pid
DebugLevel=info
CONF
chmod 600 /etc/slurm/slurmdbd.conf
log "wrote /etc/slurm/slurm.conf (node $NODE, CPUs=$CPUS, RealMemory=$MEM)"

if [ ! -f /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
setsid setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged -F >"$SLURM_ROOT/log/munged.out" 2>&1 </dev/null &
echo $! >"$SLURM_ROOT/run/munged.pid"
wait_for 10 munged bash -c "munge -n | unmunge"
log "munged up (pid $(cat "$SLURM_ROOT/run/munged.pid"))"

[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
install -d -o mysql -g mysql -m 0755 /run/mysqld
setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 >"$SLURM_ROOT/log/mariadb.out" 2>&1 </dev/null &
echo $! >"$SLURM_ROOT/run/mariadb.pid"
wait_for 30 mariadb mariadb-admin ping
mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
log "mariadb up (pid $(cat "$SLURM_ROOT/run/mariadb.pid"))"

setsid /usr/sbin/slurmdbd -D >"$SLURM_ROOT/log/slurmdbd.out" 2>&1 </dev/null &
echo $! >"$SLURM_ROOT/run/slurmdbd.pid"
wait_for 30 slurmdbd sacctmgr -n list cluster
log "slurmdbd up (pid $(cat "$SLURM_ROOT/run/slurmdbd.pid"))"

setsid /usr/sbin/slurmctld -D -c -i >"$SLURM_ROOT/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$SLURM_ROOT/run/slurmctld.pid"
wait_for 30 slurmctld bash -c "scontrol ping | grep -q 'is UP'"
log "slurmctld up (pid $(cat "$SLURM_ROOT/run/slurmctld.pid"))"

setsid /usr/sbin/slurmd -D >"$SLURM_ROOT/log/slurmd.out" 2>&1 </dev/null &
echo $! >"$SLURM_ROOT/run/slurmd.pid"
wait_for 30 "slurmd (node idle)" bash -c "[ \"\$(sinfo -h -n $NODE -o %t)\" = idle ]"
log "slurmd up (pid $(cat "$SLURM_ROOT/run/slurmd.pid")); node idle"
sinfo
