//! Identifier fingerprints: for each call that billed credits, one row per normalised
//! identifier it carried (a keyed fingerprint, never the value), so the waste finder can tell
//! when the same person or company was enriched again (`report --repeats`).
//!
//! Table `identifiers` (schema v6), written by the ledger writer in the same transaction as its
//! call row: `call_id` (= `calls.id`), `item` (which person or company of a bulk call), `kind`
//! (`email`, `linkedin_url`, `person_id`, `name+domain`, `domain`, ...), `fp` (the first 8
//! bytes of an HMAC-SHA256 keyed with a key derived from the install secret, as a signed
//! 64-bit integer), `at` (the call's `started_at`), `table_name` (the call's table, NULL when
//! unattributed) and `credits_milli` (the item's share of the call's credits). The primary key
//! `(kind, fp, at, call_id, item)` is the index the repeats query seeks; `identifiers_at` serves
//! windows and retention.

use std::borrow::Cow;

use rusqlite::{params, Connection, Transaction};
use serde::{Deserialize, Serialize};

/// One fingerprinted identifier of one call (see the module docs). Serialized in the spool
/// with its call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentifierFp {
    pub item: u16,
    pub kind: Cow<'static, str>,
    pub fp: i64,
    pub credits_milli: i64,
}

/// Writes a call's identifier rows; `call_id` is its `calls.id`.
pub(crate) fn insert(
    tx: &Transaction<'_>,
    call_id: i64,
    record: &super::CallRecord,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO identifiers
             (kind, fp, at, call_id, item, table_name, credits_milli)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for i in &record.identifiers {
        stmt.execute(params![
            i.kind,
            i.fp,
            record.started_at,
            call_id,
            i.item,
            record.table_name,
            i.credits_milli
        ])?;
    }
    Ok(())
}

/// Deletes up to `batch` identifier rows of calls started before `cutoff_ms` (retention).
pub(crate) fn prune_batch(
    conn: &Connection,
    cutoff_ms: i64,
    batch: usize,
) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM identifiers WHERE (kind, fp, at, call_id, item) IN
            (SELECT kind, fp, at, call_id, item FROM identifiers WHERE at < ?1 ORDER BY at LIMIT ?2)",
        params![cutoff_ms, batch.max(1) as i64],
    )
}

/// Splits a call's credits over its items: `items` shares that sum to `credits_milli` exactly
/// (the first ones take the remainder).
pub fn shares(credits_milli: i64, items: usize) -> Vec<i64> {
    if items == 0 {
        return Vec::new();
    }
    let n = items as i64;
    let (each, rest) = (credits_milli.div_euclid(n), credits_milli.rem_euclid(n));
    (0..n).map(|i| each + i64::from(i < rest)).collect()
}

/// Every identifier kind [`crate::catalog::RequestParams::identifiers`] produces.
pub const KINDS: [&str; 7] = [
    "email",
    "linkedin_url",
    "person_id",
    "name+domain",
    "hashed_email",
    "domain",
    "organization_id",
];

/// Re-enrichment between two tables: `later` enriched people or companies that `earlier`
/// had enriched within the window before.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepeatPair {
    /// The table that enriched first (`_unattributed` for calls without one).
    pub earlier_table: String,
    /// The table that enriched again.
    pub later_table: String,
    /// People or companies enriched again (items of calls; one bulk call can hold ten).
    pub items: i64,
    /// Calls that carried at least one of them.
    pub calls: i64,
    /// Credits the later enrichments cost, milli-credits.
    pub credits_milli: i64,
    /// Mean time between the earlier and the later enrichment, ms.
    pub mean_gap_ms: i64,
    /// Shortest and longest such gap, ms.
    pub min_gap_ms: i64,
    pub max_gap_ms: i64,
    /// Items by the identifier kind the repeat was found on (`email`, `linkedin_url`, ...),
    /// most first.
    pub by_kind: Vec<(String, i64)>,
}

