# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Limits as data through the CLI: named limits over rolling and calendar periods, denials with retry_after,
# "unlimited" overrides of a plan's limits, and reservations that charge several keys at once.

setup() {
  load helpers
  new_ids
  PLAN="plan-${KEY#key-}"
}

RFC3339='^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$'

# Seconds since the epoch of an RFC 3339 time as the CLI prints it (2026-01-31T23:00:00.000000Z).
epoch() { date -u -d "$(sed -E 's/\.[0-9]+Z$/Z/' <<<"$1")" +%s; }

# Local midnight of a date (YYYY-MM-DD) in a time zone, as the CLI prints UTC times. local_midnight ZONE DATE
local_midnight() { date -u -d "TZ=\"$1\" $2 00:00" +%Y-%m-%dT%H:%M:%S.000000Z; }

# The usage of one named limit from `limits get --json`: limit_usage KEY NAME [--unit U]
limit_usage() {
  local key=$1 name=$2
  shift 2
  allowance limits get --key "$key" "$@" --json | jq -c --arg n "$name" '.limits[] | select(.name == $n)'
}

@test "quotas: a named rolling limit is set, counted, listed and removed by name" {
  run -0 allowance limits set --key "$KEY" --name burst --rolling 1h --limit 50 --json
  assert_json --arg k "$KEY" '.key_id == $k and .name == "burst" and .limit == 50 and .spent == 0
    and .held == 0 and .remaining == 50 and .source == "key" and .resets_at == null'
  assert_json '.period == {"kind": "rolling", "seconds": 3600}'

  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 30 --commit --json
  assert_json '.allowed == true and ([.limits[] | [.name, .spent, .remaining]] == [["burst", 30, 20]])'
  # A named limit is not a round-1 window: the windows stay unlimited.
  assert_json '.usage == []'

  run -0 allowance limits get --key "$KEY" --json
  assert_json '.plan == null'
  assert_json '[.limits[] | {name, limit, spent, held, remaining, source}]
    == [{"name": "burst", "limit": 50, "spent": 30, "held": 0, "remaining": 20, "source": "key"}]'
  assert_json '.key_limits == [{"name": "burst", "period": {"kind": "rolling", "seconds": 3600}, "limit": 50}]'
  assert_json '[.usage[].limit] == [null, null, null, null]'

  run -0 allowance limits get --key "$KEY"
  assert_eq "${lines[6]}" "plan -"
  assert_matches "${lines[7]}" "^NAME +PERIOD +LIMIT +SPENT +HELD +REMAINING +SOURCE +RESETS_AT$"
  assert_matches "${lines[8]}" "^burst +rolling 1h +50 +30 +0 +20 +key +-$"
  assert_eq "${#lines[@]}" 9 "lines"

  # Setting it again replaces it.
  run -0 allowance limits set --key "$KEY" --name burst --rolling 2h --limit 31
  assert_matches "${lines[1]}" "^burst +rolling 2h +31 +30 +0 +1 +key +-$"

  run -0 allowance limits remove --key "$KEY" --name burst --json
  assert_json --arg k "$KEY" '. == {"key_id": $k, "name": "burst", "removed": true}'
  run -0 allowance limits get --key "$KEY" --json
  assert_json '.limits == [] and .key_limits == []'
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 1000 --commit

  # Removing it again: NOT_FOUND naming the limit.
  run --separate-stderr allowance limits remove --key "$KEY" --name burst
  assert_grpc_error NOT_FOUND
  assert_contains "$stderr" "burst"
}

