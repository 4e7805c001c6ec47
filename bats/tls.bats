# shellcheck shell=bash disable=SC2154,SC2030,SC2031 # bats sets $status, $output, $stderr; each test runs in its own subshell, so its exports are meant to stay there
# TLS and mTLS on the gRPC port, driven through the CLI as an operator would: --addr https://… with --tls-ca,
# client certificates, refusals, files that cannot be used, and a certificate rotated on disk while the
# server runs. Each test starts its own server (start_instance); certificates are made with the openssl
# command line, and the tests are skipped where it is missing.

# The test PKI, made once per file: CAs "ca" and "other"; server certificates for 127.0.0.1 and localhost
# from each ("server", "server-other"); client certificates "client" (from ca) and "stranger" (from other).
setup_file() {
  load helpers
  command -v openssl >/dev/null || return 0
  export PKI="$BATS_FILE_TMPDIR/pki"
  mkdir -p "$PKI"
  make_ca ca
  make_ca other
  issue ca server "subjectAltName=IP:127.0.0.1,DNS:localhost" "extendedKeyUsage=serverAuth"
  issue other server-other "subjectAltName=IP:127.0.0.1,DNS:localhost" "extendedKeyUsage=serverAuth"
  issue ca client "extendedKeyUsage=clientAuth"
  issue other stranger "extendedKeyUsage=clientAuth"
}

setup() {
  load helpers
  command -v openssl >/dev/null || skip "openssl is not installed: these tests make their certificates with it"
  new_ids
}

teardown() {
  stop_instance
}

make_ca() { # name
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=test $1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$PKI/$1.key" -out "$PKI/$1.crt" >/dev/null 2>&1 || fail "openssl: making CA $1 failed"
}

issue() { # ca name extension...
  local ca=$1 name=$2
  shift 2
  printf '%s\n' "$@" >"$PKI/$name.ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
    -keyout "$PKI/$name.key" -out "$PKI/$name.csr" >/dev/null 2>&1 || fail "openssl: a key for $name failed"
  openssl x509 -req -days 2 -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial \
    -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" >/dev/null 2>&1 || fail "openssl: issuing $name failed"
}

# Starts a server with TLS from the "server" certificate (more settings: VAR=value...), and sets TLS_ADDR.
start_tls() {
  start_instance tls ALLOWANCE_TLS_CERT="$PKI/server.crt" ALLOWANCE_TLS_KEY="$PKI/server.key" "$@"
  TLS_ADDR="https://127.0.0.1:$INSTANCE_PORT"
}

# Asserts the last `run --separate-stderr` was refused: exit code 1, an error on stderr, nothing on stdout.
assert_refused() {
  [ "$status" -eq 1 ] || fail "expected exit code 1, got $status" "stdout: $output" "stderr: $stderr"
  assert_contains "$stderr" "error: "
  [ -z "$output" ] || fail "expected nothing on stdout, got: $output"
}

@test "tls: the CLI calls a TLS server with an https:// address and --tls-ca (or ALLOWANCE_TLS_CA)" {
  start_tls
  wait_until 20 allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt"
  run -0 allowance limits set --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt" --key "$KEY" --window daily --limit 100
  # Through the environment, as the shared helpers call the CLI.
  export ALLOWANCE_ADDR=$TLS_ADDR ALLOWANCE_TLS_CA=$PKI/ca.crt
  assert_usage "$KEY" daily limit=100 spent=0
  run -0 allowance health
  assert_eq "$output" SERVING
  # The name checked can differ from the address's host.
  run -0 allowance health --tls-server-name localhost
  run --separate-stderr allowance health --tls-server-name elsewhere.example
  assert_grpc_error UNAVAILABLE "cannot reach $TLS_ADDR"
  assert_contains "$stderr" "not valid for name"
}

@test "tls: a TLS server refuses plaintext clients and is refused by clients that do not trust its CA" {
  start_tls
  wait_until 20 allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt"
  run --separate-stderr allowance health --addr "http://127.0.0.1:$INSTANCE_PORT" --timeout 3s
  assert_refused
  run --separate-stderr allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/other.crt"
  assert_grpc_error UNAVAILABLE "cannot reach"
  assert_contains "$stderr" UnknownIssuer
  # Without --tls-ca the client trusts the public web PKI only.
  run --separate-stderr allowance health --addr "$TLS_ADDR"
  assert_grpc_error UNAVAILABLE "cannot reach"
}

@test "tls: mTLS serves only clients with a certificate from the client CA" {
  local client=(--tls-cert "$PKI/client.crt" --tls-key "$PKI/client.key")
  start_tls ALLOWANCE_TLS_CLIENT_CA="$PKI/ca.crt"
  wait_until 20 allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt" "${client[@]}"
  run --separate-stderr allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt"
  assert_refused
  run --separate-stderr allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt" \
    --tls-cert "$PKI/stranger.crt" --tls-key "$PKI/stranger.key"
  # How the refusal reads varies with timing (an alert, or a closed connection): only the refusal counts.
  assert_refused
  run -0 allowance limits set --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt" "${client[@]}" \
    --key "$KEY" --window daily --limit 7
  export ALLOWANCE_ADDR=$TLS_ADDR ALLOWANCE_TLS_CA=$PKI/ca.crt
  export ALLOWANCE_TLS_CLIENT_CERT=$PKI/client.crt ALLOWANCE_TLS_CLIENT_KEY=$PKI/client.key
  assert_usage "$KEY" daily limit=7
}

