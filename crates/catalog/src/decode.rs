//! Undoing `Content-Encoding` on a captured response body.
//!
//! The proxy forwards Apollo's bytes untouched and keeps a capped copy; pricing needs the JSON
//! inside, so this module turns that copy back into plain bytes. Every stage of decoding is
//! bounded by `max_decoded`, so a small compressed body cannot expand into gigabytes.

use std::borrow::Cow;
use std::io::{self, Read};

use creditmeter_base::ByteSize;
use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

/// Buffer size handed to the brotli decompressor, in bytes.
const BROTLI_BUFFER_BYTES: usize = 4096;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A coding this module does not know, named as the header gave it.
    #[error("unsupported content-encoding `{0}`")]
    Unsupported(String),
    /// The bytes are not valid for the named coding (corrupt or cut short).
    #[error("{coding} decode failed")]
    Corrupt {
        /// `gzip`, `deflate` or `br`.
        coding: &'static str,
        /// What the decompressor reported.
        #[source]
        source: io::Error,
    },
    /// Decoding produced more than the cap allows (a decompression bomb, or just a huge body).
    #[error("decoded body exceeds {} cap", ByteSize(*limit as u64).spaced())]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
}

/// The codings this module can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
}

impl Coding {
    fn parse(token: &str) -> Result<Coding, DecodeError> {
        const NAMES: [(&str, Coding); 5] = [
            ("identity", Coding::Identity),
            ("gzip", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
            ("deflate", Coding::Deflate),
            ("br", Coding::Brotli),
        ];
        NAMES
            .iter()
            .find(|(name, _)| token.eq_ignore_ascii_case(name))
            .map(|&(_, coding)| coding)
            .ok_or_else(|| DecodeError::Unsupported(token.to_owned()))
    }
}

/// Decodes `body` according to a raw `Content-Encoding` header value.
///
/// Codings listed as `"gzip, br"` were applied in that order, so they are undone in reverse.
/// `None`, an empty header and `identity` leave the bytes as they are (borrowed, no copy).
/// Deflate is taken as zlib-wrapped (what RFC 9110 means) and, if that fails, as raw deflate
/// (what some servers send). Each stage may produce at most `max_decoded` bytes.
///
/// # Errors
/// An unknown coding, bytes that are not valid for their coding (including a stream cut
/// short), or output beyond `max_decoded`.
pub fn decode_body<'a>(
    content_encoding: Option<&str>,
    body: &'a [u8],
    max_decoded: usize,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    let header = content_encoding.unwrap_or("");
    // Parse every token before decoding anything: an unknown coding anywhere means the bytes
    // cannot be read, and there is no point spending CPU on the other stages first.
    let codings = header
        .split(',')
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .map(Coding::parse)
        .collect::<Result<Vec<_>, _>>()?;

    let mut data = Cow::Borrowed(body);
    for coding in codings.into_iter().rev() {
        data = match coding {
            Coding::Identity => data,
            Coding::Gzip => Cow::Owned(read_capped(
                MultiGzDecoder::new(&*data),
                "gzip",
                max_decoded,
                data.len(),
            )?),
            Coding::Deflate => Cow::Owned(inflate(&data, max_decoded)?),
            Coding::Brotli => Cow::Owned(read_capped(
                brotli::Decompressor::new(&*data, BROTLI_BUFFER_BYTES),
                "br",
                max_decoded,
                data.len(),
            )?),
        };
    }
    if data.len() > max_decoded {
        return Err(DecodeError::TooLarge { limit: max_decoded });
    }
    Ok(data)
}

/// Inflates zlib-wrapped deflate, falling back to raw deflate.
fn inflate(data: &[u8], max_decoded: usize) -> Result<Vec<u8>, DecodeError> {
    match read_capped(ZlibDecoder::new(data), "deflate", max_decoded, data.len()) {
        Err(DecodeError::Corrupt { source, .. }) => {
            // Report the zlib error if raw deflate is corrupt too: zlib is what the header
            // promised. A raw stream that outgrows the cap is reported as too large.
            match read_capped(
                DeflateDecoder::new(data),
                "deflate",
                max_decoded,
                data.len(),
            ) {
                Err(DecodeError::Corrupt { .. }) => Err(DecodeError::Corrupt {
                    coding: "deflate",
                    source,
                }),
                other => other,
            }
        }
        other => other,
    }
}