@test "quotas: a monthly calendar limit in a time zone resets at local midnight on the 1st" {
  run -0 allowance limits set --key "$KEY" --unit requests --name monthly --calendar month --tz Europe/Paris \
    --limit 10 --json
  # The default anchor is local midnight on 2000-01-01 in the zone: 23:00 UTC the day before.
  assert_json '.period == {"kind": "calendar", "unit": "month", "count": 1,
    "anchor": "1999-12-31T23:00:00.000000Z", "time_zone": "Europe/Paris"}'
  local month next start resets
  month=$(TZ=Europe/Paris date +%Y-%m)
  next=$(date -u -d "$month-01 +1 month" +%Y-%m-%d)
  start=$(local_midnight Europe/Paris "$month-01")
  resets=$(local_midnight Europe/Paris "$next")
  assert_json --arg s "$start" --arg r "$resets" '.period_start == $s and .resets_at == $r'
  assert_json '.limit == 10 and .remaining == 10 and .source == "key"'

  run -0 allowance limits get --key "$KEY" --unit requests
  assert_matches "${lines[8]}" "^monthly +calendar 1 month from 2000-01-01T00:00:00\+01:00 in Europe/Paris +10 +0 +0 +10 +key +$resets$"

  # Once used up, a reservation must wait for the boundary: retry_after is the time until resets_at.
  run -0 allowance reserve --key "$KEY" --unit requests --tx "$TX-1" --amount 10 --commit
  run -3 allowance reserve --key "$KEY" --unit requests --tx "$TX-2" --amount 1 --json
  local wait
  wait=$(($(epoch "$resets") - $(date +%s)))
  assert_json --argjson w "$wait" '.exceeded_limits | length == 1 and (.[0].retry_after_seconds - $w | . * . <= 25)'
  assert_json '.retry_after_seconds == .exceeded_limits[0].retry_after_seconds'

  # An explicit anchor and count: a quarter from the 31st, in UTC; a local date is read in --tz.
  run -0 allowance limits set --key "$KEY" --name quarter --calendar month --count 3 \
    --anchor 2026-01-31T00:00:00Z --limit 5 --json
  assert_json '.period == {"kind": "calendar", "unit": "month", "count": 3,
    "anchor": "2026-01-31T00:00:00.000000Z", "time_zone": "UTC"}'
  assert_json --arg re "$RFC3339" '(.period_start | test($re)) and (.resets_at | test($re)) and .period_start < .resets_at'
  run -0 allowance limits set --key "$KEY" --name fortnight --calendar week --count 2 --anchor 2026-01-05 \
    --tz America/New_York --limit 5 --json
  assert_json '.period.anchor == "2026-01-05T05:00:00.000000Z" and .period.count == 2 and .period.unit == "week"'
  # Week periods start on Monday by default.
  run -0 allowance limits set --key "$KEY" --name weekly-cal --calendar week --limit 5 --json
  assert_json '.period.anchor == "2000-01-03T00:00:00.000000Z"'
}

@test "quotas: a denial names every exceeded limit with spent, held and retry_after, and exits 3" {
  run -0 allowance limits set --key "$KEY" --name burst --rolling 1h --limit 50
  run -0 allowance limits set --key "$KEY" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 40 --commit
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 5 --ttl 10m

  run --separate-stderr allowance reserve --key "$KEY" --tx "$TX-3" --amount 8 --json
  [ "$status" -eq 3 ] || fail "expected exit code 3, got $status"
  assert_json '.allowed == false and .transaction == null and .exceeded == []'
  assert_json --arg k "$KEY" '[.exceeded_limits[] | {key_id, name, limit, spent, held}]
    == [{"key_id": $k, "name": "burst", "limit": 50, "spent": 40, "held": 5}]'
  # 40 + 5 + 8 > 50: it fits once the hold of 5 expires (in 10 minutes), long before the 40 ages out.
  assert_json '.exceeded_limits[0].retry_after_seconds | . > 590 and . <= 600'
  assert_json '.exceeded_limits[0].retry_after | test("^(10m|9m [0-9]+s)$")'
  assert_json '.retry_after_seconds == .exceeded_limits[0].retry_after_seconds
    and .retry_after == .exceeded_limits[0].retry_after'
  assert_json '.exceeded_limits[0].period == {"kind": "rolling", "seconds": 3600}'

  run -3 allowance reserve --key "$KEY" --tx "$TX-3" --amount 8
  assert_eq "${lines[0]}" "denied: exceeds burst"
  assert_matches "${lines[1]}" "^KEY +NAME +PERIOD +LIMIT +SPENT +HELD +RETRY_AFTER$"
  assert_matches "${lines[2]}" "^$KEY +burst +rolling 1h +50 +40 +5 +(10m|9m [0-9]+s)$"
  assert_matches "${lines[3]}" "^retry after (10m|9m [0-9]+s)$"

  # Over both limits. The amount alone exceeds burst: it never fits, so there is no overall retry_after.
  run -3 allowance reserve --key "$KEY" --tx "$TX-4" --amount 60 --json
  assert_json '([.exceeded_limits[] | .name] | sort) == ["burst", "daily"] and .exceeded == ["daily"]'
  assert_json '.exceeded_limits[] | select(.name == "burst") | .retry_after_seconds == null and .retry_after == null'
  # 40 + 5 + 60 > 100 until the hold expires.
  assert_json '.exceeded_limits[] | select(.name == "daily") | .retry_after_seconds > 590 and .retry_after_seconds <= 600'
  assert_json '.retry_after_seconds == null and .retry_after == null'
  run -3 allowance reserve --key "$KEY" --tx "$TX-4" --amount 60
  # Round-1 windows first, as round 1 named them.
  assert_eq "${lines[0]}" "denied: exceeds daily, burst"
  assert_matches "${lines[2]}" "^$KEY +daily +rolling 1d +100 +40 +5 +(10m|9m [0-9]+s)$"
  assert_matches "${lines[3]}" "^$KEY +burst +rolling 1h +50 +40 +5 +never$"
  assert_eq "${lines[4]}" "retry after never: the amount alone exceeds a limit"

  # Nothing was recorded by the denials.
  run --separate-stderr allowance tx get --tx "$TX-3"
  assert_grpc_error NOT_FOUND
  [ "$(limit_usage "$KEY" burst | jq '.spent, .held' | paste -sd' ')" = "40 5" ] || fail "burst usage changed"
}

