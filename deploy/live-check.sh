#!/usr/bin/env bash
# Live checks against a real Prometheus: the Apollo simulator, creditmeter in
# front of it, and Debian's `prometheus` scraping creditmeter every second with
# deploy/prometheus/creditmeter-rules.yml loaded, unmodified. Then a known
# workload, and assertions through Prometheus' HTTP API:
#
#   * promtool check metrics is clean on a live /metrics;
#   * sum(creditmeter_credits_total) == the ledger's sum(credits_milli)/1000
#     == what the simulator billed == what the callers were told they were
#     billed (also by credit type, by table, and call counts), twice;
#   * every dashboard expression (deploy/panel-exprs.py) evaluates and returns
#     data, with $table/$workflow as `.*` and as specific values (reconcile is
#     on, and credits spent at the sim outside creditmeter must show as
#     unmetered, so the reconciliation and settlement panels have data);
#   * CreditmeterCreditBurnSpike stays quiet under steady traffic and fires,
#     after its full `for: 5m`, for a constructed burst;
#   * creditmeter stops cleanly on SIGTERM with the ledger intact.
#
#   deploy/live-check.sh [--live-baseline]
#
# The spike alert compares the 5m burn with a baseline learned from history
# (the hour before last, the 24h average). A fresh Prometheus has none, so by
# default the script backfills 6h of a quiet recorded burn rate
# (creditmeter:credits:rate5m at BASELINE credits/s, one sample a second, like
# the live evaluation) with `promtool tsdb create-blocks-from openmetrics`
# before Prometheus starts: "this Prometheus has watched a quiet account for
# 6h". Everything after that is live: the recording rules, the alert and its
# `for:`. About 7 minutes. --live-baseline backfills nothing and instead runs
# a 9-minute quiet phase so the baseline is learned live (about 15 minutes).
#
# Needs python3, promtool and prometheus (Debian: apt-get install prometheus).
# Uses target/release/creditmeter (CREDITMETER_BIN to override; built with
# cargo if missing). Only loopback ports; every process it starts is killed on
# exit by PID. LIVE_CHECK_KEEP=1 keeps the temp dir (logs, ledger, TSDB).
# Last line: "live checks: N passed, N failed"; exit 1 on any failure.
set -uo pipefail

# The whole script is one compound command, so bash has parsed all of it
# before it starts: editing this file during a run cannot derail the run.
{
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
D=$ROOT/deploy
LIVE=$D/live/livecheck.py

mode=backfill
case "${1:-}" in
"") ;;
--live-baseline) mode=live ;;
*)
    echo "usage: $0 [--live-baseline]" >&2
    exit 2
    ;;
esac

BASELINE=0.5           # backfilled quiet burn, credits/s (the quiet phase burns ~1/s, under 4x this)
RATE_LIMIT_MINUTE=60   # sim: calls per minute per (key, endpoint)

passed=0 failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
finish() {
    echo "live checks: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}
say() { printf '==> %s\n' "$*"; }

# ---------------------------------------------------------------- prerequisites
missing=()
for tool in python3 promtool prometheus; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "live-check: missing ${missing[*]}." >&2
    echo "  promtool and prometheus come with Debian's prometheus package: apt-get install -y prometheus" >&2
    fail "prerequisites (${missing[*]} not installed)"
    finish
fi
say "prometheus: $(prometheus --version 2>&1 | head -n 1)"

BIN=${CREDITMETER_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/creditmeter}
if [ ! -x "$BIN" ] && [ -z "${CREDITMETER_BIN:-}" ] && command -v cargo >/dev/null 2>&1; then
    say "building $BIN (cargo build --release)"
    cargo build --release --quiet || true
fi
if [ ! -x "$BIN" ]; then
    fail "creditmeter binary at $BIN (build it: cargo build --release)"
    finish
fi
say "creditmeter: $BIN"

# ---------------------------------------------------------------- processes
tmp=$(mktemp -d "${TMPDIR:-/tmp}/creditmeter-live.XXXXXX")
pids=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "${LIVE_CHECK_KEEP:-0}" = 1 ]; then
        echo "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'fail "interrupted by a signal"; echo "live checks: $passed passed, $failed failed"; exit 130' INT TERM

