# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Plans: named sets of limits per unit that keys are put on, managed with `allowance plans`.

setup() {
  load helpers
  new_ids
  # Plans are shared by every test of the run: one name per test.
  PLAN="plan-${KEY#key-}"
  PLAN2="plan2-${KEY#key-}"
}

@test "plans: put, get and list show a plan's limits by unit and name, and its key count" {
  run -0 allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:100 --limit usd:burst:rolling=1h:20 \
    --limit requests:monthly:calendar=month/Europe/Paris:1000 --json
  assert_json --arg p "$PLAN" '.name == $p and .key_count == 0'
  assert_json '[.limits[] | [.unit, .name, .limit]]
    == [["requests", "monthly", 1000], ["usd", "burst", 20], ["usd", "daily", 100]]'
  assert_json '.limits[0].period == {"kind": "calendar", "unit": "month", "count": 1,
    "anchor": "1999-12-31T23:00:00.000000Z", "time_zone": "Europe/Paris"}'
  assert_json '.limits[1].period == {"kind": "rolling", "seconds": 3600}'
  local put=$output

  run -0 allowance plans get --name "$PLAN" --json
  assert_eq "$(jq -S . <<<"$output")" "$(jq -S . <<<"$put")" "plans get --json"

  run -0 allowance plans get --name "$PLAN"
  assert_eq "${lines[0]}" "plan $PLAN keys 0"
  assert_matches "${lines[1]}" "^UNIT +NAME +PERIOD +LIMIT$"
  assert_matches "${lines[2]}" "^requests +monthly +calendar 1 month from 2000-01-01T00:00:00\+01:00 in Europe/Paris +1000$"
  assert_matches "${lines[3]}" "^usd +burst +rolling 1h +20$"
  assert_matches "${lines[4]}" "^usd +daily +rolling 1d +100$"
  assert_eq "${#lines[@]}" 5 "lines"

  run -0 allowance plans assign --key "$KEY" --plan "$PLAN" --json
  assert_json --arg k "$KEY" --arg p "$PLAN" '. == {"key_id": $k, "plan": $p}'
  run -0 allowance plans list --json
  assert_json --arg p "$PLAN" '[.plans[] | select(.name == $p) | [.key_count, (.limits | length)]] == [[1, 3]]'
  run -0 allowance plans list
  assert_matches "${lines[0]}" "^PLAN +KEYS +UNIT +NAME +PERIOD +LIMIT$"
  assert_contains "$output" "$PLAN"
  [ "$(grep -cE "^$PLAN +1 +" <<<"$output")" = 3 ] || fail "expected 3 rows of $PLAN with 1 key" "$output"
}

@test "plans: keys on a plan get its limits in its units, and see a replaced plan at once" {
  run -0 allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:100
  run -0 allowance plans assign --key "$KEY" --plan "$PLAN"
  run -0 allowance limits get --key "$KEY" --unit usd --json
  assert_json --arg p "$PLAN" '.plan == $p and .key_limits == []'
  assert_json '[.limits[] | [.name, .limit, .source]] == [["daily", 100, "plan"]]'
  # The plan's "daily" is the round-1 daily window too.
  assert_json '.usage[0] == {"window": "daily", "limit": 100, "spent": 0, "held": 0, "remaining": 100}'
  # Another unit of the same key: the plan has no limits there.
  run -0 allowance limits get --key "$KEY" --unit eur --json
  assert_json --arg p "$PLAN" '.plan == $p and .limits == []'

  run -0 allowance reserve --key "$KEY" --unit usd --tx "$TX-1" --amount 60 --commit
  run -0 allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:50 --json
  assert_json '.key_count == 1'
  run -3 allowance reserve --key "$KEY" --unit usd --tx "$TX-2" --amount 1 --json
  assert_json '[.exceeded_limits[] | [.name, .limit, .spent]] == [["daily", 50, 60]]'
  run -0 allowance reserve --key "$KEY" --unit eur --tx "$TX-3" --amount 1000 --commit

  # A key's own limit of the same name wins over the plan's.
  run -0 allowance limits set --key "$KEY" --unit usd --window daily --limit 200
  run -0 allowance limits get --key "$KEY" --unit usd --json
  assert_json '[.limits[] | [.name, .limit, .source]] == [["daily", 200, "key"]]'
  run -0 allowance reserve --key "$KEY" --unit usd --tx "$TX-4" --amount 1
}

