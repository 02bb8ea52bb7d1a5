//! Decoding of form- and URL-encoded components (`%XX` and `+`), shared by the catalog's
//! parameter reader and attribution's query parameters.

use std::borrow::Cow;

/// The bytes a form-encoded component stands for: `%XX` escapes and `+` decoded, a `%` not
/// followed by two hex digits kept as is. Callers decide how strict to be about UTF-8.
pub fn percent_decode_bytes(text: &str) -> Cow<'_, [u8]> {
    if !text.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(text.as_bytes());
    }
    let mut bytes = text.bytes();
    let mut out = Vec::with_capacity(text.len());
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let mut ahead = bytes.clone();
                match (
                    ahead.next().and_then(hex_value),
                    ahead.next().and_then(hex_value),
                ) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        bytes = ahead;
                    }
                    _ => out.push(b'%'),
                }
            }
            _ => out.push(b),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The text a form-encoded component stands for; bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode_lossy(text: &str) -> String {
    match percent_decode_bytes(text) {
        Cow::Borrowed(b) => String::from_utf8_lossy(b).into_owned(),
        Cow::Owned(b) => String::from_utf8_lossy(&b).into_owned(),
    }
}

/// The text a form-encoded component stands for; `None` if it is not UTF-8.
pub fn percent_decode_utf8(text: &str) -> Option<String> {
    String::from_utf8(percent_decode_bytes(text).into_owned()).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus_and_keeps_stray_percents() {
        assert_eq!(percent_decode_lossy("a%20b+c"), "a b c");
        assert_eq!(percent_decode_lossy("100%"), "100%");
        assert_eq!(percent_decode_lossy("%zz"), "%zz");
        assert!(matches!(percent_decode_bytes("plain"), Cow::Borrowed(_)));
        assert_eq!(percent_decode_utf8("%C3%A9"), Some("é".to_owned()));
        assert_eq!(percent_decode_utf8("%FF"), None);
        assert_eq!(percent_decode_lossy("%FF"), "\u{FFFD}");
    }
}
