# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Retries: a payment backend that times out retries with the same transaction id, and must never be charged
# twice.

setup() {
  load helpers
  new_ids
}

@test "idempotency: retrying a reservation returns the same transaction and holds once" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60 --json
  local first
  first=$(jqo -c .transaction)
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60 --json
  assert_json '.allowed == true'
  assert_eq "$(jqo -c .transaction)" "$first" "the retried reservation's transaction"
  # 60 + 60 would exceed the limit: a second hold would have been denied. Held once:
  assert_usage "$KEY" daily spent=0 held=60 remaining=40
  run -0 allowance tx list --key "$KEY" --json
  assert_json '.transactions | length == 1'
}

@test "idempotency: retrying a reservation after its commit returns the committed transaction" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60
  run -0 allowance commit --tx "$TX-1" --amount 50
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60 --json
  assert_json '.allowed == true and .transaction.state == "committed" and .transaction.amount == 50'
  assert_usage "$KEY" daily spent=50 held=0
}

@test "idempotency: retrying a reservation made with --commit spends once" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 25 --commit
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 25 --commit --json
  assert_json '.transaction.state == "committed" and .transaction.amount == 25'
  assert_usage "$KEY" daily spent=25 held=0
}

@test "idempotency: a retry asking to commit at once is not answered with a hold; the same keys in another order are a retry" {
  run -0 allowance limits set --key "$KEY2" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-1" --amount 25
  run --separate-stderr allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-1" --amount 25 --commit
  assert_grpc_error ALREADY_EXISTS
  assert_contains "$stderr" "not committed at once"
  run -0 allowance reserve --key "$KEY2" --also-key "$KEY" --tx "$TX-1" --amount 25 --json
  assert_json '.allowed and .transaction.state == "held"'
  assert_usage "$KEY" daily held=25
  assert_usage "$KEY2" daily held=25
}

@test "idempotency: the same transaction id with another amount is ALREADY_EXISTS" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60
  run --separate-stderr allowance reserve --key "$KEY" --tx "$TX-1" --amount 61
  assert_grpc_error ALREADY_EXISTS
  assert_contains "$stderr" "$TX-1"
  assert_usage "$KEY" daily held=60
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json '.amount == 60 and .state == "held"'
}

@test "idempotency: the same transaction id on another key is ALREADY_EXISTS and touches neither key" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60
  run --separate-stderr allowance reserve --key "$KEY2" --tx "$TX-1" --amount 60
  assert_grpc_error ALREADY_EXISTS
  assert_usage "$KEY" daily held=60
  assert_usage "$KEY2" daily spent=0 held=0
  run -0 allowance tx list --key "$KEY2" --json
  assert_json '.transactions == []'
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json --arg k "$KEY" '.key_id == $k'
}

@test "idempotency: the same transaction id in another unit is ALREADY_EXISTS" {
  run -0 allowance reserve --key "$KEY" --unit usd --tx "$TX-1" --amount 60
  run --separate-stderr allowance reserve --key "$KEY" --unit eur --tx "$TX-1" --amount 60
  assert_grpc_error ALREADY_EXISTS
  UNIT=eur assert_usage "$KEY" daily held=0
}

@test "idempotency: transaction ids are unique across keys even after a reversal" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 5
  run -0 allowance reverse --tx "$TX-1"
  run --separate-stderr allowance reserve --key "$KEY2" --tx "$TX-1" --amount 5
  assert_grpc_error ALREADY_EXISTS
  # The original retry still answers with the reversed transaction, and does not hold again.
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 5 --json
  assert_json '.transaction.state == "reversed"'
  assert_usage "$KEY" daily held=0 spent=0
}