/// Reads `reader` to the end, failing once it yields more than `max` bytes. The output starts
/// at a few times the `encoded` size (JSON compresses 5-10×), so a 250 KB answer is not
/// copied through a chain of doubling buffers.
fn read_capped(
    reader: impl Read,
    coding: &'static str,
    max: usize,
    encoded: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(encoded.saturating_mul(6).min(max));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|source| DecodeError::Corrupt { coding, source })?;
    if out.len() > max {
        return Err(DecodeError::TooLarge { limit: max });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::super::testutil::{brotli, gzip, raw_deflate, zlib};
    use super::*;

    const CAP: usize = 1 << 20;
    const JSON: &[u8] = br#"{"person":{"id":"p1"}}"#;

    type TestResult = Result<(), Box<dyn Error>>;

    #[test]
    fn identity_and_absent_borrow_the_input() -> TestResult {
        for header in [None, Some(""), Some("identity"), Some(" Identity , ")] {
            let out = decode_body(header, JSON, CAP)?;
            assert!(
                matches!(out, Cow::Borrowed(_)),
                "{header:?} copied the body"
            );
            assert_eq!(&*out, JSON);
        }
        Ok(())
    }

    #[test]
    fn gzip_deflate_and_brotli_decode() -> TestResult {
        assert_eq!(&*decode_body(Some("gzip"), &gzip(JSON)?, CAP)?, JSON);
        assert_eq!(&*decode_body(Some("X-GZIP"), &gzip(JSON)?, CAP)?, JSON);
        assert_eq!(&*decode_body(Some("deflate"), &zlib(JSON)?, CAP)?, JSON);
        assert_eq!(
            &*decode_body(Some("deflate"), &raw_deflate(JSON)?, CAP)?,
            JSON
        );
        assert_eq!(&*decode_body(Some("br"), &brotli(JSON)?, CAP)?, JSON);
        Ok(())
    }

    #[test]
    fn concatenated_gzip_members_are_all_read() -> TestResult {
        let mut body = gzip(b"{\"a\":")?;
        body.extend(gzip(b"1}")?);
        assert_eq!(&*decode_body(Some("gzip"), &body, CAP)?, b"{\"a\":1}");
        Ok(())
    }

    #[test]
    fn stacked_codings_are_undone_in_reverse_order() -> TestResult {
        // "gzip, br": gzip was applied first, then br.
        let body = brotli(&gzip(JSON)?)?;
        assert_eq!(&*decode_body(Some("gzip, br"), &body, CAP)?, JSON);
        assert!(decode_body(Some("br, gzip"), &body, CAP).is_err());
        Ok(())
    }

    #[test]
    fn unknown_coding_is_named() {
        let err = decode_body(Some("gzip, zstd"), b"", CAP).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("unsupported content-encoding `zstd`")
        );
        let garbage = decode_body(Some("\u{1}%%"), JSON, CAP);
        assert!(matches!(garbage, Err(DecodeError::Unsupported(_))));
    }

    #[test]
    fn gzip_bomb_stops_at_the_cap() -> TestResult {
        let bomb = gzip(&vec![b' '; 8 << 20])?;
        assert!(
            bomb.len() < 64 << 10,
            "the bomb should be small on the wire"
        );
        let err = decode_body(Some("gzip"), &bomb, 1 << 20).err();
        assert!(matches!(err, Some(DecodeError::TooLarge { limit }) if limit == 1 << 20));
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("decoded body exceeds 1 MiB cap")
        );
        Ok(())
    }

    #[test]
    fn a_raw_deflate_bomb_is_reported_as_too_large() -> TestResult {
        let bomb = raw_deflate(&vec![b' '; 4 << 20])?;
        let err = decode_body(Some("deflate"), &bomb, 1 << 20).err();
        assert!(
            matches!(err, Some(DecodeError::TooLarge { limit }) if limit == 1 << 20),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn a_body_exactly_at_the_cap_is_accepted() -> TestResult {
        let data = vec![b'x'; 1000];
        assert_eq!(decode_body(Some("br"), &brotli(&data)?, 1000)?.len(), 1000);
        assert!(decode_body(Some("br"), &brotli(&data)?, 999).is_err());
        assert!(decode_body(None, &data, 999).is_err());
        Ok(())
    }

    #[test]
    fn truncated_and_corrupt_streams_fail_cleanly() -> TestResult {
        let full = gzip(JSON)?;
        let cut = &full[..full.len() / 2];
        let err = decode_body(Some("gzip"), cut, CAP).err();
        assert!(matches!(
            err,
            Some(DecodeError::Corrupt { coding: "gzip", .. })
        ));

        let br = brotli(JSON)?;
        let err = decode_body(Some("br"), &br[..br.len() - 2], CAP).err();
        assert!(matches!(
            err,
            Some(DecodeError::Corrupt { coding: "br", .. })
        ));

        let err = decode_body(Some("deflate"), b"\x78\x9c not deflate", CAP).err();
        assert!(matches!(
            err,
            Some(DecodeError::Corrupt {
                coding: "deflate",
                ..
            })
        ));
        assert!(decode_body(Some("gzip"), JSON, CAP).is_err());
        Ok(())
    }

    #[test]
    fn byte_sizes_print_in_binary_units() {
        assert_eq!(ByteSize(64 << 20).spaced().to_string(), "64 MiB");
        assert_eq!(ByteSize(2 << 30).spaced().to_string(), "2 GiB");
        assert_eq!(ByteSize(4096).spaced().to_string(), "4 KiB");
        assert_eq!(ByteSize(1000).spaced().to_string(), "1000 bytes");
        assert_eq!(ByteSize(0).spaced().to_string(), "0 bytes");
    }
}
