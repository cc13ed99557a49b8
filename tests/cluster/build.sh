#!/usr/bin/env bash
# Build the control plane of the throwaway test cluster and cache it.
#
# No prebuilt kube-apiserver can be installed from Debian, so this builds
# kube-apiserver, kube-controller-manager and a matching kubectl from Debian's
# `kubernetes` source package (1.20.x, full tree with vendor/) with Debian's Go.
# etcd comes from Debian's etcd-server package.
#
# The binaries go to $PETSEG_K8S_CACHE (default /var/cache/petseg-k8s), never
# into the repository. A second run with the cache filled returns at once.
#
# Usage: tests/cluster/build.sh            (needs root for apt-get)
set -euo pipefail

CACHE="${PETSEG_K8S_CACHE:-/var/cache/petseg-k8s}"
BIN="$CACHE/bin"
BINARIES=(kube-apiserver kube-controller-manager kubectl)
APT_PACKAGES=(etcd-server golang-go rsync build-essential dpkg-dev ca-certificates)

have_all() {
    local name
    for name in "${BINARIES[@]}"; do
        [ -x "$BIN/$name" ] || return 1
    done
    command -v etcd >/dev/null
}

if have_all; then
    echo "build.sh: control plane cached in $BIN"
    exit 0
fi

log() { echo "build.sh: $*" >&2; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$CACHE/src" "$CACHE/apt/lists/partial" "$BIN"

# Source packages come through a private sources list so that the machine's
# own apt configuration is left as it is.
if ! ls "$CACHE"/src/kubernetes_*.dsc >/dev/null 2>&1; then
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    echo "deb-src http://deb.debian.org/debian $codename main" > "$CACHE/apt/sources.list"
    apt_opts=(
        -o "Dir::Etc::sourcelist=$CACHE/apt/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$CACHE/apt/lists"
        -o "APT::Sandbox::User=root"
    )
    log "downloading the kubernetes source package"
    apt-get "${apt_opts[@]}" update -qq
    (cd "$CACHE/src" && apt-get "${apt_opts[@]}" source --download-only kubernetes)
fi

tree="$(find "$CACHE/src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
if [ -z "$tree" ]; then
    log "unpacking"
    (cd "$CACHE/src" && dpkg-source --no-check -x kubernetes_*.dsc >/dev/null)
    tree="$(find "$CACHE/src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
fi

# One make call shares the compiled dependencies between the three programs;
# a plain `go build -mod=vendor` fails on this tree, make sets it up right.
log "building ${BINARIES[*]} in $tree (several minutes)"
export GOCACHE="$CACHE/go-build"
(cd "$tree" && make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl")

for name in "${BINARIES[@]}"; do
    install -m 0755 "$tree/_output/bin/$name" "$BIN/$name"
done
# The tree and Go's build cache take some 2.5 GB; the binaries are what counts.
rm -rf "$tree" "$GOCACHE"
log "done: $(ls "$BIN" | tr '\n' ' ')"
