//! Per-endpoint call counts: Apollo's `usage_stats/api_usage_stats` set against the ledger's
//! calls, so that traffic outside creditmeter gets a name ("412 people/match calls outside
//! creditmeter between 14:00 and 14:05"), not just an amount of credits.
//!
//! Apollo's answer is keyed by Rails route, a JSON-encoded `[controller, action]` pair such as
//! `"[\"api/v1/people\", \"match\"]"`, each with `{"minute"|"hour"|"day": {"limit", "consumed",
//! "left_over"}}`: the team's calls (every key, proxied or not) in fixed windows that open on
//! the first request. The poller reads it right after the balance, every `reconcile.interval`;
//! each pair of consecutive readings is a window. The calls Apollo counted in a window are
//! estimated per route from the longest counter that did not restart (a counter that went down
//! restarted, and then at least its new value fell in the window), which is a lower bound: a
//! window never shows more calls outside than there were. The ledger's side is its calls per
//! endpoint that reached Apollo (not `rejected`, not settlement rows, which are no HTTP calls),
//! placed by `finished_at` like the credits, with the calls in flight at a reading netted out by
//! the same interval state as the credits ([`drift`], with no rounding slack: counts are exact).
//!
//! Some plans answer 404 or an empty body: the poller says so once and reconciles credits only.
//! The tables (`api_usage_polls`, `api_usage_counts`, `reconcile_calls`) are the ledger's
//! schema version 6 (`creditmeter_ledger::schema`); ledgers where an earlier version created
//! them on first use keep theirs.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::drift::{self, Carry};
use super::store::Settings;
use crate::catalog::Catalog;

/// One route's counters in one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCount {
    /// Apollo's route as a path under `api/v1/`: `people/match`, `people/:id`.
    pub route: String,
    /// The catalog's endpoint for it (`people_match`), or `other`.
    pub endpoint: String,
    /// `consumed` of the minute, hour and day windows (`None` when absent).
    pub counts: [Option<i64>; 3],
}

/// Why an answer gave no counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallsError {
    #[error("the answer is empty (some Apollo plans do not offer per-route usage)")]
    Empty,
    #[error("the answer is not a JSON object")]
    NotJson,
}

/// Parses a 2xx answer; routes are classified with `catalog` (as POST, else GET).
pub fn parse(body: &[u8], catalog: &Catalog) -> Result<Vec<RouteCount>, CallsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(CallsError::Empty);
    }
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
        return Err(CallsError::NotJson);
    };
    // Some answers may wrap the routes one level down (`{"api_usage_stats": {...}}`).
    let holder = match root.values().next() {
        Some(Value::Object(inner))
            if root.len() == 1 && !root.keys().any(|k| k.starts_with('[')) =>
        {
            inner.clone()
        }
        _ => root,
    };
    let mut out = Vec::new();
    for (key, v) in &holder {
        let Some(route) = route_path(key) else {
            continue;
        };
        let Some(o) = v.as_object() else { continue };
        let count = |w: &str| {
            o.get(w)
                .and_then(|x| x.get("consumed"))
                .and_then(|c| c.as_i64().or_else(|| c.as_f64().map(|f| f as i64)))
        };
        out.push(RouteCount {
            endpoint: endpoint_of(&route, catalog),
            route,
            counts: [count("minute"), count("hour"), count("day")],
        });
    }
    Ok(out)
}

/// `"[\"api/v1/people\", \"match\"]"` → `people/match`; `show` is `…/:id`.
fn route_path(key: &str) -> Option<String> {
    let pair: Vec<String> = serde_json::from_str(key).ok()?;
    let [controller, action] = pair.as_slice() else {
        return None;
    };
    let controller = controller
        .strip_prefix("api/v1/")
        .or_else(|| controller.strip_prefix("v1/"))
        .unwrap_or(controller);
    Some(match action.as_str() {
        "show" => format!("{controller}/:id"),
        "job_postings" => format!("{controller}/:id/job_postings"),
        _ => format!("{controller}/{action}"),
    })
}

/// The catalog's endpoint name for a route path.
fn endpoint_of(route: &str, catalog: &Catalog) -> String {
    let path = format!(
        "/api/v1/{}",
        route.replace(":id", "5f0000000000000000000000")
    );
    for method in ["POST", "GET"] {
        let name = catalog.endpoint(catalog.classify_id(method, &path)).name();
        if name != "other" {
            return name.to_owned();
        }
    }
    "other".to_owned()
}

