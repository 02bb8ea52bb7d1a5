//! The one duration grammar, for config files and the command line alike.
//!
//! jiff's "friendly" format (`"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, `"2w"`, `"1h 30m"`,
//! `"90 minutes"`) or ISO 8601 (`"PT30S"`), with days as 24 hours and weeks as 7 days; a bare
//! number is seconds (`30`, `"30"`). Months and years are refused: their length depends on the
//! date.

use std::fmt;
use std::time::Duration;

use jiff::{Span, SpanRelativeTo};
use serde::{Deserialize, Deserializer};

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{text:?} is not a duration; write e.g. \"30s\", \"250ms\", \"5m\", \"2h\", \"7d\" or \"2w\"")]
    Syntax { text: String },
    #[error(
        "{text:?}: months and years have no fixed length; write days or weeks (\"30d\", \"4w\")"
    )]
    Calendar { text: String },
    #[error("{text:?} is negative; a duration here must be zero or more")]
    Negative { text: String },
    #[error("{text:?} is out of range")]
    Range { text: String },
}

/// A duration read from config or the command line, in the one grammar above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses the grammar above; the error says what was expected.
    pub fn parse(text: &str) -> Result<Duration, DurationError> {
        let s = text.trim();
        let owned = || s.to_owned();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            let secs: f64 = s
                .parse()
                .map_err(|_| DurationError::Syntax { text: owned() })?;
            return Duration::try_from_secs_f64(secs)
                .map_err(|_| DurationError::Range { text: owned() });
        }
        let span: Span = s
            .parse()
            .map_err(|_| DurationError::Syntax { text: owned() })?;
        if span.get_years() != 0 || span.get_months() != 0 {
            return Err(DurationError::Calendar { text: owned() });
        }
        let signed = span
            .to_duration(SpanRelativeTo::days_are_24_hours())
            .map_err(|_| DurationError::Range { text: owned() })?;
        if signed.is_negative() {
            return Err(DurationError::Negative { text: owned() });
        }
        Duration::try_from(signed).map_err(|_| DurationError::Range { text: owned() })
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HumanDuration::parse(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(HumanDuration(Duration::from_secs(n))),
            Raw::Text(s) => HumanDuration::parse(&s)
                .map(HumanDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar_for_every_unit_people_write() {
        let p = |s| HumanDuration::parse(s).unwrap();
        assert_eq!(p("250ms"), Duration::from_millis(250));
        assert_eq!(p("30s"), Duration::from_secs(30));
        assert_eq!(p("30"), Duration::from_secs(30));
        assert_eq!(p("1.5"), Duration::from_millis(1500));
        assert_eq!(p("5m"), Duration::from_secs(300));
        assert_eq!(p("5min"), Duration::from_secs(300));
        assert_eq!(p("90m"), Duration::from_secs(5400));
        assert_eq!(p("2h"), Duration::from_secs(7200));
        assert_eq!(p("1h 30m"), Duration::from_secs(5400));
        assert_eq!(p("1d"), Duration::from_secs(86_400));
        assert_eq!(p("2w"), Duration::from_secs(14 * 86_400));
        assert_eq!(p("PT20S"), Duration::from_secs(20));
        assert_eq!(p("90 days"), Duration::from_secs(90 * 86_400));
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(matches!(
            HumanDuration::parse("soon"),
            Err(DurationError::Syntax { .. })
        ));
        assert!(matches!(
            HumanDuration::parse("1mo"),
            Err(DurationError::Calendar { .. })
        ));
        assert!(matches!(
            HumanDuration::parse("1y"),
            Err(DurationError::Calendar { .. })
        ));
        assert!(matches!(
            HumanDuration::parse("-5s"),
            Err(DurationError::Negative { .. })
        ));
        assert!(HumanDuration::parse("").is_err());
        let msg = HumanDuration::parse("soon").unwrap_err().to_string();
        assert!(msg.contains("\"soon\"") && msg.contains("30s"), "{msg}");
    }
}
