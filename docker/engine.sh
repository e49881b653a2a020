# Sourced by docker/build.sh and docker/smoke-test.sh: find a Docker client
# that can build with BuildKit, a compose command, and a daemon; start a
# daemon of our own when none answers (as CI does on a clean machine) and stop
# it again, by its PID, when the calling script exits.
#
# After `engine_up`: $DOCKER (client), $COMPOSE (compose command, an array),
# DOCKER_HOST (exported when the daemon is ours). The caller runs
# `engine_down` in its EXIT trap. Failures are one line on stderr and `exit 1`.

DOCKERD=${MTP_DOCKERD:-dockerd}  # the daemon binary to start when none answers
ENGINE_PID=""
ENGINE_STATE=""
ENGINE_FAILURE=""

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

# A client whose `docker build` runs BuildKit (needed for --secret and RUN
# --mount): one with the buildx plugin, or an engine client older than 23,
# which carries BuildKit itself (Debian bookworm's docker.io is 20.10). A
# newer client without buildx (such as a bare /usr/local/bin/docker) only has
# the legacy builder, so it is skipped.
pick_client() {
  local candidate major
  [ -n "${DOCKER:-}" ] && return 0
  for candidate in $(type -ap docker) /usr/bin/docker; do
    [ -x "$candidate" ] || continue
    if "$candidate" buildx version >/dev/null 2>&1; then
      DOCKER=$candidate
      return 0
    fi
    major=$("$candidate" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then
      DOCKER=$candidate
      return 0
    fi
  done
  die "no Docker client that builds with BuildKit: install Debian's docker.io (make docker-deps) or the docker-buildx plugin"
}

# `docker compose` (the v2 plugin) where the client has it, else Debian's docker-compose (v1.29).
pick_compose() {
  if "$DOCKER" compose version >/dev/null 2>&1; then
    COMPOSE=("$DOCKER" compose)
  elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
  else
    die "no compose command: install Debian's docker-compose (make docker-deps) or the docker compose plugin"
  fi
}

engine_answers() {
  "$DOCKER" info >/dev/null 2>&1
}

# Start dockerd with one storage driver; return 0 once it answers, 1 if it exits first.
# No bridge and no iptables (this CI machine has neither): containers and
# builds use the host's network. The data root stays Docker's default
# (/var/lib/docker), so images and the build cache outlive this run.
start_dockerd() {
  local driver=$1 log="$ENGINE_STATE/dockerd-$1.log" deadline
  "$DOCKERD" --host "unix://$ENGINE_STATE/docker.sock" --pidfile "$ENGINE_STATE/dockerd.pid" \
    --exec-root "$ENGINE_STATE/exec" --iptables=false --ip6tables=false --bridge=none \
    --storage-driver="$driver" >"$log" 2>&1 &
  ENGINE_PID=$!
  export DOCKER_HOST="unix://$ENGINE_STATE/docker.sock"
  deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    engine_answers && return 0
    kill -0 "$ENGINE_PID" 2>/dev/null || break
    sleep 1
  done
  ENGINE_FAILURE="$(basename "$DOCKERD") --storage-driver=$driver: $(grep -v '^$' "$log" | tail -n 1)"
  stop_dockerd
  return 1
}

engine_up() {
  pick_client
  pick_compose
  engine_answers && return 0
  [ "$(id -u)" -eq 0 ] || die "no Docker daemon answers and only root can start one: start Docker (systemctl start docker) or run as root"
  command -v "$DOCKERD" >/dev/null || die "no Docker daemon answers and $DOCKERD is not installed: run make docker-deps (Debian's docker.io)"
  # Two daemons on one data root would corrupt it: use a running one, never start a second.
  local running
  running=$(pgrep -x "$(basename "$DOCKERD" | cut -c1-15)" | head -n 1 || true)  # comm: 15 chars
  [ -z "$running" ] || die "dockerd (PID $running) is running but does not answer; set DOCKER_HOST to its socket"
  ENGINE_STATE=$(mktemp -d /tmp/mtp-dockerd.XXXXXX)
  local driver
  for driver in overlay2 vfs; do
    if start_dockerd "$driver"; then
      echo "$(basename "$0"): started $(basename "$DOCKERD") (PID $ENGINE_PID, storage driver $driver); it stops when this script ends"
      return 0
    fi
  done
  die "no Docker daemon could start; last: $ENGINE_FAILURE"
}

stop_dockerd() {
  [ -n "$ENGINE_PID" ] || return 0
  if kill -0 "$ENGINE_PID" 2>/dev/null; then
    kill -TERM "$ENGINE_PID"
    local deadline=$((SECONDS + 60))
    while kill -0 "$ENGINE_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 1; done
    kill -0 "$ENGINE_PID" 2>/dev/null && kill -KILL "$ENGINE_PID"
  fi
  wait "$ENGINE_PID" 2>/dev/null || true  # its exit status; it is gone either way
  ENGINE_PID=""
}

# Stop the daemon this script started (by PID: it stops its containers and its
# containerd), then unmount what it left under its state dir (the host network
# namespace's bind mount) and remove that dir. Nothing to do for a daemon that
# was already running. Never fails, and a second Ctrl-C or TERM does not cut it
# short: it runs in EXIT traps.
engine_down() {
  trap '' INT TERM
  stop_dockerd
  [ -n "$ENGINE_STATE" ] || return 0
  awk -v dir="$ENGINE_STATE/" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | sort -r \
    | while read -r mount; do umount "$mount" || umount -l "$mount" || true; done
  rm -rf --one-file-system "$ENGINE_STATE" || true
  ENGINE_STATE=""
}
