//! Reports over real ledgers: every grouping agrees with plain SQL on the same file (rollups
//! and detail rows alike, edges and retention included), the spike rule finds a constructed
//! burst by hour and table, the usage API answers what the CLI answers behind the admin token,
//! and `/api/calls` pages without losing or repeating a row.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use creditmeter::config::Synchronous;
use creditmeter::ledger::maintenance;
use creditmeter::ledger::queries::{self, Filter, GroupBy, Source, Window, HOUR_MS};
use creditmeter::ledger::{CallRecord, LedgerMetrics, LedgerWriter, Outcome, WriterConfig};
use creditmeter::report::{self, Format, ReportArgs, ReportRequest, View};
use http_body_util::Full;

const DAY: i64 = 24 * HOUR_MS;
/// A Monday, 2026-11-02T00:00:00Z: fixed so the tests do not depend on the clock.
const T0: i64 = 1_793_577_600_000;

fn metrics() -> LedgerMetrics {
    LedgerMetrics {
        pending: prometheus::IntGauge::new("p", "p").unwrap(),
        commit_seconds: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("c", "c"))
            .unwrap(),
        errors: prometheus::IntCounter::new("e", "e").unwrap(),
        spooled: prometheus::IntGauge::new("s", "s").unwrap(),
    }
}

fn row(i: u64, started_at: i64) -> CallRecord {
    CallRecord {
        request_id: format!("r{i:010}"),
        started_at,
        finished_at: started_at + 200,
        method: "POST".into(),
        path: "/api/v1/people/match".into(),
        endpoint: "people_match".into(),
        status: Some(200),
        outcome: Outcome::Ok,
        table_name: Some("t".into()),
        workflow: Some("w".into()),
        tags: None,
        key_fp: Some("k1".into()),
        lead_milli: 1000,
        direct_dial_milli: 0,
        export_milli: 0,
        credit_source: "catalog".into(),
        records_requested: Some(1),
        records_matched: Some(1),
        catalog_version: "test".into(),
        upstream_ms: Some(150),
        request_bytes: 10,
        response_bytes: 100,
        error: None,
        id_kinds: Some("email".into()),
        settles: None,
        deferred: None,
        deferred_milli: 0,
        identifiers: Vec::new(),
    }
}

/// Writes rows through the real writer thread (the triggers keep the rollups, as in production).
fn write_rows(db: &Path, rows: Vec<CallRecord>) {
    let conn = creditmeter::ledger::open_for_write(db, Synchronous::Normal).unwrap();
    let secret = creditmeter::ledger::install_secret(&conn).unwrap();
    let (writer, handle) = LedgerWriter::spawn(
        conn,
        WriterConfig {
            path: db.to_owned(),
            synchronous: Synchronous::Normal,
            batch_max: 1024,
            busy_timeout: Duration::from_secs(5),
            on_error: creditmeter::config::OnLedgerError::Spool,
            spool_reserve: 0,
            secret,
            group_wait: creditmeter::ledger::writer::GROUP_WAIT,
            commit_timeout: creditmeter::config::DEFAULT_COMMIT_TIMEOUT,
        },
        metrics(),
    )
    .unwrap();
    for r in rows {
        handle.submit(r, false);
    }
    drop(handle);
    writer.close();
}