# Runs `allowance serve` with the given settings on free ports, expecting exit code 1 within 10s.
serve_exits_1() {
  local grpc metrics
  grpc=$(free_port)
  metrics=$(free_port "$grpc")
  run timeout 10 env ALLOWANCE_LISTEN="127.0.0.1:$grpc" ALLOWANCE_METRICS_LISTEN="127.0.0.1:$metrics" \
    "$@" "$ALLOWANCE_BIN" serve
  [ "$status" -eq 1 ] || fail "expected exit code 1, got $status" "$output"
  assert_not_contains "$output" "serving allowance.v1.SpendingLimits"
}

@test "tls: TLS settings that do not go together, or files that cannot be used, stop start-up (exit 1)" {
  serve_exits_1 ALLOWANCE_TLS_CERT="$PKI/server.crt"
  assert_contains "$output" ALLOWANCE_TLS_KEY
  serve_exits_1 ALLOWANCE_TLS_KEY="$PKI/server.key"
  assert_contains "$output" ALLOWANCE_TLS_CERT
  serve_exits_1 ALLOWANCE_TLS_CLIENT_CA="$PKI/ca.crt"
  assert_contains "$output" ALLOWANCE_TLS_CLIENT_CA
  echo "not a certificate" >"$BATS_TEST_TMPDIR/garbage.pem"
  serve_exits_1 ALLOWANCE_TLS_CERT="$BATS_TEST_TMPDIR/garbage.pem" ALLOWANCE_TLS_KEY="$PKI/server.key"
  assert_contains "$output" "--tls-cert $BATS_TEST_TMPDIR/garbage.pem"
  serve_exits_1 ALLOWANCE_TLS_CERT="$PKI/server.crt" ALLOWANCE_TLS_KEY="$BATS_TEST_TMPDIR/missing.key"
  assert_contains "$output" "--tls-key $BATS_TEST_TMPDIR/missing.key"
  serve_exits_1 ALLOWANCE_TLS_CERT="$PKI/server.crt" ALLOWANCE_TLS_KEY="$PKI/client.key"
  assert_contains "$output" "does not match the certificate"
  serve_exits_1 ALLOWANCE_TLS_CERT="$PKI/server.crt" ALLOWANCE_TLS_KEY="$PKI/server.key" \
    ALLOWANCE_TLS_CLIENT_CA="$BATS_TEST_TMPDIR/garbage.pem"
  assert_contains "$output" "--tls-client-ca $BATS_TEST_TMPDIR/garbage.pem"
}

@test "tls: the CLI names a TLS file it cannot use and refuses TLS options with a plaintext address (exit 1)" {
  echo "not a key" >"$BATS_TEST_TMPDIR/garbage.pem"
  run --separate-stderr allowance health --addr https://127.0.0.1:1 --tls-ca "$BATS_TEST_TMPDIR/missing.crt"
  assert_grpc_error INVALID_ARGUMENT "--tls-ca $BATS_TEST_TMPDIR/missing.crt"
  run --separate-stderr allowance health --addr https://127.0.0.1:1 --tls-ca "$PKI/ca.crt" \
    --tls-cert "$PKI/client.crt" --tls-key "$BATS_TEST_TMPDIR/garbage.pem"
  assert_grpc_error INVALID_ARGUMENT "--tls-key $BATS_TEST_TMPDIR/garbage.pem"
  run --separate-stderr allowance limits get --key "$KEY" --addr http://127.0.0.1:1 --tls-ca "$PKI/ca.crt"
  assert_grpc_error INVALID_ARGUMENT
  assert_contains "$stderr" "https://"
}

reloads_at_least() { # result count
  [ "$(metric_value "allowance_tls_reloads_total{result=\"$1\"}" "$METRICS_URL")" -ge "$2" ]
}

@test "tls: a certificate replaced on disk is served without a restart; a bad one is counted and ignored" {
  local dir="$BATS_TEST_TMPDIR/tls"
  mkdir -p "$dir"
  cp "$PKI/server.crt" "$dir/tls.crt"
  cp "$PKI/server.key" "$dir/tls.key"
  start_tls ALLOWANCE_TLS_CERT="$dir/tls.crt" ALLOWANCE_TLS_KEY="$dir/tls.key" ALLOWANCE_TLS_RELOAD_INTERVAL=200ms
  METRICS_URL="http://127.0.0.1:$INSTANCE_METRICS_PORT/metrics"
  wait_until 20 allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt"
  assert_eq "$(metric_value 'allowance_tls_reloads_total{result="error"}' "$METRICS_URL")" 0

  # A rotation gone wrong: counted, logged, and the previous certificate is still served.
  echo "-----BEGIN CERTIFICATE-----" >"$dir/tls.crt.new"
  mv -f "$dir/tls.crt.new" "$dir/tls.crt"
  wait_until 10 reloads_at_least error 1
  run -0 allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt"
  assert_contains "$(cat "$INSTANCE_LOG")" "keeping the previous ones"

  # A certificate from another CA: new connections get it.
  cp "$PKI/server-other.key" "$dir/tls.key.new"
  cp "$PKI/server-other.crt" "$dir/tls.crt.new"
  mv -f "$dir/tls.key.new" "$dir/tls.key"
  mv -f "$dir/tls.crt.new" "$dir/tls.crt"
  wait_until 10 allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/other.crt"
  run --separate-stderr allowance health --addr "$TLS_ADDR" --tls-ca "$PKI/ca.crt"
  assert_grpc_error UNAVAILABLE "cannot reach"
  reloads_at_least ok 1 || fail "allowance_tls_reloads_total{result=\"ok\"} did not count the reload"
  # No key material in the log.
  assert_not_contains "$(cat "$INSTANCE_LOG")" "$(sed -n 2p "$PKI/server-other.key")"
}
