#!/usr/bin/env bash
# Build the mtp image (docs/containers.md):
#
#   docker/build.sh cpu [TAG]   CPU image (default tag mtp:cpu)    make docker-test runs this
#   docker/build.sh gpu [TAG]   GPU image on NGC (default mtp:gpu)  make docker
#
# CPU: the base is CPU_BASE if set (e.g. debian:bookworm-slim where a registry is reachable),
# else a Debian bookworm built here with debootstrap from the mirror apt already uses and
# imported as mtp-base/debian:bookworm: no registry needed, built once, then kept in Docker's
# image store like any other image. The CPU torch wheel is put in docker/.wheels/ (ignored by
# git) by the host's pip, which finds it where `make setup` finds it.
# GPU: GPU_BASE overrides the Dockerfile's pinned NGC image.
# Where the host has a CA bundle (MTP_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt),
# pip inside the build gets it as a BuildKit secret: it is in no layer of the image.
set -euo pipefail
cd "$(dirname "$0")/.."
. docker/engine.sh

BASE_TAG=mtp-base/debian:bookworm
CA_BUNDLE=${MTP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

# The apt sources of the host's bookworm repositories, or Debian's own mirror.
bookworm_sources() {
  local sources
  sources=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' 2>/dev/null \
    | awk '$2 ~ /^bookworm/ {print "deb " $1 " " $2 " " $3}' | sort -u || true)
  echo "${sources:-deb http://deb.debian.org/debian bookworm main}"
}

# Debian bookworm (minbase, like the official slim image) as a local base image.
ensure_base_image() {
  if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    return 0
  fi
  command -v debootstrap >/dev/null || die "debootstrap is not installed: run make docker-deps, or set CPU_BASE=debian:bookworm-slim"
  [ "$(id -u)" -eq 0 ] || die "building the base image with debootstrap needs root; or set CPU_BASE=debian:bookworm-slim"
  local sources mirror root
  sources=$(bookworm_sources)
  mirror=$(echo "$sources" | awk '$3 == "bookworm" {print $2; exit}')
  root=$(mktemp -d /var/tmp/mtp-rootfs.XXXXXX)
  echo "building $BASE_TAG with debootstrap from ${mirror:-http://deb.debian.org/debian} (once; kept in Docker's image store)"
  if ! debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >"$root.log" 2>&1; then
    tail -n 5 "$root.log" >&2
    rm -rf --one-file-system "$root" "$root.log"
    die "debootstrap of bookworm failed (its log's last lines above)"
  fi
  echo "$sources" >"$root/etc/apt/sources.list"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE_TAG" >/dev/null
  rm -rf --one-file-system "$root" "$root.log"
}

# The CPU build of torch 2.13.0 for the image's Python 3.11, fetched by the host's pip into
# the build context. Asking for `+cpu` keeps PyPI's CUDA build of the same version out.
ensure_torch_wheel() {
  local arch
  arch=$(uname -m)
  ls docker/.wheels/torch-2.13.0+cpu-cp311-cp311-*"$arch".whl >/dev/null 2>&1 && return 0
  if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --implementation cp --abi cp311 --platform "manylinux_2_28_$arch" --dest docker/.wheels \
      torch==2.13.0+cpu >&2; then
    die "pip found no CPU build of torch 2.13.0 for Python 3.11; set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or put the wheel in docker/.wheels/"
  fi
}

build() {
  local variant=$1 tag=$2
  shift 2
  local secret=()
  [ -f "$CA_BUNDLE" ] && secret=(--secret "id=ca,src=$CA_BUNDLE")
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain "${secret[@]}" \
    --build-arg VARIANT="$variant" "$@" -f docker/Dockerfile -t "$tag" .
}

main() {
  local variant=${1:-} tag=${2:-mtp:${1:-}}
  trap engine_down EXIT
  trap 'exit 130' INT TERM
  case "$variant" in
    cpu)
      engine_up
      [ -n "${CPU_BASE:-}" ] || ensure_base_image
      ensure_torch_wheel
      build cpu "$tag" --build-arg BASE="${CPU_BASE:-$BASE_TAG}"
      ;;
    gpu)
      engine_up
      build gpu "$tag" ${GPU_BASE:+--build-arg BASE="$GPU_BASE"} \
        || die "building the GPU image failed (see above); it needs its base image (GPU_BASE, default: the Dockerfile's NGC image) from a reachable registry"
      ;;
    *)
      die "usage: docker/build.sh cpu|gpu [TAG]"
      ;;
  esac
  echo "built $tag"
}

main "$@"
