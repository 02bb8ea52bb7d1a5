//! Budget windows in time: the calendar window (hour, day, week, month in a time zone) that
//! contains an instant, and the buckets a rolling window forgets its spend in.
//!
//! All instants are unix milliseconds, UTC. Calendar arithmetic is done by jiff in the zone's
//! own rules (daylight-saving days are 23 or 25 hours long; a day starts at the first instant
//! of its date even when midnight falls in a gap).

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, ZonedDateTime};

use super::config::WindowSpec;

/// `[start, end)` in unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: i64,
    pub end: i64,
}

/// The calendar window of kind `spec` in `tz` that contains `t_ms`. `None` for rolling windows,
/// or for instants outside the calendar jiff supports (years -9999..9999).
pub fn calendar_bounds(spec: WindowSpec, tz: &TimeZone, t_ms: i64) -> Option<Bounds> {
    let zdt = Timestamp::from_millisecond(t_ms)
        .ok()?
        .to_zoned_datetime(tz.clone());
    let (start, end) = match spec {
        WindowSpec::Rolling(_) => return None,
        WindowSpec::Hour => {
            // Local wall-clock hours at the offset in force: the repeated hour of a fall-back
            // transition is two windows, each a real hour long.
            let into = (i64::from(zdt.minute()) * 60 + i64::from(zdt.second())) * 1000
                + i64::from(zdt.millisecond());
            let start = t_ms - into;
            return Some(Bounds {
                start,
                end: start + 3_600_000,
            });
        }
        WindowSpec::Day => {
            let d = zdt.date();
            (day_start(d, tz)?, day_start(d.tomorrow().ok()?, tz)?)
        }
        WindowSpec::Week => {
            let d = zdt.date();
            let monday = d
                .checked_sub(i64::from(d.weekday().to_monday_zero_offset()).days())
                .ok()?;
            (
                day_start(monday, tz)?,
                day_start(monday.checked_add(7.days()).ok()?, tz)?,
            )
        }
        WindowSpec::Month => {
            let first = zdt.date().first_of_month();
            (
                day_start(first, tz)?,
                day_start(first.checked_add(1.month()).ok()?, tz)?,
            )
        }
    };
    Some(Bounds {
        start: start.timestamp().as_millisecond(),
        end: end.timestamp().as_millisecond(),
    })
}

/// The first instant of `date` in `tz`.
fn day_start(date: Date, tz: &TimeZone) -> Option<ZonedDateTime> {
    date.to_zoned_datetime(tz.clone()).ok()?.start_of_day().ok()
}

/// RFC 3339 with the zone's offset at that instant, e.g. `2026-03-29T00:00:00+01:00`.
pub fn format_local(t_ms: i64, tz: &TimeZone) -> String {
    match Timestamp::from_millisecond(t_ms) {
        Ok(ts) => {
            let offset = tz.to_offset(ts);
            ts.display_with_offset(offset).to_string()
        }
        Err(_) => t_ms.to_string(),
    }
}

/// Width of the buckets a rolling window of `window_ms` forgets spend in: 1/512 of the window,
/// at least a second. Spend is forgotten only once its whole bucket has left the window, so the
/// counted spend is never less than the true spend in the window.
pub fn bucket_ms(window_ms: i64) -> i64 {
    (window_ms / 512).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    #[test]
    fn days_follow_the_zone_and_its_daylight_saving() {
        // Berlin springs forward on 2026-03-29: a 23-hour day.
        let b = calendar_bounds(
            WindowSpec::Day,
            &tz("Europe/Berlin"),
            ms("2026-03-29T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(b.start, ms("2026-03-28T23:00:00Z"));
        assert_eq!(b.end, ms("2026-03-29T22:00:00Z"));
        // New York falls back on 2026-11-01: a 25-hour day.
        let b = calendar_bounds(
            WindowSpec::Day,
            &tz("America/New_York"),
            ms("2026-11-01T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(b.end - b.start, 25 * 3_600_000);
        // 23:30 in New York is already the next day in UTC, but the same local day.
        let b = calendar_bounds(
            WindowSpec::Day,
            &tz("America/New_York"),
            ms("2026-06-16T03:30:00Z"),
        )
        .unwrap();
        assert_eq!(b.start, ms("2026-06-15T04:00:00Z"));
        assert_eq!(b.end, ms("2026-06-16T04:00:00Z"));
    }

    #[test]
    fn weeks_start_monday_and_months_on_the_first() {
        let utc = tz("UTC");
        // 2026-01-01 is a Thursday.
        let w = calendar_bounds(WindowSpec::Week, &utc, ms("2026-01-01T10:00:00Z")).unwrap();
        assert_eq!(w.start, ms("2025-12-29T00:00:00Z"));
        assert_eq!(w.end, ms("2026-01-05T00:00:00Z"));
        let m = calendar_bounds(
            WindowSpec::Month,
            &tz("Asia/Tokyo"),
            ms("2026-02-28T16:00:00Z"),
        )
        .unwrap();
        // Already March 1st, 01:00 in Tokyo.
        assert_eq!(m.start, ms("2026-02-28T15:00:00Z"));
        assert_eq!(m.end, ms("2026-03-31T15:00:00Z"));
    }

    #[test]
    fn hours_align_to_local_wall_clock() {
        // India is UTC+05:30: local hours start at :30 UTC.
        let h = calendar_bounds(
            WindowSpec::Hour,
            &tz("Asia/Kolkata"),
            ms("2026-05-01T10:10:00.250Z"),
        )
        .unwrap();
        assert_eq!(h.start, ms("2026-05-01T09:30:00Z"));
        assert_eq!(h.end, ms("2026-05-01T10:30:00Z"));
    }

    #[test]
    fn local_format_carries_the_offset() {
        assert_eq!(
            format_local(ms("2026-03-29T22:00:00Z"), &tz("Europe/Berlin")),
            "2026-03-30T00:00:00+02:00"
        );
        assert_eq!(bucket_ms(86_400_000), 168_750);
        assert_eq!(bucket_ms(60_000), 1000);
    }
}
