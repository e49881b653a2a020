#!/usr/bin/env bash
# make docker-test: build the CPU image and run it for real against the compose MLflow server.
#
#   1. a Docker daemon: the running one, else dockerd started here (stopped again at the end)
#   2. docker/build.sh cpu: the CPU image (cached layers make a second run fast)
#   3. the image runs as a non-root user with `mtp` as its entry point, and holds no build secret
#   4. the GPU variant's build stops at its import check on a base without apex (the CPU image)
#   5. a server that cannot start fails the wait for health, and its log is shown
#   6. docker/compose.yaml: the MLflow server becomes healthy; the `train` service prepares a
#      small corpus, trains a few steps against it, exports and generates (plain = speculative)
#   7. the server holds the run, FINISHED, with every head's losses equal to metrics.jsonl
#   8. the server on a PostgreSQL backend store (a real PostgreSQL of Debian's, started here)
#      keeps a logged metric in that database
# Everything started here (compose projects with their volumes, PostgreSQL, the daemon) is
# removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. docker/engine.sh

IMAGE=${MTP_IMAGE:-mtp:cpu}
COMPOSE_FILE=docker/compose.yaml
PROJECTS=()
PASSED=0
PG_DIR=""

cleanup() {
  local status=$? project
  trap '' INT TERM  # cleaning up is not cut short
  for project in "${PROJECTS[@]}"; do
    "${COMPOSE[@]}" -p "$project" -f "$COMPOSE_FILE" down --volumes --timeout 30 >/dev/null 2>&1 || true
  done
  [ -z "$PG_DIR" ] || { as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$PG_DIR"; }
  engine_down
  echo "docker-test: took ${SECONDS}s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  if [ $status -eq 0 ]; then
    echo "docker-test: $PASSED passed, 0 failed"
  else
    echo "docker-test: $PASSED passed, 1 failed"
  fi
}

passed() {
  PASSED=$((PASSED + 1))
  echo "docker-test: ok: $* [${SECONDS}s]"
}

fail() {
  echo "docker-test: FAILED: $*" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# compose PROJECT PORT ARGS...: one compose project of the test, on its own port.
compose() {
  local project=$1 port=$2
  shift 2
  MTP_IMAGE=$IMAGE MTP_MLFLOW_PORT=$port "${COMPOSE[@]}" -p "$project" -f "$COMPOSE_FILE" "$@"
}

# Wait until the project's mlflow container is healthy; on failure print why and its log, return 1.
wait_healthy() {
  local project=$1 port=$2 id state deadline=$((SECONDS + 300))
  id=$(compose "$project" "$port" ps -a -q mlflow)
  [ -n "$id" ] || { echo "mlflow server of $project has no container" >&2; return 1; }
  while :; do
    state=$("$DOCKER" inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    case "$state" in
      "running healthy") return 0 ;;
      "running starting") [ $SECONDS -lt $deadline ] || break ;;
      *) break ;;
    esac
    sleep 2
  done
  echo "mlflow server of $project is not healthy ($state); its log:" >&2
  compose "$project" "$port" logs --no-color --tail 30 mlflow >&2
  return 1
}

check_image() {
  local user
  user=$("$DOCKER" run --rm --network host --entrypoint id "$IMAGE" -u)
  [ "$user" != 0 ] || fail "the image runs as root"
  "$DOCKER" run --rm --network host "$IMAGE" --help | grep -q "usage: mtp" || fail "the entry point is not mtp"
  "$DOCKER" run --rm --network host --user 0 --entrypoint sh "$IMAGE" -c \
    'test ! -e /run/secrets/ca && test -z "$(find /root/.cache/pip /tmp -mindepth 1)" && test ! -e /opt/mtp/docker/.wheels' \
    || fail "the image holds a build secret, pip's cache or the torch wheel"
  passed "image runs as uid $user with entry point mtp, no secret or cache in its layers"
}

# The GPU variant's build-time check is real: on a base that has torch but no apex or
# Transformer Engine (the CPU image), the build stops there.
check_gpu_build_checks_its_stack() {
  local log
  if log=$(GPU_BASE=$IMAGE bash docker/build.sh gpu mtp-smoke:gpu-check 2>&1); then
    "$DOCKER" image rm mtp-smoke:gpu-check >/dev/null 2>&1 || true
    fail "a GPU build on a base without apex succeeded"
  fi
  echo "$log" | grep -q "No module named 'apex'" || fail "the GPU build failed, but not at its import check: $(echo "$log" | tail -n 5)"
  echo "$log" | grep -m 1 "No module named 'apex'"
  passed "a GPU build on a base without apex fails at its import check"
}

