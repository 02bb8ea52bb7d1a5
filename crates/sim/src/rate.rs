//! Apollo's rate limits: fixed minute, hour and 24-hour windows per (API key, endpoint).
//!
//! Every admitted call counts in all three windows; a call past any limit is refused (and does
//! not count). Each answer carries Apollo's headers: per window the limit (empty when the window
//! is unlimited) and, for limited windows, the usage and what is left.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

/// Apollo's three windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    const ALL: [Window; 3] = [Window::Minute, Window::Hour, Window::Day];

    fn seconds(self) -> u64 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }

    /// The word in Apollo's 429 message: "… 600 times per hour."
    pub(crate) fn unit(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    /// The limit, usage and requests-left header names.
    fn headers(self, legacy_daily: bool) -> [HeaderName; 3] {
        let names = match (self, legacy_daily) {
            (Window::Minute, _) => [
                "x-rate-limit-minute",
                "x-minute-usage",
                "x-minute-requests-left",
            ],
            (Window::Hour, _) => [
                "x-rate-limit-hourly",
                "x-hourly-usage",
                "x-hourly-requests-left",
            ],
            (Window::Day, false) => [
                "x-rate-limit-24-hour",
                "x-24-hour-usage",
                "x-24-hour-requests-left",
            ],
            (Window::Day, true) => [
                "x-rate-limit-daily",
                "x-daily-usage",
                "x-daily-requests-left",
            ],
        };
        names.map(HeaderName::from_static)
    }
}

/// Call counts of the windows of one (API key, endpoint).
#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    /// Which window (elapsed time / window length) `used` belongs to.
    window: u64,
    used: u32,
}

/// The fixed-window counters of every (API key, endpoint) seen.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Minute, hour, day; 0 = unlimited.
    limits: [u32; 3],
    legacy_daily: bool,
    /// Windows are aligned to this instant.
    epoch: Instant,
    counters: HashMap<(String, &'static str), [Counter; 3]>,
}

/// The outcome of [`RateLimiter::admit`]: the windows' state after the call, and whether it was
/// refused.
#[derive(Debug)]
pub(crate) struct RateStatus {
    limits: [u32; 3],
    used: [u32; 3],
    legacy_daily: bool,
    /// Set when the call is over a limit.
    pub(crate) exceeded: Option<Exceeded>,
}

/// The window that refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exceeded {
    pub(crate) window: Window,
    pub(crate) limit: u32,
    /// Whole seconds until the window rolls over (at least 1).
    pub(crate) retry_after_secs: u64,
}

impl RateLimiter {
    /// Limits per minute, hour and 24 hours (0 = unlimited), windows starting at `epoch`.
    pub(crate) fn new(limits: [u32; 3], legacy_daily: bool, epoch: Instant) -> Self {
        Self {
            limits,
            legacy_daily,
            epoch,
            counters: HashMap::new(),
        }
    }

    /// Counts a call of `endpoint` with `api_key` at `now`, unless a window is full.
    pub(crate) fn admit(
        &mut self,
        api_key: &str,
        endpoint: &'static str,
        now: Instant,
    ) -> RateStatus {
        let elapsed = now.saturating_duration_since(self.epoch);
        let counters = self
            .counters
            .entry((api_key.to_owned(), endpoint))
            .or_default();
        let mut exceeded = None;
        for ((window, counter), limit) in
            Window::ALL.iter().zip(counters.iter_mut()).zip(self.limits)
        {
            let current = elapsed.as_secs() / window.seconds();
            if counter.window != current {
                *counter = Counter {
                    window: current,
                    used: 0,
                };
            }
            if limit > 0 && counter.used >= limit {
                // The longest window that is full decides when to come back.
                let ends = Duration::from_secs((current + 1) * window.seconds());
                let wait = ends.saturating_sub(elapsed);
                exceeded = Some(Exceeded {
                    window: *window,
                    limit,
                    retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
                });
            }
        }
        if exceeded.is_none() {
            for counter in counters.iter_mut() {
                counter.used = counter.used.saturating_add(1);
            }
        }
        RateStatus {
            limits: self.limits,
            used: counters.map(|counter| counter.used),
            legacy_daily: self.legacy_daily,
            exceeded,
        }
    }
}

