//! What the settler reads back from the ledger at start-up: the charges still pending.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use super::Original;
use crate::catalog::Deferred;
use crate::ledger::{CallRecord, LedgerError, SettleStore};

/// A row whose deferred charge has no settlement row yet.
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub original: Original,
    pub deferred: Deferred,
}

/// Every call with a `deferred` charge and no row that `settles` it, oldest first. A row whose
/// `deferred` JSON cannot be read is logged and skipped (it cannot be settled or priced).
pub fn pending(store: &dyn SettleStore) -> Result<Vec<PendingRow>, LedgerError> {
    let mut out = Vec::new();
    for call in store.pending_charges()? {
        let original = Original {
            request_id: call.request_id,
            started_at: call.started_at,
            method: call.method,
            path: call.path,
            endpoint: call.endpoint,
            table_name: call.table_name,
            workflow: call.workflow,
            tags: call.tags,
            key_fp: call.key_fp,
            records_requested: call.records_requested,
            records_matched: call.records_matched,
        };
        match Deferred::from_json(&call.deferred) {
            Ok(deferred) => out.push(PendingRow { original, deferred }),
            Err(e) => tracing::error!(
                request_id = %original.request_id,
                error = %e,
                "settle: the ledger's `deferred` of this call cannot be read; it stays pending in reports"
            ),
        }
    }
    Ok(out)
}

/// [`pending`], with the rows still waiting in the ledger's spool (`<ledger>.spool`, replayed
/// by the writer after start-up) taken into account: a call whose settlement is spooled is not
/// pending, and a spooled call with a deferred charge and no settlement is.
pub fn pending_with_spool(
    store: &dyn SettleStore,
    spool: &Path,
) -> Result<Vec<PendingRow>, LedgerError> {
    let mut rows = pending(store)?;
    let Ok(file) = std::fs::File::open(spool) else {
        return Ok(rows); // no spool: nothing waits
    };
    let spooled: Vec<CallRecord> = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect();
    let settled: HashSet<&str> = spooled
        .iter()
        .filter_map(|r| r.settles.as_deref())
        .collect();
    rows.retain(|r| !settled.contains(r.original.request_id.as_str()));
    let known: HashSet<String> = rows.iter().map(|r| r.original.request_id.clone()).collect();
    for r in &spooled {
        let Some(text) = &r.deferred else { continue };
        if settled.contains(r.request_id.as_str()) || known.contains(&r.request_id) {
            continue;
        }
        // Committed before it was spooled again (a replay cut short)? Then `pending` decided.
        let committed = store.is_stored(&r.request_id).unwrap_or(false);
        if committed {
            continue;
        }
        if let Ok(deferred) = Deferred::from_json(text) {
            rows.push(PendingRow {
                original: Original::of(r),
                deferred,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    #[test]
    fn spooled_rows_count_for_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        let conn = crate::ledger::open_for_write(&db, Synchronous::Normal).unwrap();
        let deferred = r#"{"job_id":"-1","worst":{"lead":0,"direct_dial":8000,"export":0},"estimate":{"lead":0,"direct_dial":4000,"export":0},"params":["reveal_phone_number"]}"#;
        for id in ["committed-a", "committed-b"] {
            conn.execute(
                "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint,
                     outcome, credit_source, catalog_version, deferred, deferred_milli)
                 VALUES (?1, 1, 2, 'POST', '/api/v1/people/match', 'people_match', 'ok',
                     'catalog', 't', ?2, 8000)",
                rusqlite::params![id, deferred],
            )
            .unwrap();
        }
        let store = crate::ledger::SqliteStore::open_read(&db).unwrap();
        assert_eq!(pending(&store).unwrap().len(), 2);
        // The spool holds a settlement of committed-a and a new call with a deferred charge.
        let mut settlement = crate::ledger::fixtures::bench_row(1);
        settlement.request_id = "s-1".into();
        settlement.settles = Some("committed-a".into());
        let mut call = crate::ledger::fixtures::bench_row(2);
        call.request_id = "spooled-c".into();
        call.deferred = Some(deferred.into());
        let spool = dir.path().join("ledger.db.spool");
        let text = [settlement, call]
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect::<String>();
        std::fs::write(&spool, text).unwrap();
        let mut ids: Vec<String> = pending_with_spool(&store, &spool)
            .unwrap()
            .into_iter()
            .map(|r| r.original.request_id)
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["committed-b".to_owned(), "spooled-c".to_owned()]);
    }
}
