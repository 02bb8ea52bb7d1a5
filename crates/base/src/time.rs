//! Time as the ledger keeps it (unix milliseconds, UTC) and as people write it, through jiff.

use jiff::civil::Date;
use jiff::Timestamp;

use crate::duration::HumanDuration;

/// Why a `--since`/`--until` value did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a time: use RFC 3339 (2026-11-24T10:00:00Z), a date (2026-11-24), or a relative span (24h, 7d)")]
pub struct TimeError {
    pub text: String,
}

/// Now, in unix milliseconds.
pub fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

/// Parses `--since`/`--until`: RFC 3339 (`2026-11-24T10:00:00Z`, any offset), a date
/// (`2026-11-24`, UTC midnight), `now`, or a span before `now` in the duration grammar
/// (`90m`, `24h`, `7d`, `2w`).
pub fn parse_time(text: &str, now: i64) -> Result<i64, TimeError> {
    let s = text.trim();
    let err = || TimeError { text: s.to_owned() };
    if s == "now" {
        return Ok(now);
    }
    if let Ok(ts) = s.parse::<Timestamp>() {
        return Ok(ts.as_millisecond());
    }
    if let Ok(date) = s.parse::<Date>() {
        let ts = jiff::tz::TimeZone::UTC
            .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
            .map_err(|_| err())?;
        return Ok(ts.as_millisecond());
    }
    // A bare number is a year or a typo, not "that many seconds ago".
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let ago = HumanDuration::parse(s).map_err(|_| err())?;
    let ago = i64::try_from(ago.as_millis()).map_err(|_| err())?;
    Ok(now.saturating_sub(ago))
}

/// Unix ms → `YYYY-MM-DDTHH:MM:SSZ` (whole seconds, UTC).
pub fn format_time(ms: i64) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        // Outside jiff's range (years -9999..=9999): say so rather than print a wrong date.
        Err(_) => format!("(unix ms {ms})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    #[test]
    fn absolute_forms() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z", NOW).unwrap(), 0);
        assert_eq!(parse_time("1970-01-02", NOW).unwrap(), 86_400_000);
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00", NOW).unwrap(), 0);
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z", NOW).unwrap(), 1_500);
        assert_eq!(
            parse_time("2026-11-24T10:00:00Z", NOW).unwrap(),
            1_795_514_400_000
        );
        assert_eq!(format_time(1_795_514_400_000), "2026-11-24T10:00:00Z");
        assert_eq!(format_time(1_795_514_400_999), "2026-11-24T10:00:00Z");
        assert_eq!(format_time(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn relative_forms_use_the_duration_grammar() {
        assert_eq!(parse_time("now", NOW).unwrap(), NOW);
        assert_eq!(parse_time("90m", NOW).unwrap(), NOW - 5_400_000);
        assert_eq!(parse_time("24h", NOW).unwrap(), NOW - 86_400_000);
        assert_eq!(parse_time("2w", NOW).unwrap(), NOW - 14 * 86_400_000);
        assert!(parse_time("2026", NOW).is_err());
        assert!(parse_time("yesterday", NOW).is_err());
        assert!(parse_time("2026-13-01", NOW).is_err());
    }

    #[test]
    fn round_trips() {
        for ms in [
            0,
            86_399_000,
            951_782_400_000,
            1_795_514_400_000,
            4_102_444_800_000,
        ] {
            assert_eq!(parse_time(&format_time(ms), NOW).unwrap(), ms);
        }
    }
}
