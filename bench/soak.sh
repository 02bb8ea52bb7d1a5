#!/usr/bin/env bash
# Soak: creditmeter under a moderate steady load for a long time, with the things that happen
# in production running alongside: SIGHUP reloads, holds placed and lifted, the reconcile
# poller. Every minute it prints the proxy's RSS, open file descriptors, WAL size, commit p99
# (over that minute, from creditmeter_ledger_commit_seconds) and the calls so far; at the end
# it stops the proxy with SIGTERM and counts ledger rows against the answers callers received.
# What to look for: RSS, fds and WAL flat after warm-up; p99 steady; rows == answers.
#
#   bench/soak.sh                      30 minutes at 20 calls/s (builds the release binary)
#   bench/soak.sh --minutes 5 --rate 10 --bin target/debug/creditmeter
#
# Options: --minutes N (30), --rate CALLS_PER_SECOND (20), --bin PATH (default: build
# --release), --keep (leave the work directory), --interval SECONDS between figures (60).
# Needs curl and python3 (its sqlite3 module reads the ledger). Cert rotation joins the
# loop once the proxy reloads its TLS certificate on SIGHUP.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=30 RATE=20 BIN="" KEEP=0 INTERVAL=60
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --interval) INTERVAL="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
done
command -v curl >/dev/null || { echo "soak.sh: needs curl" >&2; exit 69; }
if [ -z "$BIN" ]; then
  cargo build --release --locked --bin creditmeter >&2
  BIN="${CARGO_TARGET_DIR:-target}/release/creditmeter"
fi
BIN="$(realpath "$BIN")"

WORK="$(mktemp -d -t creditmeter-soak.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM_PORT=$(free_port) PROXY_PORT=$(free_port) ADMIN_PORT=$(free_port)

"$BIN" sim-apollo --listen "127.0.0.1:$SIM_PORT" --rate-limit-minute 0 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)

write_config() { # $1: the alert budget's limit (changes on each reload)
  cat >"$WORK/creditmeter.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
base_url = "http://127.0.0.1:$SIM_PORT"
[ledger]
path = "ledger.db"
[reconcile]
enabled = true
interval = "30s"
api_key_env = "SOAK_MASTER_KEY"
[[budget]]
name = "soak-alert"
scope = "global"
limit = $1
window = "day"
action = "alert"
EOF
}
write_config 1000000
touch "$WORK/chores.log" "$WORK/answers.txt"
SOAK_MASTER_KEY=soak-master-key RUST_LOG=info "$BIN" serve --config "$WORK/creditmeter.toml" \
  >"$WORK/serve.log" 2>&1 &
SERVE=$!
PIDS+=($SERVE)
for _ in $(seq 200); do
  curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }

# The load: RATE calls a second spread over a few tables and endpoints, each answer's status
# appended to answers.txt (one line per call).
load() {
  local i=0 gap
  gap=$(awk "BEGIN { print 1 / $RATE }")
  while :; do
    i=$((i + 1))
    case $((i % 4)) in
      0) path="/api/v1/people/match"; body="{\"email\":\"soak$i@example$((i % 50)).com\"}" ;;
      1) path="/api/v1/organizations/enrich?domain=example$((i % 80)).com"; body="" ;;
      2) path="/api/v1/mixed_companies/search"; body="{\"q_organization_name\":\"soak$((i % 30))\",\"page\":1}" ;;
      3) path="/api/v1/people/match"; body="{\"email\":\"held$i@example.com\"}" ;;
    esac
    table="soak-$((i % 5))"
    [ $((i % 4)) = 3 ] && table="soak-held"
    curl -s -o /dev/null -w '%{http_code}\n' -X POST \
      -H "x-api-key: soak-key" -H "x-meter-table: $table" -H "content-type: application/json" \
      ${body:+--data "$body"} "http://127.0.0.1:$PROXY_PORT$path" >>"$WORK/answers.txt" &
    sleep "$gap"
  done
}
load &
LOAD=$!
PIDS+=($LOAD)

