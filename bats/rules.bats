# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Request rate limits: `allowance ratelimit check` and the rules of Envoy's protocol (`allowance rules`).

setup() {
  load helpers
  new_ids
  RULE="rule-${KEY#key-}"
}

@test "ratelimit: check admits a burst, then denies with retry_after and exits 3; cost 0 only looks" {
  run -0 allowance limits set --key "$KEY" --unit requests --name api --rolling 1h --limit 60 --burst 3 --json
  run -0 allowance limits get --key "$KEY" --unit requests --json
  assert_json '.key_limits[] | select(.name == "api") | .burst == 3'
  local left # bats' `run` overwrites a loop variable named i
  for left in 2 1 0; do
    run -0 allowance ratelimit check --key "$KEY" --unit requests --json
    assert_json ".allowed and .limits[0].remaining == $left"
  done
  run -3 allowance ratelimit check --key "$KEY" --unit requests --json
  assert_json '.allowed == false and .limits[0].name == "api" and .limits[0].limit == 60 and .limits[0].burst == 3'
  assert_json '.retry_after_seconds > 0 and .retry_after_seconds <= 60'
  run -3 allowance ratelimit check --key "$KEY" --unit requests
  assert_eq "${lines[0]}" denied
  assert_matches "${lines[1]}" "^KEY +LIMIT +RATE +BURST +ALLOWED +REMAINING +RETRY AFTER +RESET AFTER$"
  run -0 allowance ratelimit check --key "$KEY" --unit requests --cost 0 --json
  assert_json '.allowed and .limits[0].remaining == 0'
  run -3 allowance ratelimit check --key "$KEY" --unit requests --cost 4 --json
  assert_json '.limits[0].cost_exceeds_burst and .retry_after_seconds == null'
  # A spending limit is not a rate limit, and a reservation ignores rate limits.
  run -0 allowance reserve --key "$KEY" --unit requests --tx "$TX-1" --amount 1000
}

@test "ratelimit: a plan's rate limit applies to its keys; --burst needs --name" {
  local plan="plan-${KEY#key-}"
  run -0 allowance plans put --name "$plan" --limit requests:api:rolling=1h:2:burst=2 --json
  assert_json '.limits[0].burst == 2'
  run -0 allowance plans assign --key "$KEY" --plan "$plan"
  run -0 allowance ratelimit check --key "$KEY" --unit requests
  run -0 allowance ratelimit check --key "$KEY" --unit requests
  run -3 allowance ratelimit check --key "$KEY" --unit requests
  run -2 allowance limits set --key "$KEY" --window daily --limit 5 --burst 2
  run --separate-stderr allowance limits set --key "$KEY" --unit requests --name api --rolling 1m --limit 5 --burst 0
  assert_grpc_error INVALID_ARGUMENT "limit.burst"
  # A burst that would take more than a hundred years to refill is refused: 1 per 400 days, a million at once.
  run --separate-stderr allowance limits set --key "$KEY" --unit requests --name slow --rolling 400d --limit 1 \
    --burst 1000000
  assert_grpc_error INVALID_ARGUMENT "limit.burst"
  assert_contains "$stderr" "36525 days"
}

@test "ratelimit: a calendar rate limit refuses a cost above its burst; a check no limit applies to says so" {
  run -0 allowance limits set --key "$KEY" --unit requests --name monthly --calendar month --limit 10 --burst 3
  run -3 allowance ratelimit check --key "$KEY" --unit requests --cost 4 --json
  assert_json '.limits[0].cost_exceeds_burst and .retry_after_seconds == null'
  run -0 allowance ratelimit check --key "$KEY" --unit requests --cost 3 --json
  assert_json '.limits[0].remaining == 7'
  run -0 allowance ratelimit check --key "$KEY" --unit requests --limit no-such-limit
  assert_contains "${lines[0]}" "no rate limit applies"
}

@test "rules: put, list and delete; bad rules are INVALID_ARGUMENT naming the field" {
  run -0 allowance rules put --name "$RULE" --domain edge --match api_key --match path=/v1/pay \
    --key-template '{api_key}/pay' --unit requests --limit-name pay --rate 100 --per rolling=1m --burst 10 --json
  assert_json --arg r "$RULE" '.[0] | .name == $r and .pattern == [{"key": "api_key", "value": null},
    {"key": "path", "value": "/v1/pay"}] and .default.amount == 100 and .default.burst == 10 and .shadow == false'
  run -0 allowance rules list --json
  assert_json --arg r "$RULE" '[.[] | select(.name == $r)] | length == 1'
  run -0 allowance rules list
  assert_matches "${lines[0]}" "^RULE +DOMAIN +MATCH +KEY +UNIT +LIMIT +DEFAULT +MODE$"
  assert_contains "$output" "api_key,path=/v1/pay"
  run --separate-stderr allowance rules put --name "$RULE-bad" --domain edge --match api_key --key-template '{user}' \
    --limit-name pay
  assert_grpc_error INVALID_ARGUMENT "rule.key_template"
  run -0 allowance rules delete --name "$RULE"
  run --separate-stderr allowance rules delete --name "$RULE"
  assert_grpc_error NOT_FOUND
  run -0 allowance audit list --json
  assert_json --arg r "$RULE" '[.events[] | select(.subject == $r) | .action] == ["rule.delete", "rule.put"]'
}

@test "ratelimit: the ratelimit scope is needed, and rate checks are counted per rule and limit" {
  run -0 allowance limits set --key "$KEY" --unit requests --name api --rolling 1m --limit 10 --burst 10
  local json token
  json=$(allowance callers create --name "gw-$KEY" --scopes ratelimit --json)
  token=$(jq -r .credential <<<"$json")
  echo "$token" >>"$E2E_STATE_DIR/secrets"
  run -0 allowance ratelimit check --token "$token" --key "$KEY" --unit requests
  run --separate-stderr allowance limits get --token "$token" --key "$KEY"
  assert_grpc_error PERMISSION_DENIED
  new_ids_2=$(allowance callers create --name "no-rl-$KEY" --scopes spend --json | jq -r .credential)
  echo "$new_ids_2" >>"$E2E_STATE_DIR/secrets"
  run --separate-stderr allowance ratelimit check --token "$new_ids_2" --key "$KEY" --unit requests
  assert_grpc_error PERMISSION_DENIED 'the caller lacks the `ratelimit` scope'
  run -0 metrics_text
  assert_contains "$output" 'allowance_rate_checks_total{rule="check_rate",limit="api",outcome="allowed"}'
  assert_contains "$output" 'allowance_rate_batch_size'
}
