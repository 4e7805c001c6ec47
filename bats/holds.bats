# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# The life of a hold: reserve, then commit (possibly for less, possibly late), reverse, or let it expire.

setup() {
  load helpers
  new_ids
}

# Seconds between two RFC 3339 times of the last `run`'s JSON, ignoring fractions: secs_between FROM TO
secs_between() {
  jqo "(.$2 | sub(\"\\\\.[0-9]+Z$\"; \"Z\") | fromdateiso8601) - (.$1 | sub(\"\\\\.[0-9]+Z$\"; \"Z\") | fromdateiso8601)"
}

@test "holds: a hold counts until reversed, and reversing it restores the capacity" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 70 --json
  assert_json '.transaction.state == "held" and .transaction.amount == 70 and .transaction.held_amount == 70'
  assert_json '.usage == [{"window": "daily", "limit": 100, "spent": 0, "held": 70, "remaining": 30}]'
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 50

  run -0 allowance reverse --tx "$TX-1" --json
  assert_json '.state == "reversed" and .reversed_at != null and .committed_at == null'
  assert_usage "$KEY" daily spent=0 held=0 remaining=100
  # The denied id recorded nothing, so it can be retried now that there is room.
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 50
  assert_usage "$KEY" daily spent=0 held=50 remaining=50

  # Reversing again is idempotent and changes nothing.
  run -0 allowance reverse --tx "$TX-1" --json
  assert_json '.state == "reversed"'
  assert_usage "$KEY" daily held=50 remaining=50
  # A reversed hold cannot be committed any more.
  run --separate-stderr allowance commit --tx "$TX-1"
  assert_grpc_error FAILED_PRECONDITION
  assert_usage "$KEY" daily spent=0 held=50
}

@test "holds: a hold expires after its ttl and the capacity comes back" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 80 --ttl 1s --json
  assert_json '.transaction.state == "held" and .transaction.expires_at != null'
  assert_eq "$(secs_between transaction.created_at transaction.expires_at)" 1 "expires_at - created_at"
  assert_usage "$KEY" daily held=80 remaining=20
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 80

  wait_until 10 tx_state_is "$TX-1" expired
  assert_usage "$KEY" daily spent=0 held=0 remaining=100
  for w in weekly monthly annual; do assert_usage "$KEY" "$w" spent=0 held=0; done
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json '.state == "expired" and .amount == 80 and .held_amount == 80 and .committed_at == null'
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 80
  assert_usage "$KEY" daily held=80 remaining=20
}

@test "holds: without --ttl a hold lasts the server's default of 15 minutes" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 5 --json
  assert_eq "$(secs_between transaction.created_at transaction.expires_at)" 900 "expires_at - created_at"
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 5 --ttl 2h --json
  assert_eq "$(secs_between transaction.created_at transaction.expires_at)" 7200 "expires_at - created_at"
}

@test "holds: a partial commit spends the final amount and releases the rest, idempotently" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 500
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 100
  assert_usage "$KEY" daily spent=0 held=100 remaining=400

  run -0 allowance commit --tx "$TX-1" --amount 60 --json
  assert_json '.state == "committed" and .amount == 60 and .held_amount == 100 and .committed_late == false'
  assert_json '.committed_at != null and .reversed_at == null'
  local committed_at
  committed_at=$(jqo .committed_at)
  assert_usage "$KEY" daily spent=60 held=0 remaining=440

  # The same commit again is idempotent: same answer, nothing counted twice.
  run -0 allowance commit --tx "$TX-1" --amount 60 --json
  assert_json --arg c "$committed_at" '.state == "committed" and .amount == 60 and .committed_at == $c'
  assert_usage "$KEY" daily spent=60 held=0 remaining=440

  # Another amount after the commit is refused.
  run --separate-stderr allowance commit --tx "$TX-1" --amount 50
  assert_grpc_error FAILED_PRECONDITION
  assert_contains "$stderr" "$TX-1"
  assert_usage "$KEY" daily spent=60 held=0 remaining=440
}

@test "holds: commit without --amount spends the whole hold" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 42
  run -0 allowance commit --tx "$TX-1" --json
  assert_json '.state == "committed" and .amount == 42 and .held_amount == 42'
  assert_usage "$KEY" daily spent=42 held=0
}

@test "holds: committing more than was held is FAILED_PRECONDITION and keeps the hold" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 100
  run --separate-stderr allowance commit --tx "$TX-1" --amount 101
  assert_grpc_error FAILED_PRECONDITION
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json '.state == "held" and .amount == 100'
  assert_usage "$KEY" daily spent=0 held=100
}

@test "holds: committing an expired hold records the spend late" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 80 --ttl 1s
  wait_until 10 tx_state_is "$TX-1" expired
  # The capacity came back, and another hold takes it.
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 80
  assert_usage "$KEY" daily spent=0 held=80 remaining=20

  run -0 allowance commit --tx "$TX-1" --json
  assert_json '.state == "committed" and .committed_late == true and .amount == 80'
  # The settled transfer happened: it is recorded even though it takes the key over its limit.
  assert_usage "$KEY" daily spent=80 held=80 remaining=0
  run -0 allowance tx get --tx "$TX-1"
  assert_matches "${lines[1]}" "committed \(late\)"
  # Committing it again is idempotent.
  run -0 allowance commit --tx "$TX-1" --json
  assert_json '.committed_late == true and .amount == 80'
  assert_usage "$KEY" daily spent=80 held=80
}

@test "holds: reversing a committed spend refunds it in every window" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance limits set --key "$KEY" --window monthly --limit 1000
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 100 --commit --json
  assert_json '.transaction.state == "committed" and .transaction.committed_at != null and .transaction.expires_at == null'
  for w in daily weekly monthly annual; do assert_usage "$KEY" "$w" spent=100 held=0; done
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 1

  run -0 allowance reverse --tx "$TX-1" --json
  assert_json '.state == "reversed" and .reversed_at != null'
  for w in daily weekly monthly annual; do assert_usage "$KEY" "$w" spent=0 held=0; done
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 100 --commit
  # Nothing is ever deleted: the refunded transaction is still listed.
  run -0 allowance tx list --key "$KEY" --json
  assert_json --arg a "$TX-1" --arg b "$TX-2" '[.transactions[] | [.transaction_id, .state]] == [[$b, "committed"], [$a, "reversed"]]'
}

@test "holds: an expired hold can be reversed, and then it cannot be committed" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 10 --ttl 1s
  wait_until 10 tx_state_is "$TX-1" expired
  run -0 allowance reverse --tx "$TX-1" --json
  assert_json '.state == "reversed"'
  run --separate-stderr allowance commit --tx "$TX-1"
  assert_grpc_error FAILED_PRECONDITION
  assert_usage "$KEY" daily spent=0 held=0
}
