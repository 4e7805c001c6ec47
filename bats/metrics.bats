# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# The Prometheus endpoint (ALLOWANCE_METRICS_LISTEN, path /metrics), as the alert rules and dashboard use it.
# Counter deltas assume the suite runs serially (bats' default), so no other test moves them meanwhile.

setup() {
  load helpers
  new_ids
}

teardown() {
  stop_instance
}

# Every metric the service describes at start-up (src/telemetry.rs, src/app/metrics.rs), but
# allowance_db_errors_total, which only a database failure produces (see zz_database_outage.bats).
METRICS=(
  allowance_reservations_total
  allowance_reservations_exceeded_total
  allowance_commits_total
  allowance_reverses_total
  allowance_holds_expired_total
  allowance_amount_reserved_total
  allowance_amount_committed_total
  allowance_batch_size
  allowance_grpc_request_duration_seconds
  allowance_open_holds
  allowance_db_pool_connections
  allowance_db_pool_max_connections
  allowance_db_pool_waiting
  allowance_ready
  allowance_build_info
)

# Label names a series may carry: all of bounded cardinality.
ALLOWED_LABELS=" method code outcome window late from unit kind state version le quantile reason rule limit result "

# Checks that the Prometheus text in $1 lists metric $2: a TYPE line and at least one sample.
lists_metric() {
  grep -q "^# TYPE $2 " <<<"$1" || return 1
  grep -Eq "^$2(_bucket|_sum|_count)?(\{| )" <<<"$1"
}

# The same, fetching the shared server's metrics.
metric_listed() { lists_metric "$(metrics_text)" "$1"; }

