//! `POST usage_stats/api_usage_stats`: the team's API call counts per Apollo route, in fixed
//! windows (minute, hour, day) that open on the first request after the previous one closed.
//!
//! Apollo's answer (docs.apollo.io/reference/view-api-usage-stats) is keyed by the Rails route
//! as a JSON-encoded `[controller, action]` pair, e.g. `"[\"api/v1/people\", \"match\"]"`, each
//! with `{"day"|"hour"|"minute": {"limit", "consumed", "left_over"}}`. The sim counts every
//! authenticated call to an Apollo route, whichever key sent it and whether or not it passed
//! through a proxy, and whatever it answered (a 429 included): the counts are the team's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The three windows, shortest first, with their lengths.
const WINDOWS: [(&str, Duration); 3] = [
    ("minute", Duration::from_secs(60)),
    ("hour", Duration::from_secs(3600)),
    ("day", Duration::from_secs(86_400)),
];

/// One fixed window of one route.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    opened: Option<Instant>,
    count: u64,
}

impl Window {
    /// The count as of `now`: 0 once the window has closed.
    fn current(&self, length: Duration, now: Instant) -> u64 {
        match self.opened {
            Some(opened) if now.saturating_duration_since(opened) < length => self.count,
            _ => 0,
        }
    }
}

/// Call counts per route.
#[derive(Debug, Default)]
pub(crate) struct ApiUsage {
    routes: BTreeMap<String, [Window; 3]>,
}

/// Whether `method path` is `usage_stats/api_usage_stats` (under `/api/v1/`, `/v1/` or `/`).
pub(crate) fn is_api_usage_stats(method: &http::Method, path: &str) -> bool {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/v1/"))
        .or_else(|| path.strip_prefix('/'))
        .unwrap_or(path);
    method == http::Method::POST && rest.trim_end_matches('/') == "usage_stats/api_usage_stats"
}

/// Apollo's route key for an endpoint path under `api/v1/` (`people/match`, `people/:id`,
/// `organizations/:id/job_postings`): `["api/v1/people", "match"]`, `["api/v1/people", "show"]`,
/// `["api/v1/organizations", "job_postings"]`, JSON-encoded.
pub(crate) fn route_key(endpoint_path: &str) -> String {
    let segments: Vec<&str> = endpoint_path.split('/').collect();
    let (controller, action) = match segments.as_slice() {
        [rest @ .., ":id"] => (rest.to_vec(), "show"),
        [rest @ .., action] => (
            rest.iter().copied().filter(|s| *s != ":id").collect(),
            *action,
        ),
        [] => (Vec::new(), ""),
    };
    // Ruby's `Array#to_s`, as Apollo shows it: `["api/v1/people", "match"]`.
    format!("[\"api/v1/{}\", \"{action}\"]", controller.join("/"))
}

impl ApiUsage {
    /// Counts one call of `endpoint_path` at `now`.
    pub(crate) fn count(&mut self, endpoint_path: &str, now: Instant) {
        let windows = self.routes.entry(route_key(endpoint_path)).or_default();
        for (w, (_, length)) in windows.iter_mut().zip(WINDOWS) {
            if w.current(length, now) == 0 {
                *w = Window {
                    opened: Some(now),
                    count: 0,
                };
            }
            w.count += 1;
        }
    }

