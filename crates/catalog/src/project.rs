//! Reading only what an endpoint's rules look at.
//!
//! A 64 KB search answer is hundreds of nested objects, but its price depends only on whether a
//! couple of arrays are empty. Building a full `serde_json::Value` of it costs thousands of
//! allocations per call, which profiles showed to be most of the proxy's CPU. A [`Projection`]
//! is compiled once per endpoint from its rules and parses a body into a small `Value` that
//! answers every rule exactly as the full one would:
//!
//! - a field read for its *shape* (`present`, `each`, `nonempty`, record counts) keeps its
//!   JSON kind, an object's or array's emptiness and each array entry's nullness; entries
//!   become `true` or `null`, strings become empty;
//! - an array read `each … unique_by = "k"` keeps each object entry's `k` when it is a string
//!   or a number;
//! - a field read whole (a `reported` figure) is kept whole;
//! - under the catalog's `unmatched` rule, an object a rule asks "is this a match?" (`present`,
//!   and each object entry of an `each` or `nonnull_items` array) keeps the rule's key whole
//!   and, when its other fields hold data, a marker saying so. (With a key repeated inside such
//!   an object, the data test sees every copy where a full parse keeps the last one.)
//! - everything else is skipped without being built.
//!
//! The JSON is still checked in full (syntax, trailing bytes), so a broken body is reported
//! as before. Keys are compared as bytes: like the strings serde_json skips, they are not
//! checked for valid UTF-8 (that check was 2.5% of the proxy's CPU under load).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::rules::has_data;

/// What the rules read of one field, and of the fields under it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Need {
    /// The value whole.
    full: bool,
    /// Its kind, whether it is empty, and its entries' nullness.
    shape: bool,
    /// Keys kept from object entries of an array (`unique_by`).
    entry_keys: Vec<String>,
    /// A rule asks whether it (or each of its entries) is a match, so the `unmatched` rule
    /// applies to it. Fields read only by `nonempty` and `items` skip that work.
    matchable: bool,
    /// Fields under it (dotted paths).
    children: BTreeMap<String, Need>,
}

/// A key the projection keeps under an object that would otherwise look empty. Under the
/// catalog's `unmatched` rule its value is `true` when the object's other fields hold data
/// (see [`has_data`]), which the projection cannot otherwise show.
const NONEMPTY_MARK: &str = "\u{0}";

/// The parts of a response body an endpoint's rules read; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Projection {
    top: Need,
    /// The `unmatched` rule's key: kept whole in every object read for its shape and in every
    /// object entry of such an array, beside whether the object's other fields hold data.
    unmatched_key: Option<String>,
}

impl Projection {
    fn at<'a>(&mut self, path: impl IntoIterator<Item = &'a str>) -> &mut Need {
        path.into_iter().fold(&mut self.top, |need, key| {
            need.children.entry(key.to_owned()).or_default()
        })
    }

    /// The rules read this field's shape.
    pub(super) fn shape<'a>(&mut self, path: impl IntoIterator<Item = &'a str>) {
        self.at(path).shape = true;
    }

    /// The rules read this field's shape and ask whether it, or each entry of it, is a match
    /// (`present`, `each`, `nonnull_items`), which the `unmatched` rule can deny.
    pub(super) fn matched<'a>(&mut self, path: impl IntoIterator<Item = &'a str>) {
        let need = self.at(path);
        need.shape = true;
        need.matchable = true;
    }

    /// The rules read this key of each object entry of this array field.
    pub(super) fn entry_key<'a>(&mut self, path: impl IntoIterator<Item = &'a str>, key: &str) {
        let need = self.at(path);
        need.shape = true;
        if !need.entry_keys.iter().any(|k| k == key) {
            need.entry_keys.push(key.to_owned());
        }
    }

    /// The rules read this field whole.
    pub(super) fn full<'a>(&mut self, path: impl IntoIterator<Item = &'a str>) {
        self.at(path).full = true;
    }

    /// The rules ask of every object they read for its shape (and of every object entry of
    /// such an array) whether it is an `unmatched` one, by this key.
    pub(super) fn unmatched(&mut self, key: &str) {
        self.unmatched_key = Some(key.to_owned());
    }

    /// Parses a JSON document into the value the rules need (see the module docs).
    pub(super) fn parse(&self, json: &[u8]) -> Result<Value, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let (value, _) = Projected {
            need: &self.top,
            mark: self.unmatched_key.as_deref(),
        }
        .deserialize(&mut de)?;
        de.end()?;
        Ok(value)
    }
}

