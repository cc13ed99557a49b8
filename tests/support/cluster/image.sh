#!/usr/bin/env bash
# The project's image, built from the Dockerfile with buildah, offline, and cached.
#
# Tagged by the content it is built from (the Dockerfile, the lock file,
# setup.py, README.md, petseg/, serving/, flows/): docker.io/library/petseg:<hash>,
# the name the CRI looks up for `petseg:<hash>`. It is rebuilt only when that
# content changes, and kept as a Docker archive in $PETSEG_K8S_CACHE/image/ for
# the test node's containerd to import.
#
# Offline: the base image is the local stand-in of base_image.sh, and pip
# inside the build installs requirements.lock exactly from a wheelhouse made
# here first (with this machine's package-index settings), mounted read-only
# with a pip.conf that allows nothing else. The Dockerfile is not changed.
#
# Usage: tests/support/cluster/image.sh [VARIANT]     (root; VARIANT: cpu, the default)
#   PYTHON  a Python 3.12 with pip that downloads the wheels (default: .venv/bin/python)
# Prints the image's name and its archive, one per line.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
variant="${1:-cpu}"
cache="${PETSEG_K8S_CACHE:-/var/cache/petseg-k8s}/image"
python="${PYTHON:-$repo/.venv/bin/python}"
log() { echo "image.sh: $*" >&2; }

cd "$repo"
# The build context's content, as the Dockerfile copies it (.dockerignore leaves out caches).
content() {
    { printf '%s\n' Dockerfile .dockerignore requirements.lock setup.py README.md
      find petseg serving flows -type f ! -path '*/__pycache__/*' ! -name '*.pyc'; } | LC_ALL=C sort | xargs sha256sum
    echo "variant $variant"
}
tag="$(content | sha256sum | cut -c1-16)"
name="docker.io/library/petseg:$tag"
archive="$cache/petseg-$tag.docker.tar"

if [ ! -f "$archive" ]; then
    mkdir -p "$cache"
    "$here/base_image.sh"
    wheels="$cache/wheels-$(sha256sum requirements.lock | cut -c1-16)"
    if [ ! -f "$wheels/.complete" ]; then
        log "collecting the wheels of requirements.lock in $wheels"
        rm -rf "$wheels"
        "$python" -m pip wheel --quiet --no-deps -r requirements.lock -w "$wheels" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
        touch "$wheels/.complete"
    fi
    conf="$(mktemp)"
    trap 'rm -f "$conf"' EXIT
    printf '[global]\nno-index = true\nfind-links = /wheels\n' > "$conf"
    chmod 0644 "$conf"
    log "building $name ($variant) with buildah"
    buildah bud --quiet --layers --pull-never --network none --build-arg "VARIANT=$variant" \
        --volume "$wheels:/wheels:ro" --volume "$conf:/etc/pip.conf:ro" \
        --tag "$name" --file Dockerfile . >&2
    buildah push --quiet "$name" "docker-archive:$archive.part:$name" >&2
    mv "$archive.part" "$archive"
    # Older archives of other content are of no further use.
    find "$cache" -maxdepth 1 -name 'petseg-*.docker.tar' ! -name "petseg-$tag.docker.tar" -delete
    log "built $name ($(du -h "$archive" | cut -f1))"
fi
echo "$name"
echo "$archive"