/// A varied ledger: every dimension takes several values, NULLs included, spread over 3 days
/// with calls on and off the hour.
fn varied_rows(n: u64, start: i64) -> Vec<CallRecord> {
    let tables = [Some("Inbound"), Some("ABM, accounts"), None, Some("Blitz")];
    let workflows = [Some("enrich"), None, Some("verify")];
    let endpoints = [
        "people_match",
        "people_bulk_match",
        "organizations_enrich",
        "other",
    ];
    let kinds = [
        Some("email"),
        Some("linkedin_url"),
        Some("email,linkedin_url"),
        None,
        Some("name+domain"),
    ];
    (0..n)
        .map(|i| {
            let mut r = row(i, start + (i as i64 * 7_919_993) % (3 * DAY));
            r.table_name = tables[(i % 4) as usize].map(str::to_owned);
            r.workflow = workflows[(i % 3) as usize].map(str::to_owned);
            r.endpoint = endpoints[(i % 7 % 4) as usize].to_owned();
            r.key_fp = if i % 11 == 0 {
                None
            } else {
                Some(format!("key{}", i % 3))
            };
            r.tags = match i % 5 {
                0 => None,
                1 => Some(r#"{"env":"staging"}"#.into()),
                _ => Some(r#"{"env":"prod","owner":"ana"}"#.into()),
            };
            r.id_kinds = kinds[(i % 5) as usize].map(str::to_owned);
            match i % 13 {
                0 => {
                    r.status = Some(429);
                    r.lead_milli = 0;
                    r.records_matched = None;
                }
                1 => {
                    r.status = None;
                    r.outcome = Outcome::UpstreamError;
                    r.lead_milli = 0;
                }
                2 => r.outcome = Outcome::ClientCancelled,
                _ => {}
            }
            r.lead_milli = if r.lead_milli > 0 {
                1000 + (i as i64 % 17) * 10
            } else {
                0
            };
            r.direct_dial_milli = if i % 6 == 0 && r.status == Some(200) {
                8000
            } else {
                0
            };
            r.export_milli = if i % 9 == 0 && r.status == Some(200) {
                1000
            } else {
                0
            };
            r.records_requested = Some(1 + (i as i64 % 10));
            r.records_matched = r.records_matched.map(|_| i as i64 % 3);
            r.credit_source = match (r.credits_milli(), i % 4) {
                (0, _) => "none",
                (_, 0) => "reported",
                (_, 1) => "estimated",
                _ => "catalog",
            }
            .into();
            r
        })
        .collect()
}

/// Plain SQL: the figures per group in the window, straight from `calls`.
fn sql_groups(db: &Path, key_sql: &str, extra: &str, w: Window) -> BTreeMap<String, [i64; 7]> {
    let conn = creditmeter::ledger::open_for_read(db).unwrap();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {key_sql}, count(*), sum(credits_milli), sum(lead_milli), sum(direct_dial_milli),
                    sum(export_milli), sum(coalesce(records_requested, 0)), sum(coalesce(records_matched, 0))
               FROM calls WHERE started_at >= ?1 AND started_at < ?2 {extra} GROUP BY 1"
        ))
        .unwrap();
    stmt.query_map([w.since_ms, w.until_ms], |r| {
        Ok((
            r.get::<_, String>(0)?,
            [
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ],
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn report_groups(rows: &[queries::SpendRow]) -> BTreeMap<String, [i64; 7]> {
    rows.iter()
        .map(|r| {
            (
                r.key.clone(),
                [
                    r.calls as i64,
                    r.credits_milli,
                    r.lead_milli,
                    r.direct_dial_milli,
                    r.export_milli,
                    r.records_requested as i64,
                    r.records_matched as i64,
                ],
            )
        })
        .collect()
}

fn spend(db: &Path, by: &GroupBy, w: Window, source: Source) -> report::SpendReport {
    let conn = creditmeter::ledger::open_for_read(db).unwrap();
    report::spend_report(
        &conn,
        &ReportRequest {
            db: db.to_owned(),
            by: by.clone(),
            since_ms: w.since_ms,
            until_ms: w.until_ms,
            source,
            ..ReportRequest::default()
        },
    )
    .unwrap()
}

#[test]
fn every_grouping_equals_plain_sql_to_the_milli_credit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    write_rows(&db, varied_rows(3000, T0 + 1_234));
    let groupings: &[(&str, &str, &str)] = &[
        ("table", "COALESCE(table_name, '_unattributed')", ""),
        ("workflow", "COALESCE(workflow, '_none')", ""),
        ("endpoint", "endpoint", ""),
        ("key", "COALESCE(key_fp, '_none')", ""),
        ("status", "COALESCE(CAST(status AS TEXT), 'none')", ""),
        ("outcome", "outcome", ""),
        (
            "tag:env",
            "COALESCE(json_extract(tags, '$.env'), '_none')",
            "",
        ),
        (
            "tag:owner",
            "COALESCE(json_extract(tags, '$.owner'), '_none')",
            "",
        ),
        (
            "id_kind",
            "id_kinds",
            "AND id_kinds IS NOT NULL AND status BETWEEN 200 AND 299",
        ),
        ("credit_source", "credit_source", ""),
    ];
    let windows = [
        // All time, whole hours, ragged edges on both sides, and a window inside one hour.
        Window {
            since_ms: 0,
            until_ms: T0 + 10 * DAY,
        },
        Window {
            since_ms: T0 + 5 * HOUR_MS,
            until_ms: T0 + 50 * HOUR_MS,
        },
        Window {
            since_ms: T0 + 5 * HOUR_MS + 777_777,
            until_ms: T0 + 50 * HOUR_MS + 1_111_111,
        },
        Window {
            since_ms: T0 + 30 * HOUR_MS + 60_000,
            until_ms: T0 + 30 * HOUR_MS + 1_800_000,
        },
    ];
    for (by, key_sql, extra) in groupings {
        let by = GroupBy::parse(by).unwrap();
        for w in windows {
            let want = sql_groups(&db, key_sql, extra, w);
            assert!(
                !want.is_empty(),
                "{by:?} {w:?}: the fixture covers this window"
            );
            for source in [Source::Auto, Source::Raw] {
                let got = spend(&db, &by, w, source);
                assert_eq!(report_groups(&got.rows), want, "{by:?} {w:?} {source:?}");
                let total: i64 = want.values().map(|v| v[1]).sum();
                assert_eq!(got.total.credits_milli, total, "{by:?} {w:?} {source:?}");
            }
            let auto = spend(&db, &by, w, Source::Auto);
            let expect_source = match (by.has_rollup(), w) {
                (false, _) => "raw",
                (true, w) if w.until_ms - w.since_ms < HOUR_MS => "raw",
                (true, w) if w.since_ms % HOUR_MS == 0 && w.until_ms % HOUR_MS == 0 => "rollup",
                _ => "rollup+raw",
            };
            assert_eq!(auto.source, expect_source, "{by:?} {w:?}");
        }
    }
}

#[test]
fn filters_and_top_cut_rows_but_not_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    write_rows(&db, varied_rows(1000, T0));
    let w = Window {
        since_ms: T0 + 1_000,
        until_ms: T0 + 3 * DAY,
    };
    let want = sql_groups(&db, "endpoint", "AND table_name = 'Blitz'", w);
    let conn = creditmeter::ledger::open_for_read(&db).unwrap();
    for source in [Source::Auto, Source::Raw] {
        let agg = queries::aggregate(
            &conn,
            Some(&GroupBy::Endpoint),
            w,
            None,
            &Filter {
                table: Some("Blitz".into()),
                ..Filter::default()
            },
            source,
        )
        .unwrap();
        let rows: Vec<_> = agg.cells.into_iter().map(|c| c.row).collect();
        assert_eq!(report_groups(&rows), want, "{source:?}");
    }
    // `_unattributed` selects the calls without a table, from rollups and raw rows alike.
    let want = sql_groups(&db, "'x'", "AND table_name IS NULL", w);
    for source in [Source::Auto, Source::Raw] {
        let agg = queries::aggregate(
            &conn,
            None,
            w,
            None,
            &Filter {
                table: Some("_unattributed".into()),
                ..Filter::default()
            },
            source,
        )
        .unwrap();
        assert_eq!(agg.cells.len(), 1);
        assert_eq!(agg.cells[0].row.credits_milli, want["x"][1], "{source:?}");
    }
    let req = ReportRequest {
        db: db.clone(),
        by: GroupBy::Key,
        since_ms: w.since_ms,
        until_ms: w.until_ms,
        top: Some(1),
        ..ReportRequest::default()
    };
    let r = report::spend_report(&conn, &req).unwrap();
    assert_eq!(r.rows.len(), 1);
    let all: i64 = sql_groups(&db, "'x'", "", w)["x"][1];
    assert_eq!(
        r.total.credits_milli, all,
        "the total covers every key, not only the top one"
    );
    assert!(r.rows[0].credits_milli >= all / 4);
}

#[test]
fn the_three_formats_render_the_same_figures() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    write_rows(&db, varied_rows(500, T0));
    let base = ReportRequest {
        db: db.clone(),
        by: GroupBy::Table,
        since_ms: T0,
        until_ms: T0 + 4 * DAY,
        ..ReportRequest::default()
    };
    let total = sql_groups(
        &db,
        "'x'",
        "",
        Window {
            since_ms: T0,
            until_ms: T0 + 4 * DAY,
        },
    )["x"];

    let json: serde_json::Value = serde_json::from_str(
        &report::run(&ReportRequest {
            format: Format::Json,
            ..base.clone()
        })
        .unwrap(),
    )
    .unwrap();
    for key in [
        "group_by", "window", "rows", "total", "view", "filter", "source", "notes",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}: {json:#}");
    }
    assert_eq!(json["group_by"], "table");
    assert_eq!(json["view"], "spend");
    assert_eq!(json["window"]["since"], "2026-11-02T00:00:00Z");
    assert_eq!(json["total"]["credits_milli"], total[1]);
    assert_eq!(json["total"]["calls"], total[0]);
    let row = &json["rows"][0];
    for key in [
        "key",
        "calls",
        "credits",
        "credits_milli",
        "lead_credits",
        "direct_dial_credits",
        "export_credits",
        "records_requested",
        "records_matched",
        "match_rate",
        "credits_per_match",
    ] {
        assert!(row.get(key).is_some(), "row lacks {key}");
    }
    let keys: Vec<&str> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"_unattributed") && keys.contains(&"ABM, accounts"));

    let csv = report::run(&ReportRequest {
        format: Format::Csv,
        ..base.clone()
    })
    .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("table,calls,credits,"));
    assert_eq!(lines.len(), keys.len() + 2, "{csv}");
    assert!(
        csv.contains("\"ABM, accounts\","),
        "a comma in a key is quoted: {csv}"
    );
    let last = lines.last().unwrap();
    assert!(last.starts_with(&format!("TOTAL,{},", total[0])), "{last}");

    let table = report::run(&base).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    let rules: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("---"))
        .collect();
    assert_eq!(rules.len(), 2, "{table}");
    // Aligned: the credits column ends at the same place on every line.
    let header = lines[rules[0] - 1];
    let credits_end = header.find("credits").unwrap() + "credits".len();
    for l in &lines[rules[0] + 1..] {
        if l.starts_with("---") || l.starts_with("note") {
            continue;
        }
        assert!(
            l.as_bytes()[credits_end - 1].is_ascii_digit(),
            "credits column misaligned in {l:?}\n{table}"
        );
        assert_eq!(l.as_bytes()[credits_end], b' ', "{l:?}\n{table}");
    }
    let total_line = lines[rules[1] + 1];
    assert!(total_line.starts_with("TOTAL"));
    assert_eq!(
        total_line.split_whitespace().nth(2).unwrap(),
        format!("{}", total[1] as f64 / 1000.0).trim_end_matches(".0"),
    );
}