impl RateStatus {
    /// Adds Apollo's rate-limit headers.
    pub(crate) fn write_headers(&self, headers: &mut HeaderMap) {
        for ((window, limit), used) in Window::ALL.iter().zip(self.limits).zip(self.used) {
            let [limit_name, usage_name, left_name] = window.headers(self.legacy_daily);
            if limit == 0 {
                headers.insert(limit_name, HeaderValue::from_static(""));
                continue;
            }
            headers.insert(limit_name, HeaderValue::from(limit));
            headers.insert(usage_name, HeaderValue::from(used));
            headers.insert(left_name, HeaderValue::from(limit.saturating_sub(used)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).map(|value| value.to_str().unwrap())
    }

    #[test]
    fn counts_per_key_and_endpoint_and_refuses_past_the_limit() {
        let epoch = Instant::now();
        let mut limiter = RateLimiter::new([2, 0, 0], false, epoch);
        let now = epoch + Duration::from_millis(10_500);
        assert!(limiter.admit("k", "people/match", now).exceeded.is_none());
        assert!(limiter.admit("k", "people/match", now).exceeded.is_none());
        let refused = limiter.admit("k", "people/match", now);
        assert_eq!(
            refused.exceeded,
            Some(Exceeded {
                window: Window::Minute,
                limit: 2,
                retry_after_secs: 50
            })
        );
        // A refused call does not count, other keys and endpoints have their own counters.
        assert_eq!(refused.used[0], 2);
        assert!(limiter
            .admit("other", "people/match", now)
            .exceeded
            .is_none());
        assert!(limiter
            .admit("k", "people/bulk_match", now)
            .exceeded
            .is_none());
        // The next minute starts afresh.
        let later = epoch + Duration::from_secs(60);
        let status = limiter.admit("k", "people/match", later);
        assert!(status.exceeded.is_none());
        assert_eq!(status.used[0], 1);
    }

    #[test]
    fn the_longest_full_window_sets_retry_after() {
        let epoch = Instant::now();
        let mut limiter = RateLimiter::new([5, 1, 0], false, epoch);
        limiter.admit("k", "e", epoch);
        let exceeded = limiter
            .admit("k", "e", epoch + Duration::from_secs(600))
            .exceeded;
        assert_eq!(
            exceeded,
            Some(Exceeded {
                window: Window::Hour,
                limit: 1,
                retry_after_secs: 3_000
            })
        );
    }

    #[test]
    fn writes_apollo_headers() {
        let epoch = Instant::now();
        let mut limiter = RateLimiter::new([1_000, 6_000, 0], false, epoch);
        limiter.admit("k", "e", epoch);
        let mut headers = HeaderMap::new();
        limiter.admit("k", "e", epoch).write_headers(&mut headers);
        assert_eq!(header(&headers, "x-rate-limit-minute"), Some("1000"));
        assert_eq!(header(&headers, "x-minute-usage"), Some("2"));
        assert_eq!(header(&headers, "x-minute-requests-left"), Some("998"));
        assert_eq!(header(&headers, "x-rate-limit-hourly"), Some("6000"));
        assert_eq!(header(&headers, "x-hourly-requests-left"), Some("5998"));
        // Unlimited: an empty limit and no usage.
        assert_eq!(header(&headers, "x-rate-limit-24-hour"), Some(""));
        assert_eq!(header(&headers, "x-24-hour-usage"), None);
        assert_eq!(header(&headers, "x-24-hour-requests-left"), None);
        assert_eq!(headers.len(), 7);
    }

    #[test]
    fn legacy_accounts_spell_the_day_window_daily() {
        let epoch = Instant::now();
        let mut limiter = RateLimiter::new([0, 0, 50_000], true, epoch);
        let mut headers = HeaderMap::new();
        limiter.admit("k", "e", epoch).write_headers(&mut headers);
        assert_eq!(header(&headers, "x-rate-limit-daily"), Some("50000"));
        assert_eq!(header(&headers, "x-daily-usage"), Some("1"));
        assert_eq!(header(&headers, "x-daily-requests-left"), Some("49999"));
        assert_eq!(header(&headers, "x-rate-limit-minute"), Some(""));
        assert!(headers
            .keys()
            .all(|name| !name.as_str().contains("24-hour")));
    }
}
