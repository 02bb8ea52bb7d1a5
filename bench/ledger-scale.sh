#!/usr/bin/env bash
# Ledger at scale: generate synthetic ledgers with a hidden burst, then time reports (rollups vs
# detail rows vs plain SQL, totals checked to the milli-credit) and the writer's commit latency
# on each file. The small ledger is the "before" for commit latency.
#
#   bash bench/ledger-scale.sh                    # 10k (baseline), 1M and 10M rows
#   ROWS="1000000" bash bench/ledger-scale.sh     # only 1M
#   KEEP=1 DIR=/tmp/ledgers bash bench/ledger-scale.sh   # keep the files
#
# Needs ~3.5 GB free in DIR for 10M rows (default: a new directory under /tmp, removed after).
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS="${ROWS:-1000000 10000000}"
DAYS="${DAYS:-365}"
DIR="${DIR:-$(mktemp -d /tmp/creditmeter-scale.XXXXXX)}"
mkdir -p "$DIR"
# The burst: 400,000 credits from one table in one hour, nine days ago at 14:00 UTC.
BURST_AT="${BURST_AT:-$(date -u -d '9 days ago' +%Y-%m-%dT14:00:00Z)}"
BURST="${BURST:-$BURST_AT,table=Runaway waterfall,credits=400000,minutes=60}"

cargo build --release --locked --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/creditmeter"

echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr)"
echo "burst: $BURST"

for n in 10000 $ROWS; do
  db="$DIR/ledger-$n.db"
  rm -f "$db" "$db-wal" "$db-shm"
  echo
  echo "=== $n rows"
  "$BIN" sim-ledger --rows "$n" --days "$DAYS" --db "$db" --burst "$BURST" 2>/dev/null
  "$BIN" ledger stats --db "$db" | sed -n '2p;5,6p'
  # Read-only figures first, then the writer (which appends rows to the file), and on the big
  # files the writer again while retention deletes the oldest ~65 days in its small batches.
  if [ "$n" = 10000 ]; then
    "$BIN" ledger bench --db "$db"
  else
    "$BIN" ledger bench --db "$db" --during-prune 300d
  fi
  if [ "$n" != 10000 ]; then
    echo
    echo "--- which day and hour did the 400k go? (one command, timed)"
    /usr/bin/time -f "(%es)" "$BIN" report --db "$db" --spikes --top 3
    echo "--- the same question in plain SQL on the same file (timed)"
    /usr/bin/time -f "(%es)" sqlite3 "$db" "SELECT strftime('%Y-%m-%dT%H:00Z', started_at/1000, 'unixepoch') AS hour,
        COALESCE(table_name, '_unattributed') AS tbl, sum(credits_milli)/1000.0 AS credits
        FROM calls GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 3;" 2>&1 || true
  fi
  if [ -z "${KEEP:-}" ]; then rm -f "$db" "$db-wal" "$db-shm"; fi
done
if [ -z "${KEEP:-}" ]; then rmdir "$DIR" 2>/dev/null || true; fi
