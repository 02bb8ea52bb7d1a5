//! The identifiers a request carried, normalised so that two spellings of one person or
//! company compare equal: what the waste finder (`report --repeats`) fingerprints.
//!
//! Apollo knowledge, so it lives with the catalog: which parameters name a person (`email`,
//! `linkedin_url`, `id`/`person_id`, a name with a company) and which a company (`domain`,
//! `domains[]`, `organization_id`). Each person or company is one *item*: the top-level
//! parameters of a single match or enrich are item 0; each object of a bulk `details` array
//! and each entry of `domains[]` is one item, numbered from 0 in request order. The values
//! returned here are never stored: the caller turns them into keyed fingerprints.

use serde_json::{Map, Value};

use super::params::RequestParams;

/// Most items read from one request (Apollo's bulk endpoints take 10); a hostile request with
/// thousands of details costs no more than this.
pub const MAX_ITEMS: usize = 100;

/// One normalised identifier of one item of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    /// Which person or company of the request (0 for a single match).
    pub item: u16,
    /// `email`, `hashed_email`, `linkedin_url`, `person_id`, `name+domain`, `domain` or
    /// `organization_id`.
    pub kind: &'static str,
    /// The normalised value (see [`RequestParams::identifiers`]). Never stored.
    pub value: String,
}

impl RequestParams {
    /// The identifiers the request carries, normalised:
    /// - `email`: trimmed and lower-cased (`hashed_email` likewise, as its own kind);
    /// - `linkedin_url`: scheme, `www.` or a country subdomain, query, fragment and trailing
    ///   slash removed, lower-cased: `linkedin.com/in/<slug>` (other LinkedIn paths keep
    ///   their first two segments);
    /// - `person_id` (`id`, `person_id`) and `organization_id`: trimmed, lower-cased;
    /// - `name+domain`: a first and last name (or `name`) with `domain` (or
    ///   `organization_name`), lower-cased with spaces collapsed, as `name@company`;
    /// - `domain`: for an object that names no person, its `domain` (lower-cased, scheme,
    ///   `www.`, port, path and trailing dot removed); each entry of `domains[]`.
    ///
    /// Blank values are skipped. At most [`MAX_ITEMS`] items are read.
    pub fn identifiers(&self) -> Vec<Identifier> {
        let mut out = Vec::new();
        let mut item: u16 = 0;
        let push_object = |obj: &Map<String, Value>, item: &mut u16, out: &mut Vec<Identifier>| {
            let before = out.len();
            object_identifiers(obj, *item, out);
            if out.len() > before {
                *item = item.saturating_add(1);
            }
        };
        let top = self.top_level();
        let details = match top.get("details") {
            Some(Value::Array(items)) => items.as_slice(),
            _ => &[],
        };
        let domains = match top.get("domains") {
            Some(Value::Array(items)) => items.as_slice(),
            Some(v @ Value::String(_)) => std::slice::from_ref(v),
            _ => &[],
        };
        push_object(top, &mut item, &mut out);
        for d in details.iter().take(MAX_ITEMS) {
            if let Value::Object(obj) = d {
                push_object(obj, &mut item, &mut out);
            }
        }
        for d in domains.iter().take(MAX_ITEMS) {
            if usize::from(item) >= MAX_ITEMS {
                break;
            }
            let value = match d {
                Value::String(s) => s.split(',').map(normal_domain).collect::<Vec<_>>(),
                _ => Vec::new(),
            };
            for v in value.into_iter().flatten() {
                out.push(Identifier {
                    item,
                    kind: "domain",
                    value: v,
                });
                item = item.saturating_add(1);
            }
        }
        out
    }
}

/// The identifiers of one object (the top level, or one `details` entry), all as `item`.
fn object_identifiers(obj: &Map<String, Value>, item: u16, out: &mut Vec<Identifier>) {
    let text = |key: &str| -> Option<String> {
        match obj.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut add = |kind: &'static str, value: Option<String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.push(Identifier { item, kind, value });
        }
    };
    let email = text("email").map(|e| e.to_lowercase());
    let hashed = text("hashed_email").map(|e| e.to_lowercase());
    let linkedin = text("linkedin_url").map(|u| normal_linkedin(&u));
    let person_id = text("id")
        .or_else(|| text("person_id"))
        .map(|i| i.to_lowercase());
    let name = match (text("first_name"), text("last_name"), text("name")) {
        (Some(f), Some(l), _) => Some(format!("{f} {l}")),
        (_, _, Some(n)) => Some(n),
        _ => None,
    }
    .map(|n| collapse(&n));
    let domain = text("domain").and_then(|d| normal_domain(&d));
    let company = domain
        .clone()
        .or_else(|| text("organization_name").map(|o| collapse(&o)));
    let person = email.is_some()
        || hashed.is_some()
        || linkedin.is_some()
        || person_id.is_some()
        || name.is_some();
    add("email", email);
    add("hashed_email", hashed);
    add("linkedin_url", linkedin);
    add("person_id", person_id);
    match (name, company) {
        (Some(n), Some(c)) => add("name+domain", Some(format!("{n}@{c}"))),
        _ if !person => {
            add("domain", domain);
            add(
                "organization_id",
                text("organization_id").map(|i| i.to_lowercase()),
            );
        }
        _ => {}
    }
}

