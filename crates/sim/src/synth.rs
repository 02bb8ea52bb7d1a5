//! `creditmeter sim-ledger`: a realistic synthetic ledger, written fast, so the figures for a
//! ten-million-row ledger can be reproduced on any machine.
//!
//! Rows go through the ordinary schema (triggers keep the rollups, as in production) in big
//! transactions. The shape: seven callers with different spend profiles (business-hours
//! enrichment, a nightly CRM refresh, an expensive weekday bulk-match-with-phones table, free
//! searches), a weekly and daily rhythm, a few percent of 429s and upstream failures, three API
//! keys, tags, identifier kinds with different match rates, and identifier fingerprints drawn
//! from one population of people and companies, so some are enriched again. Optional bursts
//! hide a known spend at a known hour and table. Deterministic for a given seed.

use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use creditmeter_ledger::queries::HOUR_MS;

/// A burst of spend hidden in the synthetic ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burst {
    /// When it starts (unix ms).
    pub at_ms: i64,
    /// The table that spends it.
    pub table: String,
    /// Credits it spends in all (whole credits).
    pub credits: i64,
    /// Over how many minutes.
    pub minutes: u32,
}

/// The burst table's default name.
pub const DEFAULT_BURST_TABLE: &str = "Runaway waterfall";
/// The default burst size, in credits.
pub const DEFAULT_BURST_CREDITS: i64 = 400_000;

impl Burst {
    /// Parses `AT[,table=NAME][,credits=N][,minutes=M]`, with `AT` read by `parse_time`
    /// (e.g. `2026-11-03T14:00:00Z,table=Runaway waterfall,credits=400000,minutes=60`).
    pub fn parse(
        s: &str,
        parse_time: impl Fn(&str) -> Result<i64, String>,
    ) -> Result<Burst, String> {
        let mut parts = s.split(',');
        let at = parts.next().unwrap_or("").trim();
        let mut burst = Burst {
            at_ms: parse_time(at)?,
            table: DEFAULT_BURST_TABLE.to_owned(),
            credits: DEFAULT_BURST_CREDITS,
            minutes: 60,
        };
        for part in parts {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("burst: {part:?} is not key=value (table=, credits=, minutes=)")
            })?;
            match k.trim() {
                "table" if !v.trim().is_empty() => burst.table = v.trim().to_owned(),
                "credits" => {
                    burst.credits = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|c: &i64| *c > 0)
                        .ok_or_else(|| format!("burst: credits={v:?} is not a positive number"))?
                }
                "minutes" => {
                    burst.minutes = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|m: &u32| (1..=24 * 60).contains(m))
                        .ok_or_else(|| format!("burst: minutes={v:?} must be 1 to 1440"))?
                }
                other => {
                    return Err(format!(
                        "burst: unknown key {other:?} (table=, credits=, minutes=)"
                    ))
                }
            }
        }
        Ok(burst)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Background rows (bursts add their own).
    pub rows: u64,
    /// Days of history, ending at `end_ms`.
    pub days: u32,
    pub end_ms: i64,
    pub seed: u64,
    pub bursts: Vec<Burst>,
    /// Rows per transaction.
    pub batch: usize,
}

/// What was generated.
#[derive(Debug, Clone, Default)]
pub struct SynthSummary {
    pub rows: u64,
    pub burst_rows: u64,
    pub credits_milli: i64,
    pub burst_credits_milli: i64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub elapsed: Duration,
}

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        self.f() < p
    }
}

/// A caller's profile: who, how much of the traffic, and when.
struct Profile {
    table: Option<&'static str>,
    /// Share of background calls, before the time-of-week shape.
    share: f64,
    rhythm: Rhythm,
}

#[derive(Clone, Copy)]
enum Rhythm {
    /// Weekdays 08:00–18:00 UTC heavy, evenings light, weekends lighter.
    Business,
    /// Every day 01:00–05:00 UTC only.
    Nightly,
    /// Weekdays 09:00–17:00 only.
    WeekdayWork,
    /// Around the clock, a little busier by day.
    Steady,
}

impl Rhythm {
    fn weight(self, hour_of_day: i64, weekday: i64) -> f64 {
        let weekend = weekday >= 5;
        match self {
            Rhythm::Business => match (weekend, hour_of_day) {
                (false, 8..=17) => 3.0,
                (false, 6..=7 | 18..=21) => 1.2,
                (false, _) => 0.4,
                (true, 9..=17) => 0.8,
                (true, _) => 0.3,
            },
            Rhythm::Nightly => {
                if (1..=4).contains(&hour_of_day) {
                    6.0
                } else {
                    0.0
                }
            }
            Rhythm::WeekdayWork => {
                if !weekend && (9..=16).contains(&hour_of_day) {
                    3.0
                } else {
                    0.0
                }
            }
            Rhythm::Steady => {
                if (7..=19).contains(&hour_of_day) {
                    1.3
                } else {
                    0.7
                }
            }
        }
    }
}

