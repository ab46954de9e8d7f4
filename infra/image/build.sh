#!/usr/bin/env bash
# Build the worker image with whatever this host has:
#
#   infra/image/build.sh [cpu|gpu] [TAG]        # the worker image; default: cpu, actviz-worker:<variant>
#   infra/image/build.sh producer [TAG]         # the light producer image (producer/Dockerfile)
#
# - Docker when an engine answers (`docker info`), buildah otherwise (Debian's package;
#   builds without a daemon, `--isolation chroot`).
# - The base image is worker/Dockerfile's PYTHON_IMAGE when its registry can be reached.
#   Where it cannot, a Debian bookworm base with Python 3.11 is made from Debian's packages
#   with mmdebstrap (localhost/actviz-python:3.11-bookworm, made once and reused) and
#   passed as PYTHON_IMAGE. That base trusts the certificate authorities this host adds
#   (/usr/local/share/ca-certificates), so the build reaches PyPI wherever the host does.
#
# Layers are cached (docker's cache, buildah --layers): a second build that changes only
# actviz's code reuses the TensorFlow layer. The last three lines of output say what was
# used, for scripts and tests:
#
#   engine=buildah
#   base=localhost/actviz-python:3.11-bookworm (mmdebstrap; the registry could not be reached)
#   image=localhost/actviz-worker:cpu
set -euo pipefail

VARIANT=${1:-cpu}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
case "$VARIANT" in
  cpu | gpu) DOCKERFILE="$ROOT/worker/Dockerfile" NAME=actviz-worker:$VARIANT ;;
  producer) DOCKERFILE="$ROOT/producer/Dockerfile" NAME=actviz-producer:latest ;;
  *) echo "what to build must be cpu, gpu or producer, got $VARIANT" >&2; exit 2 ;;
esac
REGISTRY_BASE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$DOCKERFILE")
STANDIN_BASE=localhost/actviz-python:3.11-bookworm
PULL_TIMEOUT_S=${ACTVIZ_IMAGE_PULL_TIMEOUT_S:-60}

if docker info >/dev/null 2>&1; then
  ENGINE=docker
  TAG=${2:-$NAME}
else
  ENGINE=buildah
  TAG=${2:-localhost/$NAME}
  command -v buildah >/dev/null || { echo "no Docker engine answers and buildah is not installed" >&2; exit 2; }
fi

pull() {
  if [ "$ENGINE" = docker ]; then
    timeout "$PULL_TIMEOUT_S" docker pull -q "$1" >/dev/null 2>&1
  else
    timeout "$PULL_TIMEOUT_S" buildah pull -q "docker.io/library/$1" >/dev/null 2>&1
  fi
}

have_image() {
  if [ "$ENGINE" = docker ]; then docker image inspect "$1" >/dev/null 2>&1; else buildah inspect -t image "$1" >/dev/null 2>&1; fi
}

make_standin() {
  command -v mmdebstrap >/dev/null || { echo "the registry cannot be reached and mmdebstrap is not installed" >&2; exit 2; }
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  mmdebstrap --quiet --variant=apt \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --customize-hook='if [ -d /usr/local/share/ca-certificates ]; then cp -r /usr/local/share/ca-certificates/. "$1"/usr/local/share/ca-certificates/; fi' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    bookworm "$work/base.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2
  if [ "$ENGINE" = docker ]; then
    docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'CMD ["python3"]' "$work/base.tar" "$STANDIN_BASE" >/dev/null
  else
    local ctr
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/base.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$ctr"
    buildah commit -q "$ctr" "$STANDIN_BASE" >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
}

if have_image "$REGISTRY_BASE" || have_image "docker.io/library/$REGISTRY_BASE" || pull "$REGISTRY_BASE"; then
  BASE=$REGISTRY_BASE
  BASE_NOTE="registry"
else
  have_image "$STANDIN_BASE" || make_standin
  BASE=$STANDIN_BASE
  BASE_NOTE="mmdebstrap; the registry could not be reached"
fi

# Docker's image format, not OCI: OCI drops SHELL and HEALTHCHECK.
if [ "$ENGINE" = docker ]; then
  DOCKER_BUILDKIT=1 docker build -f "$DOCKERFILE" --build-arg VARIANT="$VARIANT" \
    --build-arg PYTHON_IMAGE="$BASE" -t "$TAG" "$ROOT" >&2
else
  buildah bud --quiet --isolation chroot --layers --format docker -f "$DOCKERFILE" \
    --build-arg VARIANT="$VARIANT" --build-arg PYTHON_IMAGE="$BASE" -t "$TAG" "$ROOT" >&2
fi

echo "engine=$ENGINE"
echo "base=$BASE ($BASE_NOTE)"
echo "image=$TAG"
