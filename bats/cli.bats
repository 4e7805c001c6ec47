# shellcheck shell=bash disable=SC2016,SC2154 # jq programs in single quotes; bats sets $status, $output, $stderr
# The CLI's contract with scripts: exit codes 0 success, 1 error (gRPC status name and message on stderr),
# 2 bad usage, 3 reservation denied; bad input is INVALID_ARGUMENT naming the field.

setup() {
  load helpers
  new_ids
}

# A reservation (or other call) rejected as INVALID_ARGUMENT for FIELD, having recorded nothing.
# expect_invalid FIELD allowance-args...
expect_invalid() {
  local field=$1
  shift
  run --separate-stderr allowance "$@"
  assert_grpc_error INVALID_ARGUMENT "$field: "
}

@test "cli: success exits 0 and prints the answer on stdout" {
  run --separate-stderr allowance reserve --key "$KEY" --tx "$TX-1" --amount 1
  [ "$status" -eq 0 ]
  assert_eq "${lines[0]}" allowed
  assert_eq "$stderr" "" "stderr"
}

@test "cli: a denied reservation exits 3 and names the exceeded window" {
  run -0 allowance limits set --key "$KEY" --window monthly --limit 10
  run --separate-stderr allowance reserve --key "$KEY" --tx "$TX-1" --amount 11
  [ "$status" -eq 3 ] || fail "expected exit code 3, got $status"
  assert_eq "${lines[0]}" "denied: exceeds monthly"
  assert_eq "$stderr" "" "stderr"
}

@test "cli: bad usage exits 2 (clap), before calling the server" {
  run -2 allowance reserve --key "$KEY" --amount 1
  assert_contains "$output" "--tx"
  run -2 allowance reserve --key "$KEY" --tx "$TX-1" --amount ten
  assert_contains "$output" "--amount"
  run -2 allowance limits set --key "$KEY" --window hourly --limit 1
  assert_contains "$output" "hourly"
  run -2 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --meta no-equals-sign
  assert_contains "$output" "key=value"
  run -2 allowance frobnicate
  run -2 allowance
  run -2 allowance limits
  run -2 allowance tx list --key "$KEY" --page-size many
  # Numbers out of their documented ranges are refused as such, not quietly replaced by a default.
  run -2 allowance tx list --key "$KEY" --page-size 0
  run -2 allowance audit list --page-size 1001
  run -2 allowance limits set --key "$KEY" --name m --calendar month --count 0 --limit 1
  assert_contains "$output" "--count"
  run -2 allowance plans assign --key "$KEY" --plan ""
  run -2 allowance limits set --key "$KEY" --name yearly --rolling 1y --limit 1
  assert_contains "$output" "365d"
  run -2 allowance tx get --tx "$TX-1" --timeout 0s
  run -2 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --commit --ttl 5m
  # Nothing reached the server.
  run --separate-stderr allowance tx get --tx "$TX-1"
  assert_grpc_error NOT_FOUND
}

@test "cli: a malformed --ttl is bad usage (exit 2), like a malformed --timeout" {
  run -2 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --timeout bogus
  run -2 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --ttl bogus
  assert_contains "$output" "--ttl"
}

