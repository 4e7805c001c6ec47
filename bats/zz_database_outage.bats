# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# A database outage and recovery under the shared server, without restarting it. Runs last (file order), and
# always brings the database back for whatever runs after it.

setup() {
  load helpers
  new_ids
}

teardown() {
  if ! pg_running; then
    pg_start_again || true
    wait_until 30 healthy "$ALLOWANCE_ADDR" || true
  fi
}

@test "outage: health goes NOT_SERVING while the database is down, liveness stays SERVING, calls are UNAVAILABLE, and it all recovers" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 30 --commit
  run -0 allowance health
  local failures_before
  failures_before=$(metric_value 'allowance_db_errors_total{kind="unavailable"}')

  local stopped
  pg_stop_keep_data
  stopped=$(now_ms)
  ! pg_running || fail "Postgres still running"

  # Readiness is re-checked every 200ms (ALLOWANCE_HEALTH_INTERVAL); a check may wait for a connection.
  wait_until 15 not_healthy "$ALLOWANCE_ADDR"
  echo "# health turned NOT_SERVING $(($(now_ms) - stopped))ms after the database stopped" >&3
  run -1 allowance health
  assert_eq "$output" NOT_SERVING
  run -1 allowance health --service allowance.v1.SpendingLimits
  assert_eq "$output" NOT_SERVING
  run -0 allowance health --service liveness
  assert_eq "$output" SERVING

  # A reservation fails UNAVAILABLE (retry), without SQL or driver details.
  local started
  started=$(now_ms)
  run --separate-stderr allowance reserve --key "$KEY" --tx "$TX-2" --amount 10
  echo "# reserve answered UNAVAILABLE after $(($(now_ms) - started))ms" >&3
  assert_grpc_error UNAVAILABLE
  local leak
  for leak in sqlx SQL select insert Postgres postgres pool PoolTimedOut "connection refused" "Connection refused" \
    "error returned from database" "127.0.0.1:$ALLOWANCE_PG_PORT" "$ALLOWANCE_PG_PORT" DATABASE_URL; do
    assert_not_contains "$stderr" "$leak"
  done
  run --separate-stderr allowance limits get --key "$KEY"
  assert_grpc_error UNAVAILABLE

  assert_eq "$(metric_value allowance_ready)" 0 "allowance_ready during the outage"
  local failures
  failures=$(metric_value 'allowance_db_errors_total{kind="unavailable"}')
  [ "$failures" -gt "$failures_before" ] || fail "allowance_db_errors_total{kind=\"unavailable\"} stayed at $failures"
  run -0 curl -sf "$E2E_METRICS_URL"
  assert_contains "$output" "# TYPE allowance_db_errors_total counter"

  # The process itself is fine: it was not restarted and keeps running.
  running "$E2E_SERVER_PID" || fail "the server exited"

  # Back up: the same server becomes SERVING again, with the data intact.
  pg_start_again
  local restarted
  restarted=$(now_ms)
  wait_until 15 healthy "$ALLOWANCE_ADDR"
  echo "# health turned SERVING $(($(now_ms) - restarted))ms after the database restarted" >&3
  run -0 allowance health
  assert_eq "$output" SERVING
  assert_eq "$(metric_value allowance_ready)" 1 "allowance_ready after recovery"
  assert_usage "$KEY" daily spent=30 held=0 remaining=70
  # The reservation that failed recorded nothing: its retry is a fresh one, held once.
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 10 --json
  assert_json '.transaction.state == "held"'
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 10
  assert_usage "$KEY" daily spent=30 held=10 remaining=60
  [ "$(readlink "/proc/$E2E_SERVER_PID/exe")" = "$ALLOWANCE_BIN" ] || fail "the server process changed"
}
