#!/usr/bin/env bash
# The Dockerfile's base image, python:3.12-slim-bookworm, made locally.
#
# A STAND-IN: no registry serves Docker Hub's image on these machines, so this
# makes one as that image is made: a Debian bookworm minbase root file system
# with the shared libraries CPython's modules link to, and a CPython 3.12
# built from source under /usr/local (this machine's pyenv build, copied
# without its site-packages but pip). It is stored in buildah's local storage
# under Docker Hub's exact name, so the Dockerfile builds unchanged, and
# cached as an OCI archive in $PETSEG_K8S_CACHE/image/ so that a fresh
# storage is filled in seconds. On a machine that reaches Docker Hub none of
# this is needed: `make image` pulls the real one.
#
# Usage: tests/support/cluster/base_image.sh     (root: debootstrap, buildah)
#   PYTHON312  a CPython 3.12 interpreter whose prefix is copied (default: python3.12 on PATH)
set -euo pipefail

NAME=docker.io/library/python:3.12-slim-bookworm
CACHE="${PETSEG_K8S_CACHE:-/var/cache/petseg-k8s}/image"
ARCHIVE="$CACHE/python-3.12-slim-bookworm.oci.tar"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What python:3.12-slim-bookworm installs beside CPython: its modules' libraries, CA certificates, time zones.
PACKAGES=ca-certificates,netbase,tzdata,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,zlib1g,libncursesw6,libreadline8,libuuid1,libexpat1,libnsl2,libtirpc3,libgdbm6

log() { echo "base_image.sh: $*" >&2; }

if buildah inspect --type image "$NAME" >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$CACHE"
if [ -f "$ARCHIVE" ]; then
    buildah pull --quiet "oci-archive:$ARCHIVE" >/dev/null && buildah inspect --type image "$NAME" >/dev/null 2>&1 && exit 0
fi

python="${PYTHON312:-$(command -v python3.12)}"
prefix="$("$python" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.base_prefix)')"
version="$("$python" -c 'import platform; print(platform.python_version())')"
log "making the stand-in $NAME: Debian bookworm minbase + CPython $version from $prefix"

container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
root="$(buildah mount "$container")"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >/dev/null
# Built with --enable-shared: libpython3.12.so is found through ld.so.cache, /usr/local/lib being on its path.
cp -a "$prefix"/. "$root/usr/local/"
site="$root/usr/local/lib/python3.12/site-packages"
find "$site" -mindepth 1 -maxdepth 1 ! -name 'pip' ! -name 'pip-*.dist-info' ! -name README.txt -exec rm -rf {} +
rm -rf "$root/usr/local/lib/python3.12/test" "$root/usr/local/lib/python3.12/idlelib" \
       "$root/usr/local/lib/python3.12/tkinter" "$root/usr/local/lib/python3.12/lib-dynload/_tkinter"*
# Scripts name their interpreter by its build prefix: point them at the copy.
grep -l -I "^#!$prefix/bin/" "$root/usr/local/bin"/* | xargs -r sed -i "1s|^#!$prefix/bin/|#!/usr/local/bin/|"
for link in python3:python3.12 python:python3 pip3:pip3.12 pip:pip3; do
    ln -sfn "${link#*:}" "$root/usr/local/bin/${link%%:*}"
done
chroot "$root" /sbin/ldconfig
chroot "$root" /usr/local/bin/python3 -c 'import ssl, sqlite3, bz2, lzma, ctypes, uuid, readline'
chroot "$root" /usr/local/bin/pip --version >/dev/null
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
buildah umount "$container" >/dev/null

buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --env PYTHON_VERSION="$version" --cmd python3 --os linux --arch amd64 "$container"
buildah commit --quiet "$container" "$NAME" >/dev/null
buildah push --quiet "$NAME" "oci-archive:$ARCHIVE.part:$NAME" && mv "$ARCHIVE.part" "$ARCHIVE"
log "done: $NAME ($(du -h "$ARCHIVE" | cut -f1) archived in $ARCHIVE)"