/// Lower-cased, whitespace runs as one space, trimmed.
fn collapse(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// `https://www.Acme.com:443/about` → `acme.com`; `None` when nothing is left.
pub fn normal_domain(s: &str) -> Option<String> {
    let s = s.trim().to_lowercase();
    let s = strip_scheme(&s);
    let host = s.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    let host = host.split(':').next().unwrap_or(host);
    let host = host.trim_end_matches('.');
    let host = host.strip_prefix("www.").unwrap_or(host);
    (!host.is_empty()).then(|| host.to_owned())
}

fn strip_scheme(s: &str) -> &str {
    match s.find("://") {
        Some(i) if s[..i].chars().all(|c| c.is_ascii_alphanumeric()) => &s[i + 3..],
        _ => s.strip_prefix("//").unwrap_or(s),
    }
}

/// `https://uk.LinkedIn.com/in/Jane-Doe/?trk=x` → `linkedin.com/in/jane-doe`. A URL that is not
/// on linkedin.com is kept lower-cased without scheme, query, fragment or trailing slash.
pub fn normal_linkedin(s: &str) -> String {
    let lower = s.trim().to_lowercase();
    let rest = strip_scheme(&lower);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.split(':').next().unwrap_or(host);
    let on_linkedin = host == "linkedin.com" || host.ends_with(".linkedin.com");
    let segments: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(|p| {
            String::from_utf8_lossy(&creditmeter_base::percent::percent_decode_bytes(p))
                .to_lowercase()
        })
        .collect();
    if on_linkedin {
        let keep = segments.len().min(2);
        let mut out = String::from("linkedin.com");
        for seg in &segments[..keep] {
            out.push('/');
            out.push_str(seg);
        }
        out
    } else {
        let mut out = host.to_owned();
        for seg in &segments {
            out.push('/');
            out.push_str(seg);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(body: &str) -> Vec<(u16, &'static str, String)> {
        RequestParams::parse(None, body.as_bytes())
            .identifiers()
            .into_iter()
            .map(|i| (i.item, i.kind, i.value))
            .collect()
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            ids(r#"{"email":"  Jane.Doe@Example.COM "}"#),
            [(0, "email", "jane.doe@example.com".to_owned())]
        );
        assert_eq!(
            RequestParams::parse(Some("email=A%40B.com"), b"").identifiers()[0].value,
            "a@b.com"
        );
    }

    #[test]
    fn linkedin_urls_are_canonical() {
        for u in [
            "https://www.linkedin.com/in/Jane-Doe/",
            "http://linkedin.com/in/jane-doe?trk=abc",
            "uk.linkedin.com/in/JANE-DOE#about",
            "www.linkedin.com/in/jane-doe/details/experience/",
            "https://www.linkedin.com/in/jane%2Ddoe",
        ] {
            assert_eq!(normal_linkedin(u), "linkedin.com/in/jane-doe", "{u}");
        }
        assert_eq!(
            normal_linkedin("https://example.com/in/x/"),
            "example.com/in/x"
        );
    }

    #[test]
    fn domains_lose_scheme_www_port_and_path() {
        for d in [
            "acme.com",
            "ACME.com",
            "https://www.acme.com/about",
            "http://acme.com:8080",
            " www.acme.com. ",
        ] {
            assert_eq!(normal_domain(d).as_deref(), Some("acme.com"), "{d}");
        }
        assert_eq!(normal_domain("https://"), None);
    }

    #[test]
    fn a_person_with_a_company_is_name_plus_domain_not_the_company() {
        assert_eq!(
            ids(r#"{"first_name":"Pat ","last_name":"Lee","domain":"www.Acme.com"}"#),
            [(0, "name+domain", "pat lee@acme.com".to_owned())]
        );
        // A company alone is the company.
        assert_eq!(
            RequestParams::parse(Some("domain=https%3A%2F%2Facme.com"), b"").identifiers(),
            [Identifier {
                item: 0,
                kind: "domain",
                value: "acme.com".into()
            }]
        );
    }

    #[test]
    fn bulk_details_and_domains_are_one_item_each() {
        assert_eq!(
            ids(
                r#"{"details":[{"email":"a@x.com","linkedin_url":"linkedin.com/in/a"},null,
                {"id":"P1"},{"first_name":"A"}, {"email":"b@x.com"}]}"#
            ),
            [
                (0, "email", "a@x.com".to_owned()),
                (0, "linkedin_url", "linkedin.com/in/a".to_owned()),
                (1, "person_id", "p1".to_owned()),
                (2, "email", "b@x.com".to_owned()),
            ]
        );
        let p = RequestParams::parse(Some("domains[]=a.com&domains[]=www.B.com"), b"");
        let got: Vec<_> = p
            .identifiers()
            .into_iter()
            .map(|i| (i.item, i.kind, i.value))
            .collect();
        assert_eq!(
            got,
            [
                (0, "domain", "a.com".to_owned()),
                (1, "domain", "b.com".to_owned())
            ]
        );
    }

    #[test]
    fn blank_and_missing_values_give_nothing() {
        assert!(ids(r#"{"email":"  ","page":1}"#).is_empty());
        assert!(ids(r#"{"q_organization_name":"acme"}"#).is_empty());
    }

    #[test]
    fn a_huge_bulk_request_is_capped() {
        let details: Vec<String> = (0..500)
            .map(|i| format!(r#"{{"email":"p{i}@x.com"}}"#))
            .collect();
        let body = format!(r#"{{"details":[{}]}}"#, details.join(","));
        assert_eq!(ids(&body).len(), MAX_ITEMS);
    }
}