@test "quotas: an --unlimited override lifts a plan's limit for one key only" {
  run -0 allowance plans put --name "$PLAN" --limit daily:rolling=1d:10 --limit weekly-cap:rolling=7d:1000
  run -0 allowance plans assign --key "$KEY" --plan "$PLAN"
  run -0 allowance plans assign --key "$KEY2" --plan "$PLAN"

  run -0 allowance limits set --key "$KEY" --name daily --rolling 1d --unlimited --json
  assert_json --arg k "$KEY" '.key_id == $k and .name == "daily" and .limit == null and .source == "key"'
  run -0 allowance limits get --key "$KEY" --json
  assert_json --arg p "$PLAN" '.plan == $p'
  assert_json '.key_limits == [{"name": "daily", "period": {"kind": "rolling", "seconds": 86400}, "limit": null}]'
  assert_json '[.limits[] | [.name, .limit, .source]] == [["weekly-cap", 1000, "plan"]]'
  assert_json '.usage[0] | .window == "daily" and .limit == null'
  run -0 allowance limits get --key "$KEY"
  assert_eq "${lines[6]}" "plan $PLAN"
  assert_matches "${lines[8]}" "^weekly-cap +rolling 7d +1000 +0 +0 +1000 +plan +-$"
  assert_matches "${lines[9]}" "^daily +rolling 1d +unlimited +- +- +- +key +-$"

  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 50 --commit
  # The other key on the plan still has the plan's daily limit.
  run -3 allowance reserve --key "$KEY2" --tx "$TX-2" --amount 50 --json
  assert_json --arg k "$KEY2" '[.exceeded_limits[] | [.key_id, .name, .limit]] == [[$k, "daily", 10]]'
  run -0 allowance limits get --key "$KEY2" --json
  assert_json '[.limits[] | select(.name == "daily") | .source] == ["plan"] and .key_limits == []'

  # Removing the override puts the plan's limit back: 50 already spent > 10.
  run -0 allowance limits remove --key "$KEY" --name daily
  run -3 allowance reserve --key "$KEY" --tx "$TX-3" --amount 1 --json
  assert_json '[.exceeded_limits[] | .name] == ["daily"] and .exceeded == ["daily"]'
}

@test "quotas: a reservation charging a user and its org is denied by the org's limit and charges both" {
  # KEY is the user, KEY2 the organisation.
  run -0 allowance limits set --key "$KEY" --name user-daily --rolling 1d --limit 1000
  run -0 allowance limits set --key "$KEY2" --name org-daily --rolling 1d --limit 100

  run -0 allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-1" --amount 70 --commit --json
  assert_json --arg a "$KEY" --arg b "$KEY2" '.transaction.key_ids == [$a, $b] and .transaction.key_id == $a'
  assert_json --arg a "$KEY" --arg b "$KEY2" '[.limits[] | [.key_id, .name, .spent]]
    == [[$a, "user-daily", 70], [$b, "org-daily", 70]]'
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json --arg a "$KEY" --arg b "$KEY2" '.key_ids == [$a, $b]'
  run -0 allowance tx get --tx "$TX-1"
  assert_matches "${lines[1]}" "^$TX-1 +$KEY,$KEY2 +default +70 +committed "

  # 70 + 40 > 100 for the org; the user's own limit would allow it.
  run --separate-stderr allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-2" --amount 40 --json
  [ "$status" -eq 3 ] || fail "expected exit code 3, got $status"
  assert_json --arg b "$KEY2" '[.exceeded_limits[] | {key_id, name, limit, spent, held}]
    == [{"key_id": $b, "name": "org-daily", "limit": 100, "spent": 70, "held": 0}]'
  assert_json '.exceeded_limits[0].retry_after_seconds > 86000'
  run -3 allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-2" --amount 40
  assert_eq "${lines[0]}" "denied: exceeds org-daily of key $KEY2"

  # Both keys were charged by the first reservation only.
  [ "$(limit_usage "$KEY" user-daily | jq .spent)" = 70 ] || fail "user spent"
  [ "$(limit_usage "$KEY2" org-daily | jq .spent)" = 70 ] || fail "org spent"
  # The user alone is not limited by the org.
  run -0 allowance reserve --key "$KEY" --tx "$TX-3" --amount 40 --commit
  [ "$(limit_usage "$KEY2" org-daily | jq .spent)" = 70 ] || fail "org spent after the user's own reservation"

  # A key named twice is INVALID_ARGUMENT naming additional_key_ids.
  run --separate-stderr allowance reserve --key "$KEY" --also-key "$KEY" --tx "$TX-4" --amount 1
  assert_grpc_error INVALID_ARGUMENT "additional_key_ids: "
}

