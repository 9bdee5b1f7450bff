#!/usr/bin/env bash
# Stop what up.sh started, by the PIDs it recorded: cancel jobs first (slurmstepd and job processes outlive a
# stopped slurmd), then slurmd, slurmctld, slurmdbd, mariadb, munged, each waited for.
set -uo pipefail
SLURM_ROOT=${SLURM_ROOT:-/tmp/visor-slurm}
RUN=$SLURM_ROOT/run
[ -d "$RUN" ] || { echo "slurm-down: nothing recorded in $RUN"; exit 0; }
if scontrol ping 2>/dev/null | grep -q "is UP"; then
  scancel --full --quiet $(squeue -h -o %i) 2>/dev/null
  for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi
pkill -TERM -f "slurmstepd" 2>/dev/null
for d in slurmd slurmctld slurmdbd mariadb munged; do
  f=$RUN/$d.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
  echo "slurm-down: $d stopped"
done
