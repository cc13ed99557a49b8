#!/usr/bin/env bash
# Stop the test cluster that tests/support/cluster/up.sh started from DIR.
#
#   tests/support/cluster/down.sh [DIR]      # default DIR: ${PETSEG_CLUSTER_DIR:-/tmp/petseg-cluster}
#
# Only the supervisor recorded in DIR/supervisor.pid is signalled; it stops the
# processes it started (etcd, the control plane, S3, containerd and its pods, the kubelet, the device plugin).
set -euo pipefail

dir="${1:-${PETSEG_CLUSTER_DIR:-/tmp/petseg-cluster}}"
pidfile="$dir/supervisor.pid"
if [ ! -f "$pidfile" ]; then
    echo "down.sh: no cluster started from $dir" >&2
    exit 0
fi
pid="$(cat "$pidfile")"
# The pid file may be stale and its number reused: signal only our supervisor.
if kill -0 "$pid" 2>/dev/null && grep -q "cluster.py" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 240); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
fi
rm -f "$pidfile"
echo "cluster in $dir stopped"
