//! Path patterns: `people/{id}` under a prefix such as `/api/v1`.
//!
//! Patterns are split into segments once, when the catalog loads; matching a request path then
//! walks the path's segments without allocating.

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matches exactly this text.
    Literal(String),
    /// `{name}`: matches any one non-empty segment.
    Param,
}

/// A compiled path pattern, possibly joined to a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pattern {
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses a pattern relative to the prefixes: `people/match`, `organizations/{id}/jobs`.
    pub(super) fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("a path pattern must not be empty".to_owned());
        }
        if text.starts_with('/') || text.ends_with('/') {
            return Err(format!(
                "path pattern `{text}` must not start or end with `/` \
                 (it is relative to the prefixes; write `{}`)",
                text.trim_matches('/')
            ));
        }
        text.split('/')
            .map(Self::segment)
            .collect::<Result<_, _>>()
            .map(|segments| Pattern { segments })
    }

    /// Parses a mount prefix: `""` (host root) or literal segments such as `/api/v1`.
    pub(super) fn prefix(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Ok(Pattern {
                segments: Vec::new(),
            });
        }
        let Some(rest) = (text.strip_prefix('/')).filter(|r| !r.is_empty() && !r.ends_with('/'))
        else {
            return Err(format!(
                "prefix `{text}` must start with `/` and not end with one \
                 (or be \"\" for the host root)"
            ));
        };
        let pattern = Pattern::parse(rest)?;
        if pattern.segments.contains(&Segment::Param) {
            return Err(format!(
                "prefix `{text}` must not contain `{{…}}` parameters"
            ));
        }
        Ok(pattern)
    }

    fn segment(text: &str) -> Result<Segment, String> {
        let param = text.strip_prefix('{').and_then(|t| t.strip_suffix('}'));
        match param {
            Some(name) if !name.is_empty() && name.bytes().all(is_name_byte) => Ok(Segment::Param),
            Some(_) => Err(format!(
                "parameter `{text}` needs a name of letters, digits and `_`, like `{{id}}`"
            )),
            None if text.is_empty() => {
                Err("a path pattern must not contain an empty segment (`//`)".to_owned())
            }
            None if text.contains(['{', '}', '?', '#', '*']) => Err(format!(
                "segment `{text}` must be literal text or a whole `{{name}}` parameter"
            )),
            None => Ok(Segment::Literal(text.to_owned())),
        }
    }

    /// This pattern mounted under `prefix`.
    pub(super) fn under(&self, prefix: &Pattern) -> Pattern {
        Pattern {
            segments: prefix
                .segments
                .iter()
                .chain(&self.segments)
                .cloned()
                .collect(),
        }
    }

    /// How many segments are literal text: the more, the more specific the pattern.
    pub(super) fn literals(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// Whether `path` (as normalised by [`segments`]) matches, segment for segment.
    pub(super) fn matches<'p>(&self, mut path: impl Iterator<Item = &'p str>) -> bool {
        self.segments
            .iter()
            .all(|segment| match (segment, path.next()) {
                (Segment::Literal(text), Some(s)) => text == s,
                (Segment::Param, Some(s)) => !s.is_empty(),
                (_, None) => false,
            })
            && path.next().is_none()
    }
}

/// The segments of a request path: one leading and one trailing `/` are ignored, so
/// `/v1/people/match/` gives `v1`, `people`, `match`. The root path gives no segments.
pub(super) fn segments(path: &str) -> impl Iterator<Item = &str> + Clone {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    // `"".split('/')` yields one empty segment; the root must yield none.
    path.split('/').filter(move |_| !path.is_empty())
}