@test "plans: a plan with keys on it cannot be deleted; once they are off it, it can" {
  run -0 allowance plans put --name "$PLAN" --limit daily:rolling=1d:10
  run -0 allowance plans assign --key "$KEY" --plan "$PLAN"
  run -0 allowance plans assign --key "$KEY2" --plan "$PLAN"

  run --separate-stderr allowance plans delete --name "$PLAN"
  assert_grpc_error FAILED_PRECONDITION
  assert_contains "$stderr" "2 key"
  run -0 allowance plans get --name "$PLAN" --json
  assert_json '.key_count == 2'

  # Moving a key to another plan, and taking one off any plan.
  run -0 allowance plans put --name "$PLAN2"
  run -0 allowance plans assign --key "$KEY" --plan "$PLAN2"
  run -0 allowance plans assign --key "$KEY2" --none --json
  assert_json --arg k "$KEY2" '. == {"key_id": $k, "plan": null}'
  run -0 allowance plans assign --key "$KEY2" --none
  assert_eq "$output" "key $KEY2 plan -"
  run -0 allowance limits get --key "$KEY2" --json
  assert_json '.plan == null and .limits == []'
  run -0 allowance reserve --key "$KEY2" --tx "$TX-1" --amount 1000

  run -0 allowance plans delete --name "$PLAN" --json
  assert_json --arg p "$PLAN" '. == {"name": $p, "deleted": true}'
  run --separate-stderr allowance plans get --name "$PLAN"
  assert_grpc_error NOT_FOUND
  assert_contains "$stderr" "$PLAN"
  run --separate-stderr allowance plans delete --name "$PLAN"
  assert_grpc_error NOT_FOUND
  run -0 allowance plans list --json
  assert_json --arg p "$PLAN" '[.plans[] | select(.name == $p)] == []'
  run --separate-stderr allowance plans delete --name "$PLAN2"
  assert_grpc_error FAILED_PRECONDITION
  assert_contains "$stderr" "1 key"
  run -0 allowance plans assign --key "$KEY" --none
  run -0 allowance plans delete --name "$PLAN2"
  assert_eq "$output" "deleted plan $PLAN2"
}

@test "plans: assigning a plan that does not exist is INVALID_ARGUMENT naming plan" {
  run --separate-stderr allowance plans assign --key "$KEY" --plan "$PLAN"
  assert_grpc_error INVALID_ARGUMENT "plan: "
  assert_contains "$stderr" "$PLAN"
  run -0 allowance limits get --key "$KEY" --json
  assert_json '.plan == null'
  # --plan and --none together, or neither, are bad usage.
  run -2 allowance plans assign --key "$KEY" --plan "$PLAN" --none
  run -2 allowance plans assign --key "$KEY"
  assert_contains "$output" "--none"
}

@test "plans: --limit specs carry calendar count, anchor and zone" {
  run -0 allowance plans put --name "$PLAN" --json \
    --limit usd:quarter:calendar=3months@2026-01-31T00:00:00Z/Europe/Paris:900 \
    --limit usd:fortnight:calendar=2weeks@2026-01-05/Europe/Paris:50 \
    --limit usd:week:calendar=week:10 \
    --limit hourly:rolling=90m:7
  assert_json '[.limits[] | [.unit, .name]]
    == [["default", "hourly"], ["usd", "fortnight"], ["usd", "quarter"], ["usd", "week"]]'
  assert_json '.limits[0].period == {"kind": "rolling", "seconds": 5400} and .limits[0].limit == 7'
  # A local date is read in the zone: midnight in Paris is 23:00 UTC the day before.
  assert_json '.limits[1].period == {"kind": "calendar", "unit": "week", "count": 2,
    "anchor": "2026-01-04T23:00:00.000000Z", "time_zone": "Europe/Paris"}'
  assert_json '.limits[2].period == {"kind": "calendar", "unit": "month", "count": 3,
    "anchor": "2026-01-31T00:00:00.000000Z", "time_zone": "Europe/Paris"}'
  # Weeks start on Monday by default.
  assert_json '.limits[3].period == {"kind": "calendar", "unit": "week", "count": 1,
    "anchor": "2000-01-03T00:00:00.000000Z", "time_zone": "UTC"}'
  run -0 allowance plans get --name "$PLAN"
  assert_matches "${lines[4]}" "^usd +quarter +calendar 3 months from 2026-01-31T01:00:00\+01:00 in Europe/Paris +900$"
}

@test "plans: bad plans are refused: bad usage (exit 2) or INVALID_ARGUMENT naming the field" {
  run -2 allowance plans put --name "$PLAN" --limit daily:100
  assert_contains "$output" "NAME:PERIOD:AMOUNT"
  run -2 allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:lots
  assert_contains "$output" "lots"
  run -2 allowance plans put --name "$PLAN" --limit usd:daily:calendar=fortnight:1
  assert_contains "$output" "fortnight"
  run -2 allowance plans put --name "$PLAN" --limit usd:daily:rolling=soon:1
  run -2 allowance plans put --limit usd:daily:rolling=1d:1
  run -2 allowance plans put --name "$PLAN" --limit usd:daily:calendar=0months:1
  assert_contains "$output" "at least 1"

  run --separate-stderr allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:1 \
    --limit usd:monthly:calendar=month/Mars/Olympus:5
  assert_grpc_error INVALID_ARGUMENT "limits[1].period.calendar.time_zone: "
  run --separate-stderr allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:-1
  assert_grpc_error INVALID_ARGUMENT "limits[0].amount: "
  run --separate-stderr allowance plans put --name "$PLAN" --limit usd:daily:rolling=1d:1 --limit usd:daily:rolling=2d:2
  assert_grpc_error INVALID_ARGUMENT
  assert_contains "$stderr" "daily"
  run --separate-stderr allowance plans put --name "not a name" --limit usd:daily:rolling=1d:1
  assert_grpc_error INVALID_ARGUMENT "name: "

  # None of them was created.
  run --separate-stderr allowance plans get --name "$PLAN"
  assert_grpc_error NOT_FOUND
}
