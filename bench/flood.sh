#!/usr/bin/env bash
# The flood test, longer: strangers (junk over fresh connections, slowloris heads, slow bodies)
# against the real creditmeter binary while six real callers keep calling the simulator through
# it. Prints the real calls' latency (p50/p99/max), the refusals by reason and the proxy's RSS
# before the flood and at its peak; fails if any real call fails.
#
#   bench/flood.sh [SECONDS]        default 120 (the test suite runs it for 8)
#
# A debug build, like the test suite (pass --release to cargo yourself via CARGO_FLAGS).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-120}
# shellcheck disable=SC2086
CREDITMETER_FLOOD_SECS=$secs cargo test --locked ${CARGO_FLAGS:-} --test it \
    edge::a_flood_of_junk_and_slow_bodies_leaves_real_callers_served -- --exact --nocapture 2>&1 |
    grep -E '^flood:|test result|panicked'
