# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Start-up: bad settings stop `allowance serve` at once with a message naming the setting; defaults apply;
# readiness follows the database and its migrations.

setup() {
  load helpers
  new_ids
}

teardown() {
  stop_instance
}

# Runs `allowance serve` with the given settings (VAR=value, or -u VAR to unset one) on free ports, expecting
# it to exit on its own, non-zero and quickly. Sets $output (stdout and stderr), $status and ELAPSED_MS.
serve_fails() {
  local grpc metrics started unset=()
  while [ "${1:-}" = -u ]; do
    unset+=(-u "$2")
    shift 2
  done
  grpc=$(free_port)
  metrics=$(free_port "$grpc")
  started=$(now_ms)
  run timeout 10 env "${unset[@]}" ALLOWANCE_LISTEN="127.0.0.1:$grpc" ALLOWANCE_METRICS_LISTEN="127.0.0.1:$metrics" \
    "$@" "$ALLOWANCE_BIN" serve
  ELAPSED_MS=$(($(now_ms) - started))
  [ "$status" -ne 124 ] || fail "still running after 10s" "$output"
  [ "$status" -ne 0 ] || fail "exited 0" "$output"
  [ "$ELAPSED_MS" -lt 5000 ] || fail "took ${ELAPSED_MS}ms to fail" "$output"
  assert_contains "$output" "error: "
  assert_not_contains "$output" "serving allowance.v1.SpendingLimits"
}

# The message names the setting, by its environment variable or by its flag.
assert_names_setting() { # env-var flag
  [[ "$output" == *"$1"* || "$output" == *"$2"* ]] || fail "expected the message to name $1 or $2" "got: $output"
}

create_database() { # name: prints its URL
  psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$1\"" >/dev/null
  echo "${DATABASE_URL%/*}/$1"
}

@test "startup: ALLOWANCE_DEFAULT_HOLD_TTL=0s stops start-up, naming the setting" {
  serve_fails ALLOWANCE_DEFAULT_HOLD_TTL=0s
  assert_names_setting ALLOWANCE_DEFAULT_HOLD_TTL --default-hold-ttl
  assert_contains "$output" "0s"
}

@test "startup: ALLOWANCE_LISTEN=nonsense stops start-up, naming the setting" {
  serve_fails ALLOWANCE_LISTEN=nonsense
  assert_names_setting ALLOWANCE_LISTEN --listen
  assert_contains "$output" "nonsense"
}

@test "startup: more batch workers than pool connections stops start-up, naming both settings" {
  serve_fails ALLOWANCE_BATCH_WORKERS=8 ALLOWANCE_DB_POOL_SIZE=4
  assert_contains "$output" ALLOWANCE_BATCH_WORKERS
  assert_contains "$output" ALLOWANCE_DB_POOL_SIZE
  [ "$status" -eq 1 ] || fail "exit code $status"
}

@test "startup: gRPC and metrics on the same address stops start-up, naming both settings" {
  local port
  port=$(free_port)
  serve_fails ALLOWANCE_LISTEN="127.0.0.1:$port" ALLOWANCE_METRICS_LISTEN="127.0.0.1:$port"
  assert_contains "$output" ALLOWANCE_LISTEN
  assert_contains "$output" ALLOWANCE_METRICS_LISTEN
}

@test "startup: a zero health interval stops start-up, naming the setting" {
  serve_fails ALLOWANCE_HEALTH_INTERVAL=0s
  assert_contains "$output" ALLOWANCE_HEALTH_INTERVAL
}

@test "startup: out-of-range pool size, batch size and unit stop start-up, naming the setting" {
  serve_fails ALLOWANCE_DB_POOL_SIZE=0
  assert_names_setting ALLOWANCE_DB_POOL_SIZE --db-pool-size
  serve_fails ALLOWANCE_BATCH_MAX=0
  assert_names_setting ALLOWANCE_BATCH_MAX --batch-max
  serve_fails ALLOWANCE_DEFAULT_UNIT=
  assert_names_setting ALLOWANCE_DEFAULT_UNIT --default-unit
  serve_fails ALLOWANCE_SHUTDOWN_GRACE=soon
  assert_names_setting ALLOWANCE_SHUTDOWN_GRACE --shutdown-grace
  serve_fails ALLOWANCE_LOG_FORMAT=xml
  assert_names_setting ALLOWANCE_LOG_FORMAT --log-format
}

