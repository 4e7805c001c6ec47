# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Limits over the rolling windows, as a payment backend sees them through the CLI.

setup() {
  load helpers
  new_ids
}

@test "limits: a multi-window walk denies on the exceeded window and keeps tracking after limits are removed" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 100 --json
  assert_json '.window == "daily" and .limit == 100 and .spent == 0 and .held == 0 and .remaining == 100'
  run -0 allowance limits set --key "$KEY" --window weekly --limit 150 --json
  assert_json '.window == "weekly" and .limit == 150 and .remaining == 150'
  run -0 allowance limits set --key "$KEY" --window monthly --limit 200 --json
  assert_json '.window == "monthly" and .limit == 200 and .remaining == 200'

  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 60 --commit --json
  assert_json '.allowed == true and .exceeded == [] and .transaction.state == "committed"'
  assert_usage "$KEY" daily limit=100 spent=60 held=0 remaining=40

  # Daily is the tightest: 60 + 50 > 100, while weekly (150) and monthly (200) would allow it.
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 50 --json
  assert_json '.allowed == false and .exceeded == ["daily"] and .transaction == null'
  assert_json '[.usage[].window] == ["daily", "weekly", "monthly"]'
  # A denial records nothing.
  run --separate-stderr allowance tx get --tx "$TX-2"
  assert_grpc_error NOT_FOUND

  # Exactly reaching a limit is allowed.
  run -0 allowance reserve --key "$KEY" --tx "$TX-3" --amount 40 --commit
  assert_usage "$KEY" daily spent=100 remaining=0
  assert_usage "$KEY" weekly spent=100 remaining=50
  assert_usage "$KEY" monthly spent=100 remaining=100

  # With daily raised, weekly is the one exceeded: 100 + 60 > 150, monthly 160 <= 200.
  run -0 allowance limits set --key "$KEY" --window daily --limit 1000
  run -3 allowance reserve --key "$KEY" --tx "$TX-4" --amount 60 --json
  assert_json '.exceeded == ["weekly"]'
  # Over weekly and monthly at once: both are named, daily is not.
  run -3 allowance reserve --key "$KEY" --tx "$TX-5" --amount 120 --json
  assert_json '(.exceeded | sort) == ["monthly", "weekly"]'
  run -3 allowance reserve --key "$KEY" --tx "$TX-5" --amount 120
  assert_eq "${lines[0]}" "denied: exceeds weekly, monthly" "table output"

  # Without limits the key is unlimited, and its spending is still recorded.
  for w in daily weekly monthly; do
    run -0 allowance limits remove --key "$KEY" --window "$w" --json
    assert_json '.limit == null and .remaining == null and .spent == 100'
  done
  run -0 allowance reserve --key "$KEY" --tx "$TX-6" --amount 500 --commit --json
  assert_json '.allowed == true and .usage == []'
  for w in daily weekly monthly annual; do
    assert_usage "$KEY" "$w" limit=null spent=600 held=0 remaining=null
  done

  # A limit set later sees the spending made while there was none.
  run -0 allowance limits set --key "$KEY" --window daily --limit 700 --json
  assert_json '.spent == 600 and .remaining == 100'
  run -3 allowance reserve --key "$KEY" --tx "$TX-7" --amount 101 --json
  assert_json '.exceeded == ["daily"]'
  run -0 allowance reserve --key "$KEY" --tx "$TX-8" --amount 100
}

@test "limits: limits get reports all four windows, with or without a limit" {
  run -0 allowance limits set --key "$KEY" --window annual --limit 5000
  run -0 allowance limits get --key "$KEY" --json
  assert_json --arg k "$KEY" '.key_id == $k and .unit == "default"'
  assert_json '[.usage[].window] == ["daily", "weekly", "monthly", "annual"]'
  assert_json '.usage[3] == {"window": "annual", "limit": 5000, "spent": 0, "held": 0, "remaining": 5000}'
  assert_json '[.usage[0:3][] | .limit, .remaining] | all(. == null)'
}

@test "limits: an unknown key needs no registration and is unlimited" {
  run -0 allowance limits get --key "$KEY" --json
  assert_json '[.usage[] | .limit == null and .spent == 0 and .held == 0] | all'
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 9000000000000 --commit
  assert_usage "$KEY" annual spent=9000000000000
}

@test "limits: a limit of zero blocks all spending" {
  run -0 allowance limits set --key "$KEY" --window weekly --limit 0
  run -3 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --json
  assert_json '.exceeded == ["weekly"]'
  assert_usage "$KEY" weekly limit=0 spent=0 held=0 remaining=0
}

@test "limits: lowering a limit below what is already spent leaves remaining at 0" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 80 --commit
  run -0 allowance limits set --key "$KEY" --window daily --limit 50 --json
  assert_json '.limit == 50 and .spent == 80 and .remaining == 0'
  run -3 allowance reserve --key "$KEY" --tx "$TX-2" --amount 1
  # Replacing a limit is just setting it again.
  run -0 allowance limits set --key "$KEY" --window daily --limit 81 --json
  assert_json '.remaining == 1'
  run -0 allowance reserve --key "$KEY" --tx "$TX-3" --amount 1
}

@test "limits: spending on one key does not touch another key's usage" {
  for k in "$KEY" "$KEY2"; do
    run -0 allowance limits set --key "$k" --window daily --limit 100
  done
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 70 --commit
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 30
  assert_usage "$KEY" daily spent=70 held=30 remaining=0
  assert_usage "$KEY2" daily spent=0 held=0 remaining=100
  for w in weekly monthly annual; do assert_usage "$KEY2" "$w" spent=0 held=0; done

  run -3 allowance reserve --key "$KEY" --tx "$TX-3" --amount 1
  run -0 allowance reserve --key "$KEY2" --tx "$TX-4" --amount 100 --commit
  assert_usage "$KEY" daily spent=70 held=30
  assert_usage "$KEY2" daily spent=100 held=0 remaining=0
  run -0 allowance tx list --key "$KEY2" --json
  assert_json --arg t "$TX-4" '[.transactions[].transaction_id] == [$t]'
}

@test "limits: units are separate ledgers of the same key" {
  run -0 allowance limits set --key "$KEY" --unit usd --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --unit usd --tx "$TX-1" --amount 100 --commit
  run -3 allowance reserve --key "$KEY" --unit usd --tx "$TX-2" --amount 1
  run -0 allowance reserve --key "$KEY" --unit eur --tx "$TX-3" --amount 100 --commit --json
  assert_json '.transaction.unit == "eur"'
  UNIT=usd assert_usage "$KEY" daily limit=100 spent=100
  UNIT=eur assert_usage "$KEY" daily limit=null spent=100
  # An empty unit is the server's default unit, another ledger again.
  assert_usage "$KEY" daily limit=null spent=0
  run -0 allowance limits get --key "$KEY" --json
  assert_json '.unit == "default"'
}
