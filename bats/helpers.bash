# shellcheck shell=bash disable=SC2034,SC2154 # sets variables for the tests; bats sets $status, $output, $stderr
# Shared helpers of the end-to-end suite, loaded by every bats file (`load helpers`). Only defines functions.
#
# scripts/e2e exports what the tests use:
#   ALLOWANCE_BIN        the binary under test
#   ALLOWANCE_ADDR       the shared server's gRPC address (the CLI reads it), e.g. http://127.0.0.1:41234
#   E2E_METRICS_URL      the shared server's metrics endpoint, e.g. http://127.0.0.1:41235/metrics
#   DATABASE_URL         the suite's database (also used by second server instances)
#   E2E_STATE_DIR        scratch directory: logs, pids of extra servers
#   E2E_RUN_ID           unique per run; part of every key and transaction id
#   E2E_PG_BIN, ALLOWANCE_PG_PORT, ALLOWANCE_PG_DIR, ALLOWANCE_PG_OPTS   the throwaway Postgres (outage test)
#   E2E_ROOT             the repository
#   ALLOWANCE_TOKEN      the suite's admin credential (every scope, every key); the CLI sends it
# E2E_STRICT=1 runs the tests marked as known bugs instead of skipping them.

if declare -F bats_require_minimum_version >/dev/null; then
  bats_require_minimum_version 1.5.0
fi

# ---------------------------------------------------------------------------------------------------------
# Running the CLI

allowance() { "$ALLOWANCE_BIN" "$@"; }

# Unique ids for the current test: KEY, KEY2, KEY3 (keys) and TX (a prefix: use "$TX-1", "$TX-2", ...).
# Unique per run, file and test, so tests do not depend on each other or on their order.
new_ids() {
  local file base
  file=$(basename "${BATS_TEST_FILENAME:-adhoc}" .bats)
  base="${E2E_RUN_ID:-$$}-${file}-${BATS_TEST_NUMBER:-0}"
  KEY="key-$base"
  KEY2="key2-$base"
  KEY3="key3-$base"
  TX="tx-$base"
}

fail() {
  printf '%s\n' "$@" >&2
  return 1
}

# A test for behaviour the binary does not have yet: skipped (with the reason) unless E2E_STRICT=1.
known_bug() {
  if [ "${E2E_STRICT:-0}" != 1 ]; then
    skip "known bug: $1 (E2E_STRICT=1 runs it)"
  fi
}

# ---------------------------------------------------------------------------------------------------------
# Assertions (each prints what it expected and what it got)

assert_eq() { # actual expected [what]
  [ "$1" = "$2" ] || fail "${3:-value}: expected '$2', got '$1'"
}

assert_contains() { # haystack needle
  [[ "$1" == *"$2"* ]] || fail "expected to find: $2" "in: $1"
}

assert_not_contains() { # haystack needle
  [[ "$1" != *"$2"* ]] || fail "expected NOT to find: $2" "in: $1"
}

assert_matches() { # haystack extended-regex
  [[ "$1" =~ $2 ]] || fail "expected to match: $2" "got: $1"
}

# jq over the last `run`'s stdout; prints the raw result. jqo [jq args...] EXPR
jqo() {
  jq -r "${@:1:$#-1}" "${@: -1}" <<<"$output"
}

# Asserts a jq expression over the last `run`'s stdout is true. assert_json [jq args...] EXPR
assert_json() {
  jq -e "${@:1:$#-1}" "${@: -1}" <<<"$output" >/dev/null || fail "expected ${*: -1} to hold" "in: $output"
}

# Asserts a failed client call: exit code 1, the gRPC status name on stderr, stdout empty.
# Use after `run --separate-stderr`. assert_grpc_error CODE [text that must follow, e.g. a field name]
assert_grpc_error() {
  [ "$status" -eq 1 ] || fail "expected exit code 1, got $status" "stdout: $output" "stderr: $stderr"
  assert_contains "$stderr" "error: $1: "
  if [ -n "${2:-}" ]; then assert_contains "$stderr" "$1: $2"; fi
  [ -z "$output" ] || fail "expected nothing on stdout, got: $output"
}

