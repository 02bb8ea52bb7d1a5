//! Reconciliation's side of the ledger file: balance snapshots in, reconciled windows out.
//!
//! These writes are rare (one snapshot and a few window rows per poll), so they go through a
//! short-lived connection of their own rather than the ledger writer thread: the writer's hot
//! loop stays about `calls` only, and the window sums over `calls` (reads) never run on the
//! thread that commits calls. WAL lets one writer in at a time; every write here is one small
//! IMMEDIATE transaction (microseconds of lock), and both sides wait on a busy file
//! (`busy_timeout`; the writer also retries). Reads run before the write transaction, so the
//! lock is never held across a query over `calls`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::{json, Map, Value};

use super::drift::{self, Carry};
use super::usage::UsageStats;
use super::{CreditType, Pool, POLLER_TABLE};
use crate::ledger::reconcile::LatestBalance;
use crate::ledger::{LedgerError, ReconcileStore};
use crate::meter::now_ms;

/// Timing rules for settling windows, milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `reconcile.balance_lag`: Apollo's delay in showing a billed call.
    pub balance_lag_ms: i64,
    /// The longest a window waits after its closing snapshot's answer, whatever the in-flight
    /// tracker says: by then every call that started before it has ended (upstream.timeout
    /// bounds a call) and is committed. Windows usually settle much sooner (see the poller).
    pub settle_ms: i64,
    /// How far before a window to look for calls that ended inside it (longer than any call).
    pub lookback_ms: i64,
    /// How far before a window to look for the original calls of settlement rows that were
    /// learned inside it (a deferred charge is learned at most `settle.max_wait` after its
    /// call, 2h by default).
    pub settlement_lookback_ms: i64,
    /// `reconcile.pool`: per credit type, or one unified pool.
    pub pool: Pool,
}

/// A window just reconciled, for metrics and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub credit_type: CreditType,
    pub window_start: i64,
    pub window_end: i64,
    pub cycle_reset: bool,
    pub apollo_delta_milli: Option<i64>,
    pub metered_milli: i64,
    pub unmetered_milli: i64,
    pub drift_milli: i64,
    pub calls: i64,
}

/// Opens the (existing, migrated) ledger for reconciliation's own reads and writes.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Stores one poll's balances, one row per credit type.
pub fn insert_snapshot(
    conn: &mut Connection,
    request_id: &str,
    sent_at: i64,
    received_at: i64,
    stats: &UsageStats,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO balance_snapshots (request_id, sent_at, received_at, credit_type,
                 limit_milli, consumed_milli, left_milli, cycle_start, cycle_end)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for b in &stats.balances {
            stmt.execute(params![
                request_id,
                sent_at,
                received_at,
                b.credit_type.as_str(),
                b.limit_milli,
                b.consumed_milli,
                b.left_milli,
                stats.cycle_start,
                stats.cycle_end,
            ])?;
        }
    }
    tx.commit()
}

struct Snap {
    id: i64,
    sent_at: i64,
    received_at: i64,
    consumed: i64,
    cycle_start: Option<String>,
    cycle_end: Option<String>,
}

fn snap(r: &rusqlite::Row<'_>) -> rusqlite::Result<Snap> {
    Ok(Snap {
        id: r.get(0)?,
        sent_at: r.get(1)?,
        received_at: r.get(2)?,
        consumed: r.get(3)?,
        cycle_start: r.get(4)?,
        cycle_end: r.get(5)?,
    })
}

const SNAP_COLUMNS: &str = "id, sent_at, received_at, consumed_milli, cycle_start, cycle_end";

/// Whether the credit cycle restarted between two snapshots: the cycle Apollo names changed,
/// or, when it names none, the consumed figure went down.
fn cycle_reset(a: &Snap, b: &Snap) -> bool {
    let changed =
        |x: &Option<String>, y: &Option<String>| matches!((x, y), (Some(x), Some(y)) if x != y);
    if a.cycle_start.is_some() || a.cycle_end.is_some() {
        changed(&a.cycle_start, &b.cycle_start) || changed(&a.cycle_end, &b.cycle_end)
    } else {
        b.consumed < a.consumed
    }
}

/// A row to insert.
struct Row {
    r: Reconciled,
    from: i64,
    to: i64,
    ledger: i64,
    edge: i64,
    by_endpoint: String,
    carry: Carry,
}

