#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]
//! A spool left by hours of ledger outage (issue 19, point 2): 1,000,000 rows replayed while
//! live calls keep committing. Its own test binary, so the memory it reports is its own.
//!
//! What a user would notice, asserted: every spooled and live row lands exactly once, live
//! calls are committed while the replay is still running (none waits for the whole of it), and
//! memory does not grow with the spool. The live calls' commit latency and the memory are
//! printed, not asserted against a threshold.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use creditmeter::config::{OnLedgerError, Synchronous};
use creditmeter::ledger::{CallRecord, LedgerWriter, WriterConfig};

/// Rows in the spool; `SPOOL_ROWS` in the environment overrides it (a quicker local run).
fn spool_rows() -> usize {
    std::env::var("SPOOL_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// A spooled row as the writer writes it: one JSON object per line.
fn spool_line(i: usize, started_at: i64) -> String {
    format!(
        concat!(
            r#"{{"request_id":"spooled-{:09}","started_at":{},"finished_at":{},"method":"POST","#,
            r#""path":"/api/v1/people/match","endpoint":"people_match","status":200,"outcome":"ok","#,
            r#""table_name":"outage","workflow":"w{}","tags":null,"key_fp":"00000000spooled0","#,
            r#""lead_milli":1000,"direct_dial_milli":0,"export_milli":0,"credit_source":"catalog","#,
            r#""records_requested":1,"records_matched":1,"catalog_version":"t","upstream_ms":120,"#,
            r#""request_bytes":80,"response_bytes":2000,"error":null,"id_kinds":"email"}}"#,
            "\n"
        ),
        i,
        started_at,
        started_at + 120,
        i % 4
    )
}

fn live_row(i: usize) -> CallRecord {
    let now = creditmeter::meter::now_ms();
    let line = spool_line(i, now)
        .replace("spooled-", "live-")
        .replace("outage", "live");
    serde_json::from_str(&line).unwrap()
}

/// Resident memory (`VmRSS`) of this process in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn metrics() -> creditmeter::ledger::LedgerMetrics {
    creditmeter::ledger::LedgerMetrics {
        pending: prometheus::IntGauge::new("p", "p").unwrap(),
        commit_seconds: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("c", "c"))
            .unwrap(),
        errors: prometheus::IntCounter::new("e", "e").unwrap(),
        spooled: prometheus::IntGauge::new("s", "s").unwrap(),
    }
}

fn count(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn a_million_spooled_rows_replay_in_chunks_while_live_calls_commit() {
    let n = spool_rows();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let store = creditmeter::ledger::SqliteStore::open(&db, Synchronous::Normal).unwrap();
    let secret = creditmeter::ledger::Store::install_secret(&store).unwrap();
    let spool = dir.path().join("ledger.db.spool");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&spool).unwrap());
        let t0 = creditmeter::meter::now_ms() - 3_600_000;
        for i in 0..n {
            w.write_all(spool_line(i, t0 + i as i64).as_bytes())
                .unwrap();
        }
        w.flush().unwrap();
    }
    let spool_mib = std::fs::metadata(&spool).unwrap().len() >> 20;
    let rss_before = rss_kib();

    let started = Instant::now();
    let (writer, handle) = LedgerWriter::spawn(
        creditmeter::ledger::Store::call_sink(
            &store,
            &creditmeter::ledger::SinkOptions {
                busy_timeout: Duration::from_secs(5),
                secret,
            },
        )
        .unwrap(),
        WriterConfig {
            spool_base: db.clone(),
            batch_max: creditmeter::config::DEFAULT_BATCH_MAX,
            on_error: OnLedgerError::Spool,
            spool_reserve: 0,
            group_wait: creditmeter::ledger::writer::GROUP_WAIT,
            commit_timeout: creditmeter::config::DEFAULT_COMMIT_TIMEOUT,
        },
        metrics(),
    )
    .unwrap();

    // Live calls, one every 2 ms, each waiting for its commit as a response's end does.
    let mut latencies = Vec::new();
    let mut during_replay = 0usize;
    let mut peak_rss = rss_before;
    let mut live = 0usize;
    let mut first_ack_left = None;
    loop {
        let replaying = handle.spooled_rows() > 0;
        let t = Instant::now();
        let ack = handle.submit(live_row(live), true).unwrap();
        ack.blocking_recv().unwrap().unwrap();
        let left = handle.spooled_rows();
        first_ack_left.get_or_insert(left);
        latencies.push(t.elapsed());
        live += 1;
        if replaying && left > 0 {
            during_replay += 1;
        }
        if live % 256 == 0 {
            peak_rss = peak_rss.max(rss_kib());
        }
        if !replaying {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let replay_took = started.elapsed();
    peak_rss = peak_rss.max(rss_kib());
    // The same calls with no replay running, for comparison.
    let mut quiet = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let ack = handle.submit(live_row(live + i), true).unwrap();
        ack.blocking_recv().unwrap().unwrap();
        quiet.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    live += quiet.len();
    quiet.sort_unstable();
    drop(handle);
    writer.close();

    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    common::report(&format!(
        "spool replay: {n} rows ({spool_mib} MiB) replayed in {replay_took:?} while {live} live calls committed \
         ({during_replay} of them while the replay was still running); live commit latency p50 {:?}, p99 {:?}, max {:?}; \
         RSS {} MiB before, peak {} MiB during (+{} MiB); with no replay running: p50 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
        rss_before >> 10,
        peak_rss >> 10,
        (peak_rss - rss_before) >> 10,
        quiet[quiet.len() / 2],
        quiet[quiet.len() - 1],
    ));

    // Exactly once, all of them.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM calls WHERE table_name = 'outage'"
        ),
        n as i64
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(DISTINCT request_id) FROM calls WHERE table_name = 'outage'"
        ),
        n as i64
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM calls WHERE table_name = 'live'"),
        live as i64
    );
    assert!(!spool.exists(), "the spool is removed once replayed");
    // No live call waited for the whole replay: the first one was committed with most of the
    // spool still to go, and calls kept committing while it ran.
    let first_left = first_ack_left.unwrap();
    assert!(
        first_left as usize > n / 2,
        "the first live call was committed only once {} of {n} spooled rows were left",
        first_left
    );
    assert!(during_replay > 1, "live calls committed during the replay");
    // Memory holds a chunk, not the spool.
    assert!(
        (peak_rss - rss_before) >> 10 < (spool_mib / 4).max(64),
        "memory grew by {} MiB replaying a {spool_mib} MiB spool",
        (peak_rss - rss_before) >> 10
    );
}