const PROFILES: &[Profile] = &[
    Profile {
        table: Some("Inbound leads"),
        share: 0.30,
        rhythm: Rhythm::Business,
    },
    Profile {
        table: Some("Event attendees"),
        share: 0.12,
        rhythm: Rhythm::Business,
    },
    Profile {
        table: Some("ABM accounts"),
        share: 0.22,
        rhythm: Rhythm::Business,
    },
    Profile {
        table: Some("Q4 outbound blitz"),
        share: 0.04,
        rhythm: Rhythm::WeekdayWork,
    },
    Profile {
        table: Some("CRM hygiene"),
        share: 0.15,
        rhythm: Rhythm::Nightly,
    },
    Profile {
        table: Some("Sales nav import"),
        share: 0.05,
        rhythm: Rhythm::Business,
    },
    Profile {
        table: None,
        share: 0.12,
        rhythm: Rhythm::Steady,
    },
];

const KEYS: [&str; 3] = ["a1b2c3d4e5f60718", "9f8e7d6c5b4a3921", "0011223344556677"];

/// One synthetic call, before it is written.
struct Row {
    started_at: i64,
    upstream_ms: i64,
    method: &'static str,
    path: &'static str,
    endpoint: &'static str,
    status: Option<u16>,
    outcome: &'static str,
    table: Option<String>,
    workflow: Option<&'static str>,
    tags: Option<&'static str>,
    key_fp: &'static str,
    lead_milli: i64,
    direct_dial_milli: i64,
    export_milli: i64,
    credit_source: &'static str,
    requested: Option<i64>,
    matched: Option<i64>,
    request_bytes: i64,
    response_bytes: i64,
    error: Option<&'static str>,
    id_kinds: Option<&'static str>,
    /// Identifier fingerprints: (item, kind, fp, credits_milli).
    ids: Vec<(u16, &'static str, i64, i64)>,
}

/// Gives a billed enrichment the identifiers it carried, drawn from a population of
/// `population` people (and as many companies) shared by every table, so some are enriched
/// again, within a table and across tables, as in real traffic. Synthetic fingerprints: a
/// mix of kind and person number (no secret), stable for a seed.
fn attach_ids(row: &mut Row, rng: &mut Rng, population: u64) {
    let credits = row.lead_milli + row.direct_dial_milli + row.export_milli;
    if credits <= 0 {
        return;
    }
    let kinds: &[&'static str] = match (row.endpoint, row.id_kinds) {
        ("organizations_enrich", _) => &["domain"],
        (_, Some("email")) => &["email"],
        (_, Some("email,linkedin_url")) => &["email", "linkedin_url"],
        (_, Some("linkedin_url")) => &["linkedin_url"],
        (_, Some("name+domain")) => &["name+domain"],
        (_, Some("id")) => &["person_id"],
        _ => &[],
    };
    if kinds.is_empty() {
        return;
    }
    let items = row.requested.unwrap_or(1).clamp(1, 100) as usize;
    let shares = creditmeter_ledger::identifiers::shares(credits, items);
    for (item, share) in shares.into_iter().enumerate() {
        let person = rng.below(population.max(1));
        for kind in kinds {
            let tag = creditmeter_ledger::identifiers::KINDS
                .iter()
                .position(|k| k == kind)
                .unwrap_or(0) as u64;
            let fp = Rng(person ^ (tag << 56) ^ 0x1d_5eed).next() as i64;
            row.ids.push((item as u16, kind, fp, share));
        }
    }
}

fn background_row(p: usize, t: i64, rng: &mut Rng) -> Row {
    let prod = rng.chance(0.9);
    let mut row = Row {
        started_at: t,
        upstream_ms: 80 + rng.below(700) as i64,
        method: "POST",
        path: "/api/v1/people/match",
        endpoint: "people_match",
        status: Some(200),
        outcome: "ok",
        table: PROFILES[p].table.map(str::to_owned),
        workflow: None,
        tags: Some(if prod {
            r#"{"env":"prod"}"#
        } else {
            r#"{"env":"staging"}"#
        }),
        key_fp: KEYS[0],
        lead_milli: 0,
        direct_dial_milli: 0,
        export_milli: 0,
        credit_source: "catalog",
        requested: None,
        matched: None,
        request_bytes: 60 + rng.below(200) as i64,
        response_bytes: 0,
        error: None,
        id_kinds: None,
        ids: Vec::new(),
    };
    // (identifier kinds, their match rate) for a people match.
    let person = |row: &mut Row, kinds: &'static str, rate: f64, rng: &mut Rng| {
        row.id_kinds = Some(kinds);
        row.requested = Some(1);
        let hit = rng.chance(rate);
        row.matched = Some(i64::from(hit));
        row.lead_milli = if hit { 1000 } else { 0 };
    };
    match p {
        0 => {
            row.workflow = Some("enrich-person");
            if rng.chance(0.85) {
                person(&mut row, "email", 0.78, rng);
            } else {
                person(&mut row, "email,linkedin_url", 0.93, rng);
            }
        }
        1 => {
            row.workflow = Some("verify-employment");
            row.path = "/v1/people/match";
            if rng.chance(0.9) {
                person(&mut row, "linkedin_url", 0.92, rng);
            } else {
                person(&mut row, "name+domain", 0.61, rng);
            }
        }
        2 => {
            if rng.chance(0.65) {
                row.workflow = Some("enrich-company");
                row.method = "GET";
                row.path = "/api/v1/organizations/enrich";
                row.endpoint = "organizations_enrich";
                let hit = rng.chance(0.85);
                row.lead_milli = if hit { 1000 } else { 0 };
            } else {
                row.workflow = Some("find-lookalikes");
                row.path = "/api/v1/mixed_companies/search";
                row.endpoint = "mixed_companies_search";
                row.lead_milli = if rng.chance(0.95) { 1000 } else { 0 };
            }
        }
        3 => {
            row.workflow = Some("bulk-enrich-phones");
            row.path = "/api/v1/people/bulk_match";
            row.endpoint = "people_bulk_match";
            row.upstream_ms = 900 + rng.below(2500) as i64;
            row.key_fp = KEYS[2];
            row.id_kinds = Some("name+domain");
            let matched = 4 + rng.below(6) as i64;
            row.requested = Some(10);
            row.matched = Some(matched);
            row.lead_milli = matched * 1000;
            row.direct_dial_milli = matched * 8000;
            row.credit_source = "reported";
            row.request_bytes = 1500 + rng.below(500) as i64;
        }
        4 => {
            row.workflow = Some("nightly-refresh");
            row.key_fp = KEYS[1];
            person(&mut row, "id", 0.99, rng);
        }
        5 => {
            row.workflow = Some("find-people");
            row.path = "/api/v1/mixed_people/search";
            row.endpoint = "mixed_people_search";
            row.export_milli = if rng.chance(0.9) { 1000 } else { 0 };
        }
        _ => {
            row.workflow = None;
            row.tags = None;
            row.path = "/api/v1/mixed_people/api_search";
            row.endpoint = "mixed_people_api_search";
        }
    }
    row.response_bytes = 400 + rng.below(6000) as i64;
    // A few percent of calls fail; Apollo bills none of those, except a caller that hung up.
    let roll = rng.f();
    if roll < 0.015 {
        row.status = Some(429);
        row.lead_milli = 0;
        row.direct_dial_milli = 0;
        row.export_milli = 0;
        row.credit_source = "none";
        row.matched = None;
        row.response_bytes = 60;
    } else if roll < 0.02 {
        row.status = Some(422);
        row.lead_milli = 0;
        row.direct_dial_milli = 0;
        row.export_milli = 0;
        row.credit_source = "none";
        row.matched = None;
        row.response_bytes = 90;
    } else if roll < 0.024 {
        row.status = None;
        row.outcome = if rng.chance(0.7) {
            "upstream_error"
        } else {
            "upstream_timeout"
        };
        row.error = Some("synthetic upstream failure");
        row.lead_milli = 0;
        row.direct_dial_milli = 0;
        row.export_milli = 0;
        row.credit_source = "none";
        row.matched = None;
        row.response_bytes = 0;
    } else if roll < 0.027 {
        row.outcome = "client_cancelled";
    }
    if row.lead_milli + row.direct_dial_milli + row.export_milli == 0
        && row.credit_source == "catalog"
    {
        row.credit_source = "none";
    }
    row
}

