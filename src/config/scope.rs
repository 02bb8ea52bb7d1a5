//! Scopes: which calls a budget or a hold covers, by table, workflow, key fingerprint and tags,
//! each a glob (`*` any run of characters, `?` one character, `\` escapes the next).
//!
//! A scope with several parts covers calls that match all of them. A part never matches a call
//! that lacks the attribute: `table = "*"` covers every call that names a table, not the
//! unattributed ones; only `"global"` covers everything.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A glob over a string, matched case-sensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: impl Into<String>) -> Glob {
        Glob(pattern.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }
}

/// Iterative glob matching with one backtrack point (linear in practice, no recursion).
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => {
                p += 1;
                t += 1;
                continue;
            }
            Some(b'\\') if p + 1 < pat.len() && pat[p + 1] == text[t] => {
                p += 2;
                t += 1;
                continue;
            }
            Some(b'\\') if p + 1 < pat.len() => {}
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// What a scope is matched against: the attribution of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFacts {
    pub table: Option<String>,
    pub workflow: Option<String>,
    pub key_fp: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// A set of calls; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub table: Option<Glob>,
    pub workflow: Option<Glob>,
    pub key: Option<Glob>,
    /// Tag name (lower-case) → glob over its value.
    pub tags: BTreeMap<String, Glob>,
}

impl Scope {
    /// Every call.
    pub fn global() -> Scope {
        Scope::default()
    }

    pub fn is_global(&self) -> bool {
        self == &Scope::default()
    }

    pub fn matches(&self, call: &CallFacts) -> bool {
        let part = |glob: &Option<Glob>, value: &Option<String>| match glob {
            None => true,
            Some(g) => value.as_deref().is_some_and(|v| g.matches(v)),
        };
        part(&self.table, &call.table)
            && part(&self.workflow, &call.workflow)
            && part(&self.key, &call.key_fp)
            && self
                .tags
                .iter()
                .all(|(name, g)| call.tags.get(name).is_some_and(|v| g.matches(v)))
    }

    /// Rules a deserializer cannot express; the message says how to fix it.
    pub fn validate(&self) -> Result<(), ScopeError> {
        let globs = self
            .table
            .iter()
            .chain(&self.workflow)
            .chain(&self.key)
            .chain(self.tags.values());
        for g in globs {
            if g.0.is_empty() || g.0.len() > 256 {
                return Err(ScopeError::PatternLength);
            }
        }
        if let Some(key) = &self.key {
            // Never a raw key: key_fp is 16 lower-case hex digits.
            if !key
                .0
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c) || c == b'*' || c == b'?')
            {
                return Err(ScopeError::NotAFingerprint(key.0.clone()));
            }
        }
        if self.tags.keys().any(|k| k.is_empty()) {
            return Err(ScopeError::UnnamedTag);
        }
        Ok(())
    }
}

/// Why a scope is refused. The messages say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("every pattern must be 1 to 256 bytes long")]
    PatternLength,
    /// The `key` pattern holds something other than a fingerprint's hex digits and globs.
    #[error("key {0:?} is not a key fingerprint: scopes match `key_fp`, the 16 hex digits shown by `creditmeter report --by key`, never the API key itself")]
    NotAFingerprint(String),
    #[error("a tag needs a name")]
    UnnamedTag,
    /// Not a scope's shape (JSON from the admin API or the ledger's `holds` table).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// `global`, or `table=Inbound*, workflow=enrich, tag.team=growth`.
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_global() {
            return f.write_str("global");
        }
        let mut parts = Vec::new();
        for (name, g) in [
            ("table", &self.table),
            ("workflow", &self.workflow),
            ("key", &self.key),
        ] {
            if let Some(g) = g {
                parts.push(format!("{name}={}", g.0));
            }
        }
        for (name, g) in &self.tags {
            parts.push(format!("tag.{name}={}", g.0));
        }
        f.write_str(&parts.join(", "))
    }
}

/// `"global"`, or `{table, workflow, key, tag: {name: glob}}` with the parts that are set.
impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_global() {
            return s.serialize_str("global");
        }
        let mut m = s.serialize_map(None)?;
        for (name, g) in [
            ("table", &self.table),
            ("workflow", &self.workflow),
            ("key", &self.key),
        ] {
            if let Some(g) = g {
                m.serialize_entry(name, g.as_str())?;
            }
        }
        if !self.tags.is_empty() {
            let tags: BTreeMap<&str, &str> = self
                .tags
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            m.serialize_entry("tag", &tags)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScopeVisitor)
    }
}

struct ScopeVisitor;