/// The canonical form of a request path, the form creditmeter classifies, records and forwards:
/// what Apollo's Rails router makes of it, written so that any further normalisation upstream
/// cannot change it.
///
/// - Repeated slashes collapse (`//api/v1//people/match` is `/api/v1/people/match`), as Rails'
///   `Journey::Router::Utils.normalize_path` squeezes them.
/// - Percent-encoded unreserved characters (ALPHA, DIGIT, `-`, `.`, `_`, `~`; RFC 3986 §2.3)
///   are decoded (`%70eople` is `people`), and the hex digits of every other escape are
///   upper-cased (`%2f` is `%2F`): both are equivalences (RFC 3986 §6.2.2.1–2). An escaped
///   reserved character such as `%2F` is never decoded, so `people%2Fmatch` stays one segment.
/// - Dot segments are removed (`/api/v1/./people/x/../match`; RFC 3986 §5.2.4), including
///   ones spelled `%2E`.
/// - A trailing slash is kept as sent (at most one); the router ignores it.
///
/// Returns the input unchanged (borrowed) when it is already canonical, which is the usual case.
/// The result is a fixed point: canonicalising it again changes nothing (a decoded byte can
/// complete a new escape, as in `%%34%31`, so the rewrite repeats until nothing changes; each
/// round that changes something shortens the path or upper-cases an escape, so it ends).
pub fn canonical_path(path: &str) -> std::borrow::Cow<'_, str> {
    if is_canonical(path) {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut current = canonical_once(path);
    while !is_canonical(&current) {
        let next = canonical_once(&current);
        if next == current {
            break;
        }
        current = next;
    }
    std::borrow::Cow::Owned(current)
}

/// One round of [`canonical_path`]'s rewrite.
fn canonical_once(path: &str) -> String {
    let mut segments: Vec<String> = Vec::new();
    let raw: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut trailing = path.ends_with('/');
    for (i, segment) in raw.iter().enumerate() {
        let segment = normalise_escapes(segment);
        let last = i + 1 == raw.len();
        match segment.as_str() {
            "." => trailing |= last,
            ".." => {
                segments.pop();
                trailing |= last;
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// True when [`canonical_path`] would return `path` as it is: it starts with `/`, has no empty
/// segment except one trailing, no `%` escape to rewrite and no dot segment.
fn is_canonical(path: &str) -> bool {
    if path.contains("//") {
        return false;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return true;
    }
    rest.split('/').all(|segment| {
        !segment.is_empty() && segment != "." && segment != ".." && !needs_escape_work(segment)
    })
}

/// Whether a segment holds an escape that [`normalise_escapes`] would change.
fn needs_escape_work(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&h), Some(&l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                    h.is_ascii_lowercase() || l.is_ascii_lowercase() || is_unreserved(hex(h, l))
                }
                _ => false,
            }
    })
}

/// Decodes escaped unreserved characters and upper-cases the hex of the other escapes. A `%`
/// not followed by two hex digits is left as it is (the upstream answers such a path itself).
fn normalise_escapes(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            if let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) {
                if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() {
                    let decoded = hex(h, l);
                    if is_unreserved(decoded) {
                        out.push(char::from(decoded));
                    } else {
                        out.push('%');
                        out.push(char::from(h.to_ascii_uppercase()));
                        out.push(char::from(l.to_ascii_uppercase()));
                    }
                    i += 3;
                    continue;
                }
            }
        }
        // Every other byte is copied as it is: the path is valid UTF-8 and multi-byte
        // sequences never contain `%`.
        let len = utf8_len(b);
        out.push_str(segment.get(i..i + len).unwrap_or(""));
        i += len;
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

fn hex(high: u8, low: u8) -> u8 {
    let value = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b.wrapping_sub(b'A').wrapping_add(10),
    };
    value(high) << 4 | value(low)
}

