# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# grpc.health.v1 through `allowance health`, as container probes and scripts use it.
# (Health during a database outage: zz_database_outage.bats.)

setup() {
  load helpers
  new_ids
}

@test "health: exits 0 and prints SERVING while the server serves" {
  run --separate-stderr allowance health
  [ "$status" -eq 0 ] || fail "exit code $status" "$output" "$stderr"
  assert_eq "$output" SERVING
  run -0 allowance health --service allowance.v1.SpendingLimits
  assert_eq "$output" SERVING
}

@test "health: --service liveness is SERVING" {
  run -0 allowance health --service liveness
  assert_eq "$output" SERVING
}

@test "health: --addr and ALLOWANCE_ADDR choose the server" {
  run -0 env -u ALLOWANCE_ADDR "$ALLOWANCE_BIN" health --addr "$ALLOWANCE_ADDR"
  assert_eq "$output" SERVING
  local port
  port=$(free_port)
  run --separate-stderr env ALLOWANCE_ADDR="http://127.0.0.1:$port" "$ALLOWANCE_BIN" health --timeout 2s
  assert_grpc_error UNAVAILABLE
}

@test "health: an unknown service name is NOT_FOUND with exit code 1" {
  run --separate-stderr allowance health --service no.such.Service
  assert_grpc_error NOT_FOUND
}
