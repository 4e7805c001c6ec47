# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# `allowance reconcile` against the suite's database, and the periodic job of `allowance serve`.

setup() {
  load helpers
  new_ids
}

teardown() {
  stop_instance
}

# Sets one period's committed total of KEY by hand, as a bad migration or a hand edit would.
plant_divergence() { # key committed
  psql "$DATABASE_URL" -qtA -v ON_ERROR_STOP=1 -c "
    UPDATE accounts SET totals = (SELECT jsonb_agg(jsonb_set(e, '{c}', to_jsonb('$2'::text)))
                                  FROM jsonb_array_elements(totals) e)
    WHERE key_id = '$1'" >/dev/null
}

@test "reconcile: a consistent database reports nothing and exits 0" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 1000
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 300
  run -0 allowance commit --tx "$TX-1" --amount 250
  run -0 allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-2" --amount 40 --commit
  run -0 allowance reserve --key "$KEY" --tx "$TX-3" --amount 10
  run -0 allowance reverse --tx "$TX-3"
  # Everything every test before this one did, too.
  run -0 allowance reconcile --database-url "$DATABASE_URL"
  assert_matches "$output" "^checked [0-9]+ account\(s\): running totals equal the ledger, hold bookkeeping the rows$"
  run -0 allowance reconcile --json
  assert_json '.divergences == [] and .stale_holds == [] and .hold_bookkeeping == [] and .repaired == false
    and .accounts >= 2'
}

@test "reconcile: a planted divergence is found (exit 4), reported by the periodic job, and --repair fixes it" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 1000
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 300 --commit
  plant_divergence "$KEY" 900
  assert_usage "$KEY" daily spent=900 remaining=100 # what clients now see: wrong

  run -4 allowance reconcile
  assert_contains "$output" "diverged: key $KEY unit default period rolling 86400s: running committed 900 held 0"
  assert_contains "$output" "ledger committed 300 held 0"
  assert_contains "$output" "1 diverging period(s), not repaired"
  run -4 allowance reconcile --json
  assert_json --arg k "$KEY" '.divergences | length == 1 and .[0].key_id == $k and .[0].running.committed == "900"
    and .[0].ledger.committed == "300" and .[0].period == "rolling 86400s"'

  # The periodic job of a replica reports it (log and gauge) and repairs nothing.
  start_instance reconciler ALLOWANCE_RECONCILE_INTERVAL=300ms
  local metrics="http://127.0.0.1:$INSTANCE_METRICS_PORT/metrics"
  wait_until 30 grep -q "running totals diverge from the ledger" "$INSTANCE_LOG"
  assert_contains "$(grep "running totals diverge" "$INSTANCE_LOG")" "$KEY"
  wait_until 10 test "$(metric_value allowance_reconcile_divergences "$metrics")" -ge 1
  assert_usage "$KEY" daily spent=900
  stop_instance

  run -0 allowance reconcile --repair
  assert_contains "$output" "repaired: key $KEY unit default period rolling 86400s"
  assert_contains "$output" "1 diverging period(s) repaired"
  run -0 allowance reconcile
  assert_contains "$output" "running totals equal the ledger"
  assert_usage "$KEY" daily spent=300 remaining=700
  run -0 allowance audit list --key "$KEY" --json
  assert_json '[.events[] | select(.action == "totals.repair")] | length == 1'
}

@test "reconcile: a hold left behind its account's expiry cursor and a wrong open-hold count are found and repaired" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 1000
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 300
  run -0 allowance reserve --key "$KEY2" --tx "$TX-2" --amount 20
  # A hand edit (or a bug): the hold expires at the account's last write, which promises that every hold
  # expiring by then was released; and KEY2 counts two open holds too many.
  psql "$DATABASE_URL" -qtA -v ON_ERROR_STOP=1 -c "
    UPDATE transactions SET expires_at = (SELECT updated_at FROM accounts WHERE key_id = '$KEY')
    WHERE transaction_id = '$TX-1';
    UPDATE accounts SET open_holds = open_holds + 2 WHERE key_id = '$KEY2'" >/dev/null
  assert_usage "$KEY" daily held=300 # nothing would ever release it

  run -4 allowance reconcile
  assert_contains "$output" "diverged: key $KEY unit default period rolling 86400s: running committed 0 held 300"
  assert_contains "$output" "stale: key $KEY unit default hold $TX-1 of 300 expired"
  assert_contains "$output" "diverged: key $KEY2 unit default open holds counted 3, in the rows 1"
  assert_contains "$output" \
    "1 diverging period(s), 1 stale hold(s), 1 account(s) with diverging hold bookkeeping, not repaired"
  run -4 allowance reconcile --json
  assert_json --arg k "$KEY" --arg k2 "$KEY2" --arg t "$TX-1" '
    (.divergences | length == 1 and .[0].key_id == $k and .[0].running.held == "300" and .[0].ledger.held == "0")
    and (.stale_holds | length == 1 and .[0].key_id == $k and .[0].transaction_id == $t and .[0].amount == "300")
    and (.hold_bookkeeping | length == 1 and .[0].key_id == $k2 and .[0].open_holds == {counted: 3, rows: 1})'

  run -0 allowance reconcile --repair
  assert_contains "$output" \
    "1 diverging period(s), 1 stale hold(s), 1 account(s) with diverging hold bookkeeping repaired"
  run -0 allowance reconcile
  assert_usage "$KEY" daily held=0 remaining=1000
  run -0 psql "$DATABASE_URL" -qtA -c "SELECT string_agg(key_id || '=' || open_holds, ',' ORDER BY key_id)
                                       FROM accounts WHERE key_id IN ('$KEY', '$KEY2')"
  [ "$output" = "$KEY=0,$KEY2=1" ] || fail "open holds after the repair: $output"
  run -0 allowance audit list --key "$KEY2" --json
  assert_json '[.events[] | select(.action == "totals.repair" and .subject == "holds")] | length == 1'
}

@test "reconcile: an unreachable database is an error (exit 1), not a verdict" {
  local port
  port=$(free_port)
  run -1 --separate-stderr allowance reconcile --database-url "postgres://postgres@127.0.0.1:$port/nothing"
  assert_contains "$stderr" "error: connecting to the database"
}