/// RFC 3986 §2.3: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, prefix: &str, path: &str) -> bool {
        match (Pattern::parse(pattern), Pattern::prefix(prefix)) {
            (Ok(pattern), Ok(prefix)) => pattern.under(&prefix).matches(segments(path)),
            _ => false,
        }
    }

    #[test]
    fn literal_and_parameter_segments() {
        assert!(matches("people/match", "/api/v1", "/api/v1/people/match"));
        assert!(matches("people/{id}", "/v1", "/v1/people/5f2a"));
        assert!(matches(
            "organizations/{id}/job_postings",
            "",
            "/organizations/abc/job_postings"
        ));
        assert!(!matches("people/{id}", "/v1", "/v1/people"));
        assert!(!matches("people/{id}", "/v1", "/v1/people/a/b"));
        assert!(!matches("people/{id}", "/v1", "/v1/people//"));
        assert!(!matches("people/match", "/v1", "/api/v1/people/match"));
        assert!(!matches("people/match", "", "/v1/people/match"));
        assert!(!matches("people/match", "/v1", "/v1/People/match"));
    }

    #[test]
    fn one_trailing_slash_is_tolerated() {
        assert!(matches("people/match", "/v1", "/v1/people/match/"));
        assert!(matches("people/match", "/v1", "v1/people/match"));
        assert!(!matches("people/match", "/v1", "/v1/people/match//"));
        assert!(!matches("people/match", "/v1", "//v1/people/match"));
    }

    #[test]
    fn canonical_paths_collapse_slashes_and_decode_unreserved_escapes() {
        for (raw, canonical) in [
            ("/api/v1/people/match", "/api/v1/people/match"),
            ("//api/v1/people/match", "/api/v1/people/match"),
            ("/api//v1///people/match", "/api/v1/people/match"),
            ("/api/v1/people/match/", "/api/v1/people/match/"),
            ("/api/v1/people/match//", "/api/v1/people/match/"),
            ("/api/v1/%70eople/match", "/api/v1/people/match"),
            ("/api/v1/%50eople/%6d%61tch", "/api/v1/People/match"),
            ("/api/v1/a%2Db%2E%5F%7E", "/api/v1/a-b._~"),
            ("/api/v1/people%2Fmatch", "/api/v1/people%2Fmatch"),
            ("/api/v1/people%2fmatch", "/api/v1/people%2Fmatch"),
            ("/api/v1/caf%c3%a9", "/api/v1/caf%C3%A9"),
            ("/api/v1/100%", "/api/v1/100%"),
            ("/api/v1/%zz/%4", "/api/v1/%zz/%4"),
            ("/api/v1/./people/x/../match", "/api/v1/people/match"),
            ("/api/v1/people/%2E%2E/people/match", "/api/v1/people/match"),
            ("/api/v1/people/..", "/api/v1/"),
            ("/../../x", "/x"),
            ("/", "/"),
            ("", "/"),
            ("//", "/"),
            ("/é/ü", "/é/ü"),
            // A decoded byte completing a new escape: decoded too, so the result is stable.
            ("/%%34%31", "/A"),
            ("/%%32%66", "/%2F"),
        ] {
            assert_eq!(canonical_path(raw), canonical, "{raw:?}");
            // Canonical is a fixed point.
            assert_eq!(canonical_path(canonical), canonical, "{canonical:?}");
        }
        assert!(matches!(
            canonical_path("/api/v1/people/match"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn root_path_has_no_segments() {
        assert_eq!(segments("/").count(), 0);
        assert_eq!(segments("").count(), 0);
        assert_eq!(segments("/a/").collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn literal_count_ranks_specificity() {
        let count = |p: &str| Pattern::parse(p).map(|p| p.literals()).unwrap_or(0);
        assert_eq!(count("people/match"), 2);
        assert_eq!(count("people/{id}"), 1);
        assert_eq!(count("organizations/{id}/job_postings"), 2);
    }

    #[test]
    fn bad_patterns_are_rejected_with_a_reason() {
        for (bad, reason) in [
            ("", "must not be empty"),
            ("/people/match", "write `people/match`"),
            ("people/", "must not start or end"),
            ("people//match", "empty segment"),
            ("people/{}", "needs a name"),
            ("people/{id-x}", "needs a name"),
            ("people/x{id}", "whole `{name}`"),
            ("people/*", "whole `{name}`"),
        ] {
            let err = Pattern::parse(bad).err().unwrap_or_default();
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
        for bad in ["/", "v1", "/v1/", "/{v}", "/a//b"] {
            assert!(Pattern::prefix(bad).is_err(), "{bad:?} accepted");
        }
    }
}