/// Deserializes one value as its [`Need`] says, into the projected value and whether the
/// original is data ([`has_data`]).
#[derive(Clone, Copy)]
struct Projected<'n> {
    need: &'n Need,
    /// The `unmatched` rule's key, if the catalog has one.
    mark: Option<&'n str>,
}

impl<'de> DeserializeSeed<'de> for Projected<'_> {
    type Value = (Value, bool);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(Value, bool), D::Error> {
        if self.need.full {
            let value = Value::deserialize(d)?;
            let data = has_data(&value);
            Ok((value, data))
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Projected<'_> {
    type Value = (Value, bool);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(Value, bool), E> {
        Ok((Value::Bool(v), true))
    }

    fn visit_i64<E>(self, v: i64) -> Result<(Value, bool), E> {
        Ok((Value::from(v), true))
    }

    fn visit_u64<E>(self, v: u64) -> Result<(Value, bool), E> {
        Ok((Value::from(v), true))
    }

    fn visit_f64<E>(self, v: f64) -> Result<(Value, bool), E> {
        Ok((Value::from(v), true))
    }

    fn visit_str<E>(self, v: &str) -> Result<(Value, bool), E> {
        // Only the kind matters: a field read whole never gets here.
        Ok((Value::String(String::new()), !v.is_empty()))
    }

    fn visit_unit<E>(self) -> Result<(Value, bool), E> {
        Ok((Value::Null, false))
    }

    fn visit_none<E>(self) -> Result<(Value, bool), E> {
        Ok((Value::Null, false))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(Value, bool), A::Error> {
        let mut items = Vec::new();
        let mut any = false;
        if self.need.shape {
            let entry = Entry {
                keys: &self.need.entry_keys,
                mark: self.mark.filter(|_| self.need.matchable),
            };
            while let Some(item) = seq.next_element_seed(entry)? {
                items.push(item);
            }
            any = !items.is_empty();
        } else {
            while seq.next_element::<IgnoredAny>()?.is_some() {
                any = true;
            }
        }
        Ok((Value::Array(items), any))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(Value, bool), A::Error> {
        // An object read for its shape may be an `unmatched` one: keep the rule's key whole
        // and learn whether its other fields hold data.
        let probe = self.mark.filter(|_| self.need.shape && self.need.matchable);
        let mut kept = Map::new();
        let mut any = false;
        let mut data = false;
        let key = Key {
            children: &self.need.children,
            mark: probe,
        };
        while let Some(key) = map.next_key_seed(key)? {
            any = true;
            match key {
                KeyKind::Child(name, need) => {
                    let (value, is_data) = map.next_value_seed(Projected {
                        need,
                        mark: self.mark,
                    })?;
                    data |= is_data;
                    kept.insert(name, value);
                }
                KeyKind::Mark(name) => {
                    kept.insert(name, map.next_value::<Value>()?);
                }
                KeyKind::Skip if probe.is_some() => data |= map.next_value_seed(DataProbe)?,
                KeyKind::Skip => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if probe.is_some() && data {
            kept.insert(NONEMPTY_MARK.to_owned(), Value::Bool(true));
        } else if self.need.shape && any && kept.is_empty() {
            kept.insert(NONEMPTY_MARK.to_owned(), Value::Null);
        }
        Ok((Value::Object(kept), any))
    }
}

/// What an object key is to the projection.
enum KeyKind<'n> {
    /// A field it keeps, with what the rules read of it.
    Child(String, &'n Need),
    /// The `unmatched` rule's key, kept whole.
    Mark(String),
    /// Anything else, skipped without being built.
    Skip,
}

/// An object key, classified without allocating for skipped keys.
#[derive(Clone, Copy)]
struct Key<'n> {
    children: &'n BTreeMap<String, Need>,
    mark: Option<&'n str>,
}

impl<'de, 'n> DeserializeSeed<'de> for Key<'n> {
    type Value = KeyKind<'n>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de, 'n> Visitor<'de> for Key<'n> {
    type Value = KeyKind<'n>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        if let Some(mark) = self.mark.filter(|m| m.as_bytes() == v) {
            return Ok(KeyKind::Mark(mark.to_owned()));
        }
        Ok(self
            .children
            .iter()
            .find(|(k, _)| k.as_bytes() == v)
            .map_or(KeyKind::Skip, |(k, need)| KeyKind::Child(k.clone(), need)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.visit_bytes(v.as_bytes())
    }
}

/// Whether a skipped value is data ([`has_data`]), read without being built.
struct DataProbe;

impl<'de> DeserializeSeed<'de> for DataProbe {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataProbe {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(true)
    }

    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(true)
    }

    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(true)
    }

    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(true)
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(!v.is_empty())
    }

    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut any = false;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            any = true;
        }
        Ok(any)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut any = false;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value::<IgnoredAny>()?;
            any = true;
        }
        Ok(any)
    }
}

