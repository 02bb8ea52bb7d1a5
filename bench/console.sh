#!/usr/bin/env bash
# The console at scale: a synthetic ledger (10M rows over a year by default, with a hidden
# burst), `creditmeter serve` on it, and every console page fetched over HTTP, timed from the
# request to the last byte (curl's time_total). Prints first / best / median per page; no
# thresholds (the target, under 300 ms a page, is checked by reading the figures).
#
#   bash bench/console.sh                     # 10M rows, ~4 min to generate, ~3 GB in /tmp
#   ROWS=1000000 bash bench/console.sh        # 1M rows
#   DB=/tmp/ledger-10000000.db bash bench/console.sh   # reuse a ledger (kept, not generated)
#   RUNS=10 bash bench/console.sh             # fetches per page (default 7)
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS="${ROWS:-10000000}"
DAYS="${DAYS:-365}"
RUNS="${RUNS:-7}"
DIR="$(mktemp -d /tmp/creditmeter-console.XXXXXX)"
BURST_AT="${BURST_AT:-$(date -u -d '9 days ago' +%Y-%m-%dT14:00:00Z)}"

cargo build --release --locked --quiet -p creditmeter
BIN="${CARGO_TARGET_DIR:-target}/release/creditmeter"

echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr)"
if [ -z "${DB:-}" ]; then
  DB="$DIR/ledger.db"
  "$BIN" sim-ledger --rows "$ROWS" --days "$DAYS" --db "$DB" \
    --burst "$BURST_AT,table=Runaway waterfall,credits=400000,minutes=60" 2>/dev/null
fi
"$BIN" ledger stats --db "$DB" | sed -n '2p;5,6p'

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PROXY_PORT=$(port); ADMIN_PORT=$(port)
cat > "$DIR/creditmeter.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[ledger]
path = "$DB"
EOF
export CREDITMETER_ADMIN_TOKEN="bench-console-token"
"$BIN" serve --config "$DIR/creditmeter.toml" 2>"$DIR/serve.log" &
SERVE=$!
cleanup() {
  kill "$SERVE" 2>/dev/null || true
  wait "$SERVE" 2>/dev/null || true
  if [ -z "${KEEP:-}" ] && [ "$DB" = "$DIR/ledger.db" ]; then rm -f "$DB" "$DB-wal" "$DB-shm"; fi
  rm -rf "$DIR"
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break
  sleep 0.1
done

BASE="http://127.0.0.1:$ADMIN_PORT"
AUTH="Authorization: Bearer $CREDITMETER_ADMIN_TOKEN"
# The busiest table, workflow and key of the last 30 days, as a person would click them.
top() { "$BIN" report --db "$DB" --since 30d --by "$1" --top 1 --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["key"])'; }
urlenc() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
TABLE=$(urlenc "$(top table)"); WORKFLOW=$(urlenc "$(top workflow)"); KEY=$(urlenc "$(top key)")
CURSOR=$(curl -sf -H "$AUTH" "$BASE/ui/table?name=$TABLE&window=7d" | grep -o 'cursor=[0-9.]*' | head -1 | cut -d= -f2)

pages=(
  "overview, 24h|/ui/?window=24h"
  "overview, 7d|/ui/?window=7d"
  "overview, 30d|/ui/?window=30d"
  "table, 7d|/ui/table?name=$TABLE&window=7d"
  "table, 30d|/ui/table?name=$TABLE&window=30d"
  "table, 7d, calls page 2|/ui/table?name=$TABLE&window=7d&cursor=$CURSOR"
  "workflow, 7d|/ui/workflow?name=$WORKFLOW&window=7d"
  "workflow, 30d|/ui/workflow?name=$WORKFLOW&window=30d"
  "endpoint people_match, 7d|/ui/endpoint?name=people_match&window=7d"
  "endpoint people_match, 30d|/ui/endpoint?name=people_match&window=30d"
  "key, 7d|/ui/key?name=$KEY&window=7d"
  "key, 30d|/ui/key?name=$KEY&window=30d"
  "reconciliation, 7d|/ui/reconcile?window=7d"
  "guardrails, 7d|/ui/guardrails?window=7d"
)
echo
echo "ledger: $DB; $RUNS fetches per page, ms (first / best / median), page size"
printf '%-36s %8s %8s %8s %9s\n' page first best median bytes
for entry in "${pages[@]}"; do
  name="${entry%%|*}"; path="${entry#*|}"
  times=()
  for _ in $(seq "$RUNS"); do
    out=$(curl -s -o /dev/null -w '%{http_code} %{time_total} %{size_download}' -H "$AUTH" "$BASE$path")
    read -r code t size <<<"$out"
    if [ "$code" != 200 ]; then echo "$name: HTTP $code" >&2; exit 1; fi
    times+=("$t")
  done
  printf '%s\n' "${times[@]}" | python3 -c '
import sys
name, size = sys.argv[1], sys.argv[2]
t = [float(x) * 1000 for x in sys.stdin.read().split()]
s = sorted(t)
print(f"{name:<36} {t[0]:8.1f} {s[0]:8.1f} {s[len(s)//2]:8.1f} {size:>9}")
' "$name" "$size"
done
