//! Reconciliation's tables (`balance_snapshots`, `reconciliation`, `reconcile_polls`,
//! `reconcile_calls`, migration v8): the SQL behind [`crate::store::ReconcileStore`].
//!
//! Credit types are the strings stored in `credit_type` (`lead`, `direct_dial`, `export`,
//! `unified`); what they mean, and the drift arithmetic over these rows, stay with
//! `creditmeter::reconcile`.
//!
//! So far the totals the metrics start from and the reconciled windows a report reads go
//! through the store; the poller's own reads and writes (`creditmeter::reconcile::{store,
//! calls}`'s `reconcile_pending` and inserts) still open a connection of their own.

use rusqlite::{params, Connection, OptionalExtension};

/// The latest balance snapshot of one credit type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestBalance {
    pub credit_type: String,
    pub consumed_milli: i64,
    pub left_milli: Option<i64>,
}

/// One stored window of one credit type (a `reconciliation` row, as a report reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRecord {
    pub credit_type: String,
    pub window_start: i64,
    pub window_end: i64,
    pub cycle_reset: bool,
    pub apollo_delta_milli: Option<i64>,
    pub edge_milli: i64,
    pub metered_milli: i64,
    pub unmetered_milli: i64,
    pub drift_milli: i64,
    pub calls: i64,
    /// The `by_endpoint` JSON, as stored.
    pub by_endpoint: String,
}

/// One window of one endpoint with calls outside creditmeter (a `reconcile_calls` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideWindow {
    pub endpoint: String,
    pub routes: String,
    pub window_start: i64,
    pub window_end: i64,
    pub apollo_calls: i64,
    pub ledger_calls: i64,
    pub drift_calls: i64,
    pub outside_calls: i64,
}

/// What a reconciliation report reads for `[since, until)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsRead {
    /// Polls (distinct `request_id`s) with a snapshot sent inside the range.
    pub snapshots: i64,
    /// The latest snapshot's `sent_at`, whenever it was.
    pub last_snapshot: Option<i64>,
    /// Windows overlapping the range, in `(window_start, window_end, id)` order.
    pub windows: Vec<WindowRecord>,
    /// [`outside_windows`] for the range.
    pub outside: Vec<OutsideWindow>,
}

