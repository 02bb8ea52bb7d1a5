//! The one size grammar: `"16MiB"`, `"512 KiB"`, `"10MB"`, `"1GiB"`, or a number of bytes.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{text:?} is not a size; write e.g. \"16MiB\", \"512KiB\"")]
    Syntax { text: String },
    #[error("unknown size unit {unit:?} in {text:?}; use B, KiB, MiB, GiB, KB, MB or GB")]
    Unit { unit: String, text: String },
    #[error("{text:?} is out of range")]
    Range { text: String },
}

/// A number of bytes, read and shown in the grammar above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses the human form; the error says what was expected.
    pub fn parse(text: &str) -> Result<u64, SizeError> {
        let s = text.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: u64 = num
            .parse()
            .map_err(|_| SizeError::Syntax { text: s.to_owned() })?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(SizeError::Unit {
                    unit: other.to_owned(),
                    text: s.to_owned(),
                })
            }
        };
        value
            .checked_mul(scale)
            .ok_or_else(|| SizeError::Range { text: s.to_owned() })
    }

    /// The size in the largest binary unit that divides it exactly, with a space, as error
    /// messages show it: "64 MiB", "1000 bytes".
    pub fn spaced(self) -> impl fmt::Display {
        struct Spaced(u64);
        impl fmt::Display for Spaced {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match unit_of(self.0) {
                    Some((size, unit)) => write!(f, "{} {unit}", self.0 / size),
                    None => write!(f, "{} bytes", self.0),
                }
            }
        }
        Spaced(self.0)
    }
}

/// The largest binary unit that divides `b` exactly.
fn unit_of(b: u64) -> Option<(u64, &'static str)> {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .into_iter()
        .find(|(size, _)| b >= *size && b % size == 0)
}

/// As config files write it: "10MiB", "4KiB", "1000B".
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match unit_of(self.0) {
            Some((size, unit)) => write!(f, "{}{unit}", self.0 / size),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_shows_both_ways() {
        assert_eq!(ByteSize::parse("10MB").unwrap(), 10_000_000);
        assert_eq!(ByteSize::parse("16MiB").unwrap(), 16 << 20);
        assert_eq!(ByteSize::parse("512 KiB").unwrap(), 512 << 10);
        assert_eq!(ByteSize::parse("123").unwrap(), 123);
        assert!(matches!(
            ByteSize::parse("10 parsecs"),
            Err(SizeError::Unit { .. })
        ));
        assert!(matches!(
            ByteSize::parse("lots"),
            Err(SizeError::Syntax { .. })
        ));
        assert_eq!(ByteSize(10 << 20).to_string(), "10MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert_eq!(ByteSize(64 << 20).spaced().to_string(), "64 MiB");
        assert_eq!(ByteSize(2 << 30).spaced().to_string(), "2 GiB");
        assert_eq!(ByteSize(0).spaced().to_string(), "0 bytes");
        for b in [1u64, 1000, 4096, 10 << 20, 3 << 30] {
            assert_eq!(ByteSize::parse(&ByteSize(b).to_string()).unwrap(), b);
        }
    }
}