/// An array entry read for its nullness and, if it is an object, the `unique_by` keys (and,
/// under the `unmatched` rule, its key and whether the entry's other fields hold data).
#[derive(Clone, Copy)]
struct Entry<'k> {
    keys: &'k [String],
    mark: Option<&'k str>,
}

impl<'de> DeserializeSeed<'de> for Entry<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Entry<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Bool(true))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Bool(true))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Bool(true))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Bool(true))
    }

    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Bool(true))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Bool(true))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let key = EntryKey {
            keys: self.keys,
            mark: self.mark,
        };
        if self.keys.is_empty() && self.mark.is_none() {
            while map.next_key_seed(key)?.is_some() {
                map.next_value::<IgnoredAny>()?;
            }
            return Ok(Value::Bool(true));
        }
        let mut kept = Map::new();
        let mut data = false;
        while let Some(key) = map.next_key_seed(key)? {
            match key {
                EntryKeyKind::Mark(name) => {
                    kept.insert(name, map.next_value::<Value>()?);
                }
                EntryKeyKind::Key(name) => {
                    // Only a string or a number identifies an entry; anything else is left out,
                    // which the rule treats the same way (the entry always counts).
                    let value = map.next_value::<Value>()?;
                    data |= has_data(&value);
                    if value.is_string() || value.is_number() {
                        kept.insert(name, value);
                    } else {
                        kept.remove(&name);
                    }
                }
                EntryKeyKind::Skip if self.mark.is_some() => {
                    data |= map.next_value_seed(DataProbe)?;
                }
                EntryKeyKind::Skip => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if self.mark.is_some() && data {
            kept.insert(NONEMPTY_MARK.to_owned(), Value::Bool(true));
        }
        Ok(Value::Object(kept))
    }
}

/// What a key of an array entry is to the projection.
enum EntryKeyKind {
    /// The `unmatched` rule's key, kept whole.
    Mark(String),
    /// One of the `unique_by` keys.
    Key(String),
    Skip,
}

/// A key of an array entry: kept when it is one of the `unique_by` keys or the `unmatched` key.
#[derive(Clone, Copy)]
struct EntryKey<'k> {
    keys: &'k [String],
    mark: Option<&'k str>,
}

