//! Apollo's rate-limit response headers, read into per-window figures for the gauges.
//!
//! Apollo sends, per endpoint and fixed window, `x-rate-limit-<w>` (the limit), `x-<w>-usage` and
//! `x-<w>-requests-left`, with `<w>` one of `minute`, `hourly`, `24-hour` (older accounts:
//! `daily`). A window with no limit sends an empty limit header and no usage headers.

use http::HeaderMap;

/// One window's figures. `window` is `minute`, `hour` or `day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimit {
    pub window: &'static str,
    pub limit: Option<i64>,
    pub remaining: Option<i64>,
}

/// (label, limit header, usage header, requests-left header), current and legacy spellings.
const WINDOWS: &[(&str, &str, &str, &str)] = &[
    (
        "minute",
        "x-rate-limit-minute",
        "x-minute-usage",
        "x-minute-requests-left",
    ),
    (
        "hour",
        "x-rate-limit-hourly",
        "x-hourly-usage",
        "x-hourly-requests-left",
    ),
    (
        "day",
        "x-rate-limit-24-hour",
        "x-24-hour-usage",
        "x-24-hour-requests-left",
    ),
    (
        "day",
        "x-rate-limit-daily",
        "x-daily-usage",
        "x-daily-requests-left",
    ),
];

/// Reads the windows present in `headers`. Windows without a numeric limit are left out.
pub fn parse(headers: &HeaderMap) -> Vec<WindowLimit> {
    let num = |name: &str| -> Option<i64> {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<i64>().ok())
    };
    let mut out: Vec<WindowLimit> = Vec::new();
    for &(window, limit_h, usage_h, left_h) in WINDOWS {
        let Some(limit) = num(limit_h) else { continue };
        if out.iter().any(|w| w.window == window) {
            continue;
        }
        let remaining = num(left_h).or_else(|| num(usage_h).map(|u| (limit - u).max(0)));
        out.push(WindowLimit {
            window,
            limit: Some(limit),
            remaining,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn current_spellings() {
        let h = headers(&[
            ("x-rate-limit-minute", "1000"),
            ("x-minute-usage", "3"),
            ("x-minute-requests-left", "997"),
            ("x-rate-limit-hourly", ""),
            ("x-rate-limit-24-hour", "50000"),
            ("x-24-hour-usage", "10"),
        ]);
        let w = parse(&h);
        assert_eq!(
            w,
            vec![
                WindowLimit {
                    window: "minute",
                    limit: Some(1000),
                    remaining: Some(997)
                },
                WindowLimit {
                    window: "day",
                    limit: Some(50000),
                    remaining: Some(49990)
                },
            ]
        );
    }

    #[test]
    fn legacy_daily_spelling() {
        let h = headers(&[
            ("x-rate-limit-daily", "2000"),
            ("x-daily-requests-left", "1999"),
        ]);
        assert_eq!(
            parse(&h),
            vec![WindowLimit {
                window: "day",
                limit: Some(2000),
                remaining: Some(1999)
            }]
        );
    }

    #[test]
    fn no_headers_no_windows() {
        assert!(parse(&HeaderMap::new()).is_empty());
    }
}