@test "startup: a missing or malformed DATABASE_URL stops start-up, naming it" {
  serve_fails -u DATABASE_URL
  assert_names_setting DATABASE_URL --database-url
  serve_fails DATABASE_URL="not a url"
  assert_names_setting DATABASE_URL --database-url
  # The URL (which may carry a password) is not echoed back.
  assert_not_contains "$output" "not a url"
}

@test "startup: a gRPC port already in use stops start-up, naming the address" {
  local port=${ALLOWANCE_ADDR##*:}
  serve_fails ALLOWANCE_LISTEN="127.0.0.1:$port"
  assert_contains "$output" "127.0.0.1:$port"
  assert_contains "$output" "in use"
}

@test "startup: a server whose database is unreachable starts NOT_SERVING but live" {
  local port
  port=$(free_port)
  start_instance db-down DATABASE_URL="postgres://postgres@127.0.0.1:$port/nowhere"
  wait_until 10 port_open "$INSTANCE_PORT"
  run -1 allowance health --addr "$INSTANCE_ADDR" --timeout 2s
  assert_eq "$output" NOT_SERVING
  run -0 allowance health --addr "$INSTANCE_ADDR" --service liveness
  assert_eq "$output" SERVING
  sleep 1
  running "$INSTANCE_PID" || fail "the instance exited" "$(cat "$INSTANCE_LOG")"
  # SIGKILL: a graceful stop would wait for the pending readiness check (see shutdown.bats).
  kill -KILL "$INSTANCE_PID"
  wait "$INSTANCE_PID" 2>/dev/null || true
}

@test "startup: an unmigrated database is NOT_SERVING until allowance migrate runs, without a restart" {
  local url
  url=$(create_database "unmigrated_${BATS_TEST_NUMBER}_$RANDOM")
  start_instance unmigrated DATABASE_URL="$url"
  wait_until 10 port_open "$INSTANCE_PORT"
  sleep 0.5 # a few readiness checks (every 200ms)
  run -1 allowance health --addr "$INSTANCE_ADDR"
  assert_eq "$output" NOT_SERVING
  # The log says why, and what to do.
  assert_contains "$(cat "$INSTANCE_LOG")" "the database is not migrated"
  assert_contains "$(cat "$INSTANCE_LOG")" "run allowance migrate"

  run -0 env DATABASE_URL="$url" "$ALLOWANCE_BIN" migrate
  wait_until 10 healthy "$INSTANCE_ADDR"
  # That database has callers of its own; the instance picks a new one up at its next re-read.
  ALLOWANCE_TOKEN=$(db_token "$url")
  wait_until 5 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 1
  # Migrating again is a no-op.
  run -0 env DATABASE_URL="$url" "$ALLOWANCE_BIN" migrate
  run -0 allowance tx get --addr "$INSTANCE_ADDR" --tx "$TX-1" --json
  assert_json '.state == "held"'
}

@test "startup: serve --migrate migrates an empty database and serves" {
  local url
  url=$(create_database "fresh_${BATS_TEST_NUMBER}_$RANDOM")
  start_instance migrate-flag DATABASE_URL="$url" ALLOWANCE_MIGRATE=true
  wait_until 20 healthy "$INSTANCE_ADDR"
  ALLOWANCE_TOKEN=$(db_token "$url")
  wait_until 5 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 1 --commit
  run -0 allowance tx get --addr "$INSTANCE_ADDR" --tx "$TX-1" --json
  assert_json '.state == "committed"'
}

@test "startup: ALLOWANCE_DEFAULT_HOLD_TTL and ALLOWANCE_DEFAULT_UNIT apply to requests that leave them unset" {
  start_instance defaults ALLOWANCE_DEFAULT_HOLD_TTL=90s ALLOWANCE_DEFAULT_UNIT=credits
  wait_until 20 healthy "$INSTANCE_ADDR"
  run -0 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 3 --json
  assert_json '.transaction.unit == "credits"'
  assert_json '((.transaction.expires_at | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601)
    - (.transaction.created_at | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601)) == 90'
  run -0 allowance limits get --addr "$INSTANCE_ADDR" --key "$KEY" --json
  assert_json '.unit == "credits" and .usage[0].held == 3'
  # The shared server (default unit "default") sees the same database: the hold is in unit credits.
  UNIT=credits assert_usage "$KEY" daily held=3
  assert_usage "$KEY" daily held=0
}
