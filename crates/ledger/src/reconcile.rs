//! Reconciliation's tables (`balance_snapshots`, `reconciliation`, `reconcile_polls`,
//! `reconcile_calls`, migration v8): the SQL behind [`crate::store::ReconcileStore`].
//!
//! Credit types are the strings stored in `credit_type` (`lead`, `direct_dial`, `export`,
//! `unified`); what they mean, and the drift arithmetic over these rows, stay with
//! `creditmeter::reconcile`.
//!
//! So far the totals the metrics start from go through the store; the windows' own reads and
//! writes (`creditmeter::reconcile::{store, calls, answer}`) still open a connection of their
//! own.

use rusqlite::{Connection, OptionalExtension};

/// The latest balance snapshot of one credit type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestBalance {
    pub credit_type: String,
    pub consumed_milli: i64,
    pub left_milli: Option<i64>,
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
                     VALUES ('p', ?1, ?1 + 10, ?2, ?3, ?4)",
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
}