#[test]
fn report_args_resolve_windows_defaults_and_errors() {
    let now = T0 + 10 * DAY + 123;
    let args = |pairs: &[(&str, &str)]| ReportArgs::from_query(pairs.iter().copied());
    let r = args(&[
        ("since", "7d"),
        ("until", "24h"),
        ("by", "workflow"),
        ("top", "3"),
    ])
    .unwrap()
    .resolve("x.db".into(), now, Format::Json)
    .unwrap();
    assert_eq!((r.since_ms, r.until_ms), (now - 7 * DAY, now - DAY));
    assert_eq!(
        (r.by.clone(), r.top, r.format, r.view),
        (GroupBy::Workflow, Some(3), Format::Json, View::Spend)
    );
    let r = args(&[("since", "2026-11-03T10:30:00Z"), ("until", "2026-11-04")])
        .unwrap()
        .resolve("x.db".into(), now, Format::Table)
        .unwrap();
    assert_eq!(
        (r.since_ms, r.until_ms),
        (T0 + DAY + 10 * HOUR_MS + 1_800_000, T0 + 2 * DAY)
    );
    // Defaults: spend over all time up to a minute ahead; the timeline over a span that suits its width.
    let r = args(&[])
        .unwrap()
        .resolve("x.db".into(), now, Format::Table)
        .unwrap();
    assert_eq!(
        (r.since_ms, r.until_ms, r.by.clone()),
        (0, now + 60_000, GroupBy::Table)
    );
    for (width, bucket, since) in [
        ("5m", 300_000, now - DAY),
        ("1h", HOUR_MS, now - 7 * DAY),
        ("1d", DAY, now - 90 * DAY),
    ] {
        let r = args(&[("timeline", width)])
            .unwrap()
            .resolve("x.db".into(), now, Format::Table)
            .unwrap();
        assert_eq!(
            (r.view, r.bucket_ms, r.since_ms),
            (View::Timeline, bucket, since),
            "{width}"
        );
    }
    let r = args(&[
        ("spikes", ""),
        ("spike-factor", "5"),
        ("spike_floor", "1000"),
    ])
    .unwrap()
    .resolve("x.db".into(), now, Format::Table)
    .unwrap();
    assert_eq!(
        (r.view, r.bucket_ms, r.since_ms),
        (View::Spikes, HOUR_MS, 0)
    );
    assert_eq!((r.rule.factor, r.rule.floor_milli), (5.0, 1_000_000));
    let r = args(&[("identifiers", "true")])
        .unwrap()
        .resolve("x.db".into(), now, Format::Table)
        .unwrap();
    assert_eq!(r.by, GroupBy::IdKind);
    assert_eq!(
        args(&[("by", "tag:Owner")])
            .unwrap()
            .resolve("x.db".into(), now, Format::Table)
            .unwrap()
            .by,
        GroupBy::Tag("owner".into())
    );

    for (pairs, names) in [
        (vec![("since", "yesterday")], "since"),
        (vec![("until", "2026-13-01")], "until"),
        (vec![("since", "1d"), ("until", "2d")], "since"),
        (vec![("by", "colour")], "by"),
        (vec![("timeline", "7x")], "timeline"),
        (vec![("timeline", "10s")], "timeline"),
        (vec![("spike_factor", "0.5")], "spike-factor"),
        (vec![("top", "0")], "top"),
        (vec![("by", "key"), ("identifiers", "1")], "identifiers"),
    ] {
        let err = args(&pairs)
            .and_then(|a| a.resolve("x.db".into(), now, Format::Table).map(|_| ()))
            .unwrap_err();
        assert!(err.starts_with(names), "{pairs:?}: {err}");
    }
    let err = args(&[("colour", "red")]).unwrap_err();
    assert!(err.contains("colour"), "{err}");
    assert!(args(&[("format", "xml")]).unwrap_err().contains("format"));
}

