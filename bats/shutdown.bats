# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# A second instance on the same database: replicas share state, and stop gracefully on SIGTERM / SIGINT.

setup() {
  load helpers
  new_ids
}

teardown() {
  stop_instance
}

@test "shutdown: SIGTERM stops an instance with exit code 0 within the grace period, and its ports close" {
  start_instance second ALLOWANCE_SHUTDOWN_GRACE=5s ALLOWANCE_SHUTDOWN_DRAIN=0s
  wait_until 20 healthy "$INSTANCE_ADDR"
  run -0 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 5

  local started
  started=$(now_ms)
  kill -TERM "$INSTANCE_PID"
  wait_exit "$INSTANCE_PID" 8
  assert_eq "$EXIT_CODE" 0 "exit code after SIGTERM"
  [ $(($(now_ms) - started)) -lt 6000 ] || fail "took $(($(now_ms) - started))ms to stop"
  port_closed "$INSTANCE_PORT" || fail "gRPC port $INSTANCE_PORT still open"
  port_closed "$INSTANCE_METRICS_PORT" || fail "metrics port $INSTANCE_METRICS_PORT still open"
  run --separate-stderr allowance health --addr "$INSTANCE_ADDR" --timeout 2s
  assert_grpc_error UNAVAILABLE
  local log
  log=$(cat "$INSTANCE_LOG")
  assert_contains "$log" "shutdown signal received"
  assert_contains "$log" "stopped"

  # Its hold lives on in the database, for every other replica.
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json '.state == "held" and .amount == 5'
  run -0 allowance commit --tx "$TX-1"
}

@test "shutdown: SIGINT stops an instance gracefully too" {
  start_instance sigint
  wait_until 20 healthy "$INSTANCE_ADDR"
  kill -INT "$INSTANCE_PID"
  wait_exit "$INSTANCE_PID" 8
  assert_eq "$EXIT_CODE" 0 "exit code after SIGINT"
  port_closed "$INSTANCE_PORT" || fail "gRPC port still open"
}

@test "shutdown: during the drain delay health is NOT_SERVING while calls are still served" {
  start_instance drain ALLOWANCE_SHUTDOWN_DRAIN=3s ALLOWANCE_SHUTDOWN_GRACE=2s
  wait_until 20 healthy "$INSTANCE_ADDR"
  local started
  started=$(now_ms)
  kill -TERM "$INSTANCE_PID"
  wait_until 2 not_healthy "$INSTANCE_ADDR"
  run -1 allowance health --addr "$INSTANCE_ADDR"
  assert_eq "$output" NOT_SERVING
  run -0 allowance health --addr "$INSTANCE_ADDR" --service liveness
  # Load balancers may still send calls: they are answered.
  run -0 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 1
  [ $(($(now_ms) - started)) -lt 2500 ] || skip "the machine is too slow to check within the drain delay"
  running "$INSTANCE_PID" || fail "stopped before the drain delay was over"
  wait_exit "$INSTANCE_PID" 8
  assert_eq "$EXIT_CODE" 0 "exit code"
  port_closed "$INSTANCE_PORT" || fail "gRPC port still open"
}

@test "replicas: a hold made through one instance counts on the other at once" {
  start_instance replica
  wait_until 20 healthy "$INSTANCE_ADDR"
  run -0 allowance limits set --key "$KEY" --window daily --limit 10
  run -0 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 7
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 4
  run -0 allowance commit --tx "$TX-1" --amount 6
  run -0 allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-2" --amount 4 --commit
  assert_usage "$KEY" daily spent=10 held=0 remaining=0
  run --separate-stderr allowance reserve --addr "$INSTANCE_ADDR" --key "$KEY2" --tx "$TX-1" --amount 7
  assert_grpc_error ALREADY_EXISTS
}

@test "logs: ALLOWANCE_LOG_FORMAT=json writes one JSON object per line" {
  start_instance json-logs ALLOWANCE_LOG_FORMAT=json
  wait_until 20 healthy "$INSTANCE_ADDR"
  kill -TERM "$INSTANCE_PID"
  wait_exit "$INSTANCE_PID" 8
  assert_eq "$EXIT_CODE" 0 "exit code"
  local lines
  lines=$(wc -l <"$INSTANCE_LOG")
  [ "$lines" -ge 3 ] || fail "only $lines log lines" "$(cat "$INSTANCE_LOG")"
  jq -e -s 'all(.[]; type == "object" and has("timestamp") and has("level"))' "$INSTANCE_LOG" >/dev/null \
    || fail "not one JSON object per line:" "$(cat "$INSTANCE_LOG")"
  jq -e -s 'any(.[]; .fields.message == "serving allowance.v1.SpendingLimits")' "$INSTANCE_LOG" >/dev/null \
    || fail "no start-up message:" "$(cat "$INSTANCE_LOG")"
}

@test "shutdown: with the database unreachable, SIGTERM still stops within the grace period" {
  local port started elapsed
  port=$(free_port)
  start_instance db-down-shutdown DATABASE_URL="postgres://postgres@127.0.0.1:$port/nowhere" \
    ALLOWANCE_SHUTDOWN_GRACE=1s ALLOWANCE_SWEEP_INTERVAL=1s
  wait_until 10 port_open "$INSTANCE_PORT"
  sleep 1.5 # a readiness check and a sweep are under way
  started=$(now_ms)
  kill -TERM "$INSTANCE_PID"
  wait_exit "$INSTANCE_PID" 15
  elapsed=$(($(now_ms) - started))
  assert_eq "$EXIT_CODE" 0 "exit code"
  [ "$elapsed" -le 2000 ] || fail "took ${elapsed}ms to exit with ALLOWANCE_SHUTDOWN_GRACE=1s and no call in flight"
}