    /// The answer body as of `now`; `limits` are the per-window limits (minute, hour, day; 0 =
    /// none, shown as `null`).
    pub(crate) fn stats(&self, limits: [u32; 3], now: Instant) -> Value {
        let mut out = serde_json::Map::new();
        for (route, windows) in &self.routes {
            let mut per = serde_json::Map::new();
            for ((w, (name, length)), limit) in windows.iter().zip(WINDOWS).zip(limits) {
                let consumed = w.current(length, now);
                let limit = (limit > 0).then_some(u64::from(limit));
                per.insert(
                    name.to_owned(),
                    json!({
                        "limit": limit,
                        "consumed": consumed,
                        "left_over": limit.map(|l| l.saturating_sub(consumed)),
                    }),
                );
            }
            out.insert(route.clone(), Value::Object(per));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_apollos_controller_action_pairs() {
        assert_eq!(route_key("people/match"), r#"["api/v1/people", "match"]"#);
        assert_eq!(route_key("people/:id"), r#"["api/v1/people", "show"]"#);
        assert_eq!(
            route_key("organizations/:id/job_postings"),
            r#"["api/v1/organizations", "job_postings"]"#
        );
        assert!(is_api_usage_stats(
            &http::Method::POST,
            "/api/v1/usage_stats/api_usage_stats"
        ));
        assert!(is_api_usage_stats(
            &http::Method::POST,
            "/v1/usage_stats/api_usage_stats"
        ));
        assert!(!is_api_usage_stats(
            &http::Method::GET,
            "/api/v1/usage_stats/api_usage_stats"
        ));
    }

    #[test]
    fn fixed_windows_open_on_the_first_call_and_close_after_their_length() {
        let t0 = Instant::now();
        let mut u = ApiUsage::default();
        u.count("people/match", t0);
        u.count("people/match", t0 + Duration::from_secs(30));
        u.count("people/bulk_match", t0 + Duration::from_secs(59));
        let at = |s| u.stats([600, 0, 0], t0 + Duration::from_secs(s));
        let s = at(59);
        let pm = &s[r#"["api/v1/people", "match"]"#];
        assert_eq!(
            pm["minute"],
            json!({"limit": 600, "consumed": 2, "left_over": 598})
        );
        assert_eq!(pm["day"]["limit"], Value::Null);
        // The minute window opened at t0 closes at t0+60; the hour and day go on.
        let s = at(61);
        let pm = &s[r#"["api/v1/people", "match"]"#];
        assert_eq!(
            (
                pm["minute"]["consumed"].as_u64(),
                pm["day"]["consumed"].as_u64()
            ),
            (Some(0), Some(2))
        );
        assert_eq!(
            s[r#"["api/v1/people", "bulk_match"]"#]["minute"]["consumed"],
            1
        );
        // The next call opens a new minute window.
        u.count("people/match", t0 + Duration::from_secs(70));
        let s = u.stats([0; 3], t0 + Duration::from_secs(71));
        assert_eq!(s[r#"["api/v1/people", "match"]"#]["minute"]["consumed"], 1);
        assert_eq!(s[r#"["api/v1/people", "match"]"#]["hour"]["consumed"], 3);
    }

    /// A request as the sim's dispatcher sees it.
    fn ask(
        sim: &super::super::Sim,
        method: &str,
        uri: &str,
        key: Option<&str>,
    ) -> super::super::Reply {
        let mut b = http::Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        sim.dispatch(&parts, b"{}", Instant::now())
    }

    #[test]
    fn the_sim_counts_every_authenticated_call_per_route_whoever_sent_it() {
        let sim = super::super::Sim::new(super::super::SimConfig {
            master_key: Some("master".into()),
            ..Default::default()
        });
        ask(&sim, "POST", "/api/v1/people/match", Some("one"));
        ask(&sim, "POST", "/v1/people/match", Some("two"));
        ask(
            &sim,
            "GET",
            "/organizations/enrich?domain=a.example",
            Some("one"),
        );
        // No key: Apollo's 401, no team to count it for.
        ask(&sim, "POST", "/api/v1/people/match", None);
        // Only the master key reads the counts.
        let refused = ask(
            &sim,
            "POST",
            "/api/v1/usage_stats/api_usage_stats",
            Some("one"),
        );
        assert_eq!(refused.status, http::StatusCode::FORBIDDEN);
        let r = ask(
            &sim,
            "POST",
            "/api/v1/usage_stats/api_usage_stats",
            Some("master"),
        );
        assert_eq!(r.status, http::StatusCode::OK);
        let b = r.body();
        assert_eq!(
            b[r#"["api/v1/people", "match"]"#]["day"]["consumed"], 2,
            "{b}"
        );
        assert_eq!(b[r#"["api/v1/people", "match"]"#]["minute"]["limit"], 1000);
        assert_eq!(
            b[r#"["api/v1/organizations", "enrich"]"#]["hour"]["consumed"],
            1
        );
        // This very call is counted too, the refused one as well.
        assert_eq!(
            b[r#"["api/v1/usage_stats", "api_usage_stats"]"#]["day"]["consumed"],
            2
        );
        assert_eq!(
            sim.billed().calls,
            6,
            "every request to an Apollo path, refused ones included"
        );
    }

    #[test]
    fn plans_without_the_counts_answer_404_or_an_empty_body() {
        for (fault, status) in [
            (404, http::StatusCode::NOT_FOUND),
            (200, http::StatusCode::OK),
        ] {
            let sim = super::super::Sim::new(super::super::SimConfig {
                api_usage_stats_fault: Some(fault),
                ..Default::default()
            });
            let r = ask(
                &sim,
                "POST",
                "/api/v1/usage_stats/api_usage_stats",
                Some("k"),
            );
            assert_eq!(r.status, status);
            if fault == 200 {
                assert_eq!(r.body(), &Value::Null, "an empty text body");
            }
        }
    }
}