drop_pid() {
    local pid keep=()
    for pid in "${pids[@]}"; do
        [ "$pid" = "$1" ] || keep+=("$pid")
    done
    pids=("${keep[@]}")
}

# waited CMD...: run CMD as a child and wait for it, setting rc. Bash runs a
# trap only after a foreground command ends; `wait` is interrupted at once,
# so a SIGTERM (CI timeout) cleans up now rather than minutes later. A reaped
# PID leaves the cleanup list, so cleanup never signals a reused PID.
waited() {
    "$@" &
    local pid=$!
    pids+=("$pid")
    wait "$pid"
    rc=$?
    drop_pid "$pid"
    return "$rc"
}

show_logs() {
    local f
    for f in "$tmp"/sim.log "$tmp"/creditmeter.log "$tmp"/prometheus.log; do
        [ -s "$f" ] || continue
        echo "---- last lines of $(basename "$f")"
        tail -n 25 "$f" | sed 's/\x1b\[[0-9;]*m//g'
    done
}

# wait_http NAME URL SECONDS PID: until URL answers 200, or the process dies.
wait_http() {
    python3 - "$@" <<'EOF'
import os, sys, time, urllib.request
name, url, timeout, pid = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"{name} exited")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"{name}: no 200 from {url} within {timeout}s")
EOF
}

read -r SIM_PORT PROXY_PORT ADMIN_PORT PROM_PORT < <(python3 "$LIVE" ports 4)
SIM=http://127.0.0.1:$SIM_PORT
PROXY=http://127.0.0.1:$PROXY_PORT
ADMIN=http://127.0.0.1:$ADMIN_PORT
PROM=http://127.0.0.1:$PROM_PORT
say "temp dir $tmp; sim $SIM, proxy $PROXY, admin $ADMIN, prometheus $PROM"

"$BIN" sim-apollo --listen "127.0.0.1:$SIM_PORT" --rate-limit-minute "$RATE_LIMIT_MINUTE" >"$tmp/sim.log" 2>&1 &
pids+=("$!")
sim_pid=$!

cat >"$tmp/creditmeter.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
base_url = "$SIM"
[ledger]
path = "$tmp/ledger.db"
[settle]
# Phone reveals bill when their job ends; creditmeter polls the results with this key.
api_key_env = "CREDITMETER_LIVE_SETTLE_KEY"
first_poll = "1s"
[reconcile]
# Balance snapshots every 5s, so the reconciliation panels have windows to show (the
# driver spends credits at the sim outside creditmeter and expects them unmetered).
enabled = true
interval = "5s"
balance_lag = "1s"
api_key_env = "CREDITMETER_LIVE_SETTLE_KEY"
EOF
export CREDITMETER_LIVE_SETTLE_KEY=live-settle-key
"$BIN" serve --config "$tmp/creditmeter.toml" >"$tmp/creditmeter.log" 2>&1 &
pids+=("$!")
cm_pid=$!

if wait_http sim "$SIM/__sim/billed" 20 "$sim_pid" && wait_http creditmeter "$ADMIN/readyz" 30 "$cm_pid"; then
    pass "simulator and creditmeter started (creditmeter /readyz 200)"
else
    fail "simulator and creditmeter started"
    show_logs
    finish
fi

# ---------------------------------------------------------------- Prometheus
mkdir -p "$tmp/tsdb"
rules=$(cd "$D/prometheus" && pwd)/creditmeter-rules.yml
if [ "$mode" = backfill ]; then
    say "backfilling 6h of creditmeter:credits:rate5m = $BASELINE credits/s (promtool tsdb create-blocks-from openmetrics)"
    if python3 "$LIVE" backfill --rate "$BASELINE" --hours 6 --step 1 --end "$(($(date +%s) - 2))" >"$tmp/baseline.om" &&
        promtool tsdb create-blocks-from openmetrics "$tmp/baseline.om" "$tmp/tsdb" >"$tmp/backfill.log" 2>&1; then
        pass "baseline history backfilled ($(find "$tmp/tsdb" -mindepth 1 -maxdepth 1 -type d | wc -l) blocks)"
    else
        fail "baseline history backfilled"
        cat "$tmp/backfill.log"
        finish
    fi
    rm -f "$tmp/baseline.om"
    run_args=(--backfill-rate "$BASELINE" --quiet 60 --ambient-period 1 --burst-timeout 420)