/// Settles, in order, every window whose closing snapshot was answered at or before
/// `final_through` (the caller knows every call that started before then is in the ledger), for
/// each credit type (or the unified pool), and stores them. Returns what it stored.
pub fn reconcile_pending(
    conn: &mut Connection,
    s: &Settings,
    final_through: i64,
) -> rusqlite::Result<Vec<Reconciled>> {
    let mut rows = Vec::new();
    for &t in CreditType::pools(s.pool) {
        pending_for(conn, s, final_through, t, &mut rows)?;
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let at = now_ms();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO reconciliation (credit_type, window_start, window_end, from_snapshot,
                 to_snapshot, cycle_reset, apollo_delta_milli, ledger_milli, edge_milli,
                 metered_milli, unmetered_milli, drift_milli, calls, by_endpoint,
                 carry_lo_milli, carry_hi_milli, reconciled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        for row in &rows {
            let r = &row.r;
            stmt.execute(params![
                r.credit_type.as_str(),
                r.window_start,
                r.window_end,
                row.from,
                row.to,
                r.cycle_reset,
                r.apollo_delta_milli,
                row.ledger,
                row.edge,
                r.metered_milli,
                r.unmetered_milli,
                r.drift_milli,
                r.calls,
                row.by_endpoint,
                row.carry.lo,
                row.carry.hi,
                at,
            ])?;
        }
    }
    tx.commit()?;
    Ok(rows.into_iter().map(|row| row.r).collect())
}

fn pending_for(
    conn: &Connection,
    s: &Settings,
    final_through: i64,
    t: CreditType,
    out: &mut Vec<Row>,
) -> rusqlite::Result<()> {
    let last: Option<(i64, i64, i64)> = conn
        .query_row(
            "SELECT to_snapshot, carry_lo_milli, carry_hi_milli FROM reconciliation
              WHERE credit_type = ?1 ORDER BY window_end DESC, id DESC LIMIT 1",
            [t.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (mut prev, mut carry) = match last {
        Some((id, lo, hi)) => {
            let sql = format!("SELECT {SNAP_COLUMNS} FROM balance_snapshots WHERE id = ?1");
            let Some(p) = conn.query_row(&sql, [id], snap).optional()? else {
                return Ok(());
            };
            (p, Carry { lo, hi })
        }
        None => {
            let sql = format!(
                "SELECT {SNAP_COLUMNS} FROM balance_snapshots WHERE credit_type = ?1
                  ORDER BY sent_at, id LIMIT 1"
            );
            let Some(first) = conn
                .query_row(&sql, [t.snapshot_type().as_str()], snap)
                .optional()?
            else {
                return Ok(());
            };
            let edge = edge_credits(conn, s, t, &first)?;
            let slack = drift::slack(first.consumed);
            (first, Carry::unknown(edge, slack))
        }
    };
    let sql = format!(
        "SELECT {SNAP_COLUMNS} FROM balance_snapshots
          WHERE credit_type = ?1 AND (sent_at > ?2 OR (sent_at = ?2 AND id > ?3))
          ORDER BY sent_at, id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let next: Vec<Snap> = stmt
        .query_map(
            params![t.snapshot_type().as_str(), prev.sent_at, prev.id],
            snap,
        )?
        .collect::<Result<_, _>>()?;
    for cur in next {
        if cur.received_at > final_through {
            break;
        }
        let reset = cycle_reset(&prev, &cur);
        let (ledger, by_endpoint, calls) = window_calls(conn, s, t, &prev, &cur)?;
        let edge = edge_credits(conn, s, t, &cur)?;
        let w = drift::Window {
            apollo_delta: (!reset).then_some(cur.consumed - prev.consumed),
            ledger,
            edge,
            slack: drift::slack(cur.consumed),
        };
        let settled = drift::settle(carry, w);
        out.push(Row {
            r: Reconciled {
                credit_type: t,
                window_start: prev.sent_at,
                window_end: cur.sent_at,
                cycle_reset: reset,
                apollo_delta_milli: w.apollo_delta,
                metered_milli: settled.metered,
                unmetered_milli: settled.drift.max(0),
                drift_milli: settled.drift,
                calls,
            },
            from: prev.id,
            to: cur.id,
            ledger,
            edge,
            by_endpoint,
            carry: settled.carry,
        });
        carry = settled.carry;
        prev = cur;
    }
    Ok(())
}

/// Calls other than the poller's own (balance and call-count polls) that went upstream.
const PROXIED: &str =
    "outcome <> 'rejected' AND NOT (table_name IS ?7 AND path LIKE '%/usage_stats/%')";

/// Rows whose credits Apollo's balance shows by `finished_at` in `(?1, ?2]`. Ordinary calls are
/// found through the `started_at` index (`?3`..`?4`: a call is never longer than the lookback);
/// a settlement row (a deferred charge, outcome `settlement`) carries its original call's
/// `started_at`, which can be hours earlier, so it gets a lookback of its own (`?5`..`?6`).
/// Apollo bills the deferred part when its job ends, so the row counts where it was learned.
const IN_WINDOW: &str = "finished_at > ?1 AND finished_at <= ?2
     AND ((outcome <> 'settlement' AND started_at > ?3 AND started_at <= ?4)
       OR (outcome = 'settlement' AND started_at > ?5 AND started_at <= ?6))";

/// Credits of type `t` surely inside the window (ended at least `balance_lag` before the
/// closing snapshot was sent, and not before the opening one), and the proxied calls there by
/// endpoint. Settlement rows add their credits but are not calls.
fn window_calls(
    conn: &Connection,
    s: &Settings,
    t: CreditType,
    from: &Snap,
    to: &Snap,
) -> rusqlite::Result<(i64, String, i64)> {
    let col = t.ledger_column();
    let lo = from.sent_at - s.balance_lag_ms;
    let hi = to.sent_at - s.balance_lag_ms;
    let (look, settle_look) = (lo - s.lookback_ms, lo - s.settlement_lookback_ms);
    let ledger: i64 = conn.query_row(
        &format!("SELECT COALESCE(sum({col}), 0) FROM calls WHERE {IN_WINDOW}"),
        params![lo, hi, look, to.sent_at, settle_look, to.sent_at],
        |r| r.get(0),
    )?;
    let bind = params![
        lo,
        hi,
        look,
        to.sent_at,
        settle_look,
        to.sent_at,
        POLLER_TABLE
    ];
    let mut stmt = conn.prepare(&format!(
        "SELECT endpoint, sum(outcome <> 'settlement'),
                sum(outcome <> 'settlement' AND status BETWEEN 200 AND 299),
                sum(COALESCE(records_matched, 0)), sum(credits_milli), sum({col})
           FROM calls WHERE {IN_WINDOW} AND {PROXIED}
          GROUP BY endpoint ORDER BY endpoint"
    ))?;
    let mut by = Map::new();
    let mut calls = 0;
    let rows = stmt.query_map(bind, |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?.unwrap_or(0),
            r.get::<_, Option<i64>>(2)?.unwrap_or(0),
            r.get::<_, Option<i64>>(3)?.unwrap_or(0),
            r.get::<_, Option<i64>>(4)?.unwrap_or(0),
            r.get::<_, Option<i64>>(5)?.unwrap_or(0),
        ))
    })?;
    for row in rows {
        let (endpoint, n, ok, matched, credits, typed) = row?;
        calls += n;
        by.insert(
            endpoint,
            json!({"calls": n, "ok_calls": ok, "records_matched": matched,
                   "credits_milli": credits, "type_milli": typed}),
        );
    }
    Ok((ledger, Value::Object(by).to_string(), calls))
}

/// Credits of type `t` at a snapshot's edge: calls that started before Apollo answered and
/// ended less than `balance_lag` before the poll was sent (or after), and settlement rows
/// learned within `balance_lag` either side of it (their job ended a little before they were
/// learned, on either side of the snapshot; learned later than that, it surely ended after).
fn edge_credits(
    conn: &Connection,
    s: &Settings,
    t: CreditType,
    at: &Snap,
) -> rusqlite::Result<i64> {
    let col = t.ledger_column();
    let edge = at.sent_at - s.balance_lag_ms;
    conn.query_row(
        &format!(
            "SELECT COALESCE(sum({col}), 0) FROM calls
              WHERE finished_at > ?3
                AND ((outcome <> 'settlement' AND started_at > ?1 AND started_at < ?2)
                  OR (outcome = 'settlement' AND started_at > ?4 AND started_at < ?2
                      AND finished_at <= ?5))"
        ),
        params![
            edge - s.lookback_ms,
            at.received_at,
            edge,
            edge - s.settlement_lookback_ms,
            at.received_at + s.balance_lag_ms
        ],
        |r| r.get(0),
    )
}

/// Unmetered credits per credit type over all windows, to start the counter from (rows of a
/// credit type this build does not know are left out).
pub fn unmetered_totals(conn: &Connection) -> rusqlite::Result<Vec<(CreditType, i64)>> {
    Ok(typed_unmetered(crate::ledger::reconcile::unmetered_totals(
        conn,
    )?))
}

/// [`unmetered_totals`] through the store.
pub fn unmetered_totals_in<S: ReconcileStore + ?Sized>(
    store: &S,
) -> Result<Vec<(CreditType, i64)>, LedgerError> {
    Ok(typed_unmetered(store.unmetered_totals()?))
}

fn typed_unmetered(rows: Vec<(String, i64)>) -> Vec<(CreditType, i64)> {
    rows.into_iter()
        .filter_map(|(t, milli)| CreditType::parse(&t).map(|t| (t, milli)))
        .collect()
}

/// The latest snapshot per credit type: `(type, consumed, left)`, for the gauges at start-up.
pub fn latest_balances(conn: &Connection) -> rusqlite::Result<Vec<(CreditType, i64, Option<i64>)>> {
    let rows = crate::ledger::reconcile::latest_balances(conn, &all_types())?;
    Ok(typed_balances(rows))
}

/// [`latest_balances`] through the store.
pub fn latest_balances_in<S: ReconcileStore + ?Sized>(
    store: &S,
) -> Result<Vec<(CreditType, i64, Option<i64>)>, LedgerError> {
    Ok(typed_balances(store.latest_balances(&all_types())?))
}

fn all_types() -> [&'static str; 3] {
    CreditType::ALL.map(CreditType::as_str)
}

fn typed_balances(rows: Vec<LatestBalance>) -> Vec<(CreditType, i64, Option<i64>)> {
    rows.into_iter()
        .filter_map(|b| {
            CreditType::parse(&b.credit_type).map(|t| (t, b.consumed_milli, b.left_milli))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::usage::Balance;

    fn ledger() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        drop(crate::ledger::open_for_write(&path, crate::config::Synchronous::Normal).unwrap());
        let conn = open(&path).unwrap();
        (dir, conn)
    }

    fn call(
        conn: &Connection,
        id: &str,
        started: i64,
        finished: i64,
        endpoint: &str,
        lead: i64,
        table: &str,
    ) {
        conn.execute(
            "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint, status,
                 outcome, table_name, credits_milli, lead_milli, credit_source, records_matched,
                 catalog_version)
             VALUES (?1, ?2, ?3, 'POST', ?8, ?4, 200, 'ok', ?5, ?6, ?6, 'catalog', ?7, 't')",
            params![
                id,
                started,
                finished,
                endpoint,
                table,
                lead,
                (lead > 0) as i64,
                if endpoint == "usage_stats" {
                    "/api/v1/usage_stats/credit_usage_stats"
                } else {
                    "/api/v1/x"
                }
            ],
        )
        .unwrap();
    }

    fn snapshot(conn: &mut Connection, sent: i64, lead_consumed: i64, cycle: &str) {
        let stats = UsageStats {
            balances: vec![Balance {
                credit_type: CreditType::Lead,
                limit_milli: Some(1_000_000),
                consumed_milli: lead_consumed,
                left_milli: Some(1_000_000 - lead_consumed),
            }],
            cycle_start: Some(cycle.into()),
            cycle_end: None,
        };
        insert_snapshot(conn, &format!("poll{sent}"), sent, sent + 10, &stats).unwrap();
    }

    const S: Settings = Settings {
        balance_lag_ms: 0,
        settle_ms: 100,
        lookback_ms: 60_000,
        settlement_lookback_ms: 3_600_000,
        pool: Pool::Typed,
    };

    #[test]
    fn windows_settle_in_order_with_edges_netted_and_the_poller_left_out() {
        let (_dir, mut conn) = ledger();
        snapshot(&mut conn, 1000, 0, "c1");
        call(&conn, "a", 1100, 1200, "people_match", 1000, "t1");
        // The poller's own call at the second snapshot: free, and not proxied traffic.
        call(&conn, "poll", 2000, 2010, "usage_stats", 0, POLLER_TABLE);
        // In flight at the second snapshot; Apollo counted it there.
        call(&conn, "b", 2005, 2100, "people_match", 1000, "t1");
        snapshot(&mut conn, 2000, 7000, "c1"); // 1 + 1 (edge) + 5 out of band
        snapshot(&mut conn, 3000, 7000, "c1");

        // Not final until the caller says calls through the closing snapshot's answer are in.
        assert!(reconcile_pending(&mut conn, &S, 2009).unwrap().is_empty());
        let got = reconcile_pending(&mut conn, &S, 10_000).unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        let (w1, w2) = (&got[0], &got[1]);
        assert_eq!((w1.window_start, w1.window_end), (1000, 2000));
        assert_eq!(
            (w1.apollo_delta_milli, w1.metered_milli, w1.unmetered_milli),
            (Some(7000), 2000, 5000)
        );
        assert_eq!(w1.calls, 1);
        assert_eq!((w2.drift_milli, w2.metered_milli, w2.calls), (0, 0, 1));
        let (ledger, edge, by): (i64, i64, String) = conn
            .query_row(
                "SELECT ledger_milli, edge_milli, by_endpoint FROM reconciliation WHERE window_end = 2000",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((ledger, edge), (1000, 1000));
        let by: Value = serde_json::from_str(&by).unwrap();
        assert_eq!(by["people_match"]["calls"], 1);
        assert!(by.get("usage_stats").is_none(), "{by}");
        // Settled windows are never settled again.
        assert!(reconcile_pending(&mut conn, &S, 10_000).unwrap().is_empty());
        assert_eq!(
            unmetered_totals(&conn).unwrap(),
            vec![(CreditType::Lead, 5000)]
        );
        assert_eq!(
            latest_balances(&conn).unwrap(),
            vec![(CreditType::Lead, 7000, Some(993_000))]
        );
    }

    #[test]
    fn a_new_credit_cycle_is_not_drift() {
        let (_dir, mut conn) = ledger();
        snapshot(&mut conn, 1000, 400_000, "2026-01");
        call(&conn, "a", 1100, 1200, "people_match", 1000, "t1");
        snapshot(&mut conn, 2000, 0, "2026-02");
        call(&conn, "b", 2100, 2200, "people_match", 1000, "t1");
        snapshot(&mut conn, 3000, 3000, "2026-02");
        let got = reconcile_pending(&mut conn, &S, 10_000).unwrap();
        assert!(got[0].cycle_reset && got[0].apollo_delta_milli.is_none());
        assert_eq!((got[0].drift_milli, got[0].unmetered_milli), (0, 0));
        // After the reset, drift is measured again: 3 consumed, 1 metered.
        assert_eq!((got[1].cycle_reset, got[1].unmetered_milli), (false, 2000));
    }

    #[test]
    fn settlement_rows_count_where_they_were_learned_and_are_not_calls() {
        let (_dir, mut conn) = ledger();
        let settlement = |conn: &Connection, id: &str, started: i64, learned: i64, lead: i64| {
            conn.execute(
                "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint,
                     status, outcome, table_name, credits_milli, lead_milli, credit_source,
                     catalog_version)
                 VALUES (?1, ?2, ?3, 'POST', '/api/v1/people/bulk_match', 'people_bulk_match',
                     200, 'settlement', 't1', ?4, ?4, 'reported', 't')",
                params![id, started, learned, lead],
            )
            .unwrap();
        };
        snapshot(&mut conn, 1_000_000, 0, "c1");
        // The original call, half an hour before (beyond an ordinary call's lookback), billed
        // nothing synchronously; its deferred 1.5 credits were learned inside the window.
        call(
            &conn,
            "orig",
            -800_000,
            -799_000,
            "people_bulk_match",
            0,
            "t1",
        );
        settlement(&conn, "s1", -800_000, 1_500_000, 1500);
        // Learned just after the closing snapshot (within balance_lag of it): at its edge.
        settlement(&conn, "s2", -800_000, 2_000_005, 2000);
        // Learned well after it: surely the next window's.
        settlement(&conn, "s3", -800_000, 2_500_000, 3000);
        snapshot(&mut conn, 2_000_000, 3000, "c1"); // 1.5 + 2 (edge) floored: 3
        snapshot(&mut conn, 3_000_000, 6000, "c1"); // + 3: 6.5 floored
        let s = Settings {
            balance_lag_ms: 100,
            ..S
        };
        let got = reconcile_pending(&mut conn, &s, i64::MAX).unwrap();
        let lead: Vec<&Reconciled> = got
            .iter()
            .filter(|r| r.credit_type == CreditType::Lead)
            .collect();
        assert_eq!(lead.len(), 2, "{got:?}");
        assert!(lead.iter().all(|r| r.drift_milli == 0), "{lead:?}");
        assert_eq!(lead.iter().map(|r| r.calls).sum::<i64>(), 0);
        let (ledger, edge, by): (i64, i64, String) = conn
            .query_row(
                "SELECT ledger_milli, edge_milli, by_endpoint FROM reconciliation
                  WHERE credit_type = 'lead' AND window_end = 2000000",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((ledger, edge), (1500, 2000));
        let by: Value = serde_json::from_str(&by).unwrap();
        assert_eq!(by["people_bulk_match"]["calls"], 0, "{by}");
        assert_eq!(by["people_bulk_match"]["credits_milli"], 1500, "{by}");
    }
}