/// Whether the ledger has the tables: a ledger no server of this version has migrated yet
/// (schema version 6, see `creditmeter_ledger::schema`) is read without them.
pub fn has_tables(conn: &Connection) -> rusqlite::Result<bool> {
    crate::ledger::reconcile::has_call_tables(conn)
}

/// Stores one reading.
pub fn insert_poll(
    conn: &mut Connection,
    request_id: &str,
    sent_at: i64,
    received_at: i64,
    counts: &[RouteCount],
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO api_usage_polls (request_id, sent_at, received_at) VALUES (?1, ?2, ?3)",
        params![request_id, sent_at, received_at],
    )?;
    let poll = tx.last_insert_rowid();
    {
        let mut stmt = tx.prepare(
            "INSERT INTO api_usage_counts (poll_id, route, endpoint, minute_calls, hour_calls,
                 day_calls) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        // A route with no calls in any window reads the same as an absent one: not stored
        // (Apollo lists every route it limits, most of them idle).
        for c in counts
            .iter()
            .filter(|c| c.counts.iter().any(|n| n.unwrap_or(0) != 0))
        {
            stmt.execute(params![
                poll,
                c.route,
                c.endpoint,
                c.counts[0],
                c.counts[1],
                c.counts[2]
            ])?;
        }
    }
    tx.commit()
}

/// One window's verdict for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallWindow {
    pub endpoint: String,
    /// Apollo's routes for the endpoint, e.g. `people/match`.
    pub routes: String,
    pub window_start: i64,
    pub window_end: i64,
    pub apollo_calls: i64,
    pub ledger_calls: i64,
    pub drift_calls: i64,
    pub outside_calls: i64,
}

struct Poll {
    id: i64,
    sent_at: i64,
    received_at: i64,
}

/// Per route: the counters of one reading.
type Counts = std::collections::BTreeMap<String, (String, [Option<i64>; 3])>;

fn counts(conn: &Connection, poll: i64) -> rusqlite::Result<Counts> {
    let mut stmt = conn.prepare_cached(
        "SELECT route, endpoint, minute_calls, hour_calls, day_calls FROM api_usage_counts
          WHERE poll_id = ?1",
    )?;
    let rows = stmt.query_map([poll], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (r.get::<_, String>(1)?, [r.get(2)?, r.get(3)?, r.get(4)?]),
        ))
    })?;
    rows.collect()
}

/// Calls Apollo counted for a route between two readings: the largest of what each window
/// shows (a counter that went down restarted in between, and then at least its new value is
/// new). A lower bound, exact while the day window lasts.
fn counted_between(before: [Option<i64>; 3], after: [Option<i64>; 3]) -> i64 {
    before
        .iter()
        .zip(after)
        .filter_map(|(b, a)| {
            let a = a?;
            let b = b.unwrap_or(0);
            Some(if a < b { a } else { a - b })
        })
        .max()
        .unwrap_or(0)
}

/// Ledger calls that reached Apollo, by endpoint, finished in `(lo, hi]`.
fn ledger_calls(
    conn: &Connection,
    s: &Settings,
    lo: i64,
    hi: i64,
) -> rusqlite::Result<std::collections::BTreeMap<String, i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT endpoint, count(*) FROM calls
          WHERE started_at > ?3 AND started_at <= ?2 AND finished_at > ?1 AND finished_at <= ?2
            AND outcome NOT IN ('rejected', 'settlement')
          GROUP BY endpoint",
    )?;
    let rows = stmt.query_map(params![lo, hi, lo - s.lookback_ms], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    rows.collect()
}

/// Ledger calls in flight at a reading, by endpoint: started before it was answered, ended
/// after it was sent.
fn edge_calls(
    conn: &Connection,
    s: &Settings,
    at: &Poll,
) -> rusqlite::Result<std::collections::BTreeMap<String, i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT endpoint, count(*) FROM calls
          WHERE started_at > ?1 AND started_at < ?2 AND finished_at > ?3
            AND outcome NOT IN ('rejected', 'settlement')
          GROUP BY endpoint",
    )?;
    let rows = stmt.query_map(
        params![at.sent_at - s.lookback_ms, at.received_at, at.sent_at],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    rows.collect()
}

fn poll_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Poll> {
    Ok(Poll {
        id: r.get(0)?,
        sent_at: r.get(1)?,
        received_at: r.get(2)?,
    })
}