/// Ten days of ordinary hourly spend from three tables (`ordinary_milli` a call), with a daily
/// rhythm, then one hour in which a fourth table burns `burst_milli`.
fn burst_ledger(db: &Path, burst_at: i64, burst_milli: i64, ordinary_milli: i64) {
    let mut rows = Vec::new();
    let mut i = 0u64;
    for h in 0..(10 * 24) {
        let t = T0 + h * HOUR_MS;
        let hour_of_day = h % 24;
        let busy = (8..18).contains(&hour_of_day);
        for (table, per_hour) in [
            ("Inbound", if busy { 30 } else { 6 }),
            ("ABM", if busy { 12 } else { 2 }),
            ("Nightly", if hour_of_day < 4 { 40 } else { 0 }),
        ] {
            for k in 0..per_hour {
                let mut r = row(i, t + k * (HOUR_MS / per_hour.max(1)) + 17);
                r.table_name = Some(table.into());
                r.lead_milli = ordinary_milli;
                rows.push(r);
                i += 1;
            }
        }
    }
    // A table that spends 10 credits once: far above its own baseline of zero, but under the
    // 50-credit floor, so never a spike.
    let mut r = row(i, T0 + 9 * DAY + 20 * HOUR_MS);
    r.table_name = Some("Tiny".into());
    r.lead_milli = 10_000;
    rows.push(r);
    i += 1;
    // The burst: bulk matches with phone reveal, 90 credits each, within one hour.
    let n = burst_milli / 90_000;
    for k in 0..n {
        let mut r = row(i, burst_at + k * (HOUR_MS / n) + 5);
        r.table_name = Some("Runaway waterfall".into());
        r.endpoint = "people_bulk_match".into();
        r.lead_milli = 10_000;
        r.direct_dial_milli = 80_000;
        rows.push(r);
        i += 1;
    }
    write_rows(db, rows);
}

