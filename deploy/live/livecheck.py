#!/usr/bin/env python3
"""The Python half of deploy/live-check.sh (standard library only).

    livecheck.py ports N                      print N free loopback TCP ports
    livecheck.py backfill --rate R ...        OpenMetrics baseline history for promtool
    livecheck.py run --prom URL ...           drive the workload, assert through Prometheus

live-check.sh starts (and kills) the processes; `run` talks to them over
loopback HTTP and to the ledger with sqlite3, prints one line per check, and
writes "PASSED FAILED" to --counts.
"""

import argparse
import json
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
PANEL_EXPRS = DEPLOY / "panel-exprs.py"
DASHBOARD = DEPLOY / "grafana" / "creditmeter.json"

SPIKE = "CreditmeterCreditBurnSpike"
SPIKE_FOR_SECONDS = 300  # the rule's `for: 5m`, asserted against /api/v1/rules
HTTP_TIMEOUT = 10
EPS = 1e-6


# --------------------------------------------------------------------------- output

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.failures = []

    def ok(self, name, detail=""):
        self.passed += 1
        log(f"PASS {name}" + (f": {detail}" if detail else ""))

    def fail(self, name, detail=""):
        self.failed += 1
        self.failures.append(name)
        log(f"FAIL {name}" + (f": {detail}" if detail else ""))

    def check(self, cond, name, detail=""):
        (self.ok if cond else self.fail)(name, detail)
        return cond


def close(a, b):
    return abs(a - b) <= EPS * max(1.0, abs(a), abs(b))


# --------------------------------------------------------------------------- HTTP

