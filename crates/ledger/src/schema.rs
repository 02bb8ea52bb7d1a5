//! The ledger's public schema and its forward migrations, versioned with `PRAGMA user_version`.
//!
//! Column names are a contract with people who query the file with `sqlite3`: extend, never
//! rename. Each migration runs once, inside one transaction, in order.

use rusqlite::Connection;

/// Migrations, index = version reached after running it (minus one).
const MIGRATIONS: &[&str] = &[
    // v1: calls, meta (install secret), views in plain credits.
    r#"
    CREATE TABLE calls (
        id                INTEGER PRIMARY KEY,
        request_id        TEXT    NOT NULL UNIQUE,
        started_at        INTEGER NOT NULL,  -- unix ms, UTC
        finished_at       INTEGER NOT NULL,  -- unix ms, UTC
        method            TEXT    NOT NULL,
        path              TEXT    NOT NULL,  -- no query string
        endpoint          TEXT    NOT NULL,  -- catalog endpoint name, `other` if unknown
        status            INTEGER,           -- upstream status; NULL if no upstream response
        outcome           TEXT    NOT NULL,  -- ok, upstream_error, upstream_timeout, client_cancelled, rejected
        table_name        TEXT,              -- X-Meter-Table; NULL = unattributed
        workflow          TEXT,
        tags              TEXT,              -- JSON object of X-Meter-Tag-* values
        key_fp            TEXT,              -- HMAC fingerprint of the API key, never the key
        credits_milli     INTEGER NOT NULL DEFAULT 0,
        lead_milli        INTEGER NOT NULL DEFAULT 0,
        direct_dial_milli INTEGER NOT NULL DEFAULT 0,
        export_milli      INTEGER NOT NULL DEFAULT 0,
        credit_source     TEXT    NOT NULL,  -- reported, catalog, none
        records_requested INTEGER,
        records_matched   INTEGER,
        catalog_version   TEXT    NOT NULL,
        upstream_ms       INTEGER,
        request_bytes     INTEGER NOT NULL DEFAULT 0,
        response_bytes    INTEGER NOT NULL DEFAULT 0,
        error             TEXT,
        id_kinds          TEXT               -- identifier kinds of a people enrichment (e.g. "email,linkedin_url"), never values
    );
    CREATE INDEX calls_started_at ON calls(started_at);
    CREATE INDEX calls_table_started ON calls(table_name, started_at);

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );

    CREATE VIEW spend_by_table_day AS
    SELECT date(started_at / 1000, 'unixepoch')           AS day,
           COALESCE(table_name, '_unattributed')          AS table_name,
           count(*)                                       AS calls,
           sum(credits_milli) / 1000.0                    AS credits,
           sum(lead_milli) / 1000.0                       AS lead_credits,
           sum(direct_dial_milli) / 1000.0                AS direct_dial_credits,
           sum(export_milli) / 1000.0                     AS export_credits,
           sum(records_requested)                         AS records_requested,
           sum(records_matched)                           AS records_matched
      FROM calls
     GROUP BY 1, 2;

    CREATE VIEW spend_by_hour AS
    SELECT strftime('%Y-%m-%d %H:00', started_at / 1000, 'unixepoch') AS hour,
           COALESCE(table_name, '_unattributed')          AS table_name,
           COALESCE(workflow, '_none')                    AS workflow,
           endpoint,
           count(*)                                       AS calls,
           sum(credits_milli) / 1000.0                    AS credits,
           sum(lead_milli) / 1000.0                       AS lead_credits,
           sum(direct_dial_milli) / 1000.0                AS direct_dial_credits,
           sum(export_milli) / 1000.0                     AS export_credits
      FROM calls
     GROUP BY 1, 2, 3, 4;
    "#,
    // Reconciliation (issue 7): Apollo's credit balance as polled, and the drift per window
    // between two consecutive snapshots. Self-contained: it reads `calls` but changes nothing.
    r#"
    CREATE TABLE balance_snapshots (
        id             INTEGER PRIMARY KEY,
        request_id     TEXT    NOT NULL,  -- the poll's row in `calls`
        sent_at        INTEGER NOT NULL,  -- unix ms: poll sent; Apollo's figures are from after this
        received_at    INTEGER NOT NULL,  -- unix ms: answer received; the figures are from before this
        credit_type    TEXT    NOT NULL,  -- lead, direct_dial, export
        limit_milli    INTEGER,           -- the cycle's allowance, credits x 1000
        consumed_milli INTEGER NOT NULL,  -- consumed this cycle, credits x 1000
        left_milli     INTEGER,           -- left this cycle, credits x 1000
        cycle_start    TEXT,              -- the credit cycle as Apollo names it
        cycle_end      TEXT
    );
    CREATE INDEX balance_snapshots_type_sent ON balance_snapshots(credit_type, sent_at);

    CREATE TABLE reconciliation (
        id               INTEGER PRIMARY KEY,
        credit_type      TEXT    NOT NULL,
        window_start     INTEGER NOT NULL,  -- unix ms: the opening snapshot's sent_at
        window_end       INTEGER NOT NULL,  -- unix ms: the closing snapshot's sent_at
        from_snapshot    INTEGER NOT NULL REFERENCES balance_snapshots(id),
        to_snapshot      INTEGER NOT NULL UNIQUE REFERENCES balance_snapshots(id),
        cycle_reset      INTEGER NOT NULL DEFAULT 0,  -- 1: the credit cycle restarted inside; not reconciled
        apollo_delta_milli INTEGER,         -- Apollo's consumed delta; NULL across a cycle reset
        ledger_milli     INTEGER NOT NULL,  -- credits of calls settled in the window (finished + balance_lag inside it)
        edge_milli       INTEGER NOT NULL,  -- credits of calls at the closing edge (either side may hold them)
        metered_milli    INTEGER NOT NULL,  -- creditmeter's figure: ledger_milli with edge calls placed where Apollo counted them
        unmetered_milli  INTEGER NOT NULL,  -- max(0, apollo_delta - metered): spent outside creditmeter's view
        drift_milli      INTEGER NOT NULL,  -- apollo_delta - metered, signed (negative: creditmeter saw more)
        calls            INTEGER NOT NULL,  -- proxied calls settled in the window (the poller's own excluded)
        by_endpoint      TEXT    NOT NULL,  -- JSON: endpoint -> {calls, ok_calls, records_matched, credits_milli, type_milli}
        carry_lo_milli   INTEGER NOT NULL,  -- edge state: of edge_milli, Apollo had counted at least...
        carry_hi_milli   INTEGER NOT NULL,  -- ...and at most this much at the closing snapshot
        reconciled_at    INTEGER NOT NULL   -- unix ms
    );
    CREATE INDEX reconciliation_window ON reconciliation(window_end, credit_type);
    "#,
    // Holds: emergency stops placed through the admin API (`POST /api/holds`). A hold is in
    // force while `released_at` is NULL; released holds stay as a record of who paused what.
    r#"
    CREATE TABLE holds (
        id          INTEGER PRIMARY KEY,
        scope       TEXT    NOT NULL,  -- JSON: "global" or {"table": glob, "workflow": glob, "key": glob, "tag": {name: glob}}
        reason      TEXT,
        created_at  INTEGER NOT NULL,  -- unix ms, UTC
        released_at INTEGER            -- unix ms, UTC; NULL while in force
    );
    CREATE INDEX holds_active ON holds(released_at);
    "#,
    // Hourly rollups: spend per UTC hour × table × workflow × endpoint × status × outcome,
    // maintained by triggers in the same transaction as each insert into `calls` (whoever
    // inserts), backfilled here from the rows already there. `ledger.retention` deletes detail
    // rows but never rollups, so reports by table, workflow, endpoint, status and outcome keep
    // the whole history. Self-contained and safe to re-run inside its transaction.
    r#"
    CREATE TABLE IF NOT EXISTS rollup_hourly (
        hour              INTEGER NOT NULL,  -- unix ms of the UTC hour's start
        table_name        TEXT    NOT NULL,  -- '_unattributed' for calls without a table
        workflow          TEXT    NOT NULL,  -- '_none' for calls without a workflow
        endpoint          TEXT    NOT NULL,
        status            INTEGER NOT NULL,  -- upstream status; 0 = no upstream response
        outcome           TEXT    NOT NULL,
        calls             INTEGER NOT NULL DEFAULT 0,
        credits_milli     INTEGER NOT NULL DEFAULT 0,
        lead_milli        INTEGER NOT NULL DEFAULT 0,
        direct_dial_milli INTEGER NOT NULL DEFAULT 0,
        export_milli      INTEGER NOT NULL DEFAULT 0,
        records_requested INTEGER NOT NULL DEFAULT 0,
        records_matched   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, table_name, workflow, endpoint, status, outcome)
    ) WITHOUT ROWID;

    DELETE FROM rollup_hourly;
    INSERT INTO rollup_hourly
    SELECT (started_at / 3600000) * 3600000, COALESCE(table_name, '_unattributed'),
           COALESCE(workflow, '_none'), endpoint, COALESCE(status, 0), outcome,
           count(*), sum(credits_milli), sum(lead_milli), sum(direct_dial_milli), sum(export_milli),
           sum(COALESCE(records_requested, 0)), sum(COALESCE(records_matched, 0))
      FROM calls
     GROUP BY 1, 2, 3, 4, 5, 6;

    CREATE TRIGGER IF NOT EXISTS calls_rollup_insert AFTER INSERT ON calls BEGIN
        INSERT INTO rollup_hourly (hour, table_name, workflow, endpoint, status, outcome, calls,
                                   credits_milli, lead_milli, direct_dial_milli, export_milli,
                                   records_requested, records_matched)
        VALUES ((NEW.started_at / 3600000) * 3600000, COALESCE(NEW.table_name, '_unattributed'),
                COALESCE(NEW.workflow, '_none'), NEW.endpoint, COALESCE(NEW.status, 0),
                NEW.outcome, 1, NEW.credits_milli, NEW.lead_milli, NEW.direct_dial_milli,
                NEW.export_milli, COALESCE(NEW.records_requested, 0),
                COALESCE(NEW.records_matched, 0))
        ON CONFLICT (hour, table_name, workflow, endpoint, status, outcome) DO UPDATE SET
            calls             = calls + 1,
            credits_milli     = credits_milli + excluded.credits_milli,
            lead_milli        = lead_milli + excluded.lead_milli,
            direct_dial_milli = direct_dial_milli + excluded.direct_dial_milli,
            export_milli      = export_milli + excluded.export_milli,
            records_requested = records_requested + excluded.records_requested,
            records_matched   = records_matched + excluded.records_matched;
    END;

    -- A corrected row moves its figures: out of the old cell, into the new one.
    CREATE TRIGGER IF NOT EXISTS calls_rollup_update
    AFTER UPDATE OF started_at, table_name, workflow, endpoint, status, outcome, credits_milli,
                    lead_milli, direct_dial_milli, export_milli, records_requested,
                    records_matched ON calls BEGIN
        UPDATE rollup_hourly SET
            calls             = calls - 1,
            credits_milli     = credits_milli - OLD.credits_milli,
            lead_milli        = lead_milli - OLD.lead_milli,
            direct_dial_milli = direct_dial_milli - OLD.direct_dial_milli,
            export_milli      = export_milli - OLD.export_milli,
            records_requested = records_requested - COALESCE(OLD.records_requested, 0),
            records_matched   = records_matched - COALESCE(OLD.records_matched, 0)
         WHERE hour = (OLD.started_at / 3600000) * 3600000
           AND table_name = COALESCE(OLD.table_name, '_unattributed')
           AND workflow = COALESCE(OLD.workflow, '_none')
           AND endpoint = OLD.endpoint AND status = COALESCE(OLD.status, 0)
           AND outcome = OLD.outcome;
        INSERT INTO rollup_hourly (hour, table_name, workflow, endpoint, status, outcome, calls,
                                   credits_milli, lead_milli, direct_dial_milli, export_milli,
                                   records_requested, records_matched)
        VALUES ((NEW.started_at / 3600000) * 3600000, COALESCE(NEW.table_name, '_unattributed'),
                COALESCE(NEW.workflow, '_none'), NEW.endpoint, COALESCE(NEW.status, 0),
                NEW.outcome, 1, NEW.credits_milli, NEW.lead_milli, NEW.direct_dial_milli,
                NEW.export_milli, COALESCE(NEW.records_requested, 0),
                COALESCE(NEW.records_matched, 0))
        ON CONFLICT (hour, table_name, workflow, endpoint, status, outcome) DO UPDATE SET
            calls             = calls + 1,
            credits_milli     = credits_milli + excluded.credits_milli,
            lead_milli        = lead_milli + excluded.lead_milli,
            direct_dial_milli = direct_dial_milli + excluded.direct_dial_milli,
            export_milli      = export_milli + excluded.export_milli,
            records_requested = records_requested + excluded.records_requested,
            records_matched   = records_matched + excluded.records_matched;
    END;

    "#,
    // Deferred charges (issue 13): Apollo bills phone reveals and waterfalls when an
    // asynchronous job ends. The call's row says what is still to come (`deferred`, and its
    // worst case in `deferred_milli`); the bill arrives later as a settlement row
    // (`outcome = 'settlement'`, `settles` = the call's `request_id`). The partial unique index
    // stores a settlement at most once, whichever path (creditmeter's poll, a caller's poll,
    // a spool replay) writes it; the writer's `INSERT OR IGNORE` drops the second.
    // Pending charges: rows with `deferred` set and no row that `settles` them.
    r#"
    ALTER TABLE calls ADD COLUMN settles TEXT;                               -- settlement rows: the settled call's request_id
    ALTER TABLE calls ADD COLUMN deferred TEXT;                              -- JSON: what Apollo bills later (job_id, worst, estimate, params)
    ALTER TABLE calls ADD COLUMN deferred_milli INTEGER NOT NULL DEFAULT 0;  -- worst case of `deferred`, credits x 1000
    CREATE UNIQUE INDEX calls_settles ON calls(settles) WHERE settles IS NOT NULL;
    CREATE INDEX calls_deferred ON calls(started_at) WHERE deferred IS NOT NULL;
    "#,
    // Virtual keys (issue 15): creditmeter's own keys (`cmk_…`), each bound to a table, stored
    // only as a SHA-256 and a display prefix. `id` is 16 hex digits and is the `key_fp` of every
    // call made with the key, so `report --by key`, budget and hold scopes and `/api/calls?key=`
    // name it like any key fingerprint. `meta.keys_generation` is bumped with every change, so a
    // running server sees it before its next lookup. `last_used_at` is kept by a trigger in the
    // transaction that records the call. `audit`: who changed keys, holds and configuration.
    r#"
    CREATE TABLE virtual_keys (
        id           TEXT    PRIMARY KEY,   -- 16 hex digits; calls.key_fp of calls made with it
        name         TEXT    UNIQUE,
        prefix       TEXT    NOT NULL,      -- the key's first 12 characters (cmk_ + 8 hex), for display
        key_hash     TEXT    NOT NULL UNIQUE, -- hex SHA-256 of the key; the key itself is never stored
        table_name   TEXT    NOT NULL,
        workflow     TEXT,
        tags         TEXT,                  -- JSON object
        upstream     TEXT,                  -- [keys.upstreams.NAME]; NULL = keys.upstream_key_env
        created_at   INTEGER NOT NULL,      -- unix ms, UTC
        expires_at   INTEGER,
        revoked_at   INTEGER,
        rotated_at   INTEGER,
        last_used_at INTEGER                -- started_at of the latest call recorded with it
    );
    CREATE TRIGGER virtual_keys_last_used AFTER INSERT ON calls
    WHEN NEW.key_fp IS NOT NULL AND NEW.outcome <> 'settlement' BEGIN
        UPDATE virtual_keys SET last_used_at = max(COALESCE(last_used_at, 0), NEW.started_at)
         WHERE id = NEW.key_fp;
    END;
    INSERT OR IGNORE INTO meta(key, value) VALUES ('keys_generation', 0);

    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,  -- unix ms, UTC
        actor   TEXT    NOT NULL,  -- cli, admin, token:<admin.token_env>, sighup
        action  TEXT    NOT NULL,  -- key_created, key_revoked, key_rotated, hold_placed, hold_lifted, config_reloaded, config_reload_refused
        subject TEXT,              -- the key id or hold id changed
        detail  TEXT               -- JSON: what changed; never a key
    );
    CREATE INDEX audit_at ON audit(at);
    "#,
    // Identifier fingerprints (issue 17, the waste finder): one row per normalised identifier
    // of each call that billed credits, keyed by an HMAC fingerprint, never the value (see
    // `ledger::identifiers`). Written in the call's own transaction.
    r#"
    CREATE TABLE identifiers (
        kind          TEXT    NOT NULL,  -- email, linkedin_url, person_id, name+domain, hashed_email, domain, organization_id
        fp            INTEGER NOT NULL,  -- first 8 bytes of HMAC-SHA256(key from the install secret, kind + value), signed
        at            INTEGER NOT NULL,  -- the call's started_at (unix ms, UTC)
        call_id       INTEGER NOT NULL,  -- calls.id
        item          INTEGER NOT NULL,  -- which person or company of the call (bulk: the details index)
        table_name    TEXT,              -- the call's table; NULL = unattributed
        credits_milli INTEGER NOT NULL,  -- the item's share of the call's credits
        PRIMARY KEY (kind, fp, at, call_id, item)
    ) WITHOUT ROWID;
    CREATE INDEX identifiers_at ON identifiers(at);
    "#,
    // Per-endpoint call counts (reconciliation): Apollo's `usage_stats/api_usage_stats` readings
    // and the windows reconciled from them. Earlier versions created these tables on first use
    // (`IF NOT EXISTS` keeps those ledgers as they are).
    r#"
    CREATE TABLE IF NOT EXISTS api_usage_polls (
        id          INTEGER PRIMARY KEY,
        request_id  TEXT NOT NULL,    -- the poll's calls.request_id
        sent_at     INTEGER NOT NULL, -- unix ms
        received_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS api_usage_counts (
        poll_id     INTEGER NOT NULL REFERENCES api_usage_polls(id),
        route       TEXT NOT NULL,    -- Apollo's route under api/v1/, e.g. people/match
        endpoint    TEXT NOT NULL,    -- the catalog's endpoint name
        minute_calls INTEGER, hour_calls INTEGER, day_calls INTEGER
    );
    CREATE INDEX IF NOT EXISTS api_usage_counts_poll ON api_usage_counts(poll_id);
    CREATE TABLE IF NOT EXISTS reconcile_calls (
        id            INTEGER PRIMARY KEY,
        endpoint      TEXT NOT NULL,    -- '' marks a window with no calls at all
        routes        TEXT NOT NULL,    -- Apollo's routes for it, comma-separated
        window_start  INTEGER NOT NULL, -- sent_at of the opening poll
        window_end    INTEGER NOT NULL, -- sent_at of the closing poll
        from_poll     INTEGER NOT NULL,
        to_poll       INTEGER NOT NULL,
        apollo_calls  INTEGER NOT NULL, -- calls Apollo counted (a lower bound)
        ledger_calls  INTEGER NOT NULL, -- calls the ledger surely puts in the window
        edge_calls    INTEGER NOT NULL, -- calls in flight at the closing poll
        drift_calls   INTEGER NOT NULL, -- signed: Apollo's count minus the ledger's
        outside_calls INTEGER NOT NULL, -- max(drift_calls, 0)
        carry_lo      INTEGER NOT NULL,
        carry_hi      INTEGER NOT NULL,
        reconciled_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS reconcile_calls_window ON reconcile_calls(window_end);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema forward to [`SCHEMA_VERSION`]. Refuses a file from a newer build.
pub fn migrate(conn: &mut Connection) -> Result<(), super::LedgerError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(super::LedgerError::TooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        let names = stmt.query_map([], |r| r.get(0)).unwrap();
        names.map(Result::unwrap).collect()
    }

    #[test]
    fn a_new_ledger_has_the_reconcile_call_tables() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let names = tables(&conn);
        for t in ["api_usage_polls", "api_usage_counts", "reconcile_calls"] {
            assert!(names.iter().any(|n| n == t), "{t} missing from {names:?}");
        }
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    /// A ledger where an earlier version created the reconcile tables on first use (schema 5
    /// plus the tables) migrates to the newest version with its rows kept.
    #[test]
    fn tables_created_on_first_use_survive_the_migration() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (i, sql) in MIGRATIONS.iter().take(5).enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as i64)
                .unwrap();
        }
        // The reconcile tables' migration (v8) is what reconciliation ran on first use.
        conn.execute_batch(MIGRATIONS[7]).unwrap();
        conn.execute(
            "INSERT INTO api_usage_polls (request_id, sent_at, received_at) VALUES ('p', 1, 2)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let polls: i64 = conn
            .query_row("SELECT count(*) FROM api_usage_polls", [], |r| r.get(0))
            .unwrap();
        assert_eq!(polls, 1, "the reading an earlier version stored is kept");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert!(MIGRATIONS[7].contains("reconcile_calls"));
    }
}
