#!/usr/bin/env bash
# Offline checks for everything under deploy/: Prometheus config, rules and
# their unit tests, the Grafana dashboard (JSON, structure, every PromQL
# expression parses, every recording rule it reads exists), the generated
# PrometheusRule, the config files, and, where the tools are installed, the
# Kubernetes, compose and systemd files.
#
#   deploy/check.sh            (from anywhere; needs promtool and python3)
#
# promtool comes with Prometheus: `apt-get install prometheus` on Debian.
# Checks whose optional tool is missing are reported as skipped. The last line
# is "N passed, N failed, N skipped"; the exit status is 1 if any failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
D=deploy
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

passed=0 failed=0 skipped=0

# run NAME CMD...: run one check, show its output, count the result.
run() {
    local name=$1
    shift
    echo "==> $name"
    if "$@"; then
        echo "ok: $name"
        passed=$((passed + 1))
    else
        echo "FAILED: $name"
        failed=$((failed + 1))
    fi
    echo
}

skip() {
    echo "==> $1"
    echo "skipped: $1 ($2)"
    echo
    skipped=$((skipped + 1))
}

have() { command -v "$1" >/dev/null 2>&1; }

if ! have python3; then
    echo "deploy/check.sh needs python3" >&2
    exit 2
fi

# ---------------------------------------------------------------- Prometheus
# prometheus.yml reads the admin token from /run/secrets/creditmeter_admin_token (compose
# mounts it); promtool wants that file to exist, so check a copy that points at a stand-in.
prometheus_config() {
    mkdir -p "$tmp/prometheus"
    : >"$tmp/admin-token"
    sed "s#/run/secrets/creditmeter_admin_token#$tmp/admin-token#" "$D/prometheus/prometheus.yml" >"$tmp/prometheus/prometheus.yml"
    cp "$D/prometheus/creditmeter-rules.yml" "$tmp/prometheus/"
    promtool check config "$tmp/prometheus/prometheus.yml"
}
if have promtool; then
    run "promtool check config prometheus.yml" prometheus_config
    run "promtool check rules creditmeter-rules.yml" promtool check rules "$D/prometheus/creditmeter-rules.yml"
    run "promtool test rules creditmeter-rules.test.yml" promtool test rules "$D/prometheus/creditmeter-rules.test.yml"
else
    echo "promtool not found: install Prometheus (Debian: apt-get install prometheus)" >&2
    failed=$((failed + 3))
fi

alert_tests_cover_every_alert() {
    python3 - "$D/prometheus/creditmeter-rules.yml" "$D/prometheus/creditmeter-rules.test.yml" <<'EOF'
import re, sys
rules, tests = (open(p, encoding="utf-8").read() for p in sys.argv[1:3])
alerts = re.findall(r"^\s*-\s*alert:\s*(\S+)", rules, re.M)
cases = re.findall(r"^\s*alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\S*)", tests, re.M)
firing = {name for name, rest in cases if rest != "[]"}
quiet = {name for name, rest in cases if rest == "[]"}
bad = 0
for name in alerts:
    missing = [what for what, have in (("firing", firing), ("not firing", quiet)) if name not in have]
    if missing:
        print(f"{name}: no {' and no '.join(missing)} test case")
        bad += 1
    else:
        print(f"{name}: firing and not-firing cases")
unknown = sorted((firing | quiet) - set(alerts))
for name in unknown:
    print(f"test for unknown alert {name}")
sys.exit(1 if bad or unknown or not alerts else 0)
EOF
}
run "every alert has firing and not-firing tests" alert_tests_cover_every_alert

# ---------------------------------------------------------------- Grafana
dashboard="$D/grafana/creditmeter.json"
run "dashboard is valid JSON" python3 -m json.tool "$dashboard" "$tmp/dashboard.json"

dashboard_structure() {
    python3 - "$dashboard" "$tmp/variables.rules.yml" <<'EOF'
import json, re, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
errors = []
def err(msg): errors.append(msg)

if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 39:
    err(f"schemaVersion {d.get('schemaVersion')!r} < 39")
if not d.get("uid") or not d.get("title"):
    err("dashboard needs uid and title")
if d.get("id") is not None:
    err("dashboard id must be null for provisioning")

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))

panels = list(walk(d.get("panels", [])))
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)) or None in ids:
    err(f"panel ids must be unique and set: {ids}")
boxes = []
exprs = []
for p in panels:
    where = f"panel {p.get('id')} {p.get('title')!r}"
    g = p.get("gridPos", {})
    if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
        err(f"{where}: bad gridPos {g}")
        continue
    for other, og in boxes:
        if g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]:
            err(f"{where}: overlaps panel {other}")
    boxes.append((p.get("id"), g))
    if p.get("type") == "row":
        continue
    if p.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
        err(f"{where}: datasource must be the ${{datasource}} variable")
    if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
        err(f"{where}: no unit")
    targets = p.get("targets") or []
    if not targets:
        err(f"{where}: no targets")
    refs = [t.get("refId") for t in targets]
    if len(refs) != len(set(refs)):
        err(f"{where}: duplicate refIds {refs}")
    for t in targets:
        if t.get("datasource", {}).get("uid") != "${datasource}":
            err(f"{where} {t.get('refId')}: target datasource must be ${{datasource}}")
        if not t.get("expr"):
            err(f"{where} {t.get('refId')}: empty expr")
        exprs.append(t.get("expr", ""))

variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
ds = variables.get("datasource", {})
if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    err("templating: need a `datasource` variable of type datasource, query prometheus")
rules = ["groups:", "  - name: dashboard-variables", "    rules:"]
for name in ("table", "workflow"):
    v = variables.get(name)
    if not v:
        err(f"templating: no `{name}` variable")
        continue
    for key, want in (("type", "query"), ("multi", True), ("includeAll", True), ("allValue", ".*")):
        if v.get(key) != want:
            err(f"templating {name}: {key} is {v.get(key)!r}, want {want!r}")
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v.get("definition", ""))
    if not m or m.group(2) != name:
        err(f"templating {name}: definition {v.get('definition')!r} is not label_values(<selector>, {name})")
    else:
        sel = m.group(1).replace("$table", ".*").replace("$workflow", ".*")
        rules += [f"      - record: dashboard:variable_{name}", f"        expr: {json.dumps(sel)}"]
    if not any(f"${name}" in e or "${" + name in e for e in exprs):
        err(f"templating {name}: no panel expression uses ${name}")
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(rules) + "\n")

for e in errors:
    print(e)
print(f"{len(panels)} panels, {len(exprs)} expressions, variables: {', '.join(variables)}")
sys.exit(1 if errors else 0)
EOF
}
run "dashboard structure (ids, layout, datasource, units, variables)" dashboard_structure

dashboard_exprs_parse() {
    "$D/panel-exprs.py" --as-rules >"$tmp/panels.rules.yml" || return 1
    # $table/$workflow as a multi-value selection and an odd regex, too.
    "$D/panel-exprs.py" '(a|b\.c)' 'wf "quoted"' 7d --rate-interval 2m --as-rules >"$tmp/panels-multi.rules.yml" || return 1
    promtool check rules "$tmp/panels.rules.yml" "$tmp/panels-multi.rules.yml" "$tmp/variables.rules.yml"
}
if have promtool; then
    run "every dashboard expression parses (promtool)" dashboard_exprs_parse
else
    skip "every dashboard expression parses (promtool)" "no promtool"
fi

dashboard_uses_known_rules() {
    python3 - "$D/prometheus/creditmeter-rules.yml" <<EOF
import json, re, subprocess, sys
recorded = set(re.findall(r"^\s*-\s*record:\s*(\S+)", open(sys.argv[1], encoding="utf-8").read(), re.M))
out = subprocess.run(["$D/panel-exprs.py"], check=True, capture_output=True, text=True).stdout
used = set()
for line in out.splitlines():
    used |= set(re.findall(r"\bcreditmeter:[A-Za-z0-9_:]+", json.loads(line)["expr"]))
missing = sorted(used - recorded)
for name in missing:
    print(f"dashboard reads {name}, which no recording rule defines")
print(f"dashboard reads {len(used)} recorded series: {', '.join(sorted(used))}")
sys.exit(1 if missing else 0)
EOF
}
run "dashboard reads only recording rules that exist" dashboard_uses_known_rules

# ---------------------------------------------------------------- Kubernetes
run "k8s PrometheusRule matches the rules file" "$D/k8s/gen-prometheusrule.sh" --check

config_files() {
    python3 - "$D/container/creditmeter.toml" "$D/k8s/configmap.yaml" <<'EOF'
import re, sys, tomllib
# Keys fixed by DESIGN.md; creditmeter rejects unknown keys.
known = {"proxy.listen", "admin.listen", "admin.hosts", "upstream.base_url", "upstream.ca_file", "ledger.path", "catalog.path"}
def keys(doc, prefix=""):
    for k, v in doc.items():
        if isinstance(v, dict):
            yield from keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
container = dict(keys(tomllib.loads(open(sys.argv[1], encoding="utf-8").read())))
# The ConfigMap's creditmeter.toml: the indented block under its key.
text = open(sys.argv[2], encoding="utf-8").read()
m = re.search(r"^  creditmeter\.toml: \|\n((?:    .*\n|\n)+)", text, re.M)
configmap = dict(keys(tomllib.loads(re.sub(r"^    ", "", m.group(1), flags=re.M)))) if m else {}
bad = 0
for name, cfg in (("container/creditmeter.toml", container), ("k8s/configmap.yaml", configmap)):
    unknown = set(cfg) - known
    if not cfg or unknown:
        print(f"{name}: unknown or no keys: {sorted(unknown)}")
        bad = 1
    for key in ("proxy.listen", "admin.listen"):
        if not str(cfg.get(key, "")).startswith("0.0.0.0:"):
            print(f"{name}: {key} should listen on 0.0.0.0 inside a container")
            bad = 1
if container != configmap:
    print(f"container config and ConfigMap differ: {container} vs {configmap}")
    bad = 1
print(f"config keys: {', '.join(sorted(container))}")
sys.exit(bad)
EOF
}
run "container and ConfigMap configs use known keys and agree" config_files