@test "cli: --addr without a scheme, as grpcurl takes it, reaches the server or says the scheme is missing" {
  local hostport=${ALLOWANCE_ADDR#http://}
  run --separate-stderr allowance health --addr "$hostport"
  if [ "$status" -ne 0 ]; then
    [[ "$stderr" == *"http://"* || "$stderr" == *scheme* ]] || fail "misleading error: $stderr"
  fi
}

@test "cli: --help and --version exit 0; the help documents the exit codes" {
  run -0 allowance --help
  assert_contains "$output" "Exit codes: 0 success, 1 error"
  assert_contains "$output" "3 reservation or rate check denied"
  run -0 allowance reserve --help
  assert_contains "$output" "--ttl"
  run -0 allowance --version
  assert_matches "$output" "^allowance [0-9]+\.[0-9]+\.[0-9]+"
}

@test "cli: an unreachable server is UNAVAILABLE with exit code 1" {
  local port
  port=$(free_port)
  run --separate-stderr allowance limits get --key "$KEY" --addr "http://127.0.0.1:$port" --timeout 2s
  assert_grpc_error UNAVAILABLE
  assert_contains "$stderr" "127.0.0.1:$port"
}

@test "validation: amount 0 is INVALID_ARGUMENT naming amount, and records nothing" {
  expect_invalid amount reserve --key "$KEY" --tx "$TX-1" --amount 0
  run --separate-stderr allowance tx get --tx "$TX-1"
  assert_grpc_error NOT_FOUND
  assert_usage "$KEY" daily spent=0 held=0
}

@test "validation: a negative amount is INVALID_ARGUMENT naming amount" {
  expect_invalid amount reserve --key "$KEY" --tx "$TX-1" --amount -5
  expect_invalid amount reserve --key "$KEY" --tx "$TX-1" --amount -5 --commit
}

@test "validation: a commit for amount 0 is INVALID_ARGUMENT naming amount" {
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 10
  expect_invalid amount commit --tx "$TX-1" --amount 0
  run -0 allowance tx get --tx "$TX-1" --json
  assert_json '.state == "held"'
}

@test "validation: a negative limit is INVALID_ARGUMENT naming limit" {
  expect_invalid limit limits set --key "$KEY" --window daily --limit -1
  assert_usage "$KEY" daily limit=null
}

@test "validation: an empty key is INVALID_ARGUMENT naming key_id" {
  expect_invalid key_id reserve --key "" --tx "$TX-1" --amount 1
  expect_invalid key_id limits get --key ""
  expect_invalid key_id limits set --key "" --window daily --limit 1
  expect_invalid key_id tx list --key ""
}

@test "validation: a 129-byte key is INVALID_ARGUMENT naming key_id; 128 bytes is fine" {
  local k128 k129
  k128=$(printf 'k%.0s' $(seq 1 128))
  k129=$(printf 'k%.0s' $(seq 1 129))
  expect_invalid key_id reserve --key "$k129" --tx "$TX-1" --amount 1
  assert_contains "$stderr" "128"
  expect_invalid key_id limits set --key "$k129" --window daily --limit 1
  # The longest key is accepted (a unique one: keys are shared by every run against this database).
  k128="${KEY}-$(printf 'k%.0s' $(seq 1 128))"
  k128=${k128:0:128}
  run -0 allowance reserve --key "$k128" --tx "$TX-2" --amount 1 --json
  assert_json --arg k "$k128" '.transaction.key_id == $k'
}

@test "validation: key length counts bytes, not characters" {
  local k
  k="$(printf '%-60.60s' "$KEY" | tr ' ' x)$(printf 'ж%.0s' $(seq 1 34))" # 60 + 34 x 2 = 128 bytes
  run -0 allowance reserve --key "$k" --tx "$TX-1" --amount 1 --json
  assert_json --arg k "$k" '.transaction.key_id == $k'
  run -0 allowance tx list --key "$k" --json
  assert_json --arg k "$k" '.transactions[0].key_id == $k'
  expect_invalid key_id reserve --key "${k}ж" --tx "$TX-2" --amount 1
  assert_contains "$stderr" "got 130"
}

@test "validation: a key with a control character is INVALID_ARGUMENT naming key_id" {
  expect_invalid key_id reserve --key "$KEY"$'\t'x --tx "$TX-1" --amount 1
}

@test "validation: an empty or over-long transaction id is INVALID_ARGUMENT naming transaction_id" {
  expect_invalid transaction_id reserve --key "$KEY" --tx "" --amount 1
  expect_invalid transaction_id reserve --key "$KEY" --tx "$(printf 't%.0s' $(seq 1 129))" --amount 1
  expect_invalid transaction_id commit --tx ""
  expect_invalid transaction_id reverse --tx ""
}

@test "validation: an over-long unit is INVALID_ARGUMENT naming unit" {
  expect_invalid unit reserve --key "$KEY" --unit "$(printf 'u%.0s' $(seq 1 129))" --tx "$TX-1" --amount 1
}

@test "validation: ttl 0s (or over 30 days) is INVALID_ARGUMENT naming hold_ttl" {
  expect_invalid hold_ttl reserve --key "$KEY" --tx "$TX-1" --amount 1 --ttl 0s
  expect_invalid hold_ttl reserve --key "$KEY" --tx "$TX-1" --amount 1 --ttl 999ms
  expect_invalid hold_ttl reserve --key "$KEY" --tx "$TX-1" --amount 1 --ttl 31d
  run -0 allowance reserve --key "$KEY" --tx "$TX-2" --amount 1 --ttl 30d
  run --separate-stderr allowance tx get --tx "$TX-1"
  assert_grpc_error NOT_FOUND
}

@test "validation: 17 metadata entries is INVALID_ARGUMENT naming metadata; 16 is fine" {
  local meta=() i
  for i in $(seq 1 16); do meta+=(--meta "m$i=v$i"); done
  run -0 allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 "${meta[@]}" --json
  assert_json '.transaction.metadata | length == 16'
  expect_invalid metadata reserve --key "$KEY" --tx "$TX-2" --amount 1 "${meta[@]}" --meta m17=v17
  assert_contains "$stderr" "17"
}

@test "validation: a metadata key given twice is INVALID_ARGUMENT, not the last value silently kept" {
  run --separate-stderr allowance reserve --key "$KEY" --tx "$TX-1" --amount 1 --meta order=1 --meta order=2
  assert_grpc_error INVALID_ARGUMENT "--meta: "
  run --separate-stderr allowance tx get --tx "$TX-1"
  assert_grpc_error NOT_FOUND
}

@test "validation: an over-long metadata value or an empty metadata key is INVALID_ARGUMENT naming metadata" {
  expect_invalid metadata reserve --key "$KEY" --tx "$TX-1" --amount 1 --meta "note=$(printf 'v%.0s' $(seq 1 513))"
  expect_invalid metadata reserve --key "$KEY" --tx "$TX-1" --amount 1 --meta "=value"
}

@test "validation: a page token the service did not issue is INVALID_ARGUMENT naming page_token" {
  expect_invalid page_token tx list --key "$KEY" --page-token not-a-token
}

@test "errors: reverse, commit and tx get of an unknown transaction are NOT_FOUND naming it" {
  local cmd
  for cmd in reverse commit "tx get"; do
    # shellcheck disable=SC2086 # "tx get" is two words
    run --separate-stderr allowance $cmd --tx "$TX-unknown"
    assert_grpc_error NOT_FOUND
    assert_contains "$stderr" "$TX-unknown"
  done
  run --separate-stderr allowance commit --tx "$TX-unknown" --amount 5
  assert_grpc_error NOT_FOUND
}

@test "cli: output piped into a reader that stops early ends the command quietly, without a panic" {
  run -0 allowance limits set --key "$KEY" --name daily --rolling 1d --limit 5
  # `true` is gone long before the answer arrives: the first write finds the pipe closed.
  run --separate-stderr bash -c '"$ALLOWANCE_BIN" audit list --key "$KEY" | true'
  [ "$status" -eq 0 ]
  assert_eq "$stderr" "" "stderr"
  assert_not_contains "$stderr" "panicked"
  assert_not_contains "$stderr" "Broken pipe"
}

@test "cli: the database commands name why they cannot connect, at once and once" {
  local port
  port=$(free_port)
  run --separate-stderr timeout 3 "$ALLOWANCE_BIN" reconcile --database-url "postgres://postgres@127.0.0.1:$port/allowance"
  [ "$status" -eq 1 ] || fail "exit code $status (124: it waited for a pool timeout)"
  assert_contains "$stderr" "Connection refused"
  assert_eq "$(grep -o 'Connection refused' <<<"$stderr" | wc -l)" 1 "times the cause is printed"
}
