//! The console in a real browser: Debian's headless Chromium, driven over the DevTools
//! protocol, against a live creditmeter carrying real traffic through the proxy to the
//! simulator. Each page's tables and figures must equal `creditmeter report --format json`
//! for the window the page shows, the chart must have one bar per bucket, the login flow must
//! work, a hold placed by clicking the emergency-stop button must refuse the next call, and a
//! form post without the CSRF token must be refused. Screenshots of every page are written to
//! `<target dir>/console-screenshots/`.
//!
//! Chromium is required (`.ci/run` installs it): without it this test fails and says so.

use std::path::{Path, PathBuf};

use crate::common::*;
use bytes::Bytes;
use creditmeter::admin::console::charts::contrast_ratio;
use creditmeter::admin::console::fmt_credits;
use creditmeter_sim::SimConfig;
use http_body_util::Full;
use serde_json::{json, Value};

/// A minimal DevTools-protocol client over one page's websocket.
mod cdp {
    use std::net::TcpStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use tungstenite::{stream::MaybeTlsStream, Message, WebSocket};

    pub const CHROMIUM: &str = "/usr/bin/chromium";

    pub struct Browser {
        child: Child,
        ws: WebSocket<MaybeTlsStream<TcpStream>>,
        next_id: u64,
        /// The page's session on the browser connection.
        session: Option<String>,
        _profile: tempfile::TempDir,
        /// Events seen while waiting for replies.
        events: Vec<Value>,
    }

    impl Drop for Browser {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Browser {
        /// Starts headless Chromium with a fresh profile and connects to its first page.
        pub fn start() -> Browser {
            assert!(
                Path::new(CHROMIUM).exists(),
                "{CHROMIUM} is missing: the console's browser test needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)"
            );
            let profile = tempfile::tempdir().unwrap();
            let child = Command::new(CHROMIUM)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--hide-scrollbars",
                    "--window-size=1280,1600",
                    "--remote-debugging-port=0",
                    "--remote-allow-origins=*",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
            // The first line is the port, the second the browser's websocket path.
            let port_file: PathBuf = profile.path().join("DevToolsActivePort");
            let deadline = Instant::now() + Duration::from_secs(30);
            let (port, path) = loop {
                if let Ok(text) = std::fs::read_to_string(&port_file) {
                    let mut lines = text.lines();
                    if let (Some(p), Some(path)) = (
                        lines.next().and_then(|l| l.trim().parse::<u16>().ok()),
                        lines.next().map(|l| l.trim().to_owned()),
                    ) {
                        break (p, path);
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "chromium did not write DevToolsActivePort within 30 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}{path}")).unwrap();
            let mut b = Browser {
                child,
                ws,
                next_id: 0,
                session: None,
                _profile: profile,
                events: Vec::new(),
            };
            let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
            let attached = b.call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            );
            b.session = attached["sessionId"].as_str().map(str::to_owned);
            b.call("Page.enable", json!({}));
            b.call("Network.enable", json!({}));
            b.call("Runtime.enable", json!({}));
            b
        }

        /// Sends a command and returns its result (panics on a protocol error).
        pub fn call(&mut self, method: &str, params: Value) -> Value {
            self.next_id += 1;
            let id = self.next_id;
            let mut msg = json!({"id": id, "method": method, "params": params});
            if let Some(s) = &self.session {
                msg["sessionId"] = json!(s);
            }
            self.ws.send(Message::text(msg.to_string())).unwrap();
            loop {
                let m = self.ws.read().unwrap();
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                    return v["result"].clone();
                }
                if v.get("method").is_some() {
                    self.events.push(v);
                }
            }
        }