assert_lists_metrics() { # text names...
  local text=$1 name missing=()
  shift
  for name in "$@"; do lists_metric "$text" "$name" || missing+=("$name"); done
  [ ${#missing[@]} -eq 0 ] || fail "metrics not listed: ${missing[*]}" "metrics: $text"
}

# One call of each kind on KEY: allowed, replayed and denied reservations, a commit, a reversal, an expired
# hold, errors.
traffic() {
  run -0 allowance limits set --key "$KEY" --window daily --limit 10
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 4
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 4
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 20
  run -0 allowance commit --tx "$TX-1" --amount 3
  run -0 allowance reserve --key "$KEY" --tx "$TX-3" --amount 2 --commit
  run -0 allowance reverse --tx "$TX-3"
  run -0 allowance reserve --key "$KEY" --tx "$TX-4" --amount 1 --ttl 1s
  run -1 allowance reserve --key "$KEY2" --tx "$TX-4" --amount 1
  run -1 allowance reverse --tx "$TX-unknown"
  run -1 allowance reserve --key "$KEY" --tx "$TX-5" --amount 0
  run -0 allowance tx list --key "$KEY"
  run -0 allowance limits get --key "$KEY"
  wait_until 10 tx_state_is "$TX-4" expired
  # A write on the key releases the expired hold (the sweeper may have done so already).
  run -0 allowance reserve --key "$KEY" --tx "$TX-6" --amount 1
}

@test "metrics: after traffic the endpoint lists the service's metrics" {
  traffic
  # The open-holds gauge is refreshed by the sweeper (ALLOWANCE_SWEEP_INTERVAL=1s in scripts/e2e).
  wait_until 10 metric_listed allowance_open_holds
  wait_until 10 metric_listed allowance_holds_expired_total
  local text
  text=$(metrics_text)
  assert_lists_metrics "$text" "${METRICS[@]}"
  # Each has its description.
  local name
  for name in "${METRICS[@]}"; do
    grep -q "^# HELP $name ." <<<"$text" || fail "no HELP line for $name"
  done
  # Types as documented.
  assert_contains "$text" "# TYPE allowance_reservations_total counter"
  assert_contains "$text" "# TYPE allowance_grpc_request_duration_seconds histogram"
  assert_contains "$text" "# TYPE allowance_batch_size histogram"
  assert_contains "$text" "# TYPE allowance_ready gauge"
}

@test "metrics: reservations are counted by outcome, denials by exceeded window" {
  local allowed denied replayed exceeded
  allowed=$(metric_value 'allowance_reservations_total{outcome="allowed"}')
  denied=$(metric_value 'allowance_reservations_total{outcome="denied"}')
  replayed=$(metric_value 'allowance_reservations_total{outcome="replayed"}')
  exceeded=$(metric_value 'allowance_reservations_exceeded_total{window="annual"}')

  run -0 allowance limits set --key "$KEY" --window annual --limit 5
  run -0 allowance limits set --key "$KEY" --window daily --limit 5
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 5
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 5
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 1 --json
  assert_json '(.exceeded | sort) == ["annual", "daily"]'

  assert_eq "$(metric_value 'allowance_reservations_total{outcome="allowed"}')" $((allowed + 1)) "allowed"
  assert_eq "$(metric_value 'allowance_reservations_total{outcome="denied"}')" $((denied + 1)) "denied"
  assert_eq "$(metric_value 'allowance_reservations_total{outcome="replayed"}')" $((replayed + 1)) "replayed"
  assert_eq "$(metric_value 'allowance_reservations_exceeded_total{window="annual"}')" $((exceeded + 1)) "exceeded annual"
}

@test "metrics: commits count late ones apart, and amounts are summed per unit" {
  local unit="e2e-unit-${E2E_RUN_ID:-x}"
  local late
  late=$(metric_value 'allowance_commits_total{late="true"}')
  run -0 allowance reserve --key "$KEY" --unit "$unit" --tx "$TX-1" --amount 30 --ttl 1s
  run -0 allowance reserve --key "$KEY" --unit "$unit" --tx "$TX-2" --amount 12 --commit
  wait_until 10 tx_state_is "$TX-1" expired
  run -0 allowance commit --tx "$TX-1" --amount 20 --json
  assert_json '.committed_late == true'
  assert_eq "$(metric_value 'allowance_commits_total{late="true"}')" $((late + 1)) "late commits"
  assert_eq "$(metric_value "allowance_amount_reserved_total{unit=\"$unit\"}")" 42 "amount reserved in $unit"
  assert_eq "$(metric_value "allowance_amount_committed_total{unit=\"$unit\"}")" 32 "amount committed in $unit"
}

@test "metrics: gRPC latency is a histogram by method and status code" {
  run -1 allowance reverse --tx "$TX-unknown"
  run -0 allowance limits get --key "$KEY"
  local text
  text=$(metrics_text)
  grep -Eq '^allowance_grpc_request_duration_seconds_count\{method="Reverse",code="NOT_FOUND"\} [1-9]' <<<"$text" \
    || fail "no Reverse/NOT_FOUND count" "$(grep duration_seconds_count <<<"$text")"
  grep -Eq '^allowance_grpc_request_duration_seconds_bucket\{method="GetLimits",code="OK",le="0.05"\} [1-9]' <<<"$text" \
    || fail "no GetLimits/OK bucket at le=0.05" "$(grep 'GetLimits' <<<"$text")"
  grep -Eq '^allowance_grpc_request_duration_seconds_bucket\{method="GetLimits",code="OK",le="\+Inf"\} [1-9]' <<<"$text" \
    || fail "no +Inf bucket"
}

@test "metrics: no key or transaction id appears as a label" {
  # Distinctive ids, used on every path: allowed, denied, replayed, committed, reversed, errors.
  KEY="secret-key-$RANDOM$RANDOM-${E2E_RUN_ID:-x}"
  TX="secret-tx-$RANDOM$RANDOM-${E2E_RUN_ID:-x}"
  KEY2="other-$KEY"
  traffic
  local text labels bad=()
  text=$(metrics_text)
  assert_not_contains "$text" "secret-key-"
  assert_not_contains "$text" "secret-tx-"
  assert_not_contains "$text" "key_id"
  assert_not_contains "$text" "transaction_id"
  labels=$(grep -v '^#' <<<"$text" | grep -o '[{,][a-z_]*=' | tr -d '{,=' | sort -u)
  local l
  for l in $labels; do [[ "$ALLOWED_LABELS" == *" $l "* ]] || bad+=("$l"); done
  [ ${#bad[@]} -eq 0 ] || fail "unexpected label names: ${bad[*]}"
}

@test "metrics: ready is 1 while serving and build_info carries the version" {
  assert_eq "$(metric_value allowance_ready)" 1 "allowance_ready"
  local version
  version=$(allowance --version | awk '{print $2}')
  assert_eq "$(metric_value "allowance_build_info{version=\"$version\"}")" 1 "allowance_build_info"
  assert_eq "$(metric_value allowance_db_pool_max_connections)" 16 "pool size (the default)"
}

@test "metrics: counters and gauges are listed from start-up, at zero, before any traffic" {
  # Histograms (latency, batch size) appear with their first observation, and the per-unit amounts with their
  # first unit; every other series, with each label value it can take, is there from the first scrape so that
  # rate() and alerts see its first increments.
  start_instance fresh-metrics
  local url="http://127.0.0.1:$INSTANCE_METRICS_PORT/metrics" text
  wait_until 30 bash -c "curl -sf '$url' | grep -q '^allowance_ready 1'"
  text=$(metrics_text "$url")
  assert_lists_metrics "$text" allowance_reservations_total allowance_reservations_exceeded_total \
    allowance_commits_total allowance_reverses_total allowance_holds_expired_total allowance_db_errors_total \
    allowance_open_holds allowance_db_pool_connections allowance_db_pool_max_connections \
    allowance_db_pool_waiting allowance_ready allowance_build_info allowance_reconcile_runs_total \
    allowance_history_partitions_created_total allowance_history_partitions_dropped_total
  local series missing=()
  for series in \
    'allowance_reservations_total{outcome="allowed"} 0' \
    'allowance_reservations_total{outcome="denied"} 0' \
    'allowance_reservations_total{outcome="replayed"} 0' \
    'allowance_reservations_exceeded_total{window="daily"} 0' \
    'allowance_reservations_exceeded_total{window="weekly"} 0' \
    'allowance_reservations_exceeded_total{window="monthly"} 0' \
    'allowance_reservations_exceeded_total{window="annual"} 0' \
    'allowance_commits_total{late="false"} 0' \
    'allowance_commits_total{late="true"} 0' \
    'allowance_reverses_total{from="held"} 0' \
    'allowance_reverses_total{from="committed"} 0' \
    'allowance_holds_expired_total 0' \
    'allowance_db_errors_total{kind="unavailable"} 0' \
    'allowance_db_errors_total{kind="contended"} 0' \
    'allowance_db_errors_total{kind="corrupt"} 0' \
    'allowance_db_errors_total{kind="export"} 0' \
    'allowance_reconcile_runs_total{result="error"} 0'; do
    grep -qxF "$series" <<<"$text" || missing+=("$series")
  done
  [ ${#missing[@]} -eq 0 ] || fail "series not listed at zero:" "${missing[@]}" "metrics: $text"
}