if python3 -c 'import yaml' 2>/dev/null; then
    yaml_files() {
        python3 - "$D"/compose.yaml "$D"/grafana/provisioning/*/*.yaml "$D"/k8s/*.yaml <<'EOF'
import sys, yaml
bad = 0
kinds_seen = set()
for path in sys.argv[1:]:
    try:
        docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d is not None]
    except yaml.YAMLError as e:
        print(f"{path}: {e}")
        bad = 1
        continue
    if not docs:
        print(f"{path}: empty")
        bad = 1
    for doc in docs:
        if "/k8s/" in path and not {"apiVersion", "kind"} <= set(doc):
            print(f"{path}: a Kubernetes object needs apiVersion and kind")
            bad = 1
        if doc.get("kind") == "Deployment":
            spec = doc["spec"]
            pod = spec["template"]["spec"]
            c = pod["containers"][0]
            for cond, msg in (
                (spec.get("replicas") == 1, "replicas must be 1 (single-writer ledger)"),
                (spec.get("strategy", {}).get("type") == "Recreate", "strategy must be Recreate"),
                (c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", "liveness probe must GET /healthz"),
                (c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", "readiness probe must GET /readyz"),
                # shutdown.drain_delay (5s) + shutdown.grace (30s), the ConfigMap's defaults;
                # a preStop hook would add its own time.
                (pod.get("terminationGracePeriodSeconds", 30) > 35 and "preStop" not in c.get("lifecycle", {}),
                 "terminationGracePeriodSeconds must exceed drain_delay + grace (35s), with no preStop hook adding more"),
                (any(e.get("name") == "CREDITMETER_ADMIN_TOKEN" and "secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])),
                 "the admin listens on 0.0.0.0: CREDITMETER_ADMIN_TOKEN must come from a Secret"),
            ):
                if not cond:
                    print(f"{path}: {msg}")
                    bad = 1
        if doc.get("kind") == "ServiceMonitor":
            for ep in doc["spec"]["endpoints"]:
                if "authorization" not in ep:
                    print(f"{path}: the ServiceMonitor must send the admin token (/metrics is protected off loopback)")
                    bad = 1
        if doc.get("kind") == "NetworkPolicy":
            kinds_seen.add("NetworkPolicy")
if "NetworkPolicy" not in kinds_seen:
    print("k8s: no NetworkPolicy guards the admin port")
    bad = 1
print(f"{len(sys.argv) - 1} YAML files parse")
sys.exit(bad)
EOF
    }
    run "compose, provisioning and k8s YAML parse" yaml_files
else
    skip "compose, provisioning and k8s YAML parse" "python3 has no yaml module"
fi

if have kubectl; then
    run "kubectl kustomize deploy/k8s" sh -c "kubectl kustomize '$D/k8s' >'$tmp/k8s.yaml' && grep -c '^kind:' '$tmp/k8s.yaml' | sed 's/\$/ objects rendered/'"
else
    skip "kubectl kustomize deploy/k8s" "no kubectl"
fi

if have docker && docker compose version >/dev/null 2>&1; then
    run "docker compose config" docker compose -f "$D/compose.yaml" config --quiet
else
    skip "docker compose config" "no docker compose"
fi

# ---------------------------------------------------------------- systemd
systemd_unit() {
    # verify wants ExecStart's binary to exist; check the unit with a stand-in.
    mkdir -p "$tmp/systemd"
    sed 's#^ExecStart=/usr/local/bin/creditmeter#ExecStart=/bin/true#' \
        "$D/systemd/creditmeter.service" >"$tmp/systemd/creditmeter.service"
    local out
    out=$(systemd-analyze verify "$tmp/systemd/creditmeter.service" 2>&1) || { echo "$out"; return 1; }
    # verify only warns about unknown or invalid settings: treat any as failure.
    if [ -n "$out" ]; then
        echo "$out"
        return 1
    fi
    systemd-analyze security --offline=true "$tmp/systemd/creditmeter.service" 2>/dev/null | tail -n 1
    return 0
}
if have systemd-analyze; then
    run "systemd-analyze verify creditmeter.service" systemd_unit
else
    skip "systemd-analyze verify creditmeter.service" "no systemd-analyze"
fi

if have shellcheck; then
    run "shellcheck" shellcheck "$D/check.sh" "$D/live-check.sh" "$D/k8s/gen-prometheusrule.sh"
else
    skip "shellcheck" "no shellcheck"
fi

echo "deploy checks: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