fn burst_row(b: &Burst, t: i64, credits_milli: i64, rng: &mut Rng) -> Row {
    // A waterfall retrying bulk matches with phone reveal: 90 credits a call when all ten match.
    let matched = 10;
    let (lead, dd) = if credits_milli == 90_000 {
        (10_000, 80_000)
    } else {
        (credits_milli, 0)
    };
    Row {
        started_at: t,
        upstream_ms: 700 + rng.below(1500) as i64,
        method: "POST",
        path: "/api/v1/people/bulk_match",
        endpoint: "people_bulk_match",
        status: Some(200),
        outcome: "ok",
        table: Some(b.table.clone()),
        workflow: Some("waterfall-retry"),
        tags: Some(r#"{"env":"prod"}"#),
        key_fp: KEYS[2],
        lead_milli: lead,
        direct_dial_milli: dd,
        export_milli: 0,
        credit_source: "reported",
        requested: Some(10),
        matched: Some(matched),
        request_bytes: 1800,
        response_bytes: 24_000,
        error: None,
        id_kinds: Some("email"),
        ids: Vec::new(),
    }
}

/// Calls of a burst, in start order: `(started_at, credits_milli)`, summing to its credits.
fn burst_calls(b: &Burst) -> Vec<(i64, i64)> {
    let total = b.credits.saturating_mul(1000);
    let full = total / 90_000;
    let rest = total % 90_000;
    let n = full + i64::from(rest > 0);
    let span = i64::from(b.minutes) * 60_000;
    (0..n)
        .map(|i| {
            let t = b.at_ms + span * i / n.max(1);
            (t, if i < full { 90_000 } else { rest })
        })
        .collect()
}

const INSERT: &str = "INSERT INTO calls (
    request_id, started_at, finished_at, method, path, endpoint, status, outcome, table_name,
    workflow, tags, key_fp, credits_milli, lead_milli, direct_dial_milli, export_milli,
    credit_source, records_requested, records_matched, catalog_version, upstream_ms,
    request_bytes, response_bytes, error, id_kinds
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
          ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

const INSERT_ID: &str = "INSERT OR IGNORE INTO identifiers
    (kind, fp, at, call_id, item, table_name, credits_milli) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Writes the synthetic ledger into `conn` (an opened, migrated ledger), in time order, as
/// production would. `progress` is told the rows written so far after each transaction.
pub fn generate(
    conn: &mut Connection,
    opts: &SynthOptions,
    mut progress: impl FnMut(u64),
) -> rusqlite::Result<SynthSummary> {
    let started = Instant::now();
    let mut rng = Rng(opts.seed ^ 0x00c0_ffee);
    let days = i64::from(opts.days.max(1));
    let end = opts.end_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let start = end - days * 24 * HOUR_MS;
    let hours = (end - start) / HOUR_MS;

    // Expected rows per hour: each profile's share spread over its own rhythm, with a daily
    // wobble so no two days look alike.
    let mut weight_sums = vec![0.0f64; PROFILES.len()];
    let mut day_factor = Vec::with_capacity(days as usize + 1);
    for _ in 0..=days {
        day_factor.push(0.8 + 0.4 * rng.f());
    }
    let hour_shape = |h: i64| -> (i64, i64) {
        let t = start + h * HOUR_MS;
        let hour_of_day = t.div_euclid(HOUR_MS).rem_euclid(24);
        // 1970-01-01 was a Thursday: weekday 0 = Monday.
        let weekday = (t.div_euclid(24 * HOUR_MS) + 3).rem_euclid(7);
        (hour_of_day, weekday)
    };
    for h in 0..hours {
        let (hod, wd) = hour_shape(h);
        for (i, p) in PROFILES.iter().enumerate() {
            weight_sums[i] += p.rhythm.weight(hod, wd) * day_factor[(h / 24) as usize];
        }
    }
    let rows_f = opts.rows as f64;

    let mut bursts: Vec<(i64, i64, usize)> = Vec::new();
    for (bi, b) in opts.bursts.iter().enumerate() {
        bursts.extend(burst_calls(b).into_iter().map(|(t, c)| (t, c, bi)));
    }
    bursts.sort();
    let mut next_burst = 0usize;

    let mut summary = SynthSummary {
        first_ms: start,
        last_ms: end,
        ..Default::default()
    };
    let process = (opts.seed as u32) ^ 0x5eed_0000;
    let mut counter: u64 = 0;
    let mut carry = vec![0.0f64; PROFILES.len()];
    let mut hour_rows: Vec<(i64, usize)> = Vec::new();
    let mut pending: Vec<Row> = Vec::with_capacity(opts.batch.max(1));
    let mut written: u64 = 0;
    // Identifiers draw from their own stream, so the calls are the same as without them.
    let mut id_rng = Rng(opts.seed ^ 0x1d_1d1d);
    let population = opts.rows.saturating_mul(2).max(500);

    let flush = |conn: &mut Connection,
                 pending: &mut Vec<Row>,
                 counter: &mut u64|
     -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(INSERT)?;
            let mut ids = tx.prepare_cached(INSERT_ID)?;
            for r in pending.drain(..) {
                *counter += 1;
                let id = format!(
                    "{:012x}{:08x}{:012x}",
                    r.started_at as u64 & 0xffff_ffff_ffff,
                    process,
                    *counter
                );
                stmt.execute(params![
                    id,
                    r.started_at,
                    r.started_at + r.upstream_ms,
                    r.method,
                    r.path,
                    r.endpoint,
                    r.status,
                    r.outcome,
                    r.table,
                    r.workflow,
                    r.tags,
                    r.key_fp,
                    r.lead_milli + r.direct_dial_milli + r.export_milli,
                    r.lead_milli,
                    r.direct_dial_milli,
                    r.export_milli,
                    r.credit_source,
                    r.requested,
                    r.matched,
                    "synthetic",
                    r.status.map(|_| r.upstream_ms),
                    r.request_bytes,
                    r.response_bytes,
                    r.error,
                    r.id_kinds,
                ])?;
                if !r.ids.is_empty() {
                    let call_id = tx.last_insert_rowid();
                    for (item, kind, fp, share) in &r.ids {
                        ids.execute(params![
                            kind,
                            fp,
                            r.started_at,
                            call_id,
                            item,
                            r.table,
                            share
                        ])?;
                    }
                }
            }
        }
        tx.commit()
    };

    for h in 0..hours {
        let (hod, wd) = hour_shape(h);
        let t0 = start + h * HOUR_MS;
        hour_rows.clear();
        for (i, p) in PROFILES.iter().enumerate() {
            if weight_sums[i] <= 0.0 {
                continue;
            }
            let expect =
                rows_f * p.share * p.rhythm.weight(hod, wd) * day_factor[(h / 24) as usize]
                    / weight_sums[i]
                    + carry[i];
            let n = expect.floor();
            carry[i] = expect - n;
            for _ in 0..n as u64 {
                hour_rows.push((t0 + rng.below(HOUR_MS as u64) as i64, i));
            }
        }
        hour_rows.sort_unstable();
        let mut rows: Vec<Row> = hour_rows
            .iter()
            .map(|&(t, p)| background_row(p, t, &mut rng))
            .collect();
        summary.rows += rows.len() as u64;
        while let Some(&(t, c, bi)) = bursts.get(next_burst) {
            if t >= t0 + HOUR_MS {
                break;
            }
            next_burst += 1;
            if t < start {
                continue;
            }
            rows.push(burst_row(&opts.bursts[bi], t, c, &mut rng));
            summary.burst_rows += 1;
            summary.burst_credits_milli += c;
        }
        rows.sort_by_key(|r| r.started_at);
        for mut r in rows {
            attach_ids(&mut r, &mut id_rng, population);
            summary.credits_milli += r.lead_milli + r.direct_dial_milli + r.export_milli;
            pending.push(r);
            if pending.len() >= opts.batch.max(1) {
                written += pending.len() as u64;
                flush(conn, &mut pending, &mut counter)?;
                progress(written);
            }
        }
    }
    if !pending.is_empty() {
        written += pending.len() as u64;
        flush(conn, &mut pending, &mut counter)?;
        progress(written);
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Result<i64, String> {
        creditmeter_base::parse_time(s, 0).map_err(|e| e.to_string())
    }

    #[test]
    fn bursts_parse_with_defaults_and_reject_nonsense() {
        let b = Burst::parse("2026-11-03T14:00:00Z", t).unwrap();
        assert_eq!(b.table, DEFAULT_BURST_TABLE);
        assert_eq!(b.credits, DEFAULT_BURST_CREDITS);
        assert_eq!(b.minutes, 60);
        let b = Burst::parse("2026-11-03T14:00:00Z,table=X y,credits=1234,minutes=5", t).unwrap();
        assert_eq!((b.table.as_str(), b.credits, b.minutes), ("X y", 1234, 5));
        assert!(Burst::parse("soon", t).is_err());
        assert!(Burst::parse("2026-11-03T14:00:00Z,credits=-5", t).is_err());
        assert!(Burst::parse("2026-11-03T14:00:00Z,colour=red", t).is_err());
    }

    #[test]
    fn a_burst_spends_exactly_its_credits_within_its_minutes() {
        let b = Burst {
            at_ms: 1_000 * HOUR_MS,
            table: "x".into(),
            credits: 400_001,
            minutes: 60,
        };
        let calls = burst_calls(&b);
        assert_eq!(calls.iter().map(|c| c.1).sum::<i64>(), 400_001_000);
        assert!(calls
            .iter()
            .all(|c| c.0 >= b.at_ms && c.0 < b.at_ms + HOUR_MS));
    }
}
