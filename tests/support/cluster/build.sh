#!/usr/bin/env bash
# Build the control plane of the throwaway test cluster and cache it.
#
# No prebuilt kube-apiserver can be installed from Debian, so this builds
# kube-apiserver, kube-controller-manager and a matching kubectl from Debian's
# `kubernetes` source package (1.20.x, full tree with vendor/) with Debian's Go.
# etcd comes from Debian's etcd-server package.
#
# Go >= 1.18 changed reflect.mapiterinit, which the vendored
# github.com/modern-go/reflect2 v1.0.1 links to directly: built with Debian's
# Go 1.19 as is, kube-apiserver dies with "unexpected fault address" as soon as
# it encodes an unstructured object (e.g. a custom resource). reflect2 v1.0.2
# fixed that; its source comes from Debian's golang-github-modern-go-reflect2-dev
# and replaces the vendored copy before the build.
#
# The binaries go to $PETSEG_K8S_CACHE (default /var/cache/petseg-k8s), never
# into the repository. A second run with the cache filled returns at once.
#
# Usage: tests/support/cluster/build.sh            (needs root for apt-get)
set -euo pipefail

CACHE="${PETSEG_K8S_CACHE:-/var/cache/petseg-k8s}"
BIN="$CACHE/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
APT_PACKAGES=(etcd-server golang-go rsync build-essential dpkg-dev ca-certificates golang-github-modern-go-reflect2-dev
              containerd runc containernetworking-plugins iptables conntrack buildah skopeo debootstrap libc6-dev)
# Names what the cached binaries were built from; a change rebuilds them.
BUILD_ID="kubernetes-1.20 debian-source reflect2-1.0.2 node+pause"
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2

have_all() {
    local name
    [ "$(cat "$BIN/BUILD_ID" 2>/dev/null)" = "$BUILD_ID" ] || return 1
    for name in "${BINARIES[@]}" pause; do
        [ -x "$BIN/$name" ] || return 1
    done
    for name in etcd containerd runc buildah; do
        command -v "$name" >/dev/null || return 1
    done
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

vendored="$tree/vendor/github.com/modern-go/reflect2"
if ! cmp -s "$REFLECT2/go_above_118.go" "$vendored/go_above_118.go"; then
    log "replacing the vendored reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
    rm -f "$vendored"/*.go
    cp "$REFLECT2"/*.go "$vendored"/
    rm -f "$vendored"/*_test.go
fi

# One make call shares the compiled dependencies between the three programs;
# a plain `go build -mod=vendor` fails on this tree, make sets it up right.
log "building ${BINARIES[*]} in $tree (several minutes)"
export GOCACHE="$CACHE/go-build"
(cd "$tree" && make WHAT="$(printf 'cmd/%s ' "${BINARIES[@]}")")

for name in "${BINARIES[@]}"; do
    install -m 0755 "$tree/_output/bin/$name" "$BIN/$name"
done
# The pod sandbox's pause program, from the same tree: no registry serves
# the pause image here, so the cluster packs this binary as one.
version="$(sed -n 's/^#define VERSION "\(.*\)"/\1/p' "$tree/build/pause/linux/pause.c" 2>/dev/null || true)"
gcc -Os -static -Wall -Werror ${version:+-DVERSION="$version"} -o "$BIN/pause" "$tree/build/pause/linux/pause.c"
echo "$BUILD_ID" > "$BIN/BUILD_ID"
# The tree and Go's build cache take some 2.5 GB; the binaries are what counts.
rm -rf "$tree" "$GOCACHE"
log "done: $(ls "$BIN" | tr '\n' ' ')"
