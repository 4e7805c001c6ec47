# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# Callers and scopes: every call but health carries a credential; callers are managed with `allowance callers`,
# changes are read back with `allowance audit`.

setup() {
  load helpers
  new_ids
  ADMIN_TOKEN=$ALLOWANCE_TOKEN
}

# Creates a caller through the shared server as the suite's admin; sets CALLER_ID and CALLER_TOKEN.
# new_caller NAME SCOPES [--key-prefix P...]
new_caller() {
  local json
  json=$(ALLOWANCE_TOKEN=$ADMIN_TOKEN allowance callers create --name "$1" --scopes "$2" "${@:3}" --json) \
    || fail "callers create $1 failed"
  CALLER_ID=$(jq -r .caller.id <<<"$json")
  CALLER_TOKEN=$(jq -r .credential <<<"$json")
  echo "$CALLER_TOKEN" >>"$E2E_STATE_DIR/secrets"
}

@test "auth: a call without a credential, or with a wrong one, is UNAUTHENTICATED; health needs none" {
  run --separate-stderr env -u ALLOWANCE_TOKEN "$ALLOWANCE_BIN" limits get --key "$KEY"
  assert_grpc_error UNAUTHENTICATED "missing credential"
  run --separate-stderr allowance limits get --key "$KEY" --token "$(uuidgen 2>/dev/null || cat /proc/sys/kernel/random/uuid):$(printf '0%.0s' {1..64})"
  assert_grpc_error UNAUTHENTICATED "invalid credential"
  run --separate-stderr allowance limits get --key "$KEY" --token "not a credential"
  assert_grpc_error UNAUTHENTICATED "malformed credential"
  run -0 env -u ALLOWANCE_TOKEN "$ALLOWANCE_BIN" health
  assert_eq "$output" SERVING
}

@test "auth: callers create, list, rotate and revoke; a rotation keeps both secrets until the old one is revoked" {
  new_caller "svc-$KEY" spend,read
  local old=$CALLER_TOKEN
  assert_matches "$old" "^$CALLER_ID:[0-9a-f]{64}$"
  run -0 allowance reserve --token "$old" --key "$KEY" --tx "$TX-1" --amount 5

  run -0 allowance callers list --json
  assert_json --arg id "$CALLER_ID" '[.[] | select(.id == $id) | [.scopes, .key_prefixes, .revoked_at]]
    == [[["spend", "read"], [], null]]'
  assert_not_contains "$output" "${old#*:}"
  run -0 allowance callers list
  assert_matches "${lines[0]}" "^ID +NAME +SCOPES +KEY PREFIXES +STATE +CREATED$"
  assert_matches "$output" "$CALLER_ID +svc-$KEY +spend,read +\* +active"

  run -0 allowance callers rotate --id "$CALLER_ID" --json
  local new
  new=$(jq -r .credential <<<"$output")
  echo "$new" >>"$E2E_STATE_DIR/secrets"
  assert_json '.caller.has_previous_secret'
  run -0 allowance tx get --token "$old" --tx "$TX-1"
  run -0 allowance tx get --token "$new" --tx "$TX-1"
  run --separate-stderr allowance callers rotate --id "$CALLER_ID"
  assert_grpc_error FAILED_PRECONDITION
  assert_contains "$stderr" "already has a previous secret"

  run -0 allowance callers revoke --id "$CALLER_ID" --previous-secret
  run --separate-stderr allowance tx get --token "$old" --tx "$TX-1"
  assert_grpc_error UNAUTHENTICATED
  run -0 allowance tx get --token "$new" --tx "$TX-1"

  run -0 allowance callers revoke --id "$CALLER_ID" --json
  assert_json '.[0].revoked_at != null'
  run --separate-stderr allowance tx get --token "$new" --tx "$TX-1"
  assert_grpc_error UNAUTHENTICATED "invalid credential"
  run --separate-stderr allowance callers revoke --id "$(cat /proc/sys/kernel/random/uuid)"
  assert_grpc_error NOT_FOUND
}

@test "auth: a missing scope is PERMISSION_DENIED naming the scope" {
  new_caller "spender-$KEY" spend
  run --separate-stderr allowance limits set --token "$CALLER_TOKEN" --key "$KEY" --window daily --limit 10
  assert_grpc_error PERMISSION_DENIED 'the caller lacks the `admin` scope that SetLimit needs'
  run --separate-stderr allowance limits get --token "$CALLER_TOKEN" --key "$KEY"
  assert_grpc_error PERMISSION_DENIED 'the caller lacks the `read` scope'
  run --separate-stderr allowance callers list --token "$CALLER_TOKEN"
  assert_grpc_error PERMISSION_DENIED 'the caller lacks the `admin` scope'
  run -0 allowance reserve --token "$CALLER_TOKEN" --key "$KEY" --tx "$TX-1" --amount 1
}

