//! The real binary, as a user runs it: bad config, SIGTERM, the demo.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_creditmeter");

#[test]
fn bad_config_exits_64_naming_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[ledger]\npaht = \"x.db\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("paht") && err.contains("line 5"), "{err}");

    std::fs::write(&cfg, "[upstream]\nbase_url = \"ftp://apollo\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.base_url"));

    std::fs::write(
        &cfg,
        "[proxy]\ntls_cert = \"missing-cert.pem\"\ntls_key = \"missing-key.pem\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing-cert.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_prints_what_is_in_force() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/creditmeter.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "proxy.listen",
        "proxy.metering          on",
        "https://api.apollo.io",
        "people_bulk_match",
        "unmatched: an object whose `match_confidence` is \"none\"",
        "ok",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serve_exits_0_on_sigterm_with_the_ledger_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let sim_port = free_port();
    let mut sim = Command::new(BIN)
        .args(["sim-apollo", "--listen", &format!("127.0.0.1:{sim_port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{proxy_port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[upstream]\nbase_url = \"http://127.0.0.1:{sim_port}\"\n[ledger]\npath = \"ledger.db\"\n"
        ),
    )
    .unwrap();
    let mut serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    // Wait for both listeners, then make three calls with a plain HTTP/1.1 client.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", sim_port)).is_err()
    {
        assert!(Instant::now() < deadline, "servers did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        let body = format!("{{\"email\":\"cli{i}@example.com\"}}");
        let req = format!(
            "POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Meter-Table: cli\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    // SIGHUP reloads (and must not kill the process, as a default SIGHUP would).
    Command::new("kill")
        .args(["-HUP", &serve.id().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        serve.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the server"
    );
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let status = wait_timeout(&mut serve, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");
    let log = lines.join().unwrap().join("\n");
    assert!(log.contains("ledger flushed"), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        !log.contains("\u{1b}["),
        "no colour codes when stderr is not a terminal"
    );
    let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM calls WHERE table_name = 'cli'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 3);
    let _ = sim.kill();
    let _ = sim.wait();
}

fn wait_timeout(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_names_the_heavy_spender_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["demo", "--calls", "400", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let first_row = text
        .lines()
        .skip_while(|l| !l.starts_with("---"))
        .nth(1)
        .unwrap_or("");
    assert!(first_row.starts_with("Q4 outbound blitz"), "{text}");
    assert!(text.contains("sqlite3 "), "{text}");
    assert!(text.contains(&dir.path().join("ledger.db").display().to_string()));
    // Phone reveals bill later: the first report shows the heavy spender's credits pending
    // (the last column), the second has them settled, with nothing left pending.
    let heavy: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Q4 outbound blitz"))
        .collect();
    assert_eq!(
        heavy.len(),
        2,
        "a report before and after settlement: {text}"
    );
    let pending = |l: &str| l.split_whitespace().last().unwrap().parse::<f64>().unwrap();
    assert!(pending(heavy[0]) > 0.0, "{text}");
    assert_eq!(pending(heavy[1]), 0.0, "{text}");
    assert!(
        text.contains("settled them at the calls' own times"),
        "{text}"
    );
    // The final report's total equals what the simulator says it billed, deferred jobs included.
    let total = text
        .lines()
        .rfind(|l| l.starts_with("TOTAL"))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();
    assert!(text.contains(&format!("billed {total} credits")), "{text}");
}