        /// Waits for an event named `method` (seen since the last wait, or arriving).
        fn wait_event(&mut self, method: &str, within: Duration) {
            if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
                self.events.drain(..=i);
                return;
            }
            let deadline = Instant::now() + within;
            if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
            }
            loop {
                assert!(Instant::now() < deadline, "no {method} within {within:?}");
                match self.ws.read() {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        if v["method"] == method {
                            self.events.clear();
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("devtools socket: {e}"),
                }
            }
            if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
                s.set_read_timeout(None).unwrap();
            }
        }

        /// Opens `url` and waits until the page has loaded.
        pub fn goto(&mut self, url: &str) {
            self.events.clear();
            self.call("Page.navigate", json!({"url": url}));
            self.wait_event("Page.loadEventFired", Duration::from_secs(30));
        }

        /// Evaluates a JavaScript expression in the page and returns its value.
        pub fn eval(&mut self, expr: &str) -> Value {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            );
            assert!(
                r.get("exceptionDetails").is_none(),
                "{expr}: {}",
                r["exceptionDetails"]
            );
            r["result"]["value"].clone()
        }

        /// Clicks the element `selector` with the mouse (a real press and release at its
        /// centre) and, when it navigates, waits for the next page.
        pub fn click(&mut self, selector: &str, navigates: bool) {
            let rect = self.eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
                sel = serde_json::to_string(selector).unwrap()
            ));
            let (x, y) = (
                rect[0]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no element {selector}")),
                rect[1].as_f64().unwrap(),
            );
            self.events.clear();
            for kind in ["mousePressed", "mouseReleased"] {
                self.call(
                    "Input.dispatchMouseEvent",
                    json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
                );
            }
            if navigates {
                self.wait_event("Page.loadEventFired", Duration::from_secs(30));
            }
        }

        /// Types text into the focused element.
        pub fn type_text(&mut self, text: &str) {
            self.call("Input.insertText", json!({"text": text}));
        }

        /// A PNG of the whole page.
        pub fn screenshot(&mut self, path: &Path) {
            let r = self.call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            );
            use base64::Engine as _;
            let png = base64::engine::general_purpose::STANDARD
                .decode(r["data"].as_str().unwrap())
                .unwrap();
            std::fs::write(path, png).unwrap();
        }

        /// The browser's cookies for the current page.
        pub fn cookies(&mut self) -> Vec<Value> {
            self.call("Network.getCookies", json!({}))["cookies"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
    }
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `creditmeter report --db DB --format json ARGS`.
fn report(db: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(crate::common::binary::BIN)
        .args(["report", "--format", "json", "--db"])
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The page's window, as the report's `--since`/`--until`.
fn window(b: &mut cdp::Browser) -> (String, String) {
    let w = b.eval("[document.querySelector('p.window').dataset.since, document.querySelector('p.window').dataset.until]");
    (
        w[0].as_str().unwrap().to_owned(),
        w[1].as_str().unwrap().to_owned(),
    )
}

/// The rows of the spend table grouped by `by` on the page: (key, credits_milli, calls,
/// credits as shown), the total last.
fn spend_rows(b: &mut cdp::Browser, by: &str) -> Vec<(String, i64, u64, String)> {
    let v = b.eval(&format!(
        "Array.from(document.querySelectorAll('table.spend[data-group-by=\"{by}\"] tr.row')).map(r => [r.dataset.key, Number(r.dataset.creditsMilli), Number(r.dataset.calls), r.querySelector('td.credits').textContent])"
    ));
    v.as_array()
        .unwrap_or_else(|| panic!("no spend table by {by}"))
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_i64().unwrap(),
                r[2].as_u64().unwrap(),
                r[3].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The page's spend table by `by` equals the report's rows and total.
fn assert_spend_equals(b: &mut cdp::Browser, by: &str, doc: &Value, what: &str) {
    let page = spend_rows(b, by);
    let mut want: Vec<&Value> = doc["rows"].as_array().unwrap().iter().collect();
    want.push(&doc["total"]);
    assert_eq!(page.len(), want.len(), "{what}: rows on the page {page:?}");
    for (p, w) in page.iter().zip(want) {
        let milli = w["credits_milli"].as_i64().unwrap();
        assert_eq!(p.0, w["key"].as_str().unwrap(), "{what}");
        assert_eq!(p.1, milli, "{what}: {}", p.0);
        assert_eq!(p.2, w["calls"].as_u64().unwrap(), "{what}: {}", p.0);
        assert_eq!(
            p.3,
            fmt_credits(milli),
            "{what}: the figure shown for {}",
            p.0
        );
    }
}

/// The page's chart has one bar per bucket of the report's timeline, with its credits.
fn assert_chart_equals(b: &mut cdp::Browser, doc: &Value, what: &str) {
    let bars = b.eval(
        "Array.from(document.querySelectorAll('figure.chart svg rect.bucket')).map(r => [r.dataset.start, Number(r.dataset.creditsMilli), r.classList.contains('spike')])",
    );
    let bars = bars.as_array().unwrap();
    let buckets = doc["buckets"].as_array().unwrap();
    assert!(!buckets.is_empty(), "{what}: the report has buckets");
    assert_eq!(bars.len(), buckets.len(), "{what}: one bar per bucket");
    for (bar, bucket) in bars.iter().zip(buckets) {
        assert_eq!(bar[0], bucket["start"], "{what}");
        assert_eq!(
            bar[1], bucket["credits_milli"],
            "{what}: {}",
            bucket["start"]
        );
        assert_eq!(bar[2], bucket["spike"], "{what}: {}", bucket["start"]);
    }
}

/// Every visible form control has a label (a `<label for>` or an `aria-label`).
fn assert_labelled(b: &mut cdp::Browser, page: &str) {
    let unlabelled = b.eval(
        "Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, button')).filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !(e.tagName === 'BUTTON' && e.textContent.trim())).map(e => e.outerHTML)",
    );
    assert_eq!(
        unlabelled,
        json!([]),
        "{page}: form controls without a label"
    );
}

/// The chart's bar colours reach 3:1 against the page background.
fn assert_chart_contrast(b: &mut cdp::Browser) {
    let v = b.eval(
        "(() => { const hex = c => { const m = c.match(/\\d+/g).map(Number); return '#' + m.slice(0, 3).map(x => x.toString(16).padStart(2, '0')).join(''); }; return [hex(getComputedStyle(document.body).backgroundColor), Array.from(new Set(Array.from(document.querySelectorAll('figure.chart rect.bucket')).map(r => hex(getComputedStyle(r).fill))))]; })()",
    );
    let bg = v[0].as_str().unwrap();
    let fills = v[1].as_array().unwrap();
    assert!(!fills.is_empty());
    for f in fills {
        let f = f.as_str().unwrap();
        let r = contrast_ratio(f, bg).unwrap();
        assert!(r >= 3.0, "bar colour {f} on {bg}: {r:.2}:1, below 3:1");
    }
}

async fn call(c: &HttpClient, proxy: &Proxy, table: &str, workflow: &str, email: &str) -> u16 {
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("content-type", "application/json")
        .header("x-meter-table", table)
        .header("x-meter-workflow", workflow)
        .header("x-api-key", "console-test-key")
        .body(Full::new(Bytes::from(json!({"email": email}).to_string())))
        .unwrap();
    send(c, req).await.0.as_u16()
}

async fn bulk(c: &HttpClient, proxy: &Proxy, table: &str, n: usize) -> u16 {
    let details: Vec<Value> = (0..n)
        .map(|i| json!({"linkedin_url": format!("https://www.linkedin.com/in/person-{table}-{i}")}))
        .collect();
    let req = http::Request::post(proxy.url("/api/v1/people/bulk_match"))
        .header("content-type", "application/json")
        .header("x-meter-table", table)
        .header("x-meter-workflow", "bulk")
        .header("x-api-key", "console-test-key")
        .body(Full::new(Bytes::from(
            json!({"details": details}).to_string(),
        )))
        .unwrap();
    send(c, req).await.0.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_real_browser_shows_what_the_report_shows() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(SimConfig::default(), None).await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.admin.token_env = "CREDITMETER_TEST_CONSOLE_TOKEN".into();
    let budgets = creditmeter::config::Config::from_toml(
        "[[budget]]\nname = \"inbound-daily\"\nscope = { table = \"Inbound leads\" }\nlimit = 1000\nwindow = \"day\"\naction = \"alert\"\n",
    )
    .unwrap();
    cfg.guard = budgets.guard;
    cfg.budget = budgets.budget;
    let token = "console-admin-token-7f3a";
    std::env::set_var("CREDITMETER_TEST_CONSOLE_TOKEN", token);
    let proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    // Real traffic through the proxy to the simulator: two tables, two workflows, people
    // matches by email and bulk matches by LinkedIn URL.
    for i in 0..60 {
        assert_eq!(
            call(
                &c,
                &proxy,
                "Inbound leads",
                "enrich-person",
                &format!("lead{i}@example.com")
            )
            .await,
            200
        );
    }
    for i in 0..12 {
        assert_eq!(
            call(
                &c,
                &proxy,
                "ABM accounts",
                "abm-refresh",
                &format!("abm{i}@example.org")
            )
            .await,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(bulk(&c, &proxy, "ABM accounts", 10).await, 200);
    }
    let db = proxy.db.clone();
    let base = format!("http://{}", proxy.admin);
    let shots = screenshots_dir();

    let (session_value, b) = tokio::task::block_in_place(|| {
        let mut b = cdp::Browser::start();

        // Login: the console sends a new visitor to the login form; a wrong token is refused.
        b.goto(&format!("{base}/"));
        assert_eq!(b.eval("location.pathname"), "/ui/login");
        assert_labelled(&mut b, "login");
        b.screenshot(&shots.join("login.png"));
        b.click("#token", false);
        b.type_text("not-the-token");
        b.click("button[type=submit]", true);
        assert_eq!(
            b.eval("document.querySelector('[role=alert]').textContent"),
            "That is not the admin token."
        );
        b.click("#token", false);
        b.type_text(token);
        b.click("button[type=submit]", true);
        assert_eq!(b.eval("location.pathname"), "/ui/");
        let cookies = b.cookies();
        let session = cookies
            .iter()
            .find(|c| c["name"] == "creditmeter_session")
            .expect("a session cookie after login");
        assert_eq!(session["httpOnly"], true);
        assert_eq!(session["sameSite"], "Strict");
        let session_value = session["value"].as_str().unwrap().to_owned();
        assert!(
            !session_value.contains(token),
            "the token is not in the cookie"
        );
        assert_eq!(
            b.eval("document.cookie"),
            "",
            "scripts cannot read the cookie"
        );

        // Overview: every figure equals the report over the window the page shows.
        for w in ["24h", "7d", "30d"] {
            b.goto(&format!("{base}/ui/?window={w}"));
            assert!(
                !b.eval("document.documentElement.outerHTML")
                    .as_str()
                    .unwrap()
                    .contains(token),
                "the admin token is never in a page"
            );
            let (since, until) = window(&mut b);
            let by_table = report(
                &db,
                &["--by", "table", "--since", &since, "--until", &until],
            );
            assert_spend_equals(
                &mut b,
                "table",
                &by_table,
                &format!("overview {w}, by table"),
            );
            let mut keys: Vec<&str> = by_table["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["key"].as_str().unwrap())
                .collect();
            keys.sort_unstable();
            assert_eq!(keys, ["ABM accounts", "Inbound leads"], "{w}");
            let by_endpoint = report(
                &db,
                &["--by", "endpoint", "--since", &since, "--until", &until],
            );
            assert_spend_equals(&mut b, "endpoint", &by_endpoint, "overview, by endpoint");
            let bucket = b
                .eval("document.querySelector('figure.chart svg').dataset.bucket")
                .as_str()
                .unwrap()
                .to_owned();
            let timeline = report(
                &db,
                &["--timeline", &bucket, "--since", &since, "--until", &until],
            );
            assert_chart_equals(&mut b, &timeline, &format!("overview {w}"));
            assert_eq!(
                b.eval("Number(document.querySelector('#total-credits').dataset.milli)"),
                by_table["total"]["credits_milli"]
            );
            let spikes = report(
                &db,
                &[
                    "--spikes",
                    "--timeline",
                    &bucket,
                    "--since",
                    &since,
                    "--until",
                    &until,
                ],
            );
            assert_eq!(
                b.eval("Number(document.querySelector('#spikes').dataset.spikes)"),
                json!(spikes["spikes"].as_array().unwrap().len())
            );
            assert_labelled(&mut b, "overview");
            b.screenshot(&shots.join(format!("overview-{w}.png")));
        }
        assert_chart_contrast(&mut b);
        assert_eq!(
            b.eval("document.querySelectorAll('svg').length > 0 && document.querySelectorAll('script').length"),
            0,
            "no script on the page"
        );

        // A table's page: its spend, timeline, endpoints and identifier kinds.
        b.goto(&format!("{base}/ui/"));
        b.click(
            "table.spend[data-group-by=table] tr.row[data-key='Inbound leads'] a",
            true,
        );
        assert_eq!(
            b.eval("document.querySelector('#entity').dataset.name"),
            "Inbound leads"
        );
        let (since, until) = window(&mut b);
        let t = [
            "--table",
            "Inbound leads",
            "--since",
            &since,
            "--until",
            &until,
        ];
        let mut args = t.to_vec();
        args.extend(["--by", "table"]);
        assert_spend_equals(&mut b, "table", &report(&db, &args), "table page, spend");
        let mut args = t.to_vec();
        args.extend(["--by", "endpoint"]);
        assert_spend_equals(
            &mut b,
            "endpoint",
            &report(&db, &args),
            "table page, endpoints",
        );
        let mut args = t.to_vec();
        args.extend(["--identifiers"]);
        let ids = report(&db, &args);
        assert_eq!(ids["rows"][0]["key"], "email", "{ids}");
        assert_spend_equals(&mut b, "id_kind", &ids, "table page, identifier kinds");
        let mut args = t.to_vec();
        args.extend(["--timeline", "1h"]);
        assert_chart_equals(&mut b, &report(&db, &args), "table page");
        // Recent calls, 50 a page; "Older calls" continues after the last row shown.
        let ids =
            "Array.from(document.querySelectorAll('#calls tr.call')).map(r => r.dataset.requestId)";
        let first_page = b.eval(ids);
        assert_eq!(first_page.as_array().unwrap().len(), 50);
        b.screenshot(&shots.join("table.png"));
        b.click("#older", true);
        let second_page = b.eval(ids);
        assert_eq!(
            second_page.as_array().unwrap().len(),
            10,
            "the other 10 of the 60 calls"
        );
        let mut all: Vec<&Value> = first_page
            .as_array()
            .unwrap()
            .iter()
            .chain(second_page.as_array().unwrap())
            .collect();
        all.sort_by_key(|v| v.as_str().unwrap().to_owned());
        all.dedup();
        assert_eq!(all.len(), 60, "no call shown twice");
        assert!(b
            .eval("document.querySelector('#older') === null")
            .as_bool()
            .unwrap());
        b.screenshot(&shots.join("table-older.png"));

        // "Email or LinkedIn?": a table that enriched by both shows each kind's match rate and
        // credits per match, as the report does.
        b.goto(&format!("{base}/ui/table?name=ABM%20accounts"));
        let (since, until) = window(&mut b);
        let ids = report(
            &db,
            &[
                "--table",
                "ABM accounts",
                "--identifiers",
                "--since",
                &since,
                "--until",
                &until,
            ],
        );
        let mut kinds: Vec<&str> = ids["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        kinds.sort_unstable();
        assert_eq!(kinds, ["email", "linkedin_url"], "{ids}");
        assert_spend_equals(&mut b, "id_kind", &ids, "ABM identifier kinds");
        let rates = b.eval("Array.from(document.querySelectorAll('table.spend[data-group-by=id_kind] tbody tr.row')).map(r => [r.dataset.key, r.children[8].textContent, r.children[9].textContent])");
        for (row, want) in rates
            .as_array()
            .unwrap()
            .iter()
            .zip(ids["rows"].as_array().unwrap())
        {
            assert_eq!(row[0], want["key"]);
            assert_eq!(
                row[1].as_str().unwrap(),
                format!("{:.1}%", want["match_rate"].as_f64().unwrap() * 100.0)
            );
            assert_eq!(
                row[2].as_str().unwrap(),
                format!("{:.2}", want["credits_per_match"].as_f64().unwrap())
            );
        }
        b.screenshot(&shots.join("table-identifiers.png"));

        // The workflow, endpoint and key pages.
        b.goto(&format!("{base}/ui/workflow?name=abm-refresh"));
        let (since, until) = window(&mut b);
        assert_spend_equals(
            &mut b,
            "workflow",
            &report(
                &db,
                &[
                    "--workflow",
                    "abm-refresh",
                    "--by",
                    "workflow",
                    "--since",
                    &since,
                    "--until",
                    &until,
                ],
            ),
            "workflow page",
        );
        b.screenshot(&shots.join("workflow.png"));
        b.goto(&format!("{base}/ui/endpoint?name=people_bulk_match"));
        let (since, until) = window(&mut b);
        let ep = report(
            &db,
            &[
                "--endpoint",
                "people_bulk_match",
                "--by",
                "endpoint",
                "--since",
                &since,
                "--until",
                &until,
            ],
        );
        assert_spend_equals(&mut b, "endpoint", &ep, "endpoint page");
        assert_eq!(ep["rows"][0]["calls"], 3);
        assert_spend_equals(
            &mut b,
            "table",
            &report(
                &db,
                &[
                    "--endpoint",
                    "people_bulk_match",
                    "--by",
                    "table",
                    "--since",
                    &since,
                    "--until",
                    &until,
                ],
            ),
            "endpoint page, tables",
        );
        b.screenshot(&shots.join("endpoint.png"));
        let by_key = report(&db, &["--by", "key", "--since", &since, "--until", &until]);
        let key = by_key["rows"][0]["key"].as_str().unwrap().to_owned();
        b.goto(&format!("{base}/ui/key?name={key}"));
        let page = spend_rows(&mut b, "key");
        assert_eq!(page[0].0, key);
        assert_eq!(
            page[0].1,
            by_key["rows"][0]["credits_milli"].as_i64().unwrap()
        );
        assert_eq!(page[0].2, by_key["rows"][0]["calls"].as_u64().unwrap());
        assert_eq!(
            b.eval("document.querySelectorAll('figure.chart rect.bucket').length"),
            json!(report(
                &db,
                &["--timeline", "1h", "--since", &since, "--until", &until]
            )["buckets"]
                .as_array()
                .unwrap()
                .len())
        );
        b.screenshot(&shots.join("key.png"));

        // Reconciliation: the page lists what report --reconcile lists.
        b.goto(&format!("{base}/ui/reconcile"));
        let (since, until) = window(&mut b);
        let out = std::process::Command::new(crate::common::binary::BIN)
            .args(["report", "--reconcile", "--format", "json", "--db"])
            .arg(&db)
            .args(["--since", &since, "--until", &until])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rec: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            b.eval("Number(document.querySelector('#unmetered-windows').dataset.rows)"),
            json!(rec["windows"].as_array().unwrap().len())
        );
        b.screenshot(&shots.join("reconcile.png"));

        // Guardrails: the emergency stop asks first, then holds the table.
        b.goto(&format!("{base}/ui/guardrails"));
        assert_eq!(
            b.eval("Number(document.querySelector('#holds').dataset.holds)"),
            0
        );
        assert_labelled(&mut b, "guardrails");
        b.screenshot(&shots.join("guardrails.png"));
        b.click("#stop-tables tr[data-key='ABM accounts'] button", true);
        assert_eq!(b.eval("location.pathname"), "/ui/stop");
        assert_labelled(&mut b, "confirm stop");
        b.screenshot(&shots.join("confirm-stop.png"));
        // Nothing is held until the confirmation.
        assert!(held_tables(&db).is_empty());
        b.click("#reason", false);
        b.type_text("runaway test");
        b.click("#confirm", true);
        assert_eq!(b.eval("location.pathname"), "/ui/guardrails");
        assert_eq!(
            b.eval("Number(document.querySelector('#holds').dataset.holds)"),
            1
        );
        assert_eq!(
            b.eval("document.querySelector('tr.hold').dataset.scope"),
            "table=ABM accounts"
        );
        b.screenshot(&shots.join("guardrails-held.png"));
        (session_value, b)
    });

    // The next call from the held table is refused before it reaches Apollo; another
    // table's call goes through.
    assert_eq!(
        call(
            &c,
            &proxy,
            "ABM accounts",
            "abm-refresh",
            "after@example.org"
        )
        .await,
        503
    );
    assert_eq!(
        call(
            &c,
            &proxy,
            "Inbound leads",
            "enrich-person",
            "after@example.com"
        )
        .await,
        200
    );

    // Form posts with the session cookie but without the CSRF token (or a wrong one) are
    // refused and change nothing.
    let cookie = format!("creditmeter_session={session_value}");
    for (path, body) in [
        ("/ui/holds", "table=Inbound+leads"),
        ("/ui/holds", "table=Inbound+leads&csrf=0123abcd"),
        ("/ui/holds/release", "id=1"),
        ("/ui/logout", ""),
    ] {
        let req = http::Request::post(format!("{base}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", &cookie)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let (status, _, page) = send(&c, req).await;
        assert_eq!(
            status,
            403,
            "{path} {body}: {}",
            String::from_utf8_lossy(&page)
        );
        assert!(String::from_utf8_lossy(&page).contains("CSRF"));
    }
    assert_eq!(
        held_tables(&db),
        ["ABM accounts"],
        "no change without the CSRF token"
    );
    assert_eq!(
        call(
            &c,
            &proxy,
            "Inbound leads",
            "enrich-person",
            "again@example.com"
        )
        .await,
        200
    );

    // Releasing by clicking lets the table's calls through again.
    let mut b = b;
    tokio::task::block_in_place(|| {
        b.goto(&format!("{base}/ui/guardrails"));
        b.click("tr.hold button", true);
        assert_eq!(
            b.eval("Number(document.querySelector('#holds').dataset.holds)"),
            0
        );
        assert!(b
            .eval("document.querySelector('#released') !== null")
            .as_bool()
            .unwrap());
        // Signing out ends the session: the console asks for the token again.
        b.click("header form button", true);
        assert_eq!(b.eval("location.pathname"), "/ui/login");
        b.goto(&format!("{base}/ui/guardrails"));
        assert_eq!(b.eval("location.pathname"), "/ui/login");
    });
    assert!(held_tables(&db).is_empty());
    assert_eq!(
        call(
            &c,
            &proxy,
            "ABM accounts",
            "abm-refresh",
            "released@example.org"
        )
        .await,
        200
    );
    // The old cookie no longer opens a page.
    let req = http::Request::get(format!("{base}/ui/"))
        .header("cookie", &cookie)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = send(&c, req).await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/ui/login");
}

/// Tables held in the ledger's `holds` (in force).
fn held_tables(db: &Path) -> Vec<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT json_extract(scope, '$.table') FROM holds WHERE released_at IS NULL ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, Option<String>>(0))
        .unwrap()
        .map(|r| r.unwrap().unwrap_or_default())
        .collect()
}

/// Without an admin token (a loopback listener), the console needs no login and says so, but
/// its forms still need the CSRF token of the session it hands out.
#[tokio::test]
async fn without_a_token_no_login_is_needed_but_forms_still_need_the_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(SimConfig::default(), None).await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.admin.token_env = "CREDITMETER_TEST_CONSOLE_NO_TOKEN".into();
    std::env::remove_var("CREDITMETER_TEST_CONSOLE_NO_TOKEN");
    let proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    assert_eq!(
        call(&c, &proxy, "Inbound leads", "w", "a@example.com").await,
        200
    );
    let base = format!("http://{}", proxy.admin);
    let (status, headers, _) = get(&format!("{base}/")).await;
    assert_eq!(
        (status.as_u16(), &headers["location"]),
        (303, &"/ui/".parse::<http::HeaderValue>().unwrap())
    );
    let (status, headers, page) = get(&format!("{base}/ui/stop?table=Inbound+leads")).await;
    assert_eq!(status, 200);
    let page = String::from_utf8(page.to_vec()).unwrap();
    assert!(
        page.contains("needs no login"),
        "the page says no login is needed"
    );
    let cookie = headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let post = |cookie: Option<&str>, body: String| {
        let mut r = http::Request::post(format!("{base}/ui/holds"))
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        r.body(Full::new(Bytes::from(body))).unwrap()
    };
    // Another site's form: no cookie (SameSite=Strict), no token. Then a cookie but no token,
    // a token of no session, a JSON body: all refused, nothing held.
    for (cookie, body) in [
        (None, "table=Inbound+leads".to_owned()),
        (None, format!("table=Inbound+leads&csrf={csrf}")),
        (Some(cookie.as_str()), "table=Inbound+leads".to_owned()),
        (
            Some(cookie.as_str()),
            "table=Inbound+leads&csrf=".to_owned(),
        ),
    ] {
        let (status, _, _) = send(&c, post(cookie, body.clone())).await;
        assert_eq!(status, 403, "{cookie:?} {body}");
    }
    let json_post = http::Request::post(format!("{base}/ui/holds"))
        .header("content-type", "application/json")
        .header("cookie", &cookie)
        .body(Full::new(Bytes::from(format!(
            "{{\"table\": \"Inbound leads\", \"csrf\": \"{csrf}\"}}"
        ))))
        .unwrap();
    // (Not a form: 415, and nothing changes either.)
    assert_eq!(send(&c, json_post).await.0, 415);
    assert!(held_tables(&proxy.db).is_empty());
    assert_eq!(
        call(&c, &proxy, "Inbound leads", "w", "b@example.com").await,
        200
    );
    // With the session's token, the hold is placed and the next call refused.
    let (status, headers, _) = send(
        &c,
        post(
            Some(&cookie),
            format!("table=Inbound+leads&reason=test&csrf={csrf}"),
        ),
    )
    .await;
    assert_eq!(status, 303);
    assert!(headers["location"]
        .to_str()
        .unwrap()
        .starts_with("/ui/guardrails?placed="));
    assert_eq!(held_tables(&proxy.db), ["Inbound leads"]);
    assert_eq!(
        call(&c, &proxy, "Inbound leads", "w", "c@example.com").await,
        503
    );
}

/// A call through the proxy with the virtual key `key` and no attribution headers: (status,
/// the ledger's table and workflow for it).
async fn keyed_call(
    c: &HttpClient,
    proxy: &Proxy,
    key: &str,
    email: &str,
) -> (u16, Option<(String, String)>) {
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .body(Full::new(Bytes::from(json!({"email": email}).to_string())))
        .unwrap();
    let (status, headers, _) = send(c, req).await;
    let attributed = headers
        .get("x-meter-request-id")
        .and_then(|id| id.to_str().ok())
        .and_then(|id| {
            proxy
                .ledger()
                .query_row(
                    "SELECT table_name, workflow FROM calls WHERE request_id = ?1",
                    [id],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .ok()
        });
    (status.as_u16(), attributed)
}

/// The Repeats page's pairs, sentences and total equal `report --repeats --format json` for
/// people enriched from two tables; the Keys page's forms create a key the proxy attributes
/// to its table, rotate it (the old secret stops working) and revoke it (the next call is a
/// 401), each audited as the console; a post without the CSRF token changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeats_and_keys_pages_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            match_rate_pct: 100,
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.admin.token_env = "CREDITMETER_TEST_CONSOLE_KEYS_NO_TOKEN".into();
    std::env::remove_var("CREDITMETER_TEST_CONSOLE_KEYS_NO_TOKEN");
    cfg.keys.mode = creditmeter::keys::KeysMode::Optional;
    cfg.keys.upstream_key_env = "CREDITMETER_TEST_CONSOLE_KEYS_APOLLO".into();
    std::env::set_var(
        "CREDITMETER_TEST_CONSOLE_KEYS_APOLLO",
        "console-real-apollo-key",
    );
    let proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    // ABM accounts enriches three people; Inbound leads enriches two of them again, and one
    // new person.
    for e in ["pat@acme.com", "sam@acme.com", "lee@globex.com"] {
        assert_eq!(call(&c, &proxy, "ABM accounts", "abm", e).await, 200);
    }
    for e in ["Pat@Acme.com", "sam@acme.com", "new@initech.com"] {
        assert_eq!(call(&c, &proxy, "Inbound leads", "inbound", e).await, 200);
    }
    let db = proxy.db.clone();
    let base = format!("http://{}", proxy.admin);
    let shots = screenshots_dir();

    let (mut b, key, cookie) = tokio::task::block_in_place(|| {
        let mut b = cdp::Browser::start();
        // The navigation leads to the Repeats page.
        b.goto(&format!("{base}/ui/"));
        b.click("header nav a[href=\"/ui/repeats\"]", true);
        assert_eq!(b.eval("location.pathname"), "/ui/repeats");
        let (since, until) = window(&mut b);
        let doc = report(&db, &["--repeats", "--since", &since, "--until", &until]);
        let pairs = doc["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 1, "{doc}");
        assert_eq!(pairs[0]["earlier_table"], "ABM accounts");
        assert_eq!(pairs[0]["later_table"], "Inbound leads");
        assert_eq!(pairs[0]["items"], 2);
        let rows = b.eval("Array.from(document.querySelectorAll('#repeats tr.pair')).map(r => [r.dataset.earlier, r.dataset.later, Number(r.dataset.items), Number(r.dataset.calls), Number(r.dataset.creditsMilli), r.querySelector('td.credits').textContent])");
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), pairs.len(), "one row per table pair");
        for (r, p) in rows.iter().zip(pairs) {
            assert_eq!(r[0], p["earlier_table"]);
            assert_eq!(r[1], p["later_table"]);
            assert_eq!(r[2], p["items"]);
            assert_eq!(r[3], p["calls"]);
            assert_eq!(r[4], p["credits_milli"]);
            assert_eq!(
                r[5].as_str().unwrap(),
                fmt_credits(p["credits_milli"].as_i64().unwrap())
            );
        }
        let sentences = b
            .eval("Array.from(document.querySelectorAll('#summaries li')).map(l => l.textContent)");
        let want: Vec<&Value> = pairs.iter().map(|p| &p["summary"]).collect();
        assert_eq!(sentences, json!(want));
        assert_eq!(
            b.eval("Number(document.querySelector('#repeats-total').dataset.creditsMilli)"),
            doc["total"]["credits_milli"]
        );
        assert!(doc["total"]["credits_milli"].as_i64().unwrap() > 0);
        // A shorter look-back is the report's --within.
        b.goto(&format!("{base}/ui/repeats?window=24h&within=1h"));
        let (since, until) = window(&mut b);
        let doc = report(
            &db,
            &[
                "--repeats",
                "--within",
                "1h",
                "--since",
                &since,
                "--until",
                &until,
            ],
        );
        assert_eq!(
            b.eval("Number(document.querySelector('#repeats-within').dataset.withinMs)"),
            doc["within_ms"]
        );
        assert_eq!(
            b.eval("document.querySelectorAll('#repeats tr.pair').length"),
            json!(doc["pairs"].as_array().unwrap().len())
        );
        assert_labelled(&mut b, "repeats");
        b.screenshot(&shots.join("repeats.png"));

        // Create a key through the form; the secret is shown on the answer, once.
        b.goto(&format!("{base}/ui/keys"));
        assert_eq!(b.eval("document.querySelector('#keys').dataset.keys"), "0");
        b.click("#key-table", false);
        b.type_text("Keyed table");
        b.click("#key-workflow", false);
        b.type_text("keyed-flow");
        b.click("#key-name", false);
        b.type_text("console-key");
        b.click("#create", true);
        let key = b
            .eval("document.querySelector('#new-key').value")
            .as_str()
            .unwrap()
            .to_owned();
        assert!(key.starts_with("cmk_"), "{key}");
        b.screenshot(&shots.join("key-created.png"));
        b.goto(&format!("{base}/ui/keys"));
        assert!(
            !b.eval("document.documentElement.outerHTML")
                .as_str()
                .unwrap()
                .contains(&key),
            "the key is shown only once"
        );
        assert_eq!(
            b.eval("Array.from(document.querySelectorAll('#keys tr.key')).map(r => [r.dataset.name, r.dataset.table, r.dataset.status])"),
            json!([["console-key", "Keyed table", "live"]])
        );
        assert_labelled(&mut b, "keys");
        b.screenshot(&shots.join("keys.png"));
        // A second key with the same name is refused with a message naming the problem.
        b.click("#key-table", false);
        b.type_text("Other table");
        b.click("#key-name", false);
        b.type_text("console-key");
        b.click("#create", true);
        let alert = b.eval("document.querySelector('[role=alert]').textContent");
        let alert = alert.as_str().unwrap();
        assert!(
            alert.contains("console-key") && alert.contains("nothing was changed"),
            "{alert}"
        );
        assert_eq!(
            b.eval("document.querySelector('#new-key')"),
            Value::Null,
            "no key is shown"
        );
        let cookie = b
            .cookies()
            .iter()
            .find(|c| c["name"] == "creditmeter_session")
            .map(|c| format!("creditmeter_session={}", c["value"].as_str().unwrap()))
            .expect("a session cookie");
        (b, key, cookie)
    });
    // Neither the ledger file nor its WAL holds the key.
    for suffix in ["", "-wal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let bytes = std::fs::read(&p).unwrap_or_default();
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key is not stored ({suffix})"
        );
    }
    // A call with the key is attributed to its table and workflow.
    assert_eq!(
        keyed_call(&c, &proxy, &key, "k1@example.com").await,
        (200, Some(("Keyed table".into(), "keyed-flow".into())))
    );
    let listed = || async {
        let (_, _, body) = get(&format!("{base}/api/keys")).await;
        serde_json::from_slice::<Value>(&body).unwrap()["keys"].clone()
    };
    let id = listed().await[0]["id"].as_str().unwrap().to_owned();

    // Posts without the session's CSRF token change nothing.
    for (path, body) in [
        ("/ui/keys", "table=Sneaky".to_owned()),
        ("/ui/keys/revoke", format!("id={id}")),
        ("/ui/keys/rotate", format!("id={id}&csrf=")),
    ] {
        let req = http::Request::post(format!("{base}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", &cookie)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        assert_eq!(send(&c, req).await.0, 403, "{path} {body}");
    }
    let keys = listed().await;
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys[0]["status"], "live");
    assert_eq!(keyed_call(&c, &proxy, &key, "k2@example.com").await.0, 200);

    // Rotate through the form: the old secret is refused, the new one works.
    let rotated = tokio::task::block_in_place(|| {
        b.goto(&format!("{base}/ui/keys"));
        b.click(
            "#keys tr.key[data-name=\"console-key\"] button.rotate",
            true,
        );
        b.eval("document.querySelector('#new-key').value")
            .as_str()
            .unwrap()
            .to_owned()
    });
    assert!(rotated.starts_with("cmk_") && rotated != key);
    assert_eq!(keyed_call(&c, &proxy, &key, "k3@example.com").await.0, 401);
    assert_eq!(
        keyed_call(&c, &proxy, &rotated, "k4@example.com").await,
        (200, Some(("Keyed table".into(), "keyed-flow".into())))
    );

    // Revoke through the form: the next call is a 401.
    tokio::task::block_in_place(|| {
        b.goto(&format!("{base}/ui/keys"));
        b.click(
            "#keys tr.key[data-name=\"console-key\"] button.revoke",
            true,
        );
        assert_eq!(b.eval("location.pathname"), "/ui/keys");
        assert!(b.eval("document.querySelector('#revoked') !== null") == json!(true));
        assert_eq!(
            b.eval("document.querySelector('#keys tr.key').dataset.status"),
            "revoked"
        );
    });
    assert_eq!(
        keyed_call(&c, &proxy, &rotated, "k5@example.com").await.0,
        401
    );

    // The audit log has the three changes, by the console.
    let (_, _, body) = get(&format!("{base}/api/audit")).await;
    let audit: Value = serde_json::from_slice(&body).unwrap();
    let by_console: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == id.as_str())
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let actions: Vec<&str> = by_console.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["key_created", "key_rotated", "key_revoked"],
        "{audit}"
    );
    assert!(
        by_console.iter().all(|(a, _)| a == "console:admin"),
        "{by_console:?}"
    );
    let audit_text = audit.to_string();
    assert!(!audit_text.contains(&key) && !audit_text.contains(&rotated));
}