check_unhealthy_server_fails_with_log() {
  local project="mtp-smoke-bad-$$" port log
  port=$(free_port)
  PROJECTS+=("$project")
  MTP_MLFLOW_BACKEND=nosuchdb://nowhere compose "$project" "$port" up -d mlflow
  if log=$(wait_healthy "$project" "$port" 2>&1); then
    fail "an MLflow server with backend nosuchdb:// became healthy"
  fi
  echo "$log" | grep -q "nosuchdb" || fail "the unhealthy server's log was not shown: $log"
  echo "$log" | sed -n '1p;$p'
  compose "$project" "$port" down --volumes --timeout 30 >/dev/null 2>&1
  passed "a server that cannot start fails the health wait, with its log"
}

check_demo_tracked_in_server() {
  local project="mtp-smoke-$$" port stdlib=/usr/lib/python3.11
  port=$(free_port)
  PROJECTS+=("$project")
  compose "$project" "$port" up -d mlflow
  wait_healthy "$project" "$port" || fail "the compose MLflow server did not become healthy"
  passed "compose MLflow server healthy on 127.0.0.1:$port"
  compose "$project" "$port" run --rm -T -e DEMO_STEPS=12 -e DEMO_NEW_TOKENS=16 \
    -e DEMO_SOURCE="$stdlib/json $stdlib/email" -e DEMO_VAL_FRACTION=0.2 train || fail "the demo in the train service failed"
  passed "train service: prepared a corpus, trained 12 steps, exported, generated (plain = speculative)"
  compose "$project" "$port" run --rm -T --entrypoint python3 train /opt/mtp/docker/check_mlflow.py \
    --run-dir runs/demo --experiment mtp-tiny --heads 4 || fail "the MLflow server does not hold the run"
  passed "MLflow server holds the run with per-head metrics"
}

# PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user of Debian's package.
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

check_postgres_backend() {
  local project="mtp-smoke-pg-$$" port pg_port password stored
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -x "$PG_BIN/initdb" ] || fail "no PostgreSQL server (Debian's postgresql): run make docker-deps"
  PG_DIR=$(mktemp -d /tmp/mtp-smoke-pg.XXXXXX)
  [ "$(id -u)" -ne 0 ] || chown postgres "$PG_DIR"
  pg_port=$(free_port)
  password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  echo "$password" >"$PG_DIR/password"
  as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U mlflow --auth=scram-sha-256 --pwfile="$PG_DIR/password" >/dev/null
  as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-p $pg_port -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null
  PGPASSWORD=$password "$PG_BIN/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow </dev/null
  port=$(free_port)
  PROJECTS+=("$project")
  MTP_MLFLOW_BACKEND="postgresql://mlflow:$password@127.0.0.1:$pg_port/mlflow" compose "$project" "$port" up -d mlflow
  wait_healthy "$project" "$port" || fail "the MLflow server on PostgreSQL did not become healthy"
  "$DOCKER" run --rm --network host -e MLFLOW_TRACKING_URI="http://127.0.0.1:$port" --entrypoint python3 "$IMAGE" -c \
    "from mlflow.tracking import MlflowClient as C; c = C(); r = c.create_run(c.create_experiment('pg')).info.run_id; c.log_metric(r, 'loss_head1', 1.5, step=3)"
  stored=$(PGPASSWORD=$password "$PG_BIN/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d mlflow -At \
    -c "select key || '=' || value || '@' || step from metrics" </dev/null)
  [ "$stored" = "loss_head1=1.5@3" ] || fail "PostgreSQL holds '$stored', not the metric logged through the server"
  passed "MLflow server on PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') stores what it is sent"
}

trap cleanup EXIT
trap 'exit 130' INT TERM
engine_up
export DOCKER
bash docker/build.sh cpu "$IMAGE"
passed "built $IMAGE"
check_image
check_gpu_build_checks_its_stack
check_unhealthy_server_fails_with_log
check_postgres_backend
check_demo_tracked_in_server
