#!/usr/bin/env bash
# Side by side: the Apollo simulator called directly, through nginx, and through creditmeter
# (metered with its durable ledger, and with metering off). Figures and how to read them:
# BENCHMARKS.md.
#
#   bench/run.sh                 the full run (about 9 minutes; run it on a quiet machine)
#   bench/run.sh --smoke         a 20-second check that the harness works (CI runs this)
#   bench/run.sh --help          every option (rounds, seconds, rate, scenarios, --set, --json)
set -euo pipefail
cd "$(dirname "$0")/.."

nginx_bin() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }; }
if [ -z "$(nginx_bin)" ]; then
  echo "bench/run.sh: installing Debian's nginx" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
    || $sudo apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi
NGINX="$(nginx_bin)"

# 1,000 idle keep-alive connections need about 2,300 descriptors between us and the proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec cargo bench --locked --bench side_by_side -- --nginx "$NGINX" "$@"
