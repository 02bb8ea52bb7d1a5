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
