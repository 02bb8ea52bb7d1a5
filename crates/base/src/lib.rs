//! The leaf of creditmeter's crate graph: small, pure helpers every other crate may use, with
//! one grammar each.
//!
//! - [`time`]: unix milliseconds, RFC 3339 formatting and parsing (jiff), `--since`/`--until`.
//! - [`duration`]: [`HumanDuration`], the one duration grammar for config files and the CLI.
//! - [`size`]: [`ByteSize`], the one size grammar.
//! - [`percent`]: decoding of form/URL-encoded components.
//! - [`constant_time_eq`]: comparing secrets without an early exit.
//!
//! It depends on nothing of creditmeter's and on no I/O crate.

pub mod duration;
pub mod percent;
pub mod size;
pub mod time;

pub use duration::{DurationError, HumanDuration};
pub use size::{ByteSize, SizeError};
pub use time::{format_time, now_ms, parse_time, TimeError};

/// Compares two byte strings (digests, tokens) without an early exit on the first difference.
/// Different lengths compare unequal at once: callers compare fixed-length digests.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }
}