#[test]
fn spikes_and_the_timeline_name_the_burst_hour_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    let burst_at = T0 + 8 * DAY + 14 * HOUR_MS; // 2026-11-10T14:00:00Z
    burst_ledger(&db, burst_at, 45_000_000, 1000);
    let req = ReportRequest {
        db: db.clone(),
        view: View::Spikes,
        since_ms: 0,
        until_ms: T0 + 10 * DAY,
        format: Format::Json,
        ..ReportRequest::default()
    };
    let spikes: serde_json::Value = serde_json::from_str(&report::run(&req).unwrap()).unwrap();
    let list = spikes["spikes"].as_array().unwrap();
    assert_eq!(list.len(), 1, "one spike, the burst: {spikes:#}");
    assert_eq!(list[0]["start"], "2026-11-10T14:00:00Z");
    assert_eq!(list[0]["end"], "2026-11-10T15:00:00Z");
    assert_eq!(list[0]["total_spike"], true);
    assert_eq!(list[0]["top"][0]["key"], "Runaway waterfall");
    assert_eq!(list[0]["top"][0]["jumped"], true);
    assert_eq!(list[0]["top"][0]["credits_milli"], 45_000_000);
    assert_eq!(
        list[0]["top"][1]["jumped"], false,
        "the ordinary tables did not jump"
    );
    assert_eq!(spikes["spike_rule"]["trailing_buckets"], 168);

    // The same from the detail rows, and from the table rendering a person reads.
    let raw: serde_json::Value = serde_json::from_str(
        &report::run(&ReportRequest {
            source: Source::Raw,
            ..req.clone()
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(raw["spikes"], spikes["spikes"]);
    let text = report::run(&ReportRequest {
        format: Format::Table,
        ..req.clone()
    })
    .unwrap();
    let first = text.lines().find(|l| l.starts_with("2026-")).unwrap();
    assert!(
        first.starts_with("2026-11-10T14:00:00Z to 2026-11-10T15:00:00Z"),
        "{text}"
    );
    assert!(
        text.contains("Runaway waterfall") && text.contains("JUMPED"),
        "{text}"
    );

    // The timeline marks that hour and no other.
    let tl = ReportRequest {
        view: View::Timeline,
        since_ms: T0 + 7 * DAY,
        ..req.clone()
    };
    let timeline: serde_json::Value = serde_json::from_str(&report::run(&tl).unwrap()).unwrap();
    let marked: Vec<&str> = timeline["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["spike"] == true)
        .map(|b| b["start"].as_str().unwrap())
        .collect();
    assert_eq!(marked, ["2026-11-10T14:00:00Z"]);
    let b = timeline["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["spike"] == true)
        .unwrap();
    assert_eq!(b["jumps"][0]["key"], "Runaway waterfall");
    assert_eq!(timeline["buckets"].as_array().unwrap().len(), 72);
    let text = report::run(&ReportRequest {
        format: Format::Table,
        ..tl.clone()
    })
    .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("2026-11-10T14:00:00Z"))
        .unwrap();
    assert!(line.contains("!! Runaway waterfall +"), "{text}");
    assert_eq!(
        text.matches("!!").count(),
        2,
        "the legend and the burst hour only:\n{text}"
    );

    // Day buckets name the day; 5-minute buckets name the minutes.
    let days: serde_json::Value = serde_json::from_str(
        &report::run(&ReportRequest {
            bucket_ms: DAY,
            ..req.clone()
        })
        .unwrap(),
    )
    .unwrap();
    // Ten days of history is less than half the 28-day trailing window: too early to judge.
    assert_eq!(days["spikes"].as_array().unwrap().len(), 0, "{days:#}");
    let five: serde_json::Value = serde_json::from_str(
        &report::run(&ReportRequest {
            bucket_ms: 300_000,
            since_ms: burst_at - 6 * HOUR_MS,
            until_ms: burst_at + 6 * HOUR_MS,
            ..req.clone()
        })
        .unwrap(),
    )
    .unwrap();
    let list = five["spikes"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{five:#}");
    assert_eq!(list[0]["start"], "2026-11-10T14:00:00Z");
    assert_eq!(list[0]["end"], "2026-11-10T15:00:00Z");
    assert_eq!(list[0]["buckets"], 12);
    assert_eq!(five["source"], "raw");
}

#[test]
fn a_small_burst_in_one_table_is_found_even_when_the_total_hides_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    let burst_at = T0 + 9 * DAY + 3 * HOUR_MS; // at night, 2026-11-11T03:00:00Z
                                               // Ordinary hours spend thousands (100 credits a call); 1,710 credits from a table that
                                               // never spends stay within the total's usual range, so only the table's own series shows it.
    burst_ledger(&db, burst_at, 19 * 90_000, 100_000);
    let req = ReportRequest {
        db: db.clone(),
        view: View::Spikes,
        since_ms: 0,
        until_ms: T0 + 10 * DAY,
        format: Format::Json,
        ..ReportRequest::default()
    };
    let spikes: serde_json::Value = serde_json::from_str(&report::run(&req).unwrap()).unwrap();
    let list = spikes["spikes"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{spikes:#}");
    assert_eq!(list[0]["start"], "2026-11-11T03:00:00Z");
    assert_eq!(list[0]["total_spike"], false, "{spikes:#}");
    assert_eq!(list[0]["top"][0]["key"], "Runaway waterfall");
    assert_eq!(list[0]["top"][0]["jumped"], true);
    assert_eq!(list[0]["top"][0]["credits_milli"], 19 * 90_000);
}

#[test]
fn retention_keeps_totals_in_the_rollups_and_says_what_detail_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    write_rows(&db, varied_rows(3000, T0));
    let all = Window {
        since_ms: 0,
        until_ms: T0 + 10 * DAY,
    };
    let before_table = sql_groups(&db, "COALESCE(table_name, '_unattributed')", "", all);
    let before_status = sql_groups(&db, "COALESCE(CAST(status AS TEXT), 'none')", "", all);
    // Retention at T0 + 1.5 days: the cutoff is on the hour, the oldest rows go.
    let cutoff = T0 + 36 * HOUR_MS;
    let mut conn = creditmeter::ledger::open_for_write(&db, Synchronous::Normal).unwrap();
    let mut stops = 0;
    let out = maintenance::prune(&mut conn, cutoff, 100, Duration::ZERO, || {
        stops += 1;
        false
    })
    .unwrap();
    assert!(out.deleted > 1000 && out.batches > 10, "{out:?}");
    assert!(stops > 10, "the stop flag is checked between batches");
    let left: i64 = conn
        .query_row(
            "SELECT count(*) FROM calls WHERE started_at < ?1",
            [cutoff],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);
    drop(conn);
    // Rollups keep the whole history: all-time by table and by status still equal the sums
    // from before the deletion, to the milli-credit.
    assert_eq!(
        report_groups(&spend(&db, &GroupBy::Table, all, Source::Auto).rows),
        before_table
    );
    assert_eq!(
        report_groups(&spend(&db, &GroupBy::Status, all, Source::Auto).rows),
        before_status
    );
    // A window starting inside the deleted part widens to whole hours and says so.
    let ragged = Window {
        since_ms: T0 + 5 * HOUR_MS + 1234,
        until_ms: T0 + 40 * HOUR_MS + 5,
    };
    let r = spend(&db, &GroupBy::Table, ragged, Source::Auto);
    assert_eq!(r.window.since_ms, T0 + 5 * HOUR_MS);
    assert!(
        r.notes.iter().any(|n| n.contains("widened")),
        "{:?}",
        r.notes
    );
    let want: i64 = {
        let w = Window {
            since_ms: T0 + 5 * HOUR_MS,
            until_ms: cutoff,
        };
        let c = creditmeter::ledger::open_for_read(&db).unwrap();
        let old: i64 = c
            .query_row(
                "SELECT sum(credits_milli) FROM rollup_hourly WHERE hour >= ?1 AND hour < ?2",
                [w.since_ms, w.until_ms],
                |r| r.get(0),
            )
            .unwrap();
        let new: i64 = c
            .query_row(
                "SELECT sum(credits_milli) FROM calls WHERE started_at >= ?1 AND started_at < ?2",
                [cutoff, ragged.until_ms],
                |r| r.get(0),
            )
            .unwrap();
        old + new
    };
    assert_eq!(r.total.credits_milli, want);
    // Groupings that need detail rows cover only what is kept, and say so.
    let r = spend(&db, &GroupBy::Key, all, Source::Auto);
    assert!(
        r.notes.iter().any(|n| n.contains("ledger.retention")),
        "{:?}",
        r.notes
    );
    assert_eq!(r.window.since_ms, cutoff);
    let kept = sql_groups(&db, "COALESCE(key_fp, '_none')", "", all);
    assert_eq!(report_groups(&r.rows), kept);
    // The metrics' start-up totals come from the rollups, so they do not shrink either.
    let conn = creditmeter::ledger::open_for_read(&db).unwrap();
    let seeded: i64 = queries::seed_totals(&conn)
        .unwrap()
        .credits
        .iter()
        .map(|c| c.lead_milli + c.direct_dial_milli + c.export_milli)
        .sum();
    assert_eq!(seeded, before_table.values().map(|v| v[1]).sum::<i64>());
    assert_eq!(queries::detail_deleted_before(&conn).unwrap(), Some(cutoff));
    // A timeline from detail rows does not learn its baseline from the deleted stretch: right
    // after the cutoff nothing is judged (with a zero floor, an empty baseline would flag
    // every bucket).
    let mut req = ReportRequest {
        db: db.clone(),
        by: GroupBy::Key,
        view: View::Spikes,
        bucket_ms: 300_000,
        since_ms: cutoff,
        until_ms: cutoff + 12 * HOUR_MS,
        format: Format::Json,
        ..ReportRequest::default()
    };
    req.rule.floor_milli = 0;
    let spikes: serde_json::Value = serde_json::from_str(&report::run(&req).unwrap()).unwrap();
    assert_eq!(spikes["source"], "raw");
    assert_eq!(spikes["spikes"].as_array().unwrap().len(), 0, "{spikes:#}");
}

#[test]
fn the_migration_backfills_rollups_from_existing_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    write_rows(&db, varied_rows(800, T0));
    let all = Window {
        since_ms: 0,
        until_ms: T0 + 10 * DAY,
    };
    let want = sql_groups(&db, "COALESCE(table_name, '_unattributed')", "", all);
    // Turn the file back into the ledger before the rollup migration (v4), with rows and no
    // rollups, undoing the migrations after it too (v5: deferred charges, v6: identifier
    // fingerprints), then reopen it.
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(
        creditmeter::ledger::schema::SCHEMA_VERSION,
        6,
        "undo the newer migrations here"
    );
    conn.execute_batch(
        "DROP TABLE identifiers; DROP INDEX calls_settles; DROP INDEX calls_deferred;
         ALTER TABLE calls DROP COLUMN settles; ALTER TABLE calls DROP COLUMN deferred;
         ALTER TABLE calls DROP COLUMN deferred_milli;
         DROP TRIGGER calls_rollup_insert; DROP TRIGGER calls_rollup_update;
         DROP TABLE rollup_hourly; PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);
    drop(creditmeter::ledger::open_for_write(&db, Synchronous::Normal).unwrap());
    let conn = creditmeter::ledger::open_for_read(&db).unwrap();
    let rolled: i64 = conn
        .query_row("SELECT sum(calls) FROM rollup_hourly", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rolled, 800);
    assert_eq!(
        report_groups(
            &spend(
                &db,
                &GroupBy::Table,
                Window {
                    since_ms: T0,
                    until_ms: T0 + 4 * DAY
                },
                Source::Auto
            )
            .rows
        ),
        want
    );
    // A corrected row moves its figures in the rollups too.
    drop(conn);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE calls SET table_name = 'Moved', lead_milli = lead_milli + 500, credits_milli = credits_milli + 500
          WHERE id = (SELECT min(id) FROM calls WHERE lead_milli > 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let want = sql_groups(&db, "COALESCE(table_name, '_unattributed')", "", all);
    assert_eq!(
        report_groups(&spend(&db, &GroupBy::Table, all, Source::Auto).rows),
        want
    );
    assert!(want.contains_key("Moved"));
}

async fn get_auth(url: &str, token: Option<&str>) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let mut req = http::Request::get(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_api_answers_like_the_cli_behind_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    write_rows(&db, varied_rows(600, T0));
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.ledger.path = db.clone();
    cfg.admin.token_env = "CREDITMETER_TEST_ADMIN_TOKEN_USAGE".into();
    std::env::set_var("CREDITMETER_TEST_ADMIN_TOKEN_USAGE", "usage-token");
    let proxy = Proxy::start(cfg, dir.path()).await;
    let base = format!("http://{}", proxy.admin);
    let q = "by=workflow&since=2026-11-02T03:30:00Z&until=2026-11-04T00:00:00Z&top=2";
    for path in [format!("/api/usage?{q}"), "/api/calls?limit=5".into()] {
        let (status, h, _) = get_auth(&format!("{base}{path}"), None).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
        assert_eq!(
            get_auth(&format!("{base}{path}"), Some("wrong")).await.0,
            401
        );
    }
    let (status, h, body) = get_auth(&format!("{base}/api/usage?{q}"), Some("usage-token")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(h.get("content-type").unwrap(), "application/json");
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // The CLI with the same parameters gives the same document.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditmeter"))
        .args(["report", "--db"])
        .arg(&db)
        .args([
            "--by",
            "workflow",
            "--since",
            "2026-11-02T03:30:00Z",
            "--until",
            "2026-11-04T00:00:00Z",
            "--top",
            "2",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(api, cli);
    assert_eq!(api["rows"].as_array().unwrap().len(), 2);
    // Timeline, spikes and CSV through the API; bad parameters are a 400 naming them.
    let (s, _, b) = get_auth(
        &format!("{base}/api/usage?timeline=1h&since=2026-11-02&until=2026-11-03&by=table"),
        Some("usage-token"),
    )
    .await;
    assert_eq!(s, 200);
    let tl: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(tl["buckets"].as_array().unwrap().len(), 24);
    let (s, h, b) = get_auth(
        &format!("{base}/api/usage?by=status&format=csv"),
        Some("usage-token"),
    )
    .await;
    assert_eq!(s, 200);
    assert!(h
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    assert!(String::from_utf8_lossy(&b).starts_with("status,calls,"));
    let (s, _, b) = get_auth(
        &format!("{base}/api/usage?spikes=true&by=tag%3Aenv"),
        Some("usage-token"),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let sp: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(sp["group_by"], "tag:env");
    for (bad, names) in [
        ("by=colour", "colour"),
        ("since=soon", "since"),
        ("frobnicate=1", "frobnicate"),
        ("timeline=1m&since=2026-01-01&until=2030-01-01", "too many"),
    ] {
        let (s, _, b) = get_auth(&format!("{base}/api/usage?{bad}"), Some("usage-token")).await;
        assert_eq!(s, 400, "{bad}");
        let e: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert!(e["message"].as_str().unwrap().contains(names), "{e}");
    }
    // Writes are not part of this API.
    let req = http::Request::post(format!("{base}/api/usage"))
        .header("authorization", "Bearer usage-token")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client(), req).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_pages_every_row_once_with_filters() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let mut rows = varied_rows(257, T0);
    // Several rows with the same start time: the id breaks the tie across pages.
    for r in rows.iter_mut().take(30) {
        r.started_at = T0 + 5 * HOUR_MS;
    }
    write_rows(&db, rows);
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.ledger.path = db.clone();
    let proxy = Proxy::start(cfg, dir.path()).await;
    let base = format!("http://{}/api/calls", proxy.admin);

    let page_through = |query: String| {
        let base = base.clone();
        async move {
            let mut seen: Vec<(i64, i64)> = Vec::new();
            let mut cursor: Option<String> = None;
            let mut pages = 0;
            loop {
                let url = match &cursor {
                    Some(c) => format!("{base}?{query}&cursor={c}"),
                    None => format!("{base}?{query}"),
                };
                let (s, _, b) = get(&url).await;
                assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
                let page: serde_json::Value = serde_json::from_slice(&b).unwrap();
                pages += 1;
                for r in page["rows"].as_array().unwrap() {
                    seen.push((r["started_at"].as_i64().unwrap(), r["id"].as_i64().unwrap()));
                }
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
                assert!(pages < 100);
            }
            (seen, pages)
        }
    };
    let (seen, pages) = page_through("limit=50".into()).await;
    assert_eq!(seen.len(), 257);
    assert_eq!(pages, 6);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, ties broken by id");
    sorted.dedup();
    assert_eq!(sorted.len(), 257, "no row twice");

    // Pages of 7 cut through the 30 rows that share one start time, both ways.
    for order in ["desc", "asc"] {
        let (small, pages) = page_through(format!("limit=7&order={order}")).await;
        let mut unique = small.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            (small.len(), unique.len(), pages),
            (257, 257, 37),
            "{order}"
        );
    }
    let (asc, _) = page_through("limit=40&order=asc".into()).await;
    assert_eq!(asc.len(), 257);
    assert!(asc.windows(2).all(|w| w[0] < w[1]));

    // Filters: a table with a comma (percent-encoded), a status, a window.
    let conn = creditmeter::ledger::open_for_read(&db).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    let (abm, _) = page_through("limit=7&table=ABM%2C+accounts".into()).await;
    assert_eq!(
        abm.len() as i64,
        count("SELECT count(*) FROM calls WHERE table_name = 'ABM, accounts'")
    );
    let (unattributed, _) = page_through("limit=100&table=_unattributed&status=200".into()).await;
    assert_eq!(
        unattributed.len() as i64,
        count("SELECT count(*) FROM calls WHERE table_name IS NULL AND status = 200")
    );
    let (none, _) = page_through("status=none".into()).await;
    assert_eq!(
        none.len() as i64,
        count("SELECT count(*) FROM calls WHERE status IS NULL")
    );
    let (win, _) = page_through(format!(
        "since={}&until={}&limit=1000",
        "2026-11-02T05:00:00Z", "2026-11-02T06:00:00Z"
    ))
    .await;
    assert_eq!(
        win.len() as i64,
        count(&format!(
            "SELECT count(*) FROM calls WHERE started_at >= {} AND started_at < {}",
            T0 + 5 * HOUR_MS,
            T0 + 6 * HOUR_MS
        ))
    );
    assert!(win.len() >= 30);

    // One row in full: the columns by name, tags as an object.
    let (_, _, b) = get(&format!("{base}?limit=1&table=Blitz")).await;
    let page: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let r = &page["rows"][0];
    assert_eq!(r["table_name"], "Blitz");
    for key in [
        "request_id",
        "started_at",
        "endpoint",
        "outcome",
        "credits_milli",
        "key_fp",
        "id_kinds",
    ] {
        assert!(r.get(key).is_some(), "row lacks {key}: {r}");
    }
    assert!(r["tags"].is_object() || r["tags"].is_null());
    for bad in [
        "limit=0",
        "limit=5000",
        "cursor=abc",
        "order=sideways",
        "status=teapot",
        "colour=red",
    ] {
        let (s, _, b) = get(&format!("{base}?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {}", String::from_utf8_lossy(&b));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_runs_retention_off_the_hot_path() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    // Old rows (ten days ago) and the metrics they seed.
    let now = creditmeter::meter::now_ms();
    write_rows(&db, varied_rows(1200, now - 10 * DAY));
    let conn = creditmeter::ledger::open_for_read(&db).unwrap();
    let old_credits: i64 = conn
        .query_row("SELECT sum(credits_milli) FROM calls", [], |r| r.get(0))
        .unwrap();
    drop(conn);
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.ledger.path = db.clone();
    cfg.ledger.retention = Some(creditmeter::config::HumanDuration(Duration::from_secs(
        86_400,
    )));
    let mut proxy = Proxy::start(cfg.clone(), dir.path()).await;
    // Calls keep flowing while retention deletes.
    let c = client();
    for i in 0..20 {
        let req = http::Request::post(proxy.url("/api/v1/people/match"))
            .header("x-api-key", "k")
            .header("x-meter-table", "live")
            .body(Full::new(Bytes::from(format!(
                r#"{{"email":"p{i}@example.com"}}"#
            ))))
            .unwrap();
        assert_eq!(send(&c, req).await.0, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = proxy
            .ledger()
            .query_row(
                "SELECT count(*) FROM calls WHERE started_at < ?1",
                [now - DAY],
                |r| r.get(0),
            )
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{left} old rows left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE table_name = 'live'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(live, 20);
    proxy.shutdown().await;
    // After a restart the credit counters still include the deleted rows (they start from the rollups).
    let proxy = Proxy::start(cfg, dir.path()).await;
    let m = proxy.metrics().await;
    let counted = metric_sum(&m, "creditmeter_credits_total", &[]);
    let live_credits: f64 = 20.0;
    assert!(
        (counted - (old_credits as f64 / 1000.0 + live_credits)).abs() < 1e-6,
        "{counted} vs {}",
        old_credits as f64 / 1000.0 + live_credits
    );
}

/// Marks `request_id`'s row as carrying a deferred charge (what the settler writes with the
/// call), and optionally adds its settlement row, booked at the call's own start.
fn defer_and_settle(
    db: &Path,
    request_id: &str,
    deferred_milli: i64,
    settlement: Option<(i64, &str, i64)>,
) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute(
        "UPDATE calls SET deferred_milli = ?2,
                deferred = json_object('job_id', '-42', 'worst', json_object('lead', 0, 'direct_dial', ?2, 'export', 0))
          WHERE request_id = ?1",
        rusqlite::params![request_id, deferred_milli],
    )
    .unwrap();
    if let Some((direct_dial_milli, source, finished_at)) = settlement {
        conn.execute(
            "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint, status,
                                outcome, table_name, workflow, tags, key_fp, credits_milli, lead_milli,
                                direct_dial_milli, export_milli, credit_source, records_requested,
                                records_matched, catalog_version, settles)
             SELECT request_id || '.s', started_at, ?2, method, path, endpoint, 200, 'settlement',
                    table_name, workflow, tags, key_fp, ?3, 0, ?3, 0, ?4, 0, 0, catalog_version, request_id
               FROM calls WHERE request_id = ?1",
            rusqlite::params![request_id, finished_at, direct_dial_milli, source],
        )
        .unwrap();
    }
}

#[test]
fn deferred_charges_show_as_pending_then_settle_at_the_call_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    let mut rows = vec![
        row(1, T0 + 600_000),
        row(2, T0 + 1_200_000),
        row(3, T0 + 1_800_000),
    ];
    rows[0].table_name = Some("phones".into());
    rows[1].table_name = Some("phones".into());
    rows[2].table_name = Some("plain".into());
    write_rows(&db, rows);
    // Call 1's phone reveal found a mobile, learned three hours later; call 2's is pending.
    defer_and_settle(
        &db,
        "r0000000001",
        8000,
        Some((8000, "reported", T0 + 3 * HOUR_MS)),
    );
    defer_and_settle(&db, "r0000000002", 8000, None);

    let w = Window {
        since_ms: T0,
        until_ms: T0 + 4 * HOUR_MS,
    };
    // Whole hours come from the rollups, the rest from detail rows: both must agree.
    for source in [Source::Auto, Source::Raw] {
        let r = spend(&db, &GroupBy::Table, w, source);
        let phones = r.rows.iter().find(|r| r.key == "phones").unwrap();
        assert_eq!(
            phones.calls, 2,
            "a settlement row is not a call ({source:?})"
        );
        assert_eq!(
            phones.credits_milli, 10_000,
            "1 + 1 lead + 8 settled ({source:?})"
        );
        assert_eq!(phones.direct_dial_milli, 8000);
        assert_eq!(
            phones.pending_milli, 8000,
            "call 2 still pending ({source:?})"
        );
        let plain = r.rows.iter().find(|r| r.key == "plain").unwrap();
        assert_eq!(
            (plain.calls, plain.credits_milli, plain.pending_milli),
            (1, 1000, 0)
        );
        assert_eq!((r.total.calls, r.total.pending_milli), (3, 8000));
    }

    // Every format shows the pending column.
    let base = ReportRequest {
        db: db.clone(),
        since_ms: w.since_ms,
        until_ms: w.until_ms,
        ..ReportRequest::default()
    };
    let json: serde_json::Value = serde_json::from_str(
        &report::run(&ReportRequest {
            format: Format::Json,
            ..base.clone()
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(json["total"]["pending_credits"], 8.0);
    assert_eq!(json["total"]["pending_milli"], 8000);
    let csv = report::run(&ReportRequest {
        format: Format::Csv,
        ..base.clone()
    })
    .unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",pending"), "{csv}");
    assert!(csv.lines().last().unwrap().ends_with(",8"), "{csv}");
    let table = report::run(&base).unwrap();
    let header = table.lines().nth(2).unwrap();
    assert!(header.trim_end().ends_with("pending"), "{table}");
    assert!(
        table.contains("note: pending: up to 8 more credits"),
        "{table}"
    );

    // The timeline books the settlement at the call's hour, not at the hour it was learned.
    let t: serde_json::Value = serde_json::from_str(
        &report::run(&ReportRequest {
            format: Format::Json,
            view: View::Timeline,
            bucket_ms: HOUR_MS,
            ..base.clone()
        })
        .unwrap(),
    )
    .unwrap();
    let buckets = t["buckets"].as_array().unwrap();
    assert_eq!(buckets[0]["start_ms"], T0);
    assert_eq!(buckets[0]["credits_milli"], 11_000, "{t:#}");
    assert_eq!(buckets[0]["calls"], 3);
    assert_eq!(buckets[0]["pending_credits"], 8.0);
    assert!(
        buckets[1..].iter().all(|b| b["credits_milli"] == 0),
        "nothing at the hour the settlement was learned: {t:#}"
    );

    // Where the figures came from.
    let by_source = |db: &Path| -> BTreeMap<String, (u64, i64)> {
        spend(db, &GroupBy::CreditSource, w, Source::Auto)
            .rows
            .iter()
            .map(|r| (r.key.clone(), (r.calls, r.credits_milli)))
            .collect()
    };
    let s = by_source(&db);
    assert_eq!(s["catalog"], (3, 3000));
    assert_eq!(s["reported"], (0, 8000));
    assert!(!s.contains_key("estimated"));

    // Call 2's charge is never learned: after settle.max_wait the estimate settles it.
    defer_and_settle(
        &db,
        "r0000000002",
        8000,
        Some((4000, "estimated", T0 + 5 * HOUR_MS)),
    );
    let r = spend(&db, &GroupBy::Table, w, Source::Auto);
    assert_eq!(r.total.pending_milli, 0);
    assert_eq!(r.total.credits_milli, 3000 + 8000 + 4000);
    assert_eq!(by_source(&db)["estimated"], (0, 4000));
    // `/api/calls` shows which call a settlement settles, and what was deferred.
    let conn = creditmeter::ledger::open_for_read(&db).unwrap();
    let (page, _) = queries::calls_page(
        &conn,
        &queries::CallsQuery {
            limit: 100,
            ..Default::default()
        },
    )
    .unwrap();
    let settlement = page
        .iter()
        .find(|r| r.settles.as_deref() == Some("r0000000002"))
        .unwrap();
    assert_eq!(
        (settlement.outcome.as_str(), settlement.started_at),
        ("settlement", T0 + 1_200_000)
    );
    let call = page.iter().find(|r| r.request_id == "r0000000002").unwrap();
    assert_eq!(call.deferred_milli, 8000);
    assert_eq!(call.deferred.as_ref().unwrap()["job_id"], "-42");
    // `--by credit_source` parses under its name.
    assert_eq!(GroupBy::parse("credit_source"), Ok(GroupBy::CreditSource));
}
