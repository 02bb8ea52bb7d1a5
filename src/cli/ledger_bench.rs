//! `creditmeter ledger bench`: how a ledger file performs at its size. It times the reports over
//! the last 30 days of data from the rollups and from the detail rows, checks that both agree
//! group by group, to the milli-credit, with the plain `GROUP BY` a person would type into
//! `sqlite3` (timed too), and measures the writer's commit latency on the
//! file (single-row commits, as an idle proxy makes, and a burst of rows, as a busy one does).
//! `bench/ledger-scale.sh` runs it on a small and on big synthetic ledgers.
//!
//! Timing the writer appends rows (table `_bench`) to the file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use creditmeter::config::Synchronous;
use creditmeter::ledger::fixtures::{bench_metrics, bench_row};
use creditmeter::ledger::queries::{self, GroupBy, Source, Window};
use creditmeter::ledger::{LedgerWriter, SinkOptions, SqliteStore, Store, WriterConfig};
use creditmeter::report::{self, Format, ReportRequest, View};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub db: PathBuf,
    /// Single-row commits to time.
    pub commits: usize,
    /// Rows in the burst.
    pub burst_rows: usize,
    /// Runs per query; the best and the first are shown.
    pub runs: usize,
    /// Skip the writer part (leave the file untouched).
    pub no_writes: bool,
    /// Also time single-row commits while retention deletes detail rows older than this
    /// (destructive: the rows are really deleted).
    pub during_prune: Option<Duration>,
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Ledger(#[from] creditmeter::ledger::LedgerError),
    #[error(transparent)]
    Report(#[from] creditmeter::report::ReportError),
    #[error("prometheus: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the ledger holds no calls")]
    Empty,
}

fn timed<T>(
    runs: usize,
    mut f: impl FnMut() -> Result<T, BenchError>,
) -> Result<(T, Duration, Duration), BenchError> {
    let mut first = Duration::ZERO;
    let mut best = Duration::MAX;
    let mut out = None;
    for i in 0..runs.max(1) {
        let t = Instant::now();
        let v = f()?;
        let e = t.elapsed();
        if i == 0 {
            first = e;
        }
        best = best.min(e);
        out = Some(v);
    }
    match out {
        Some(v) => Ok((v, first, best)),
        None => Err(BenchError::Empty),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Runs the benchmark and returns the printed report.
pub fn run(opts: &BenchOptions) -> Result<String, BenchError> {
    let store = SqliteStore::open_read(&opts.db)?;
    let (rows, newest) = store.call_count()?;
    let newest = newest.ok_or(BenchError::Empty)?;
    let bytes = std::fs::metadata(&opts.db).map(|m| m.len()).unwrap_or(0);
    let window = Window {
        since_ms: newest + 1 - 30 * 86_400_000,
        until_ms: newest + 1,
    };
    let in_window = store.calls_in(window)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ledger {}: {} calls, {:.0} MiB; window: the 30 days to {} ({} calls)\n",
        opts.db.display(),
        rows,
        bytes as f64 / (1 << 20) as f64,
        report::format_time(window.until_ms),
        in_window
    );

    // Reports: the rollup path (auto) and the detail rows (raw), each checked against plain SQL.
    let mut table = vec![vec![
        "report over 30 days".to_owned(),
        "auto: first ms".into(),
        "auto: best ms".into(),
        "source".into(),
        "raw rows: best ms".into(),
        "SQL GROUP BY: best ms".into(),
        "totals agree".into(),
    ]];
    let base = ReportRequest {
        db: opts.db.clone(),
        since_ms: window.since_ms,
        until_ms: window.until_ms,
        format: Format::Json,
        ..ReportRequest::default()
    };
    for by in [
        "table", "workflow", "endpoint", "status", "outcome", "key", "tag:env", "id_kind",
    ] {
        let by = GroupBy::parse(by).map_err(|_| BenchError::Empty)?;
        let req = ReportRequest {
            by: by.clone(),
            ..base.clone()
        };
        let (auto, first, best) = timed(opts.runs, || Ok(report::spend_report(&store, &req)?))?;
        let raw_req = ReportRequest {
            source: Source::Raw,
            ..req.clone()
        };
        let (raw, _, raw_best) = timed(opts.runs, || Ok(report::spend_report(&store, &raw_req)?))?;
        let (sql, _, sql_best) = timed(opts.runs, || Ok(store.plain_group_by(&by, window)?))?;
        let (auto_g, raw_g) = (groups_of(&auto), groups_of(&raw));
        let sql_total: i64 = sql.values().map(|v| v.0).sum();
        let agree = auto_g == sql && raw_g == sql && auto.total.credits_milli == sql_total;
        table.push(vec![
            format!("--by {}", by.label()),
            ms(first),
            ms(best),
            auto.source.to_owned(),
            ms(raw_best),
            ms(sql_best),
            if agree {
                format!(
                    "yes, {} groups ({} credits)",
                    sql.len(),
                    report_credits(sql_total)
                )
            } else {
                format!(
                    "NO: auto {} raw {} sql {}",
                    auto.total.credits_milli, raw.total.credits_milli, sql_total
                )
            },
        ]);
    }
    for (label, view, width, since) in [
        (
            "--timeline 1h",
            View::Timeline,
            queries::HOUR_MS,
            window.since_ms,
        ),
        ("--timeline 1d", View::Timeline, 86_400_000, window.since_ms),
        (
            "--timeline 5m (last 24h)",
            View::Timeline,
            300_000,
            window.until_ms - 86_400_000,
        ),
        (
            "--spikes (30 days)",
            View::Spikes,
            queries::HOUR_MS,
            window.since_ms,
        ),
        ("--spikes (all history)", View::Spikes, queries::HOUR_MS, 0),
    ] {
        let req = ReportRequest {
            view,
            bucket_ms: width,
            since_ms: since,
            ..base.clone()
        };
        let (_, first, best) = timed(opts.runs, || Ok(report::run(&req)?))?;
        table.push(vec![
            label.to_owned(),
            ms(first),
            ms(best),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    for l in creditmeter::report::align(&table) {
        out.push_str(&l);
        out.push('\n');
    }
    drop(store);

    if !opts.no_writes {
        out.push('\n');
        out.push_str(&writer_bench(opts)?);
    }
    Ok(out)
}

fn report_credits(milli: i64) -> String {
    format!("{:.3}", milli as f64 / 1000.0)
}

fn groups_of(report: &report::SpendReport) -> BTreeMap<String, (i64, i64)> {
    report
        .rows
        .iter()
        .map(|r| (r.key.clone(), (r.credits_milli, r.calls as i64)))
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let k = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[k]
}

/// Commit latency through the real writer thread on this file.
fn writer_bench(opts: &BenchOptions) -> Result<String, BenchError> {
    let store = std::sync::Arc::new(SqliteStore::open(&opts.db, Synchronous::Normal)?);
    let secret = store.install_secret()?;
    let metrics = bench_metrics()?;
    // The proxy's defaults, without the spool's ballast file.
    let sink = store.call_sink(&SinkOptions {
        busy_timeout: creditmeter::config::DEFAULT_BUSY_TIMEOUT,
        secret,
    })?;
    let (writer, handle) = LedgerWriter::spawn(
        sink,
        WriterConfig {
            spool_base: store.spool_base().to_owned(),
            batch_max: creditmeter::config::DEFAULT_BATCH_MAX,
            on_error: creditmeter::config::OnLedgerError::Spool,
            spool_reserve: 0,
            group_wait: creditmeter::ledger::writer::GROUP_WAIT,
            commit_timeout: creditmeter::config::DEFAULT_COMMIT_TIMEOUT,
        },
        metrics.clone(),
    )?;
    let mut lat = Vec::with_capacity(opts.commits);
    for i in 0..opts.commits {
        let t = Instant::now();
        if let Some(ack) = handle.submit(bench_row(i), true) {
            let _ = ack.blocking_recv();
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let t = Instant::now();
    let mut last = None;
    for i in 0..opts.burst_rows {
        last = handle.submit(bench_row(opts.commits + i), i + 1 == opts.burst_rows);
    }
    if let Some(ack) = last {
        let _ = ack.blocking_recv();
    }
    let burst = t.elapsed();
    let mut prune_line = None;
    if let Some(keep) = opts.during_prune {
        // Retention's own batches and pauses, on its own connection, while an idle-ish proxy
        // (a call every 5 ms) commits rows one at a time.
        let pruning = store.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let pruner = std::thread::spawn(move || {
            let cutoff = creditmeter::ledger::maintenance::retention_cutoff(
                creditmeter::meter::now_ms(),
                keep,
            );
            let started = Instant::now();
            let o = pruning.prune(
                cutoff,
                creditmeter::ledger::maintenance::RETENTION_BATCH,
                creditmeter::ledger::maintenance::RETENTION_PAUSE,
                &mut || stop2.load(std::sync::atomic::Ordering::Relaxed),
            )?;
            Ok::<_, BenchError>((o, started.elapsed()))
        });
        let mut lat = Vec::with_capacity(opts.commits);
        for i in 0..opts.commits {
            std::thread::sleep(Duration::from_millis(5));
            let t = Instant::now();
            if let Some(ack) = handle.submit(bench_row(opts.commits + opts.burst_rows + i), true) {
                let _ = ack.blocking_recv();
            }
            lat.push(t.elapsed());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (o, took) = pruner.join().map_err(|_| BenchError::Empty)??;
        lat.sort();
        prune_line = Some(format!(
            "writer, single-row commits every 5 ms while retention deleted {} rows in {} batches of {} ({:.1} s): p50 {} ms, p99 {} ms, max {} ms",
            o.deleted,
            o.batches,
            creditmeter::ledger::maintenance::RETENTION_BATCH,
            took.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(lat.last().copied().unwrap_or_default()),
        ));
    }
    drop(handle);
    writer.close();
    let h = &metrics.commit_seconds;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "writer, single-row commits (idle proxy, durability=commit, synchronous=normal): {} commits, p50 {} ms, p99 {} ms, max {} ms",
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
    let _ = writeln!(
        out,
        "writer, a burst of {} rows (busy proxy, group commit): {} ms in all, {:.0} rows/s; {} commits in the whole run, mean {:.2} ms",
        opts.burst_rows,
        ms(burst),
        opts.burst_rows as f64 / burst.as_secs_f64().max(1e-9),
        h.get_sample_count(),
        h.get_sample_sum() * 1000.0 / (h.get_sample_count().max(1) as f64),
    );
    if let Some(l) = prune_line {
        let _ = writeln!(out, "{l}");
    }
    Ok(out)
}