# Every 2 minutes a reload (a new budget limit); every 3 minutes a hold on soak-held, lifted
# a minute later.
chores() {
  local n=0
  while :; do
    sleep 60
    n=$((n + 1))
    if [ $((n % 2)) = 0 ]; then
      write_config $((1000000 + n))
      kill -HUP "$SERVE"
    fi
    if [ $((n % 3)) = 0 ]; then
      "$BIN" hold --admin "http://127.0.0.1:$ADMIN_PORT" --table soak-held --reason soak >>"$WORK/chores.log" 2>&1 || true
    elif [ $((n % 3)) = 1 ] && [ "$n" -gt 1 ]; then
      "$BIN" release --admin "http://127.0.0.1:$ADMIN_PORT" --table soak-held >>"$WORK/chores.log" 2>&1 || true
    fi
  done
}
chores &
PIDS+=($!)

# commit_seconds histogram: "le count" pairs, cumulative.
buckets() {
  curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" |
    awk '/^creditmeter_ledger_commit_seconds_bucket/ { match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); print le, $NF }'
}
p99_between() { # $1 $2: bucket files (before, after) -> the p99's bucket bound, in ms
  join <(sort "$1") <(sort "$2") | awk '
    { le[NR] = $1; d[NR] = $3 - $2 }
    END {
      n = NR; total = 0
      for (i = 1; i <= n; i++) if (le[i] == "+Inf") total = d[i]
      if (total == 0) { print "n/a"; exit }
      best = "+Inf"; bestv = 1e18
      for (i = 1; i <= n; i++) if (le[i] != "+Inf" && d[i] >= 0.99 * total && le[i] + 0 < bestv) { bestv = le[i] + 0; best = le[i] }
      if (best == "+Inf") print ">max bucket"; else printf "<=%.2f ms\n", best * 1000
    }'
}

# Rows of callers' calls (the reconcile poller's own rows, table _creditmeter, left out).
ledger_rows() {
  python3 -c 'import sqlite3, sys
c = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True, timeout=5)
print(c.execute("SELECT count(*) FROM calls WHERE coalesce(table_name, \"\") <> \"_creditmeter\"").fetchone()[0])' "$WORK/ledger.db" 2>/dev/null || echo "?"
}

echo "soak: $MINUTES min at $RATE calls/s, binary $BIN, work $WORK"
printf '%-6s %-9s %-5s %-10s %-14s %-8s %-8s\n' min rss_mib fds wal_kib commit_p99 calls rows
buckets >"$WORK/b0"
END=$(( $(date +%s) + MINUTES * 60 ))
m=0
while [ "$(date +%s)" -lt "$END" ]; do
  sleep "$INTERVAL"
  m=$((m + 1))
  buckets >"$WORK/b1"
  rss=$(awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$SERVE/status")
  fds=$(ls "/proc/$SERVE/fd" | wc -l)
  wal=$(( $(stat -c %s "$WORK/ledger.db-wal" 2>/dev/null || echo 0) / 1024 ))
  calls=$(wc -l <"$WORK/answers.txt")
  rows=$(ledger_rows)
  printf '%-6s %-9s %-5s %-10s %-14s %-8s %-8s\n' "$m" "$rss" "$fds" "$wal" "$(p99_between "$WORK/b0" "$WORK/b1")" "$calls" "$rows"
  mv "$WORK/b1" "$WORK/b0"
done

kill "$LOAD" 2>/dev/null || true
sleep 3 # calls in flight finish
polls=$(curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null | awk '/^creditmeter_reconcile_polls_total/ { n += $NF } END { print n + 0 }')
kill -TERM "$SERVE"
wait "$SERVE" && code=0 || code=$?
answered=$(grep -c '^200$' "$WORK/answers.txt" || true)
held=$(grep -c '^503$' "$WORK/answers.txt" || true)
total=$(wc -l <"$WORK/answers.txt")
rows=$(ledger_rows)
echo "soak done: exit $code; $total calls answered ($answered x 200, $held x 503 held); ledger rows for them: $rows"
[ "$rows" = "$total" ] && echo "every answer is in the ledger, once" || echo "MISMATCH: $total answers, $rows rows"
echo "reloads and holds: $(grep -c 'configuration reloaded' "$WORK/serve.log" || true) reloads applied, $(grep -c '^hold .* placed' "$WORK/chores.log" || true) holds placed, $(grep -c 'released' "$WORK/chores.log" || true) lifted; reconcile polls: $polls"