/// Settles, in order, every call-count window whose closing reading was answered at or before
/// `final_through`, and stores them. Returns the windows with calls outside creditmeter.
pub fn reconcile_pending(
    conn: &mut Connection,
    s: &Settings,
    final_through: i64,
) -> rusqlite::Result<Vec<CallWindow>> {
    if !has_tables(conn)? {
        return Ok(Vec::new());
    }
    let last: Option<i64> = conn
        .query_row("SELECT max(to_poll) FROM reconcile_calls", [], |r| r.get(0))
        .optional()?
        .flatten();
    let start = match last {
        Some(id) => conn
            .query_row(
                "SELECT id, sent_at, received_at FROM api_usage_polls WHERE id = ?1",
                [id],
                poll_row,
            )
            .optional()?,
        None => conn
            .query_row(
                "SELECT id, sent_at, received_at FROM api_usage_polls ORDER BY sent_at, id LIMIT 1",
                [],
                poll_row,
            )
            .optional()?,
    };
    let Some(mut prev) = start else {
        return Ok(Vec::new());
    };
    // The interval state per endpoint at `prev`.
    let mut carries: std::collections::BTreeMap<String, Carry> = std::collections::BTreeMap::new();
    if last.is_some() {
        let mut stmt = conn.prepare(
            "SELECT endpoint, carry_lo, carry_hi FROM reconcile_calls WHERE to_poll = ?1",
        )?;
        let rows = stmt.query_map([prev.id], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))
        })?;
        for row in rows {
            let (e, lo, hi) = row?;
            carries.insert(e, Carry { lo, hi });
        }
    } else {
        for (e, n) in edge_calls(conn, s, &prev)? {
            carries.insert(e, Carry::unknown(n, 0));
        }
    }
    let next: Vec<Poll> = {
        let mut stmt = conn.prepare(
            "SELECT id, sent_at, received_at FROM api_usage_polls
              WHERE sent_at > ?1 OR (sent_at = ?1 AND id > ?2) ORDER BY sent_at, id",
        )?;
        let rows = stmt.query_map(params![prev.sent_at, prev.id], poll_row)?;
        rows.collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    let mut rows = Vec::new();
    let mut before = counts(conn, prev.id)?;
    for cur in next {
        if cur.received_at > final_through {
            break;
        }
        let after = counts(conn, cur.id)?;
        // Apollo's calls per endpoint, and the routes that make them up.
        let mut apollo: std::collections::BTreeMap<String, (i64, Vec<String>)> =
            std::collections::BTreeMap::new();
        for (route, (endpoint, now)) in &after {
            let then = before.get(route).map(|(_, c)| *c).unwrap_or([None; 3]);
            let e = apollo.entry(endpoint.clone()).or_default();
            e.0 += counted_between(then, *now);
            e.1.push(route.clone());
        }
        let ledger = ledger_calls(conn, s, prev.sent_at, cur.sent_at)?;
        let edges = edge_calls(conn, s, &cur)?;
        let mut endpoints: std::collections::BTreeSet<String> = apollo.keys().cloned().collect();
        endpoints.extend(ledger.keys().cloned());
        endpoints.extend(carries.keys().cloned());
        endpoints.remove("");
        let mut next_carries = std::collections::BTreeMap::new();
        let mut window_rows = 0;
        for endpoint in endpoints {
            let (counted, routes) = apollo.get(&endpoint).cloned().unwrap_or_default();
            let in_window = ledger.get(&endpoint).copied().unwrap_or(0);
            let edge = edges.get(&endpoint).copied().unwrap_or(0);
            let prev_carry = carries
                .get(&endpoint)
                .copied()
                .unwrap_or(Carry { lo: 0, hi: 0 });
            let settled = drift::settle(
                prev_carry,
                drift::Window {
                    apollo_delta: Some(counted),
                    ledger: in_window,
                    edge,
                    slack: 0,
                },
            );
            if settled.carry != (Carry { lo: 0, hi: 0 }) {
                next_carries.insert(endpoint.clone(), settled.carry);
            }
            let w = CallWindow {
                endpoint,
                routes: routes.join(", "),
                window_start: prev.sent_at,
                window_end: cur.sent_at,
                apollo_calls: counted,
                ledger_calls: in_window,
                drift_calls: settled.drift,
                outside_calls: settled.drift.max(0),
            };
            if w.outside_calls > 0 {
                out.push(w.clone());
            }
            // An endpoint with no calls on either side and nothing carried needs no row.
            let idle = counted == 0
                && in_window == 0
                && edge == 0
                && settled.drift == 0
                && settled.carry == (Carry { lo: 0, hi: 0 });
            if !idle {
                rows.push((w, prev.id, cur.id, edge, settled.carry));
                window_rows += 1;
            }
        }
        if window_rows == 0 {
            // One row marks the window settled (`to_poll` is where the next pass resumes).
            rows.push((
                CallWindow {
                    endpoint: String::new(),
                    routes: String::new(),
                    window_start: prev.sent_at,
                    window_end: cur.sent_at,
                    apollo_calls: 0,
                    ledger_calls: 0,
                    drift_calls: 0,
                    outside_calls: 0,
                },
                prev.id,
                cur.id,
                0,
                Carry { lo: 0, hi: 0 },
            ));
        }
        carries = next_carries;
        before = after;
        prev = cur;
    }
    if rows.is_empty() {
        return Ok(out);
    }
    let at = crate::meter::now_ms();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO reconcile_calls (endpoint, routes, window_start, window_end, from_poll,
                 to_poll, apollo_calls, ledger_calls, edge_calls, drift_calls, outside_calls,
                 carry_lo, carry_hi, reconciled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        for (w, from, to, edge, carry) in &rows {
            stmt.execute(params![
                w.endpoint,
                w.routes,
                w.window_start,
                w.window_end,
                from,
                to,
                w.apollo_calls,
                w.ledger_calls,
                edge,
                w.drift_calls,
                w.outside_calls,
                carry.lo,
                carry.hi,
                at
            ])?;
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Windows with calls outside creditmeter that overlap `[since, until)`, oldest first.
pub fn load_outside(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Vec<CallWindow>> {
    let rows = crate::ledger::reconcile::outside_windows(conn, since_ms, until_ms)?;
    Ok(rows.into_iter().map(CallWindow::from).collect())
}

impl From<crate::ledger::reconcile::OutsideWindow> for CallWindow {
    fn from(w: crate::ledger::reconcile::OutsideWindow) -> CallWindow {
        CallWindow {
            endpoint: w.endpoint,
            routes: w.routes,
            window_start: w.window_start,
            window_end: w.window_end,
            apollo_calls: w.apollo_calls,
            ledger_calls: w.ledger_calls,
            drift_calls: w.drift_calls,
            outside_calls: w.outside_calls,
        }
    }
}

/// Calls outside creditmeter per endpoint over all windows, to start the counter from.
pub fn outside_totals(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    crate::ledger::reconcile::outside_totals(conn)
}

impl CallWindow {
    /// What a person reads: "412 people/match calls outside creditmeter between 14:00:00 and
    /// 14:05:00 (Apollo counted 500, creditmeter saw 88)".
    pub fn summary(&self) -> String {
        let what = if self.routes.is_empty() {
            self.endpoint.clone()
        } else {
            self.routes.clone()
        };
        format!(
            "{} {what} call{} outside creditmeter between {} and {} (Apollo counted {}, creditmeter saw {})",
            self.outside_calls,
            if self.outside_calls == 1 { "" } else { "s" },
            super::answer::format_ms(self.window_start),
            super::answer::format_ms(self.window_end),
            self.apollo_calls,
            self.ledger_calls,
        )
    }

    /// As JSON for `GET /api/reconcile` and `report --reconcile --format json`.
    pub fn to_json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "routes": self.routes,
            "start": super::answer::format_ms(self.window_start),
            "end": super::answer::format_ms(self.window_end),
            "start_ms": self.window_start,
            "end_ms": self.window_end,
            "apollo_calls": self.apollo_calls,
            "ledger_calls": self.ledger_calls,
            "outside_calls": self.outside_calls,
            "summary": self.summary(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_apollos_route_keys_and_classifies_them() {
        let catalog = Catalog::builtin();
        let body = br#"{"[\"api/v1/people\", \"match\"]": {"day": {"limit": 6000, "consumed": 12, "left_over": 5988},
              "hour": {"limit": 1000, "consumed": 3, "left_over": 997}, "minute": {"limit": 100, "consumed": 1, "left_over": 99}},
            "[\"api/v1/organizations\", \"show\"]": {"day": {"limit": null, "consumed": 2, "left_over": null}},
            "[\"api/v1/contacts\", \"search\"]": {"day": {"consumed": 4}},
            "not a route": {"day": {"consumed": 1}}}"#;
        let got = parse(body, &catalog).unwrap();
        let by = |r: &str| got.iter().find(|c| c.route == r).unwrap().clone();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(by("people/match").endpoint, "people_match");
        assert_eq!(by("people/match").counts, [Some(1), Some(3), Some(12)]);
        assert_eq!(by("organizations/:id").endpoint, "organization_get");
        assert_eq!(by("organizations/:id").counts, [None, None, Some(2)]);
        assert_eq!(by("contacts/search").endpoint, "other");
        assert_eq!(parse(b"", &catalog), Err(CallsError::Empty));
        assert_eq!(parse(b"  \n", &catalog), Err(CallsError::Empty));
        assert_eq!(parse(b"[]", &catalog), Err(CallsError::NotJson));
        assert_eq!(parse(b"{}", &catalog), Ok(Vec::new()));
    }

    #[test]
    fn counts_between_readings_take_the_longest_counter_that_did_not_restart() {
        // Nothing restarted: every counter agrees on 5 new calls... the day's is used.
        assert_eq!(
            counted_between([Some(2), Some(10), Some(40)], [Some(7), Some(15), Some(45)]),
            5
        );
        // The minute and hour restarted (went down): the day still counts exactly.
        assert_eq!(
            counted_between([Some(9), Some(30), Some(40)], [Some(1), Some(3), Some(52)]),
            12
        );
        // Only a minute counter, which restarted: at least its new value.
        assert_eq!(
            counted_between([Some(9), None, None], [Some(4), None, None]),
            4
        );
        // A route first seen now.
        assert_eq!(counted_between([None; 3], [Some(1), Some(2), Some(2)]), 2);
    }

    fn ledger() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        drop(crate::ledger::open_for_write(&path, crate::config::Synchronous::Normal).unwrap());
        let conn = super::super::store::open(&path).unwrap();
        (dir, conn)
    }

    fn row(conn: &Connection, id: &str, started: i64, finished: i64, outcome: &str) {
        conn.execute(
            "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint,
                 status, outcome, credit_source, catalog_version)
             VALUES (?1, ?2, ?3, 'POST', '/api/v1/people/match', 'people_match', 200, ?4,
                 'catalog', 't')",
            params![id, started, finished, outcome],
        )
        .unwrap();
    }

    fn poll(conn: &mut Connection, sent: i64, day: i64) {
        let counts = [RouteCount {
            route: "people/match".into(),
            endpoint: "people_match".into(),
            counts: [None, None, Some(day)],
        }];
        insert_poll(conn, &format!("p{sent}"), sent, sent + 10, &counts).unwrap();
    }

    const S: Settings = Settings {
        balance_lag_ms: 0,
        settle_ms: 100,
        lookback_ms: 60_000,
        settlement_lookback_ms: 3_600_000,
        pool: super::super::Pool::Typed,
    };

    #[test]
    fn windows_name_calls_outside_and_settle_once() {
        let (_dir, mut conn) = ledger();
        poll(&mut conn, 1000, 100);
        // Window 1: 3 proxied calls, Apollo counted 10; a settlement row is no call.
        for i in 0..3 {
            row(&conn, &format!("a{i}"), 1100 + i, 1200 + i, "ok");
        }
        row(&conn, "s", -500_000, 1500, "settlement");
        row(&conn, "r", 1600, 1601, "rejected");
        // In flight across the second poll: Apollo counted it in window 1.
        row(&conn, "edge", 1990, 2100, "ok");
        poll(&mut conn, 2000, 111);
        // Window 2: nothing outside.
        row(&conn, "b", 2200, 2300, "ok");
        poll(&mut conn, 3000, 112);
        // Window 3: no calls at all.
        poll(&mut conn, 4000, 112);

        assert!(reconcile_pending(&mut conn, &S, 2009).unwrap().is_empty());
        let out = reconcile_pending(&mut conn, &S, 10_000).unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].window_start, out[0].window_end, out[0].outside_calls),
            (1000, 2000, 7)
        );
        assert_eq!((out[0].apollo_calls, out[0].ledger_calls), (11, 3));
        assert_eq!(
            out[0].summary().split(" between").next().unwrap(),
            "7 people/match calls outside creditmeter"
        );
        // Settled windows are never settled again, the empty one included.
        assert!(reconcile_pending(&mut conn, &S, 10_000).unwrap().is_empty());
        let windows: i64 = conn
            .query_row(
                "SELECT count(DISTINCT window_end) FROM reconcile_calls",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(windows, 3);
        assert_eq!(
            outside_totals(&conn).unwrap(),
            vec![("people_match".to_owned(), 7)]
        );
        assert_eq!(load_outside(&conn, 0, 10_000).unwrap(), out);
        poll(&mut conn, 5000, 120);
        let more = reconcile_pending(&mut conn, &S, 10_000).unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!((more[0].window_start, more[0].outside_calls), (4000, 8));
    }
}
