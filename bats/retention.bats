# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# `allowance partitions …` and `allowance retention run` against the suite's database, and a real drop with
# export on a database of the test's own (the suite's history is all recent: nothing in it is old enough).

setup() {
  load helpers
  new_ids
  OWN_DB=""
}

teardown() {
  if [ -n "$OWN_DB" ]; then
    psql "${DATABASE_URL%/*}/postgres" -qc "DROP DATABASE IF EXISTS \"$OWN_DB\" WITH (FORCE)" >/dev/null
  fi
}

@test "partitions: list shows the monthly partitions ahead and the default; create is idempotent" {
  run -0 allowance partitions create --ahead 4 --json
  run -0 allowance partitions create --ahead 4
  assert_eq "$output" "every partition needed already exists"
  run -0 allowance partitions list --json
  local month
  month=$(date -u -d "$(date -u +%Y-%m-01) +4 month" +%Y%m)
  assert_json --arg m "transactions_$month" '[.[] | select(.name == $m and .detached == false)] | length == 1'
  assert_json '[.[] | select(.default)] | length == 1 and .[0].name == "transactions_default"'
  run -0 allowance partitions list
  assert_matches "$output" "^NAME +FROM +TO +ROWS"
  assert_contains "$output" "transactions_default"
}

@test "retention: a dry run drops nothing; a retention below the floor is refused, naming the floor" {
  run -0 allowance retention run --dry-run --json
  assert_json '.dry_run == true and .dropped == [] and .retention == "430d"'
  local floor
  floor=$(jqo .floor)
  run -1 --separate-stderr allowance retention run --retention 1d
  assert_contains "$stderr" "1d is below the floor of $floor"
  run -2 --separate-stderr allowance retention run --retention 1x
  assert_contains "$stderr" "--retention"
  : >"$BATS_TEST_TMPDIR/file"
  run -1 --separate-stderr allowance retention run --dry-run --export-dir "$BATS_TEST_TMPDIR/file"
  assert_contains "$stderr" "cannot use it as a directory"
  run -0 allowance retention run --dry-run --export-dir "$BATS_TEST_TMPDIR/missing"
  [ ! -e "$BATS_TEST_TMPDIR/missing" ] || fail "a dry run made the export directory"
}

@test "retention: an old partition is exported to CSV, then dropped; an open hold keeps its partition" {
  OWN_DB="ret-${E2E_RUN_ID:-$$}"
  local url="${DATABASE_URL%/*}/$OWN_DB" dir="$BATS_TEST_TMPDIR/export"
  psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$OWN_DB\"" >/dev/null
  run -0 allowance migrate --database-url "$url"
  # History from 2020: replace the (empty) first partition by two old months, one with an open hold.
  psql "$url" -qtA -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
    ALTER TABLE transactions DETACH PARTITION transactions_legacy;
    DROP TABLE transactions_legacy;
    CREATE TABLE transactions_202001 PARTITION OF transactions FOR VALUES FROM ('2020-01-01') TO ('2020-02-01');
    CREATE TABLE transactions_202002 PARTITION OF transactions FOR VALUES FROM ('2020-02-01') TO ('2020-03-01');
    INSERT INTO accounts (key_id, unit) VALUES ('old-key', 'usd');
    INSERT INTO transactions (transaction_id, account_id, amount, held_amount, state, created_at, committed_at)
      SELECT 'old-' || g, (SELECT id FROM accounts), 5, 5, 2, '2020-01-15', '2020-01-15' FROM generate_series(1, 3) g;
    INSERT INTO transactions (transaction_id, account_id, amount, held_amount, state, created_at, expires_at)
      VALUES ('held', (SELECT id FROM accounts), 7, 7, 1, '2020-02-15', 'infinity');
SQL
  run -0 allowance retention run --dry-run --database-url "$url" --json
  assert_json '[.dropped[].name] == ["transactions_202001", "transactions_202002"]'
  run -0 allowance partitions list --database-url "$url" --json
  assert_json '[.[] | select(.name == "transactions_202001")] | length == 1'

  run -0 --separate-stderr allowance retention run --database-url "$url" --export-dir "$dir" --json
  assert_json '.dry_run == false and [.dropped[] | {name, rows}] == [{"name": "transactions_202001", "rows": 3}]'
  assert_json '.kept | length == 1 and .[0].name == "transactions_202002"'
  assert_contains "$stderr" "kept an old partition: it has open holds"
  assert_eq "$(wc -l <"$dir/transactions_202001.csv")" 4 "CSV lines (a header and 3 rows)"
  assert_eq "$(head -n 1 "$dir/transactions_202001.csv" | cut -d, -f1)" transaction_id
  [ ! -e "$dir/transactions_202001.csv.partial" ] || fail "a .partial file was left behind"
  run -0 allowance partitions list --database-url "$url" --json
  assert_json '[.[] | select(.name == "transactions_202001")] == []'
  assert_eq "$(psql "$url" -qtAc "SELECT count(*) FROM transactions WHERE transaction_id LIKE 'old-%'")" 0
  assert_eq "$(psql "$url" -qtAc "SELECT state FROM transactions WHERE transaction_id = 'held'")" 1
}