const SCOPE_FIELDS: &[&str] = &["table", "workflow", "key", "tag"];

impl<'de> Visitor<'de> for ScopeVisitor {
    type Value = Scope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "\"global\", or a table such as { table = \"Inbound*\" }, { workflow = \"enrich\" }, { key = \"<key_fp>\" } or { tag = { team = \"growth\" } }",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scope, E> {
        match v {
            "global" => Ok(Scope::global()),
            other => Err(E::custom(format!(
                "scope {other:?} is not understood: write \"global\" for every call, or a table such as {{ table = {other:?} }}"
            ))),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scope, A::Error> {
        let mut scope = Scope::default();
        let mut any = false;
        while let Some(key) = map.next_key::<String>()? {
            any = true;
            match key.as_str() {
                "table" => scope.table = Some(Glob::new(map.next_value::<String>()?)),
                "workflow" => scope.workflow = Some(Glob::new(map.next_value::<String>()?)),
                "key" => scope.key = Some(Glob::new(map.next_value::<String>()?)),
                "tag" => {
                    let tags = map.next_value::<BTreeMap<String, String>>()?;
                    if tags.is_empty() {
                        return Err(de::Error::custom(
                            "`tag` is empty: name at least one tag, like tag = { team = \"growth\" }",
                        ));
                    }
                    scope.tags = tags
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), Glob::new(v)))
                        .collect();
                }
                other => return Err(de::Error::unknown_field(other, SCOPE_FIELDS)),
            }
        }
        if !any {
            return Err(de::Error::custom(
                "an empty scope would cover every call: write scope = \"global\" if that is meant",
            ));
        }
        Ok(scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let m = |p: &str, t: &str| Glob::new(p).matches(t);
        assert!(m("Inbound*", "Inbound leads"));
        assert!(m("Inbound*", "Inbound"));
        assert!(!m("Inbound*", "inbound leads"), "case-sensitive");
        assert!(m("*leads", "Inbound leads"));
        assert!(m("*", ""));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("a*b*c", "a-b-x-c"));
        assert!(!m("a*b*c", "a-c-b"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(m("lit\\*", "lit*"));
        assert!(!m("lit\\*", "lit-x"));
        assert!(m("*a*a*a*a*b", &format!("{}b", "a".repeat(50))));
        assert!(!m("*a*a*a*a*b", &"a".repeat(50)));
    }

    fn facts(table: Option<&str>, tags: &[(&str, &str)]) -> CallFacts {
        CallFacts {
            table: table.map(str::to_owned),
            workflow: Some("enrich".into()),
            key_fp: Some("0123456789abcdef".into()),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn scopes_match_every_part_and_never_a_missing_attribute() {
        let s: Scope = toml::from_str::<BTreeMap<String, Scope>>(
            "s = { table = \"In*\", tag = { Team = \"gr*\" } }",
        )
        .unwrap()
        .remove("s")
        .unwrap();
        assert!(s.matches(&facts(Some("Inbound"), &[("team", "growth")])));
        assert!(!s.matches(&facts(Some("Inbound"), &[("team", "sales")])));
        assert!(!s.matches(&facts(Some("Inbound"), &[])));
        assert!(!s.matches(&facts(None, &[("team", "growth")])));
        let any_table = Scope {
            table: Some(Glob::new("*")),
            ..Scope::default()
        };
        assert!(!any_table.matches(&facts(None, &[])));
        assert!(Scope::global().matches(&facts(None, &[])));
        assert_eq!(s.to_string(), "table=In*, tag.team=gr*");
    }

    #[test]
    fn scope_json_round_trips_and_rejects_nonsense() {
        let s: Scope =
            serde_json::from_str(r#"{"table":"A","key":"0123*","tag":{"x":"y"}}"#).unwrap();
        let back: Scope = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(s, back);
        assert_eq!(
            serde_json::to_value(Scope::global()).unwrap(),
            serde_json::json!("global")
        );
        assert!(serde_json::from_str::<Scope>(r#""everything""#).is_err());
        assert!(serde_json::from_str::<Scope>(r#"{}"#).is_err());
        assert!(serde_json::from_str::<Scope>(r#"{"tabel":"A"}"#)
            .unwrap_err()
            .to_string()
            .contains("tabel"));
        let raw_key: Scope = serde_json::from_str(r#"{"key":"sk_live_ABC"}"#).unwrap();
        let err = raw_key.validate().unwrap_err();
        assert!(err.to_string().contains("fingerprint"));
        assert!(matches!(err, ScopeError::NotAFingerprint(k) if k == "sk_live_ABC"));
    }
}
