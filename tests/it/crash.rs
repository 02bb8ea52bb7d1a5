//! Crash durability: concurrent traffic through the real binary, `kill -9` at pseudo-random
//! moments, many rounds on one ledger. After each kill, every call whose response a caller
//! received in full must be in the ledger, and no call may be recorded twice.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::{free_port, Served, BIN};

const CALLERS: usize = 6;

struct Sim(Child, u16);

impl Sim {
    fn start() -> Sim {
        let port = free_port();
        let child = Command::new(BIN)
            .args([
                "sim-apollo",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--rate-limit-minute",
                "0",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sim did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sim(child, port)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One call on a keep-alive connection; `Some(request id)` only if the whole body arrived.
fn call(s: &mut TcpStream, tag: &str) -> std::io::Result<Option<String>> {
    let body = format!("{{\"email\":\"{tag}@crash.example\"}}");
    write!(
        s,
        "POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Meter-Table: crash\r\nX-Meter-Tag-call: {tag}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                let id = head.lines().find_map(|l| {
                    l.strip_prefix("x-meter-request-id:")
                        .map(|v| v.trim().to_owned())
                });
                return Ok(if head.starts_with("http/1.1 200") {
                    id
                } else {
                    None
                });
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            // After the head arrived, an early end is a truncated body; before it, just a close.
            let truncated = got.windows(4).any(|w| w == b"\r\n\r\n");
            let kind = if truncated {
                std::io::ErrorKind::InvalidData
            } else {
                std::io::ErrorKind::UnexpectedEof
            };
            return Err(std::io::Error::new(kind, "closed"));
        }
        got.extend_from_slice(&buf[..n]);
    }
}

struct Figures {
    rounds: usize,
    truncated: usize,
    received: usize,
    rows: usize,
    missing: usize,
    duplicated: usize,
}

/// Runs `rounds` kill -9 rounds; returns the figures.
fn rounds(durability: &str, rounds: usize, seed: u64) -> Figures {
    run(durability, rounds, seed, false)
}

/// `graceful`: SIGTERM instead of SIGKILL, and the process must exit 0.
fn run(durability: &str, rounds: usize, seed: u64, graceful: bool) -> Figures {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let mut received: BTreeMap<String, String> = BTreeMap::new(); // request id -> tag
    let mut rng = seed;
    let mut figures = Figures {
        rounds,
        truncated: 0,
        received: 0,
        rows: 0,
        missing: 0,
        duplicated: 0,
    };
    for round in 0..rounds {
        let served = Served::start(
            dir.path(),
            &[
                (
                    "upstream.base_url",
                    format!("\"http://127.0.0.1:{}\"", sim.1),
                ),
                ("ledger.durability", format!("\"{durability}\"")),
            ],
            &[],
        );
        let mut served = served;
        let port = served.proxy_port;
        let done = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let truncated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let callers: Vec<_> = (0..CALLERS)
            .map(|c| {
                let (done, got, truncated) = (done.clone(), got.clone(), truncated.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    'outer: while !done.load(Ordering::Relaxed) {
                        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                            break;
                        };
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        loop {
                            let tag = format!("r{round}c{c}n{n}");
                            n += 1;
                            match call(&mut s, &tag) {
                                Ok(Some(id)) => got.lock().unwrap().push((id, tag)),
                                Ok(None) => {}
                                Err(e) => {
                                    if e.kind() == std::io::ErrorKind::InvalidData {
                                        truncated.fetch_add(1, Ordering::Relaxed);
                                    }
                                    continue 'outer;
                                }
                            }
                            if done.load(Ordering::Relaxed) {
                                break 'outer;
                            }
                        }
                    }
                })
            })
            .collect();
        // splitmix64: a reproducible "random" moment between 50 and 400 ms.
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        std::thread::sleep(Duration::from_millis(50 + (z ^ (z >> 31)) % 350));
        if graceful {
            Command::new("kill")
                .args(["-TERM", &served.child.id().to_string()])
                .status()
                .unwrap();
            let status = served.child.wait().unwrap();
            assert_eq!(status.code(), Some(0), "SIGTERM under load exits 0");
        } else {
            served.child.kill().unwrap(); // SIGKILL
            served.child.wait().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        for c in callers {
            c.join().unwrap();
        }
        received.extend(got.lock().unwrap().drain(..));
        figures.truncated += truncated.load(Ordering::Relaxed);
    }
    // The ledger as the next start would see it (WAL included).
    let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    let ids: BTreeSet<String> = conn
        .prepare("SELECT request_id FROM calls")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let dup: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT tags FROM calls GROUP BY tags HAVING count(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    figures.received = received.len();
    figures.rows = ids.len();
    figures.missing = received.keys().filter(|id| !ids.contains(*id)).count();
    figures.duplicated = dup as usize;
    figures
}

#[test]
fn kill_9_never_loses_a_call_a_caller_received() {
    let f = rounds("commit", 50, 7);
    println!(
        "kill -9 (durability=commit): rounds={} calls received in full={} ledger rows={} missing={} duplicated={}",
        f.rounds, f.received, f.rows, f.missing, f.duplicated
    );
    assert!(
        f.received > 200,
        "too little traffic to prove anything: {}",
        f.received
    );
    assert_eq!(f.missing, 0, "calls received in full but not in the ledger");
    assert_eq!(f.duplicated, 0);
}

#[test]
fn kill_9_in_background_mode_loses_at_most_the_queue() {
    let f = rounds("background", 15, 11);
    println!(
        "kill -9 (durability=background): rounds={} calls received in full={} ledger rows={} missing={} duplicated={} (loss per kill: {:.2} calls)",
        f.rounds,
        f.received,
        f.rows,
        f.missing,
        f.duplicated,
        f.missing as f64 / f.rounds as f64
    );
    assert!(f.received > 50);
    assert_eq!(f.duplicated, 0);
    // The queue is what was handed to the writer and not yet committed: a group commit's worth
    // of calls per kill at most, never a backlog.
    assert!(
        f.missing <= f.rounds * 64,
        "{} missing over {} kills",
        f.missing,
        f.rounds
    );
}

#[test]
fn sigterm_under_load_loses_nothing_and_truncates_nothing() {
    let f = run("commit", 10, 13, true);
    println!(
        "SIGTERM under load: rounds={} calls received in full={} ledger rows={} missing={} duplicated={} truncated bodies={}",
        f.rounds, f.received, f.rows, f.missing, f.duplicated, f.truncated
    );
    assert!(f.received > 50);
    assert_eq!(f.missing, 0);
    assert_eq!(f.duplicated, 0);
    assert_eq!(
        f.truncated, 0,
        "a body in flight was cut off by a graceful shutdown"
    );
}