def http(method, url, body=None, headers=None, timeout=HTTP_TIMEOUT):
    """Returns (status, headers, body bytes); HTTP errors are answers, not exceptions."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


class PromError(Exception):
    pass


class Prom:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def api(self, path, params):
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            status, _, body = http("GET", url, timeout=30)
        except OSError as err:
            raise PromError(f"{path}: {err}") from err
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise PromError(f"{path}: HTTP {status}, not JSON: {body[:200]!r}") from err
        if doc.get("status") != "success":
            raise PromError(f"{doc.get('errorType')}: {doc.get('error')}")
        return doc

    def query(self, expr, at=None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", params)["data"]["result"]

    def scalar(self, expr, at=None):
        """Value of a single-series instant query, or None when it has no data."""
        result = self.query(expr, at)
        if not result:
            return None
        if len(result) != 1:
            raise PromError(f"{expr}: {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def alerts(self, name):
        return [a for a in self.api("alerts", {})["data"]["alerts"] if a["labels"].get("alertname") == name]


def wait_until(what, fn, timeout, interval=0.5):
    """Polls fn until it returns something truthy; returns it, or None on timeout."""
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except (OSError, PromError, ValueError) as err:
            last_err = err
        time.sleep(interval)
    log(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))
    return None


# --------------------------------------------------------------------------- traffic

class Traffic:
    """Callers of the proxy. Every call is recorded: status, and what the sim
    says it billed (x-sim-billed-milli, passed through by creditmeter)."""

    def __init__(self, proxy):
        self.proxy = proxy.rstrip("/")
        self.lock = threading.Lock()
        self.billed_milli = 0
        self.billed_by_table = {}
        self.calls = 0
        self.statuses = {}
        self.errors = []
        self.inflight = 0
        self.idle = threading.Condition(self.lock)
        self.running = threading.Event()  # cleared = paused
        self.running.set()
        self.stop = threading.Event()
        self.threads = []
        # (table, Apollo request_id) of calls whose answer starts a job Apollo bills later
        # (phone reveals): what the callers were billed includes those jobs once they end.
        self.jobs = []

    def call(self, method, path, *, key, table=None, workflow=None, body=None, query=None, expect=(200,),
             job=False):
        headers = {"x-api-key": key}
        if table is not None:
            headers["x-meter-table"] = table
        if workflow is not None:
            headers["x-meter-workflow"] = workflow
        url = f"{self.proxy}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with self.lock:
            self.inflight += 1
        try:
            status, hdrs, answer = http(method, url, body=body, headers=headers)
            billed = int(hdrs.get("x-sim-billed-milli") or 0)
            job_id = None
            if job and status == 200:
                job_id = json.loads(answer).get("request_id")
            err = None if status in expect else f"{method} {path} -> HTTP {status}"
        except OSError as exc:
            status, billed, err, job_id = None, 0, f"{method} {path}: {exc}", None
        with self.lock:
            self.inflight -= 1
            self.calls += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.billed_milli += billed
            label = table if table is not None else (query or {}).get("meter_table", "_unattributed")
            self.billed_by_table[label] = self.billed_by_table.get(label, 0) + billed
            if job_id is not None:
                self.jobs.append((label, job_id))
            if err:
                self.errors.append(err)
            self.idle.notify_all()
        return status, billed

    @contextmanager
    def paused(self):
        """No call in flight and none started until the block ends."""
        self.running.clear()
        with self.lock:
            self.idle.wait_for(lambda: self.inflight == 0, timeout=30)
        try:
            yield
        finally:
            self.running.set()

    def loop(self, name, period, step):
        """Runs step(i) every `period` seconds until stop is set."""

        def run():
            i = 0
            next_at = time.monotonic()
            while not self.stop.is_set():
                self.running.wait(timeout=1)
                if not self.running.is_set():
                    continue
                try:
                    step(i)
                except Exception as exc:  # a broken step must show up, not kill the run silently
                    with self.lock:
                        self.errors.append(f"{name}: {exc!r}")
                i += 1
                next_at += period
                delay = next_at - time.monotonic()
                if delay < 0:
                    next_at = time.monotonic()
                else:
                    self.stop.wait(delay)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def halt(self):
        self.stop.set()
        self.running.set()
        for t in self.threads:
            t.join(timeout=HTTP_TIMEOUT + 5)

    # The workload. One API key per caller (Apollo rate-limits per key and endpoint).

    def ambient_step(self, i):
        """A steady mix: several tables and workflows, every credit-bearing
        endpoint kind, a free one, query-parameter attribution, and an
        unattributed caller; all three credit types. About 1 credit per step."""
        kind = i % 8
        n = i // 8
        if kind == 0:
            self.call("POST", "/api/v1/people/match", key="key-leads", table="Leads", workflow="enrich-inbound",
                      body={"email": f"inbound{n}@example.com"})
        elif kind == 1:
            self.call("GET", "/api/v1/organizations/enrich", key="key-companies", table="Companies",
                      workflow="account-research", query={"domain": f"company{n}.example.com"})
        elif kind == 2:
            self.call("POST", "/api/v1/mixed_companies/search", key="key-companies", table="Companies",
                      workflow="account-research", body={"q_organization_name": f"acme {n}", "page": 1})
        elif kind == 3:
            self.call("POST", "/api/v1/mixed_people/api_search", key="key-prospects", table="Prospects",
                      workflow="list-build", body={"person_titles": ["cto"], "page": n % 5 + 1})
        elif kind == 4:
            # A caller that cannot set headers: attribution by query parameter.
            self.call("POST", "/api/v1/people/match", key="key-signups",
                      query={"meter_table": "Signups", "meter_workflow": "webhook"},
                      body={"email": f"signup{n}@example.com"})
        elif kind == 5:
            # No table at all: counted as _unattributed.
            self.call("POST", "/api/v1/people/match", key="key-adhoc", workflow="adhoc-script",
                      body={"email": f"adhoc{n}@example.com"})
        elif kind == 6:
            self.call("POST", "/api/v1/people/bulk_match", key="key-leads", table="Leads", workflow="enrich-batch",
                      body={"details": [{"email": f"batch{n}-{j}@example.com"} for j in range(5)]})
        else:
            # The legacy people search: Apollo now answers API callers 422 (deprecated), free;
            # still proxied and recorded.
            self.call("POST", "/api/v1/mixed_people/search", key="key-prospects", table="Prospects",
                      workflow="list-build", body={"person_titles": ["vp sales"], "page": n % 5 + 1},
                      expect=(200, 422))

    def burst_step(self, i):
        """The expensive mistake: bulk match with phone reveal, 10 people a call
        (up to 90 credits each)."""
        self.call("POST", "/api/v1/people/bulk_match", key="key-leads-bulk", table="Leads", workflow="phone-backfill",
                  body={"reveal_phone_number": True, "poll_only": True,
                        "details": [{"email": f"backfill{i}-{j}@example.com"} for j in range(10)]},
                  job=True)

    def hammer(self, limit):
        """Push one (key, endpoint) past the sim's per-minute limit on a free
        endpoint, so some calls get Apollo's 429 (upstream errors and
        rate-limit headroom panels). Returns how many 429s came back."""
        got = 0
        for i in range(limit + 40):
            status, _ = self.call("POST", "/api/v1/mixed_people/api_search", key="key-hammer", table="Prospects",
                                  workflow="rate-limit-probe", body={"person_titles": ["ceo"], "page": i % 3 + 1},
                                  expect=(200, 429))
            if status == 429:
                got += 1
                if got >= 5:
                    break
        return got


# --------------------------------------------------------------------------- checks

class Run:
    def __init__(self, args, checks):
        self.args = args
        self.c = checks
        self.prom = Prom(args.prom)
        self.admin = args.admin.rstrip("/")
        self.sim = args.sim.rstrip("/")
        self.traffic = Traffic(args.proxy)
        self.started = time.time()

    # ---- totals: ledger, sim, callers, Prometheus, /metrics

    def ledger_totals(self):
        db = sqlite3.connect(f"file:{self.args.ledger}?mode=ro", uri=True, timeout=10)
        try:
            total, lead, dd, export, rows, settlements, own = db.execute(
                "SELECT coalesce(sum(credits_milli),0), coalesce(sum(lead_milli),0),"
                " coalesce(sum(direct_dial_milli),0), coalesce(sum(export_milli),0), count(*),"
                " count(*) FILTER (WHERE outcome = 'settlement'),"
                " count(*) FILTER (WHERE table_name = '_creditmeter' AND outcome <> 'settlement') FROM calls"
            ).fetchone()
            by_table = dict(db.execute(
                "SELECT coalesce(table_name, '_unattributed'), sum(credits_milli) FROM calls GROUP BY 1"
            ).fetchall())
        finally:
            db.close()
        return {"total": total, "lead": lead, "direct_dial": dd, "export": export, "rows": rows,
                "settlements": settlements, "own": own, "by_table": by_table}

    def pending(self):
        """Deferred charges (phone reveals) not settled yet."""
        db = sqlite3.connect(f"file:{self.args.ledger}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(
                "SELECT count(*) FROM calls c WHERE deferred IS NOT NULL AND NOT EXISTS"
                " (SELECT 1 FROM calls s WHERE s.settles = c.request_id)").fetchone()[0]
        finally:
            db.close()

    def metrics_text(self):
        status, _, body = http("GET", f"{self.admin}/metrics")
        if status != 200:
            raise PromError(f"/metrics: HTTP {status}")
        return body.decode()

    def wait_fresh_scrape(self, after):
        """Waits until Prometheus holds a creditmeter scrape taken after `after` (unix s)."""
        def fresh():
            ts = self.prom.scalar('max(timestamp(up{job="creditmeter"}))')
            return ts if ts is not None and ts > after + 0.1 else None
        return wait_until("a fresh scrape", fresh, timeout=20)

    def checkpoint(self, label):
        """Pause every caller, let Prometheus scrape, and compare all totals."""
        log(f"checkpoint ({label}): pausing traffic, waiting for a scrape")
        with self.traffic.paused():
            # Phone reveals are billed when their job ends: wait until creditmeter has settled
            # every one (its own webhook_result polls), then compare.
            settled = wait_until("every deferred charge settled",
                                 lambda: True if self.pending() == 0 else None, timeout=60)
            self.c.check(settled is not None, f"[{label}] every deferred charge settled within 60s",
                         f"{self.pending()} pending")
            quiet_since = time.time()
            scrape_ts = self.wait_fresh_scrape(quiet_since)
            if scrape_ts is None:
                self.c.fail(f"[{label}] Prometheus scraped creditmeter after traffic paused")
                return None
            ledger = self.ledger_totals()
            _, _, body = http("GET", f"{self.sim}/__sim/billed")
            sim = json.loads(body)
            prom_total = self.prom.scalar("sum(creditmeter_credits_total)")
            prom_by_type = {r["metric"].get("credit_type"): float(r["value"][1])
                            for r in self.prom.query("sum by (credit_type) (creditmeter_credits_total)")}
            prom_by_table = {r["metric"].get("table"): float(r["value"][1])
                             for r in self.prom.query("sum by (table) (creditmeter_credits_total)")}
            prom_requests = self.prom.scalar("sum(creditmeter_requests_total)")
            metrics_total = sum(
                float(m.group(1)) for m in re.finditer(r"^creditmeter_credits_total\{[^}]*\} (\S+)$",
                                                       self.metrics_text(), re.M))
            with self.traffic.lock:
                client_milli = self.traffic.billed_milli
                client_by_table = dict(self.traffic.billed_by_table)
                client_calls = self.traffic.calls
                jobs = list(self.traffic.jobs)
            # What the callers' jobs billed when they ended (the sim's own record of each job).
            _, _, body = http("GET", f"{self.sim}/__sim/jobs")
            job_milli = {int(j["request_id"]): j["lead_milli"] + j["direct_dial_milli"] + j["export_milli"]
                         for j in json.loads(body)["jobs"]}
            for table, job_id in jobs:
                later = job_milli.get(int(job_id), 0)
                client_milli += later
                client_by_table[table] = client_by_table.get(table, 0) + later

        ledger_credits = ledger["total"] / 1000
        sim_milli = sim["lead_milli"] + sim["direct_dial_milli"] + sim["export_milli"]
        log(f"[{label}] credits: prometheus={prom_total} ledger={ledger_credits} sim={sim_milli / 1000} "
            f"callers={client_milli / 1000} /metrics={metrics_total}; calls: sim={sim['calls']} "
            f"ledger rows={ledger['rows']} requests_total={prom_requests} callers={client_calls}")
        self.c.check(prom_total is not None and ledger_credits > 0 and close(prom_total, ledger_credits),
                     f"[{label}] sum(creditmeter_credits_total) == ledger sum(credits_milli)/1000",
                     f"{prom_total} vs {ledger_credits}")
        self.c.check(ledger["total"] == sim_milli,
                     f"[{label}] ledger total == what the sim billed (/__sim/billed)",
                     f"{ledger['total']} vs {sim_milli} milli")
        self.c.check(ledger["total"] == client_milli,
                     f"[{label}] ledger total == sum of x-sim-billed-milli the callers received",
                     f"{ledger['total']} vs {client_milli} milli")
        self.c.check(close(metrics_total, ledger_credits),
                     f"[{label}] live /metrics credits == ledger", f"{metrics_total} vs {ledger_credits}")
        types_ok = all(close(prom_by_type.get(t, 0.0), ledger[t] / 1000) and ledger[t] == sim[f"{t}_milli"]
                       for t in ("lead", "direct_dial", "export"))
        self.c.check(types_ok, f"[{label}] credits by credit_type agree (Prometheus, ledger, sim)",
                     f"prometheus={prom_by_type} ledger={{lead: {ledger['lead']}, direct_dial: "
                     f"{ledger['direct_dial']}, export: {ledger['export']}}} milli")
        tables = set(prom_by_table) | set(ledger["by_table"]) | {t for t, v in client_by_table.items() if v}
        table_bad = [t for t in sorted(tables)
                     if not (close(prom_by_table.get(t, 0.0), (ledger["by_table"].get(t) or 0) / 1000)
                             and (ledger["by_table"].get(t) or 0) == client_by_table.get(t, 0))]
        self.c.check(not table_bad, f"[{label}] credits by table agree (Prometheus, ledger, callers)",
                     f"tables {sorted(tables)}" + (f"; differ: {table_bad}" if table_bad else ""))
        # Settlement rows are deferred charges, not calls; creditmeter's own result polls are
        # calls (the sim counts them) that no caller made.
        calls_rows = ledger["rows"] - ledger["settlements"]
        self.c.check(prom_requests is not None and int(prom_requests) == ledger["rows"]
                     and calls_rows == sim["calls"] and calls_rows - ledger["own"] == client_calls,
                     f"[{label}] call counts agree (requests_total, ledger rows, sim calls, callers)",
                     f"requests_total={prom_requests} rows={ledger['rows']} settlements={ledger['settlements']} "
                     f"own polls={ledger['own']} sim={sim['calls']} callers={client_calls}")
        return prom_total

    # ---- the rule under test

    def check_rules_loaded(self):
        groups = self.prom.api("rules", {})["data"]["groups"]
        files = {g["file"] for g in groups}
        rule = next((r for g in groups for r in g["rules"] if r.get("name") == SPIKE), None)
        n_rules = sum(len(g["rules"]) for g in groups)
        health = [r["name"] for g in groups for r in g["rules"] if r.get("health") not in ("ok", "unknown")]
        self.c.check(files == {str(Path(self.args.rules).resolve())} and rule is not None
                     and rule.get("duration") == SPIKE_FOR_SECONDS,
                     f"Prometheus loaded {SPIKE} from the production rules file, for: {SPIKE_FOR_SECONDS}s",
                     f"{n_rules} rules from {sorted(files)}; {SPIKE} duration={rule and rule.get('duration')}")
        return health

    def spike_states(self):
        return [(a["state"], a.get("activeAt"), a.get("value")) for a in self.prom.alerts(SPIKE)]

    # ---- dashboard

    def panel_exprs(self, table, workflow):
        out = subprocess.run([sys.executable, str(PANEL_EXPRS), table, workflow], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def check_panels(self, table, workflow):
        exprs = self.panel_exprs(table, workflow)
        end = time.time()
        start = self.started
        bad = []
        for item in exprs:
            where = f"panel {item['panel_id']} {item['panel']!r} {item['ref_id']}"
            try:
                if item["instant"]:
                    result = self.prom.query(item["expr"], at=end)
                    values = [r["value"][1] for r in result]
                else:
                    data = self.prom.api("query_range", {"query": item["expr"], "start": f"{start:.3f}",
                                                         "end": f"{end:.3f}", "step": "5"})["data"]
                    result = data["result"]
                    values = [v[1] for r in result for v in r["values"]]
            except PromError as err:
                bad.append(f"{where}: error {err}")
                continue
            finite = [v for v in values if not math.isnan(float(v))]
            if not result:
                bad.append(f"{where}: no data")
            elif not finite:
                bad.append(f"{where}: only NaN")
        self.c.check(not bad, f"all {len(exprs)} dashboard expressions evaluate and return data "
                              f"(table={table!r}, workflow={workflow!r})",
                     "; ".join(bad) if bad else "")

    def check_variables(self, expected):
        """The dashboard's $table/$workflow dropdown queries list the workload's names."""
        dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        for var in dash["templating"]["list"]:
            name = var.get("name")
            if name not in expected:
                continue
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var.get("definition", ""))
            if not m:
                self.c.fail(f"dashboard variable ${name} lists values", f"unexpected definition {var.get('definition')!r}")
                continue
            selector = m.group(1).replace("$table", ".*").replace("$workflow", ".*")
            values = set(self.prom.api(f"label/{m.group(2)}/values", {"match[]": selector})["data"])
            missing = sorted(set(expected[name]) - values)
            self.c.check(not missing, f"dashboard variable ${name} ({var['definition']}) lists the workload's values",
                         f"{sorted(values)}" + (f", missing {missing}" if missing else ""))

    # ---- reconciliation

    DEBIT_CREDITS = 7

    def debit_outside(self):
        """Spends credits out of band at the sim (as Apollo's web app would): Apollo's balance
        falls, creditmeter meters nothing, so reconciliation must report them unmetered."""
        status, _, body = http("POST", f"{self.sim}/__sim/debit",
                               {"credit_type": "lead", "credits": self.DEBIT_CREDITS})
        self.c.check(status == 200, f"sim debited {self.DEBIT_CREDITS} lead credits outside creditmeter",
                     f"HTTP {status}" if status != 200 else "")

    def check_reconcile(self):
        """The reconciliation panels' series: the out-of-band debit shows up as unmetered
        credits, and the balance gauge is set."""
        got = wait_until("the debit reconciled as unmetered",
                         lambda: (lambda v: v if v is not None and v >= self.DEBIT_CREDITS - EPS else None)(
                             self.prom.scalar("sum(creditmeter_unmetered_credits_total)")), timeout=90)
        self.c.check(got is not None,
                     f"reconciliation: the {self.DEBIT_CREDITS} credits spent outside creditmeter show as "
                     "creditmeter_unmetered_credits_total",
                     f"{got} unmetered credits" if got is not None else
                     f"{self.prom.scalar('sum(creditmeter_unmetered_credits_total)')} after 90s")
        left = self.prom.scalar('sum(creditmeter_apollo_credits_left{credit_type="lead"})')
        self.c.check(left is not None and left > 0, "reconciliation: creditmeter_apollo_credits_left is set",
                     f"lead credits left {left}")

    # ---- promtool check metrics

    def check_metrics_lint(self):
        text = self.metrics_text()
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        complaints = (proc.stdout + proc.stderr).strip()
        self.c.check(proc.returncode == 0 and not complaints,
                     "promtool check metrics on live /metrics",
                     f"{len(text.splitlines())} lines clean" if proc.returncode == 0 and not complaints
                     else f"exit {proc.returncode}: {complaints}")

    def note_increase_vs_ledger(self):
        """Information, not a check: the "Credits spent" stat is increase()
        over the range, which cannot count a series' first sample (a new
        table/workflow/endpoint/credit_type's first call)."""
        try:
            first = self.panel_exprs(".*", ".*")[0]
            spent = self.prom.scalar(first["expr"])
            ledger = self.ledger_totals()["total"] / 1000
            series = len(self.prom.query("creditmeter_credits_total"))
            log(f"note: panel {first['panel']!r} ({first['expr']}) = {spent:.1f} vs ledger {ledger:.1f} "
                f"({ledger - spent:.1f} credits short, {series} credit series all born during the run)")
        except (PromError, OSError, subprocess.SubprocessError, TypeError) as err:
            log(f"note: could not compare the Credits spent panel with the ledger: {err}")

    # ---- the whole run

    def main(self):
        a = self.args
        c = self.c
        log(f"waiting for Prometheus to scrape creditmeter ({a.prom})")
        up = wait_until("up{job=\"creditmeter\"} == 1",
                        lambda: self.prom.scalar('up{job="creditmeter"}') == 1.0, timeout=60)
        if not c.check(up, "Prometheus scrapes creditmeter (up{job=\"creditmeter\"} == 1)"):
            return
        self.check_rules_loaded()
        if a.backfill_rate is not None:
            base = wait_until("the baseline recording rule",
                              lambda: self.prom.scalar("creditmeter:credits:rate_baseline"), timeout=30)
            c.check(base is not None and abs(base - a.backfill_rate) < 0.05 * a.backfill_rate,
                    "baseline history backfilled: creditmeter:credits:rate_baseline ~= backfilled rate",
                    f"{base} credits/s vs {a.backfill_rate}")

        # ---------------- quiet phase
        self.debit_outside()
        log(f"quiet phase: {a.quiet}s of steady mixed traffic (~1 credit every {a.ambient_period}s)")
        self.traffic.loop("ambient", a.ambient_period, self.traffic.ambient_step)
        got_429 = self.traffic.hammer(a.rate_limit_minute)
        c.check(got_429 > 0, "sim rate limit answered 429 to the probe caller", f"{got_429} x 429")
        quiet_end = time.monotonic() + a.quiet
        linted = False
        samples = 0
        active = []
        rate = base = None
        while time.monotonic() < quiet_end:
            if not linted and time.monotonic() > quiet_end - a.quiet + 10:
                self.check_metrics_lint()
                linted = True
            try:
                states = self.spike_states()
                ts = self.prom.query(f'ALERTS{{alertname="{SPIKE}"}}')
                samples += 1
                if states or ts:
                    active.append((round(time.monotonic() - T0, 1), states, len(ts)))
                rate = self.prom.scalar("creditmeter:credits:rate5m")
                base = self.prom.scalar("creditmeter:credits:rate_baseline")
            except PromError as err:
                log(f"query failed during quiet phase: {err}")
            time.sleep(min(3, max(0, quiet_end - time.monotonic())))
        log(f"end of quiet phase: rate5m={rate} baseline={base} credits/s")
        self.check_reconcile()
        c.check(samples >= 3 and not active, f"{SPIKE} neither pending nor firing during the quiet phase",
                f"{samples} samples" + (f"; active: {active[:3]}" if active else ""))
        # Above the 0.05/s floor, so only the baseline comparison keeps it quiet.
        c.check(rate is not None and base is not None and 0.05 < rate < 4 * base,
                "quiet burn is above the 0.05 credits/s floor and below 4x baseline",
                f"rate5m={rate} baseline={base}")
        self.checkpoint("after quiet phase")

        # ---------------- burst
        burst_start = time.time()
        log(f"burst: bulk_match with phone reveal every {a.burst_period}s (table Leads, workflow phone-backfill), "
            f"waiting up to {a.burst_timeout}s for {SPIKE}")
        self.traffic.loop("burst", a.burst_period, self.traffic.burst_step)
        burst_deadline = time.monotonic() + a.burst_timeout
        panels_done = False
        pending_at = firing_seen = firing_value = None
        last_report = 0
        while time.monotonic() < burst_deadline:
            if not panels_done and time.time() - burst_start > 45:
                log("checking every dashboard expression against the live data")
                self.check_panels(".*", ".*")
                self.check_panels("Leads", "phone-backfill")
                self.check_panels("(Leads|Companies)", "(enrich-inbound|enrich-batch|account-research)")
                self.check_variables({
                    "table": ["Leads", "Companies", "Prospects", "Signups", "_unattributed"],
                    "workflow": ["enrich-inbound", "enrich-batch", "account-research", "phone-backfill",
                                 "webhook", "adhoc-script"],
                })
                panels_done = True
            try:
                states = self.spike_states()
            except PromError as err:
                log(f"alerts query failed: {err}")
                states = []
            for state, active_at, value in states:
                if pending_at is None and active_at:
                    pending_at = parse_ts(active_at)
                    log(f"{SPIKE} is {state} (activeAt {active_at}, {pending_at - burst_start:.0f}s into the burst, "
                        f"value {value} credits/h)")
                if state == "firing":
                    firing_seen, firing_value = time.time(), value
            if firing_seen:
                break
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                try:
                    log(f"  burst +{time.time() - burst_start:.0f}s: rate5m={self.prom.scalar('creditmeter:credits:rate5m')}"
                        f" baseline={self.prom.scalar('creditmeter:credits:rate_baseline')} credits/s;"
                        f" {SPIKE}: {[s[0] for s in states] or 'inactive'}")
                except PromError:
                    pass
            time.sleep(2)
        if not panels_done:
            c.fail("dashboard expressions checked", "the burst ended before the panel checks ran")
        if c.check(firing_seen is not None, f"{SPIKE} fires for the burst",
                   f"firing {firing_seen - burst_start:.0f}s after the burst started, value {firing_value} credits/h"
                   if firing_seen else f"not firing after {a.burst_timeout}s"):
            held = firing_seen - pending_at if pending_at else 0
            c.check(pending_at is not None and pending_at >= burst_start - 1 and held >= SPIKE_FOR_SECONDS - 5,
                    f"{SPIKE} went pending only after the burst began and fired after its for: {SPIKE_FOR_SECONDS}s",
                    f"pending {pending_at - burst_start:.0f}s into the burst, firing {held:.0f}s later"
                    if pending_at else "no activeAt")
            try:
                rate = self.prom.scalar("creditmeter:credits:rate5m")
                base = self.prom.scalar("creditmeter:credits:rate_baseline")
                c.check(rate is not None and base is not None and rate > 4 * base and rate > 0.05,
                        "at firing: rate5m > 4 x baseline and > 0.05 credits/s",
                        f"rate5m={rate:.3f} baseline={base:.3f} credits/s")
            except PromError as err:
                c.fail("at firing: rate5m > 4 x baseline", str(err))
        self.traffic.halt()

        # ---------------- final
        self.checkpoint("end of run")
        self.note_increase_vs_ledger()
        with self.traffic.lock:
            errors = list(self.traffic.errors)
            statuses = dict(self.traffic.statuses)
        c.check(not errors, "every workload call got its expected answer",
                f"{sum(statuses.values())} calls, statuses {statuses}" + (f"; errors: {errors[:5]}" if errors else ""))
        try:
            others = sorted({(x["labels"]["alertname"], x["state"]) for x in self.prom.api("alerts", {})["data"]["alerts"]})
            log(f"alerts active at the end (information): {others}")
            unhealthy = [(r["name"], r.get("lastError")) for g in self.prom.api("rules", {})["data"]["groups"]
                         for r in g["rules"] if r.get("health") == "err"]
            c.check(not unhealthy, "no rule evaluation errors in Prometheus", str(unhealthy) if unhealthy else "")
        except PromError as err:
            c.fail("read Prometheus alerts and rule health", str(err))


def parse_ts(text):
    """RFC 3339 with nanoseconds (Prometheus' activeAt) -> unix seconds."""
    from datetime import datetime, timezone
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        raise ValueError(f"bad timestamp {text!r}")
    base = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    tz = timezone.utc if m.group(3) == "Z" else datetime.strptime(m.group(3).replace(":", ""), "%z").tzinfo
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.replace(tzinfo=tz).timestamp() + frac


# --------------------------------------------------------------------------- subcommands

def cmd_after_restart(args):
    """After creditmeter restarted on the same ledger: the counters come back
    at the ledger's totals, with no counter reset for rate()/increase()."""
    checks = Checks()
    prom = Prom(args.prom)
    try:
        def fresh():
            ts = prom.scalar('max(timestamp(up{job="creditmeter"} == 1))')
            return ts if ts is not None and ts > args.since + 0.5 else None
        if checks.check(wait_until("a scrape of the restarted creditmeter", fresh, timeout=30) is not None,
                        "Prometheus scrapes the restarted creditmeter"):
            db = sqlite3.connect(f"file:{args.ledger}?mode=ro", uri=True, timeout=10)
            ledger = db.execute("SELECT coalesce(sum(credits_milli),0), count(*) FROM calls").fetchone()
            db.close()
            total = prom.scalar("sum(creditmeter_credits_total)")
            requests = prom.scalar("sum(creditmeter_requests_total)")
            checks.check(total is not None and close(total, ledger[0] / 1000) and requests == ledger[1],
                         "after restart: credits and requests counters resume at the ledger's totals",
                         f"credits {total} vs {ledger[0] / 1000}, requests {requests} vs {ledger[1]}")
            resets = prom.scalar("sum(resets(creditmeter_credits_total[1h])) + sum(resets(creditmeter_requests_total[1h]))")
            checks.check(resets == 0, "after restart: no counter resets seen by Prometheus", f"resets() = {resets}")
    except (PromError, OSError, sqlite3.Error) as err:
        checks.fail("after restart checks", str(err))
    Path(args.counts).write_text(f"{checks.passed} {checks.failed}\n")
    return 1 if checks.failed else 0


def cmd_ports(args):
    socks = []
    for _ in range(args.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_backfill(args):
    """History of the recorded 5m burn rate, as Prometheus would have recorded
    it at this evaluation interval: `rate` credits/s for `hours` up to `end`.
    Same step as the live evaluation interval, because avg_over_time weights
    samples, not time."""
    end = int(args.end)
    start = end - int(args.hours * 3600)
    out = sys.stdout
    out.write("# HELP creditmeter:credits:rate5m Backfilled history of the recorded burn rate (live-check).\n")
    out.write("# TYPE creditmeter:credits:rate5m gauge\n")
    for ts in range(start, end + 1, args.step):
        out.write(f"creditmeter:credits:rate5m {args.rate} {ts}\n")
    out.write("# EOF\n")


def cmd_run(args):
    checks = Checks()
    try:
        Run(args, checks).main()
    except Exception as exc:  # report, count, and let the shell clean up
        import traceback
        traceback.print_exc()
        checks.fail("live check driver", repr(exc))
    Path(args.counts).write_text(f"{checks.passed} {checks.failed}\n")
    if checks.failures:
        log("failed: " + "; ".join(checks.failures))
    return 1 if checks.failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("ports")
    sp.add_argument("n", type=int)
    sb = sub.add_parser("backfill")
    sb.add_argument("--rate", type=float, required=True)
    sb.add_argument("--hours", type=float, default=6)
    sb.add_argument("--step", type=int, default=1)
    sb.add_argument("--end", type=float, default=time.time())
    sr = sub.add_parser("run")
    for name in ("prom", "proxy", "admin", "sim", "ledger", "rules", "counts"):
        sr.add_argument(f"--{name}", required=True)
    sr.add_argument("--backfill-rate", type=float, default=None,
                    help="the backfilled baseline (credits/s); omit when the baseline is live history")
    sr.add_argument("--quiet", type=float, default=60)
    sr.add_argument("--ambient-period", type=float, default=2.0)
    sr.add_argument("--burst-period", type=float, default=3.0)
    sr.add_argument("--burst-timeout", type=float, default=420)
    sr.add_argument("--rate-limit-minute", type=int, default=60)
    sa = sub.add_parser("after-restart")
    for name in ("prom", "ledger", "counts"):
        sa.add_argument(f"--{name}", required=True)
    sa.add_argument("--since", type=float, required=True, help="unix time of the restart")
    args = p.parse_args()
    if args.cmd == "after-restart":
        return cmd_after_restart(args)
    if args.cmd == "ports":
        return cmd_ports(args)
    if args.cmd == "backfill":
        return cmd_backfill(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
