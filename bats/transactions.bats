# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Reading transactions back: tx get and tx list (newest first, paged).

setup() {
  load helpers
  new_ids
}

# Five committed transactions TX-1 .. TX-5 on KEY, made in that order.
five_transactions() {
  local i
  for i in 1 2 3 4 5; do
    run -0 allowance reserve --key "$KEY" --tx "$TX-$i" --amount "$i" --commit
  done
}

@test "transactions: tx list shows a key's transactions newest first" {
  five_transactions
  run -0 allowance tx list --key "$KEY" --json
  assert_json --arg t "$TX" '[.transactions[].transaction_id] == [5, 4, 3, 2, 1 | "\($t)-\(.)"]'
  assert_json '[.transactions[].created_at] as $c | $c == ($c | sort | reverse)'
  assert_json '.next_page_token == ""'
}

@test "transactions: tx list pages with --page-size and --page-token" {
  five_transactions
  run -0 allowance tx list --key "$KEY" --page-size 2 --json
  assert_json --arg t "$TX" '[.transactions[].transaction_id] == ["\($t)-5", "\($t)-4"]'
  local token
  token=$(jqo .next_page_token)
  [ -n "$token" ] || fail "expected a next_page_token"

  run -0 allowance tx list --key "$KEY" --page-size 2 --page-token "$token" --json
  assert_json --arg t "$TX" '[.transactions[].transaction_id] == ["\($t)-3", "\($t)-2"]'
  token=$(jqo .next_page_token)
  [ -n "$token" ] || fail "expected a next_page_token"

  # A transaction made meanwhile is newer than the cursor: it does not shift the pages being read.
  run -0 allowance reserve --key "$KEY" --tx "$TX-6" --amount 6
  run -0 allowance tx list --key "$KEY" --page-size 2 --page-token "$token" --json
  assert_json --arg t "$TX" '[.transactions[].transaction_id] == ["\($t)-1"]'
  assert_json '.next_page_token == ""'

  # The table says how to get the next page.
  run -0 allowance tx list --key "$KEY" --page-size 3
  assert_eq "${#lines[@]}" 5 "lines (header, 3 rows, next page)"
  assert_matches "${lines[4]}" "^next page: --page-token [^ ]+$"
}

@test "transactions: paging through every page returns each transaction exactly once" {
  five_transactions
  local token="" pages=0 ids=()
  while :; do
    run -0 allowance tx list --key "$KEY" --page-size 1 --page-token "$token" --json
    mapfile -t -O "${#ids[@]}" ids < <(jqo '.transactions[].transaction_id')
    token=$(jqo .next_page_token)
    pages=$((pages + 1))
    [ -n "$token" ] || break
    [ "$pages" -le 6 ] || fail "more pages than transactions: ${ids[*]}"
  done
  assert_eq "${ids[*]}" "$TX-5 $TX-4 $TX-3 $TX-2 $TX-1" "ids over all pages"
}

@test "transactions: tx list shows only the key's transactions in the unit asked for" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1
  run -0 allowance reserve --key "$KEY2" --tx "$TX-2" --amount 1
  run -0 allowance reserve --key "$KEY" --unit usd --tx "$TX-3" --amount 1
  run -0 allowance tx list --key "$KEY" --json
  assert_json --arg t "$TX-1" '[.transactions[].transaction_id] == [$t]'
  run -0 allowance tx list --key "$KEY" --unit usd --json
  assert_json --arg t "$TX-3" '[.transactions[].transaction_id] == [$t]'
  run -0 allowance tx list --key "$KEY3" --json
  assert_json '.transactions == [] and .next_page_token == ""'
  # The table of an empty list is just its header.
  run -0 allowance tx list --key "$KEY3"
  assert_eq "${#lines[@]}" 1 "lines"
}

@test "transactions: tx list includes every state: held, committed, reversed, expired" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --ttl 1s
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 2
  run -0 allowance reserve --key "$KEY" --tx "$TX-3" --amount 3 --commit
  run -0 allowance reserve --key "$KEY" --tx "$TX-4" --amount 4
  run -0 allowance reverse --tx "$TX-4"
  wait_until 10 tx_state_is "$TX-1" expired
  run -0 allowance tx list --key "$KEY" --json
  assert_json '[.transactions[].state] == ["reversed", "committed", "held", "expired"]'
}

@test "transactions: tx get returns the metadata given at reservation" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 7 --meta order=981 --meta "channel=web shop" --meta empty=
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json '.metadata == {"order": "981", "channel": "web shop", "empty": ""}'
  assert_json --arg k "$KEY" --arg t "$TX-1" '.transaction_id == $t and .key_id == $k and .unit == "default"'
}