/// The balance tables and windows overlapping `[since_ms, until_ms)`, or `None` when the
/// ledger has no `balance_snapshots` and `reconciliation` tables.
pub fn read_windows(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Option<WindowsRead>> {
    let tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'
            AND name IN ('balance_snapshots', 'reconciliation')",
        [],
        |r| r.get(0),
    )?;
    if tables < 2 {
        return Ok(None);
    }
    let (snapshots, last_snapshot) = conn.query_row(
        "SELECT (SELECT count(DISTINCT request_id) FROM balance_snapshots
                  WHERE sent_at >= ?1 AND sent_at < ?2),
                (SELECT max(sent_at) FROM balance_snapshots)",
        params![since_ms, until_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut stmt = conn.prepare(
        "SELECT credit_type, window_start, window_end, cycle_reset, apollo_delta_milli,
                edge_milli, metered_milli, unmetered_milli, drift_milli, calls, by_endpoint
           FROM reconciliation
          WHERE window_end > ?1 AND window_start < ?2
          ORDER BY window_start, window_end, id",
    )?;
    let windows = stmt
        .query_map(params![since_ms, until_ms], |r| {
            Ok(WindowRecord {
                credit_type: r.get(0)?,
                window_start: r.get(1)?,
                window_end: r.get(2)?,
                cycle_reset: r.get(3)?,
                apollo_delta_milli: r.get(4)?,
                edge_milli: r.get(5)?,
                metered_milli: r.get(6)?,
                unmetered_milli: r.get(7)?,
                drift_milli: r.get(8)?,
                calls: r.get(9)?,
                by_endpoint: r.get(10)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let outside = outside_windows(conn, since_ms, until_ms)?;
    Ok(Some(WindowsRead {
        snapshots,
        last_snapshot,
        windows,
        outside,
    }))
}

/// Windows with calls outside creditmeter that overlap `[since_ms, until_ms)`, oldest first
/// (empty on a ledger without the call-count tables).
pub fn outside_windows(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Vec<OutsideWindow>> {
    if !has_call_tables(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT endpoint, routes, window_start, window_end, apollo_calls, ledger_calls,
                drift_calls, outside_calls
           FROM reconcile_calls
          WHERE outside_calls > 0 AND window_end > ?1 AND window_start < ?2
          ORDER BY window_start, endpoint",
    )?;
    let rows = stmt.query_map(params![since_ms, until_ms], |r| {
        Ok(OutsideWindow {
            endpoint: r.get(0)?,
            routes: r.get(1)?,
            window_start: r.get(2)?,
            window_end: r.get(3)?,
            apollo_calls: r.get(4)?,
            ledger_calls: r.get(5)?,
            drift_calls: r.get(6)?,
            outside_calls: r.get(7)?,
        })
    })?;
    rows.collect()
}

/// Whether the ledger has the call-count tables: a ledger no server of this version has
/// migrated yet (schema version 6, see [`crate::schema`]) is read without them.
pub fn has_call_tables(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'reconcile_calls'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Unmetered credits per stored credit type over all windows, to start the counter from.
pub fn unmetered_totals(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare("SELECT credit_type, sum(unmetered_milli) FROM reconciliation GROUP BY 1")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.collect()
}

/// The latest snapshot of each of `credit_types` that has one, in the order asked.
pub fn latest_balances(
    conn: &Connection,
    credit_types: &[&str],
) -> rusqlite::Result<Vec<LatestBalance>> {
    let mut out = Vec::new();
    for &t in credit_types {
        let row: Option<(i64, Option<i64>)> = conn
            .query_row(
                "SELECT consumed_milli, left_milli FROM balance_snapshots
                  WHERE credit_type = ?1 ORDER BY sent_at DESC, id DESC LIMIT 1",
                [t],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((consumed_milli, left_milli)) = row {
            out.push(LatestBalance {
                credit_type: t.to_owned(),
                consumed_milli,
                left_milli,
            });
        }
    }
    Ok(out)
}

/// Calls outside creditmeter per endpoint over all windows (endpoints with any), to start the
/// counter from. Empty on a ledger without the call-count tables.
pub fn outside_totals(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    if !has_call_tables(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT endpoint, sum(outside_calls) FROM reconcile_calls
          GROUP BY endpoint HAVING sum(outside_calls) > 0",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use crate::store::ReconcileStore;
    use crate::{SqliteStore, Synchronous};

    fn snapshot(store: &SqliteStore, sent: i64, t: &str, consumed: i64, left: Option<i64>) {
        store
            .write(|c| {
                c.execute(
                    "INSERT INTO balance_snapshots (request_id, sent_at, received_at, credit_type,
                         consumed_milli, left_milli)
                     VALUES ('p' || ?1, ?1, ?1 + 10, ?2, ?3, ?4)",
                    rusqlite::params![sent, t, consumed, left],
                )?;
                Ok(())
            })
            .unwrap();
    }

    fn window(store: &SqliteStore, t: &str, to: i64, unmetered: i64) {
        store
            .write(|c| {
                c.execute(
                    "INSERT INTO reconciliation (credit_type, window_start, window_end,
                         from_snapshot, to_snapshot, ledger_milli, edge_milli, metered_milli,
                         unmetered_milli, drift_milli, calls, by_endpoint, carry_lo_milli,
                         carry_hi_milli, reconciled_at)
                     VALUES (?1, 0, ?2, 1, ?2, 0, 0, 0, ?3, ?3, 0, '{}', 0, 0, 0)",
                    rusqlite::params![t, to, unmetered],
                )?;
                Ok(())
            })
            .unwrap();
    }

    fn outside(store: &SqliteStore, endpoint: &str, n: i64) {
        store
            .write(|c| {
                c.execute(
                    "INSERT INTO reconcile_calls (endpoint, routes, window_start, window_end,
                         from_poll, to_poll, apollo_calls, ledger_calls, edge_calls,
                         drift_calls, outside_calls, carry_lo, carry_hi, reconciled_at)
                     VALUES (?1, '', 0, 1, 1, 2, ?2, 0, 0, ?2, max(?2, 0), 0, 0, 0)",
                    rusqlite::params![endpoint, n],
                )?;
                Ok(())
            })
            .unwrap();
    }

    /// What the metrics start from, read through the store: unmetered credits summed per
    /// credit type, the latest snapshot of each type asked for, and calls outside creditmeter
    /// per endpoint that has any.
    #[test]
    fn the_metrics_seed_reads_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("l.db"), Synchronous::Normal).unwrap();
        assert!(store.unmetered_totals().unwrap().is_empty());
        assert!(store.latest_balances(&["lead"]).unwrap().is_empty());
        assert!(store.outside_totals().unwrap().is_empty());

        snapshot(&store, 1000, "lead", 1000, Some(9000));
        snapshot(&store, 2000, "lead", 3000, Some(7000));
        snapshot(&store, 1500, "export", 500, None);
        window(&store, "lead", 1, 1500);
        window(&store, "lead", 2, 500);
        window(&store, "export", 3, 0);
        outside(&store, "people_match", 4);
        outside(&store, "people_match", 3);
        outside(&store, "org_enrich", -2);

        let mut unmetered = store.unmetered_totals().unwrap();
        unmetered.sort();
        assert_eq!(
            unmetered,
            vec![("export".to_owned(), 0), ("lead".to_owned(), 2000)]
        );
        let balances = store
            .latest_balances(&["lead", "direct_dial", "export"])
            .unwrap();
        let got: Vec<(&str, i64, Option<i64>)> = balances
            .iter()
            .map(|b| (b.credit_type.as_str(), b.consumed_milli, b.left_milli))
            .collect();
        assert_eq!(got, vec![("lead", 3000, Some(7000)), ("export", 500, None)]);
        assert_eq!(
            store.outside_totals().unwrap(),
            vec![("people_match".to_owned(), 7)]
        );
    }

    /// A report's read through the store: the windows overlapping the range in order, with
    /// their rows as stored, the polls inside it, the latest snapshot whenever it was, and the
    /// outside-call windows that overlap it.
    #[test]
    fn a_reports_windows_read_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("l.db"), Synchronous::Normal).unwrap();
        let empty = store.reconcile_windows(0, 10_000).unwrap().unwrap();
        assert_eq!(
            (empty.snapshots, empty.last_snapshot, empty.windows.len()),
            (0, None, 0)
        );
        snapshot(&store, 1000, "lead", 1000, Some(9000));
        snapshot(&store, 2000, "lead", 3000, Some(7000));
        snapshot(&store, 20_000, "lead", 3000, Some(7000));
        window(&store, "lead", 2, 1500); // window_end 2: overlaps [0, 10000)
        window(&store, "lead", 3, 500); // window_end 3
        outside(&store, "people_match", 4);
        outside(&store, "org_enrich", -2);
        let got = store.reconcile_windows(0, 10_000).unwrap().unwrap();
        assert_eq!((got.snapshots, got.last_snapshot), (2, Some(20_000)));
        let ends: Vec<(i64, i64)> = got
            .windows
            .iter()
            .map(|w| (w.window_end, w.unmetered_milli))
            .collect();
        assert_eq!(ends, vec![(2, 1500), (3, 500)]);
        assert_eq!(got.windows[0].by_endpoint, "{}");
        let outside: Vec<(&str, i64)> = got
            .outside
            .iter()
            .map(|w| (w.endpoint.as_str(), w.outside_calls))
            .collect();
        assert_eq!(outside, vec![("people_match", 4)]);
        // A range after every window holds none of them.
        let later = store.reconcile_windows(5, 10_000).unwrap().unwrap();
        assert!(
            later.windows.is_empty() && later.outside.is_empty(),
            "{later:?}"
        );
    }
}