@test "quotas: round-1 usage of a multi-key reservation describes the first key, not another one" {
  run -0 allowance limits set --key "$KEY2" --window daily --limit 100
  run -0 allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-1" --amount 30 --json
  assert_json '.usage == []'
  run -3 allowance reserve --key "$KEY" --also-key "$KEY2" --tx "$TX-2" --amount 80 --json
  assert_json '.usage == [] and .exceeded == []'
}

@test "quotas: bad input is refused before anything is set" {
  # An unknown time zone: the server names the field (exit 1).
  run --separate-stderr allowance limits set --key "$KEY" --name monthly --calendar month --tz Mars/Olympus --limit 1
  assert_grpc_error INVALID_ARGUMENT "limit.period.calendar.time_zone: "
  assert_contains "$stderr" "Mars/Olympus"
  run --separate-stderr allowance limits set --key "$KEY" --name "has space" --rolling 1d --limit 1
  assert_grpc_error INVALID_ARGUMENT "limit.name: "
  run --separate-stderr allowance limits set --key "$KEY" --name x --rolling 1500ms --limit 1
  assert_grpc_error INVALID_ARGUMENT "limit.period.rolling: "
  run --separate-stderr allowance limits set --key "$KEY" --name x --calendar month --count 14 --limit 1
  assert_grpc_error INVALID_ARGUMENT "limit.period.calendar.count: "
  run --separate-stderr allowance limits set --key "$KEY" --name x --rolling 1d --limit -1
  assert_grpc_error INVALID_ARGUMENT "limit.amount: "

  # Ambiguous or incomplete flags are bad usage (exit 2, clap), before calling the server.
  run -2 allowance limits set --key "$KEY" --name x --rolling 1h --calendar month --limit 1
  assert_contains "$output" "--rolling"
  assert_contains "$output" "--calendar"
  run -2 allowance limits set --key "$KEY" --name x --limit 1
  assert_contains "$output" "--rolling"
  run -2 allowance limits set --key "$KEY" --name x --rolling 1h
  assert_contains "$output" "--unlimited"
  run -2 allowance limits set --key "$KEY" --name x --rolling 1h --limit 1 --unlimited
  run -2 allowance limits set --key "$KEY" --window daily --unlimited
  run -2 allowance limits set --key "$KEY" --window daily --rolling 1h --limit 1
  run -2 allowance limits set --key "$KEY" --window daily --name x --rolling 1h --limit 1
  run -2 allowance limits set --key "$KEY" --name x --rolling 1h --count 2 --limit 1
  assert_contains "$output" "--count"
  run -2 allowance limits set --key "$KEY" --name x --rolling 1h --tz Europe/Paris --limit 1
  run -2 allowance limits set --key "$KEY" --name x --calendar fortnight --limit 1
  assert_contains "$output" "fortnight"
  run -2 allowance limits set --key "$KEY" --name x --calendar month --anchor yesterday --limit 1
  assert_contains "$output" "--anchor"
  run -2 allowance limits set --key "$KEY" --name x --rolling soon --limit 1
  run -2 allowance limits remove --key "$KEY"
  run -2 allowance limits remove --key "$KEY" --window daily --name daily

  # Nothing was set.
  run -0 allowance limits get --key "$KEY" --json
  assert_json '.limits == [] and .key_limits == [] and ([.usage[].limit] | all(. == null))'
}
