# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# What the CLI prints: --json that parses and carries the documented fields, and tables with a header line.

setup() {
  load helpers
  new_ids
}

TX_FIELDS='["amount", "committed_at", "committed_late", "created_at", "expires_at", "held_amount", "key_id", "key_ids", "metadata", "reversed_at", "state", "transaction_id", "unit"]'
USAGE_FIELDS='["held", "limit", "remaining", "spent", "window"]'
LIMIT_USAGE_FIELDS='["held", "key_id", "limit", "name", "period", "period_start", "remaining", "resets_at", "source", "spent"]'
RFC3339='^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$'

@test "output: reserve --json has allowed, exceeded, usage and transaction" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 10
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 4 --meta order=1 --json
  assert_json '(keys | sort) == ["allowed", "exceeded", "exceeded_limits", "limits", "retry_after", "retry_after_seconds", "transaction", "usage"]'
  assert_json '.exceeded_limits == [] and .retry_after == null and .retry_after_seconds == null'
  assert_json --argjson f "$LIMIT_USAGE_FIELDS" '.limits | length == 1 and ((.[0] | keys | sort) == $f)'
  assert_json --arg k "$KEY" '.limits[0] | .key_id == $k and .name == "daily" and .limit == 10 and .held == 4
    and .remaining == 6 and .source == "key" and .period == {"kind": "rolling", "seconds": 86400}'
  assert_json --arg k "$KEY" '.transaction.key_ids == [$k]'
  assert_json --argjson f "$TX_FIELDS" '(.transaction | keys | sort) == $f'
  assert_json --argjson f "$USAGE_FIELDS" '.usage | length == 1 and ((.[0] | keys | sort) == $f)'
  assert_json --arg k "$KEY" --arg t "$TX-1" '.transaction | .transaction_id == $t and .key_id == $k and .unit == "default"
    and .amount == 4 and .held_amount == 4 and .state == "held" and .committed_late == false
    and .committed_at == null and .reversed_at == null and .metadata == {"order": "1"}'
  assert_json --arg re "$RFC3339" '.transaction | (.created_at | test($re)) and (.expires_at | test($re))'
  # Amounts are JSON numbers, not strings.
  assert_json '[.usage[0][] | select(type != "string")] | all(type == "number")'
}

@test "output: tx get --json has every transaction field with RFC 3339 UTC times" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 9
  run -0 allowance commit --tx "$TX-1" --amount 8
  run -0 allowance reverse --tx "$TX-1" --json
  assert_json --argjson f "$TX_FIELDS" '(keys | sort) == $f'
  assert_json --arg re "$RFC3339" '[.created_at, .expires_at, .committed_at, .reversed_at] | all(test($re))'
  assert_json '.created_at <= .committed_at and .committed_at <= .reversed_at'
  assert_json '.state == "reversed" and .amount == 8 and .held_amount == 9'
}

@test "output: limits get, set and remove --json carry key, unit and the usage fields" {
  run -0 allowance limits get --key "$KEY" --unit usd --json
  assert_json '(keys | sort) == ["key_id", "key_limits", "limits", "plan", "unit", "usage"]'
  assert_json '.limits == [] and .key_limits == [] and .plan == null'
  assert_json --arg k "$KEY" '.key_id == $k and .unit == "usd" and (.usage | length == 4)'
  assert_json --argjson f "$USAGE_FIELDS" '[.usage[] | keys | sort == $f] | all'
  run -0 allowance limits set --key "$KEY" --window weekly --limit 3 --json
  assert_json '. == {"window": "weekly", "limit": 3, "spent": 0, "held": 0, "remaining": 3}'
  run -0 allowance limits remove --key "$KEY" --window weekly --json
  assert_json '. == {"window": "weekly", "limit": null, "spent": 0, "held": 0, "remaining": null}'
}

@test "output: tx list --json carries transactions and next_page_token" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1
  run -0 allowance tx list --key "$KEY" --json
  assert_json '(keys | sort) == ["next_page_token", "transactions"]'
  assert_json --argjson f "$TX_FIELDS" '[.transactions[] | keys | sort == $f] | all'
}

@test "output: health --json carries the status" {
  run -0 allowance health --json
  assert_json '. == {"status": "SERVING"}'
}

@test "output: tables start with a header line" {
  run -0 allowance limits set --key "$KEY" --window daily --limit 10
  assert_matches "${lines[0]}" "^WINDOW +LIMIT +SPENT +HELD +REMAINING$"
  assert_matches "${lines[1]}" "^daily +10 +0 +0 +10$"

  run -0 allowance limits get --key "$KEY"
  assert_eq "${lines[0]}" "key $KEY unit default"
  assert_matches "${lines[1]}" "^WINDOW +LIMIT +SPENT +HELD +REMAINING$"
  assert_matches "${lines[2]}" "^daily +10 +0 +0 +10$"
  assert_matches "${lines[3]}" "^weekly +- +0 +0 +-$"
  # Then the key's plan and every limit that applies to it (round-1 windows are rolling limits by name).
  assert_eq "${lines[6]}" "plan -"
  assert_matches "${lines[7]}" "^NAME +PERIOD +LIMIT +SPENT +HELD +REMAINING +SOURCE +RESETS_AT$"
  assert_matches "${lines[8]}" "^daily +rolling 1d +10 +0 +0 +10 +key +-$"
  assert_eq "${#lines[@]}" 9 "lines"
  # A key without limits or plan: the four windows only.
  run -0 allowance limits get --key "$KEY2"
  assert_eq "${#lines[@]}" 6 "lines"

  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 4
  assert_eq "${lines[0]}" allowed
  assert_matches "${lines[1]}" "^TRANSACTION +KEY +UNIT +AMOUNT +STATE +CREATED +EXPIRES$"
  assert_matches "${lines[2]}" "^$TX-1 +$KEY +default +4 +held "
  assert_matches "${lines[3]}" "^WINDOW +LIMIT +SPENT +HELD +REMAINING$"

  local cmd
  for cmd in "tx get --tx $TX-1" "commit --tx $TX-1" "reverse --tx $TX-1" "tx list --key $KEY"; do
    # shellcheck disable=SC2086 # word splitting wanted
    run -0 allowance $cmd
    assert_matches "${lines[0]}" "^TRANSACTION +KEY +UNIT +AMOUNT +STATE +CREATED +EXPIRES$"
    assert_matches "${lines[1]}" "^$TX-1 +$KEY +default +4 +"
  done
}