impl<'de> DeserializeSeed<'de> for EntryKey<'_> {
    type Value = EntryKeyKind;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<EntryKeyKind, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for EntryKey<'_> {
    type Value = EntryKeyKind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<EntryKeyKind, E> {
        if let Some(mark) = self.mark.filter(|m| m.as_bytes() == v) {
            return Ok(EntryKeyKind::Mark(mark.to_owned()));
        }
        Ok(self
            .keys
            .iter()
            .find(|k| k.as_bytes() == v)
            .map_or(EntryKeyKind::Skip, |k| EntryKeyKind::Key(k.clone())))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<EntryKeyKind, E> {
        self.visit_bytes(v.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn projected(p: &Projection, v: &Value) -> Value {
        p.parse(v.to_string().as_bytes()).unwrap_or(Value::Null)
    }

    #[test]
    fn escaped_keys_match_like_plain_ones() {
        let mut p = Projection::default();
        p.entry_key(["matches"], "id");
        p.full(["credits_consumed"]);
        let body = br#"{"m\u0061tches": [{"\u0069d": "a", "x\"y": 1}, {"id": "b"}],
                        "credits_\u0063onsumed": 2, "ign\u00f6red": {"k": [1]}}"#;
        assert_eq!(
            p.parse(body).unwrap(),
            json!({"matches": [{"id": "a"}, {"id": "b"}], "credits_consumed": 2})
        );
    }

    #[test]
    fn keeps_shapes_entries_keys_and_whole_fields_only() {
        let mut p = Projection::default();
        p.shape(["person"]);
        p.entry_key(["matches"], "id");
        p.full(["credits_consumed"]);
        p.shape(["a", "b"]);
        let body = json!({
            "person": {"name": "Ada", "employment_history": [{"x": 1}]},
            "matches": [null, {"id": "p1", "name": "x"}, {"id": 7}, {"id": [1]}, "s"],
            "credits_consumed": 2.5,
            "a": {"b": [], "c": "skip"},
            "pagination": {"page": 1},
        });
        assert_eq!(
            projected(&p, &body),
            json!({
                "person": {NONEMPTY_MARK: null},
                "matches": [null, {"id": "p1"}, {"id": 7}, {}, true],
                "credits_consumed": 2.5,
                "a": {"b": []},
            })
        );
    }

    #[test]
    fn keeps_kinds_and_emptiness() {
        let mut p = Projection::default();
        for k in ["o", "e", "s", "n", "b", "z", "arr"] {
            p.shape([k]);
        }
        let body = json!({"o": {}, "e": [], "s": "text", "n": 3, "b": false, "z": null, "arr": [[1], {"k": 1}]});
        assert_eq!(
            projected(&p, &body),
            json!({"o": {}, "e": [], "s": "", "n": 3, "b": false, "z": null, "arr": [true, true]})
        );
    }

    #[test]
    fn the_unmatched_key_is_kept_only_where_a_rule_asks_for_a_match() {
        let mut p = Projection::default();
        p.unmatched("match_confidence");
        p.matched(["person"]);
        p.matched(["matches"]);
        p.entry_key(["matches"], "id");
        p.shape(["organizations"]);
        let body = json!({
            "person": {"match_confidence": "low", "name": "", "emails": [], "x": null},
            "matches": [
                {"id": "p1", "match_confidence": "none", "name": "Ada"},
                {"match_confidence": "low", "title": "CTO"},
                {"match_confidence": "low", "title": ""},
                null,
            ],
            "organizations": [{"match_confidence": "none", "name": "Acme"}],
        });
        assert_eq!(
            projected(&p, &body),
            json!({
                "person": {"match_confidence": "low"},
                "matches": [
                    {"id": "p1", "match_confidence": "none", NONEMPTY_MARK: true},
                    {"match_confidence": "low", NONEMPTY_MARK: true},
                    {"match_confidence": "low"},
                    null,
                ],
                "organizations": [true],
            })
        );
    }

    #[test]
    fn a_broken_document_is_still_an_error() {
        let mut p = Projection::default();
        p.shape(["person"]);
        assert!(p.parse(br#"{"person": {"a": 1}, "x": [1, 2"#).is_err());
        assert!(p.parse(br#"{"person": null} trailing"#).is_err());
        assert!(p.parse(br#"{"x": "\ud800 bad escape"#).is_err());
        assert_eq!(p.parse(b"[1, 2]").ok(), Some(json!([])));
    }
}