/// Finds the re-enrichments that started in `[since_ms, until_ms)`: an item whose identifier
/// (any kind) had been enriched by a call that billed credits at most `within_ms` before.
/// Each later item counts once, against the most recent earlier enrichment of any of its
/// identifiers. Most credits first.
pub fn repeats(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
    within_ms: i64,
) -> rusqlite::Result<Vec<RepeatPair>> {
    let kinds = KINDS
        .iter()
        .map(|k| format!(", sum(kind = '{k}')"))
        .collect::<String>();
    // Each identifier row enriched in the window, when an earlier enrichment of the same
    // (kind, fp) by another call lies within `within` before it: one primary-key seek per row
    // (most find nothing). Only for those, the latest such enrichment and its table. Then one
    // line per later item (its most recent earlier enrichment over its kinds), then per pair.
    let sql = format!(
        "
    WITH hits AS (
        SELECT l.kind, l.fp, l.at, l.call_id, l.item, l.table_name, l.credits_milli
          FROM identifiers l
         WHERE l.at >= ?1 AND l.at < ?2
           AND EXISTS (SELECT 1 FROM identifiers e
                        WHERE e.kind = l.kind AND e.fp = l.fp
                          AND e.at < l.at AND e.at >= l.at - ?3 AND e.call_id != l.call_id)
    ),
    prev AS (
        SELECT h.*,
               (SELECT max(e.at) FROM identifiers e
                 WHERE e.kind = h.kind AND e.fp = h.fp
                   AND e.at < h.at AND e.at >= h.at - ?3 AND e.call_id != h.call_id) AS prev_at
          FROM hits h
    ),
    per_item AS (
        SELECT call_id, max(prev_at) AS prev_at, kind, fp, table_name, at, credits_milli
          FROM prev
         GROUP BY call_id, item
    ),
    named AS (
        SELECT p.*,
               (SELECT e.table_name FROM identifiers e
                 WHERE e.kind = p.kind AND e.fp = p.fp AND e.at = p.prev_at
                   AND e.call_id != p.call_id LIMIT 1) AS prev_table
          FROM per_item p
    )
    SELECT COALESCE(prev_table, '_unattributed'), COALESCE(table_name, '_unattributed'),
           count(*), count(DISTINCT call_id), sum(credits_milli),
           sum(at - prev_at), min(at - prev_at), max(at - prev_at){kinds}
      FROM named
     GROUP BY 1, 2"
    );
    // Random seeks into a big index: a larger page cache than SQLite's 2 MB default pays.
    conn.pragma_update(None, "cache_size", -65_536)?;
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![since_ms, until_ms, within_ms.max(0)], |r| {
        let mut by_kind = Vec::new();
        for (i, k) in KINDS.iter().enumerate() {
            let n: i64 = r.get(8 + i)?;
            if n > 0 {
                by_kind.push(((*k).to_owned(), n));
            }
        }
        by_kind.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let items: i64 = r.get(2)?;
        let gaps: i64 = r.get(5)?;
        Ok(RepeatPair {
            earlier_table: r.get(0)?,
            later_table: r.get(1)?,
            items,
            calls: r.get(3)?,
            credits_milli: r.get(4)?,
            mean_gap_ms: if items > 0 { gaps / items } else { 0 },
            min_gap_ms: r.get(6)?,
            max_gap_ms: r.get(7)?,
            by_kind,
        })
    })?;
    let mut pairs = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    pairs.sort_by(|a, b| {
        b.credits_milli
            .cmp(&a.credits_milli)
            .then(b.items.cmp(&a.items))
            .then(a.earlier_table.cmp(&b.earlier_table))
            .then(a.later_table.cmp(&b.later_table))
    });
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_sum_to_the_whole() {
        assert_eq!(shares(10_000, 3), [3334, 3333, 3333]);
        assert_eq!(shares(0, 2), [0, 0]);
        assert!(shares(5, 0).is_empty());
        assert_eq!(shares(7, 10).iter().sum::<i64>(), 7);
    }
}