else
    # Without history the baseline is the average of the run so far, burst
    # included: ~0.5 credits/s for 9 minutes keeps it low enough.
    run_args=(--quiet 540 --ambient-period 2 --burst-timeout 480)
fi

cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $rules
scrape_configs:
  - job_name: creditmeter
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
if promtool check config "$tmp/prometheus.yml" >"$tmp/check-config.log" 2>&1; then
    pass "promtool check config (live config with the production rules file)"
else
    fail "promtool check config (live config)"
    cat "$tmp/check-config.log"
fi

prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=2d \
    >"$tmp/prometheus.log" 2>&1 &
pids+=("$!")
prom_pid=$!
if wait_http prometheus "$PROM/-/ready" 60 "$prom_pid"; then
    pass "prometheus started"
else
    fail "prometheus started"
    show_logs
    finish
fi

# ---------------------------------------------------------------- workload and assertions
say "driving the workload ($mode baseline)"
waited python3 -u "$LIVE" run --prom "$PROM" --proxy "$PROXY" --admin "$ADMIN" --sim "$SIM" \
    --ledger "$tmp/ledger.db" --rules "$rules" --counts "$tmp/counts" \
    --rate-limit-minute "$RATE_LIMIT_MINUTE" "${run_args[@]}"
if [ -s "$tmp/counts" ]; then
    read -r p f <"$tmp/counts"
    passed=$((passed + p))
    failed=$((failed + f))
else
    fail "workload driver finished"
fi

# ---------------------------------------------------------------- graceful stop, restart
ledger_sums() {
    python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*), coalesce(sum(credits_milli), 0) from calls").fetchone())' "$tmp/ledger.db" 2>&1
}
# stop_cm: SIGTERM creditmeter, wait up to 45s (5s drain delay + up to 30s drain); sets rc.
stop_cm() {
    kill -TERM "$cm_pid" 2>/dev/null
    rc=timeout
    for _ in $(seq 1 450); do
        if ! kill -0 "$cm_pid" 2>/dev/null; then
            wait "$cm_pid"
            rc=$?
            drop_pid "$cm_pid"
            return
        fi
        sleep 0.1
    done
}

say "stopping creditmeter with SIGTERM"
before=$(ledger_sums)
stop_cm
after=$(ledger_sums)
# Credits must not change. Rows may: with reconcile on, creditmeter's own free balance polls
# (0 credits, table _creditmeter) go on being recorded until the listener closes.
if [ "$rc" = 0 ] && [ "${before#*, }" = "${after#*, }" ]; then
    pass "creditmeter exits 0 on SIGTERM, credits unchanged: before $before, after $after (rows, credits_milli)"
else
    fail "creditmeter exits 0 on SIGTERM (exit: $rc; ledger before $before, after $after)"
fi

say "restarting creditmeter on the same ledger"
restart_at=$(date +%s.%N)
"$BIN" serve --config "$tmp/creditmeter.toml" >>"$tmp/creditmeter.log" 2>&1 &
pids+=("$!")
cm_pid=$!
if wait_http creditmeter "$ADMIN/readyz" 30 "$cm_pid"; then
    rm -f "$tmp/counts"
    waited python3 -u "$LIVE" after-restart --prom "$PROM" --ledger "$tmp/ledger.db" --since "$restart_at" --counts "$tmp/counts"
    if [ -s "$tmp/counts" ]; then
        read -r p f <"$tmp/counts"
        passed=$((passed + p))
        failed=$((failed + f))
    else
        fail "after-restart checks finished"
    fi
    stop_cm
    if [ "$rc" = 0 ]; then
        pass "restarted creditmeter exits 0 on SIGTERM"
    else
        fail "restarted creditmeter exits 0 on SIGTERM (exit: $rc)"
    fi
else
    fail "creditmeter restarted on the same ledger"
fi

[ "$failed" -eq 0 ] || show_logs
finish
}