@test "auth: a caller confined to a key prefix touches only its tenant's keys and cannot see other transactions" {
  new_caller "tenant-$KEY" spend,read,admin --key-prefix "tenant-a-$KEY/"
  local mine="tenant-a-$KEY/card" theirs="tenant-b-$KEY/card"
  run -0 allowance reserve --key "$theirs" --tx "$TX-theirs" --amount 5 # as the admin

  run -0 allowance reserve --token "$CALLER_TOKEN" --key "$mine" --tx "$TX-mine" --amount 5
  run -0 allowance limits set --token "$CALLER_TOKEN" --key "$mine" --window daily --limit 100
  run --separate-stderr allowance reserve --token "$CALLER_TOKEN" --key "$theirs" --tx "$TX-2" --amount 5
  assert_grpc_error PERMISSION_DENIED "the key is outside the key prefixes"
  run --separate-stderr allowance reserve --token "$CALLER_TOKEN" --key "$mine" --also-key "$theirs" --tx "$TX-3" --amount 5
  assert_grpc_error PERMISSION_DENIED
  # Another tenant's transaction: answered exactly as one that does not exist.
  run --separate-stderr allowance reverse --token "$CALLER_TOKEN" --tx "$TX-theirs"
  assert_grpc_error NOT_FOUND
  local theirs_msg=$stderr
  run --separate-stderr allowance reverse --token "$CALLER_TOKEN" --tx "$TX-nonexistent"
  assert_eq "${stderr//$TX-nonexistent/ID}" "${theirs_msg//$TX-theirs/ID}" "the two answers"
  run --separate-stderr allowance commit --token "$CALLER_TOKEN" --tx "$TX-theirs"
  assert_grpc_error NOT_FOUND
  run --separate-stderr allowance tx get --token "$CALLER_TOKEN" --tx "$TX-theirs"
  assert_grpc_error NOT_FOUND
  assert_eq "$(tx_state "$TX-theirs")" held "their transaction"
  # Plans and callers are shared by every tenant.
  run --separate-stderr allowance plans put --token "$CALLER_TOKEN" --name "p-$KEY" --limit usd:daily:rolling=1d:1
  assert_grpc_error PERMISSION_DENIED
  run --separate-stderr allowance callers list --token "$CALLER_TOKEN"
  assert_grpc_error PERMISSION_DENIED
}

@test "auth: changes are audited with the caller, the request id and the values before and after" {
  new_caller "auditor-$KEY" admin,spend
  run -0 allowance limits set --token "$CALLER_TOKEN" --key "$KEY" --unit usd --window daily --limit 100
  run -0 allowance limits set --token "$CALLER_TOKEN" --key "$KEY" --unit usd --window daily --limit 250
  run -0 allowance reserve --token "$CALLER_TOKEN" --key "$KEY" --unit usd --tx "$TX-1" --amount 7
  run -0 allowance reverse --token "$CALLER_TOKEN" --tx "$TX-1"
  run -0 allowance audit list --key "$KEY" --json
  assert_json --arg id "$CALLER_ID" '[.events[] | [.action, .caller_id, .unit]]
    == [["transaction.reverse", $id, "usd"], ["limit.put", $id, "usd"], ["limit.put", $id, "usd"]]'
  assert_json '.events[1].before.amount == 100 and .events[1].after.amount == 250'
  assert_json '.events[2].before == null and .events[2].after.period == "rolling 86400s"'
  assert_json '.events[0].before.state == "held" and .events[0].after.state == "reversed"'
  assert_json '[.events[].request_id | test("^[0-9a-f-]{36}$")] | all'
  run -0 allowance audit list --caller "$CALLER_ID" --page-size 1 --json
  assert_json '(.events | length) == 1 and .next_page_token != ""'
  run -0 allowance audit list --key "$KEY"
  assert_matches "${lines[0]}" "^ID +TIME +CALLER +ACTION +KEY +SUBJECT +BEFORE +AFTER$"
  run --separate-stderr allowance audit list --caller not-a-uuid
  assert_grpc_error INVALID_ARGUMENT caller_id
}

@test "auth: no secret appears in the server's log or metrics, and failures are counted by reason" {
  local wrong scope
  wrong=$(metric_value 'allowance_auth_failures_total{reason="wrong_secret"}')
  scope=$(metric_value 'allowance_auth_failures_total{reason="missing_scope"}')
  new_caller "leak-$KEY" read
  run -1 allowance limits get --key "$KEY" --token "${CALLER_TOKEN%%:*}:$(printf 'f%.0s' {1..64})"
  run -1 allowance limits set --token "$CALLER_TOKEN" --key "$KEY" --window daily --limit 1
  assert_eq "$(metric_value 'allowance_auth_failures_total{reason="wrong_secret"}')" "$((wrong + 1))" wrong_secret
  assert_eq "$(metric_value 'allowance_auth_failures_total{reason="missing_scope"}')" "$((scope + 1))" missing_scope
  metrics_text >"$E2E_STATE_DIR/metrics-$KEY.txt"
  echo "$ADMIN_TOKEN" >>"$E2E_STATE_DIR/secrets"
  local token
  while read -r token; do
    [ -n "$token" ] || continue
    if grep -qF "${token#*:}" "$E2E_STATE_DIR/server.log" "$E2E_STATE_DIR/metrics-$KEY.txt"; then
      fail "a secret appears in the server's log or metrics"
    fi
  done <"$E2E_STATE_DIR/secrets"
  grep -q '"call refused"\|call refused' "$E2E_STATE_DIR/server.log"
}

@test "auth: the first admin is made against the database; --insecure-no-auth warns and lets every call through" {
  run -0 allowance callers create --name "boot-$KEY" --scopes admin --database-url "$DATABASE_URL" --json
  local token
  token=$(jq -r .credential <<<"$output")
  echo "$token" >>"$E2E_STATE_DIR/secrets"
  # The shared server picks it up at its next re-read of the callers table.
  wait_until 5 allowance callers list --token "$token"
  run -0 allowance audit list --json
  assert_json --arg n "boot-$KEY" '[.events[] | select(.action == "caller.create" and .after.name == $n)
    | .caller_name] == ["cli:database"]'

  start_instance no-auth ALLOWANCE_INSECURE_NO_AUTH=true
  wait_until 20 healthy "$INSTANCE_ADDR"
  run -0 env -u ALLOWANCE_TOKEN "$ALLOWANCE_BIN" reserve --addr "$INSTANCE_ADDR" --key "$KEY" --tx "$TX-1" --amount 1
  grep -q "authentication is OFF" "$INSTANCE_LOG"
  stop_instance
}