# Usage of one window of a key: assert_usage KEY WINDOW field=value... (fields: limit spent held remaining;
# null for unset). The unit is $UNIT when set, else the server's default.
assert_usage() {
  local key=$1 window=$2 json kv field want got
  shift 2
  json=$(allowance limits get --key "$key" --unit "${UNIT:-}" --json) || fail "limits get --key $key failed"
  for kv in "$@"; do
    field=${kv%%=*}
    want=${kv#*=}
    got=$(jq -r --arg w "$window" --arg f "$field" '.usage[] | select(.window == $w) | .[$f] | tostring' <<<"$json")
    [ "$got" = "$want" ] || fail "$key $window $field: expected $want, got $got" "usage: $json"
  done
}

# The state of a transaction, as `tx get` reports it.
tx_state() { allowance tx get --tx "$1" --json | jq -r .state; }

tx_state_is() { [ "$(tx_state "$1")" = "$2" ]; }

# ---------------------------------------------------------------------------------------------------------
# Time and processes

now_ms() { date +%s%3N; }

# Polls a command every 100ms until it succeeds; fails after SECONDS. wait_until SECONDS cmd...
wait_until() {
  local deadline=$(($(now_ms) + $1 * 1000))
  shift
  until "$@" >/dev/null 2>&1; do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      fail "timed out waiting for: $*"
      return 1
    fi
    sleep 0.1
  done
}

port_open() { (exec 5<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_closed() { ! port_open "$1"; }

# A loopback port nothing listens on, below the usual ephemeral range. free_port [port to avoid]
free_port() {
  local p _
  for _ in $(seq 1 500); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    if [ "$p" != "${1:-}" ] && ! port_open "$p"; then
      echo "$p"
      return 0
    fi
  done
  fail "no free loopback port found"
}

healthy() { allowance health --addr "$1" --timeout 1s >/dev/null 2>&1; }

not_healthy() { ! healthy "$1"; }

# Runs a command with every file descriptor above 2 closed. For anything that outlives the test (a server,
# a daemon): bats waits for every holder of its own descriptors (fd 3 and others) before it finishes.
without_bats_fds() {
  local fd
  for fd in "/proc/$BASHPID/fd/"*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
  done
  exec "$@"
}

# Starts another `allowance serve` on the suite's database, on fresh loopback ports, without waiting for it.
# start_instance NAME [VAR=value...] sets INSTANCE_PID, INSTANCE_ADDR, INSTANCE_PORT, INSTANCE_METRICS_PORT
# and INSTANCE_LOG. The pid is recorded so that scripts/e2e stops it if the test does not.
start_instance() {
  local name=$1
  shift
  INSTANCE_PORT=$(free_port)
  INSTANCE_METRICS_PORT=$(free_port "$INSTANCE_PORT")
  INSTANCE_ADDR="http://127.0.0.1:$INSTANCE_PORT"
  INSTANCE_LOG="$E2E_STATE_DIR/$name-${BATS_TEST_NUMBER:-0}.log"
  (without_bats_fds env ALLOWANCE_LISTEN="127.0.0.1:$INSTANCE_PORT" \
    ALLOWANCE_METRICS_LISTEN="127.0.0.1:$INSTANCE_METRICS_PORT" \
    ALLOWANCE_HEALTH_INTERVAL=200ms ALLOWANCE_AUTH_REFRESH=200ms \
    "$@" "$ALLOWANCE_BIN" serve) </dev/null >"$INSTANCE_LOG" 2>&1 &
  INSTANCE_PID=$!
  echo "$INSTANCE_PID" >>"$E2E_STATE_DIR/pids"
}

# A new credential with every scope on the database at URL (migrated), made as operators make the first one.
# db_token URL
db_token() {
  allowance callers create --name "test-$KEY" --scopes spend,read,admin,ratelimit --database-url "$1" --json | jq -er .credential
}

# True while a process runs (an exited child not yet reaped is a zombie: not running).
running() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# Waits for a process started by this shell (not in a subshell: call it directly, not in $(...)) to exit,
# and sets EXIT_CODE. Fails after SECONDS. wait_exit PID SECONDS
wait_exit() {
  local pid=$1 deadline=$(($(now_ms) + $2 * 1000))
  EXIT_CODE=""
  while running "$pid"; do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      fail "process $pid still running after $2s"
      return 1
    fi
    sleep 0.05
  done
  EXIT_CODE=0
  wait "$pid" || EXIT_CODE=$?
}

# Stops an instance started by start_instance if it still runs (SIGTERM, then SIGKILL after 10s).
stop_instance() {
  local pid=${1:-${INSTANCE_PID:-}}
  [ -n "$pid" ] || return 0
  if running "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" 10 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------------------
# The throwaway Postgres (for the outage test)

# Runs a Postgres tool as the data directory's owner (the server refuses to run as root).
pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Stops the suite's Postgres keeping its data (scripts/pg-throwaway stop would delete it).
pg_stop_keep_data() {
  pg_as_owner "$E2E_PG_BIN/pg_ctl" -D "$ALLOWANCE_PG_DIR" -m fast -w -t 30 stop >/dev/null
}

# Starts it again on its existing data directory.
pg_start_again() {
  (without_bats_fds "$E2E_ROOT/scripts/pg-throwaway" start) >/dev/null
}

pg_running() { "$E2E_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$ALLOWANCE_PG_PORT"; }

# Prometheus text of the shared server (or of the URL given).
metrics_text() { curl -sf --max-time 5 "${1:-$E2E_METRICS_URL}"; }

# The value of one sample, e.g. metric_value 'allowance_reservations_total{outcome="denied"}'; 0 if absent.
metric_value() {
  local v
  v=$(metrics_text "${2:-}" | awk -v s="$1" 'index($0, s " ") == 1 { print $2 }' | head -n 1)
  echo "${v:-0}"
}
