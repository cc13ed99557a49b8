#!/usr/bin/env bash
# Start the throwaway test cluster in the background and wait until it is ready.
#
#   tests/support/cluster/up.sh [DIR]        # default DIR: ${PETSEG_CLUSTER_DIR:-/tmp/petseg-cluster}
#   source DIR/env.sh                # KUBECONFIG, METAFLOW_HOME/PROFILE, S3 endpoint, ...
#   python flows/seg_flow.py run --with kubernetes ...
#   tests/support/cluster/down.sh [DIR]
#
# Builds the cluster's binaries and the project's image first if they are not
# cached (build.sh, image.sh). Needs root (the node runs containers).
# PYTHON picks the interpreter of the harness, S3 and the device plugin (default: .venv/bin/python).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-${PETSEG_CLUSTER_DIR:-/tmp/petseg-cluster}}"
python="${PYTHON:-$here/../../../.venv/bin/python}"

if [ -f "$dir/supervisor.pid" ] && grep -q "cluster.py" "/proc/$(cat "$dir/supervisor.pid")/cmdline" 2>/dev/null; then
    echo "up.sh: a cluster already runs from $dir (pid $(cat "$dir/supervisor.pid")); stop it with tests/support/cluster/down.sh $dir" >&2
    exit 1
fi
"$here/build.sh"
{ read -r image; read -r archive; } < <(PYTHON="$python" "$here/image.sh")
mkdir -p "$dir"
rm -f "$dir/env.sh"
nohup "$python" "$here/cluster.py" --dir "$dir" --image "$image" --image-archive "$archive" > "$dir/supervisor.log" 2>&1 &
echo $! > "$dir/supervisor.pid"

for _ in $(seq 1 600); do
    if [ -f "$dir/env.sh" ]; then
        echo "cluster ready: source $dir/env.sh"
        exit 0
    fi
    if ! kill -0 "$(cat "$dir/supervisor.pid")" 2>/dev/null; then
        echo "up.sh: the cluster failed to start:" >&2
        tail -n 40 "$dir/supervisor.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "up.sh: the cluster was not ready after 5 minutes; see $dir/logs/ and stop it with tests/support/cluster/down.sh $dir" >&2
exit 1
