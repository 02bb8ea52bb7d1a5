//! Property tests for the parts of the catalog that read bytes a caller or Apollo chose: the
//! path matcher, request parameters (query strings with Rails keys, JSON bodies) and response
//! decoding. Each property runs over generated inputs, hostile ones included, and checks what
//! must hold for every input: no panic, determinism, bounds, and agreement with a plain
//! reference model or a round trip.
//!
//! Why proptest and not `cargo fuzz`: cargo-fuzz needs a nightly toolchain (libFuzzer and
//! `-Zsanitizer`), and only stable Rust (1.95) is installed here and in CI. proptest runs on
//! stable inside `cargo test`, shrinks a failure to a small case, and the case counts below keep
//! the whole set to a few seconds in a debug build, so it runs briefly on every CI run.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::{decode_body, Catalog, DecodeError, RequestParams};

/// Cases per property: enough to find the edges, small enough for every `cargo test`.
fn config(cases: u32) -> ProptestConfig {
    // `PROPTEST_CASES` in the environment asks for a longer run.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// --- The path matcher ---------------------------------------------------------------------

/// A pattern segment: a literal from a small alphabet (so patterns collide), or a parameter.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "people", "match"]).prop_map(str::to_owned),
        1 => Just("{id}".to_owned()),
    ]
}

fn pattern() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), 1..4)
}

#[derive(Debug, Clone)]
struct EndpointGen {
    methods: Vec<&'static str>,
    paths: Vec<Vec<String>>,
}

fn endpoint() -> impl Strategy<Value = EndpointGen> {
    (
        prop::sample::subsequence(vec!["GET", "POST", "DELETE"], 1..=3),
        prop::collection::vec(pattern(), 1..3),
    )
        .prop_map(|(methods, paths)| EndpointGen { methods, paths })
}

fn catalog_toml(prefixes: &[&str], endpoints: &[EndpointGen]) -> String {
    let mut toml = format!("version = \"prop\"\nprefixes = {prefixes:?}\n");
    for (i, ep) in endpoints.iter().enumerate() {
        let paths: Vec<String> = ep.paths.iter().map(|p| p.join("/")).collect();
        toml.push_str(&format!(
            "[[endpoint]]\nname = \"e{i}\"\nmethods = {:?}\npaths = {paths:?}\n",
            ep.methods
        ));
    }
    toml
}

/// The reference matcher: the documented rule, written the obvious way. Routes in file order
/// (endpoint, then path, then prefix); among those whose method and segments match, the most
/// literal segments win, then the first.
fn reference(prefixes: &[&str], endpoints: &[EndpointGen], method: &str, path: &str) -> String {
    // Paths are matched in canonical form (tested on its own in `pattern`): with slashes
    // collapsed, every segment is non-empty.
    let canonical = super::pattern::canonical_path(path);
    let got: Vec<&str> = canonical.split('/').filter(|s| !s.is_empty()).collect();
    let mut best: Option<(usize, usize)> = None; // (literals, endpoint index)
    for (i, ep) in endpoints.iter().enumerate() {
        if !ep.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
            continue;
        }
        for p in &ep.paths {
            for prefix in prefixes {
                let mut want: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
                want.extend(p.iter().map(String::as_str));
                let matches =
                    want.len() == got.len()
                        && want.iter().zip(&got).all(|(w, g)| {
                            if *w == "{id}" {
                                !g.is_empty()
                            } else {
                                w == g
                            }
                        });
                let literals = want.iter().filter(|w| **w != "{id}").count();
                if matches && best.is_none_or(|(l, _)| literals > l) {
                    best = Some((literals, i));
                }
            }
        }
    }
    best.map_or("other".to_owned(), |(_, i)| format!("e{i}"))
}

/// A request path near the generated patterns: a prefix or none, segments from the same
/// alphabet plus ids and odd bytes, and sometimes a trailing or doubled slash.
fn request_path() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "people", "match", "v1", "api", "5f2a", "", "A", "%2F", "é"])
            .prop_map(str::to_owned),
        1 => "[^/]{0,6}",
    ];
    (
        prop::sample::select(vec!["", "/v1", "/api/v1", "/api"]),
        prop::collection::vec(seg, 0..5),
        prop::sample::select(vec!["", "/", "//"]),
    )
        .prop_map(|(prefix, segs, tail)| format!("{prefix}/{}{tail}", segs.join("/")))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn classify_never_panics_and_is_deterministic(method in ".{0,8}", path in ".{0,64}") {
        let catalog = Catalog::builtin();
        let first = catalog.classify_id(&method, &path);
        prop_assert_eq!(first, catalog.classify_id(&method, &path));
        prop_assert_eq!(catalog.classify(&method, &path).name(), catalog.endpoint(first).name());
    }

    #[test]
    fn classify_follows_the_literal_precedence_rule(
        prefixes in prop::sample::subsequence(vec!["", "/v1", "/api/v1"], 1..=3),
        endpoints in prop::collection::vec(endpoint(), 1..6),
        requests in prop::collection::vec(
            (prop::sample::select(vec!["GET", "post", "Delete", "PUT"]), request_path()),
            1..16,
        ),
    ) {
        let catalog = Catalog::from_toml(&catalog_toml(&prefixes, &endpoints), "prop")
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (method, path) in &requests {
            prop_assert_eq!(
                catalog.classify(method, path).name(),
                reference(&prefixes, &endpoints, method, path),
                "{} {}", method, path
            );
        }
    }

    #[test]
    fn a_literal_segment_beats_a_parameter_in_either_file_order(
        literal in prop::sample::select(vec!["match", "search", "bulk_match"]),
        literal_first in any::<bool>(),
    ) {
        let specific = EndpointGen { methods: vec!["GET"], paths: vec![vec!["people".into(), literal.into()]] };
        let general = EndpointGen { methods: vec!["GET"], paths: vec![vec!["people".into(), "{id}".into()]] };
        let (endpoints, specific_name) = if literal_first {
            (vec![specific, general], "e0")
        } else {
            (vec![general, specific], "e1")
        };
        let catalog = Catalog::from_toml(&catalog_toml(&["/v1"], &endpoints), "prop")
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(catalog.classify("GET", &format!("/v1/people/{literal}")).name(), specific_name);
        prop_assert_ne!(catalog.classify("GET", "/v1/people/someone-else").name(), specific_name);
    }
}

// --- Request parameters -------------------------------------------------------------------

/// Form-encodes `s` the way browsers and HTTP clients do (space as `+` or `%20`).
fn form_encode(s: &str, plus: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b' ' if plus => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Query strings made mostly of the characters the parser treats specially.
fn hostile_query() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\\[\\]%&=+a0F]{0,80}",
        ".{0,80}",
        "(details\\[[0-9]{0,3}\\]\\[[a-z]{0,5}\\]=[a-z%]{0,4}&){0,8}",
    ]
}

/// Bodies: arbitrary bytes, or JSON-looking text.
fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "[\\[\\]{}\":,0-9a-z \\\\]{0,120}".prop_map(String::into_bytes),
    ]
}

/// Simple JSON values as Apollo requests carry them.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_body_of_any_type_and_coding_is_read_or_explained(
        query in prop::option::of(hostile_query()),
        body in hostile_body(),
        content_type in prop::option::of(prop::sample::select(vec![
            "application/json", "application/x-www-form-urlencoded", "text/plain",
            "APPLICATION/JSON; charset=utf-8", "", ";", "multipart/form-data; boundary=x",
        ])),
        encoding in prop::option::of(prop::sample::select(vec!["gzip", "deflate", "br", "identity", "zstd", ""])),
    ) {
        let p = RequestParams::from_request(
            query.as_deref(),
            &super::RequestBody { content_type, content_encoding: encoding, bytes: &body, max_decoded: 4096 },
        );
        // Either the body was read, or the request says why and is treated as asking for
        // everything; never both, never a panic.
        prop_assert_eq!(p.body_unreadable(), p.note().is_some());
        prop_assert!(!p.body_unreadable() || p.may_be_set("reveal_phone_number"));
        let _ = p.identifier_kinds();
    }

    #[test]
    fn canonical_paths_are_fixed_points_without_empty_dot_or_unreserved_escaped_segments(
        path in "[/%.a-fA-F0-9~_x\\-é]{0,40}",
    ) {
        let canonical = super::pattern::canonical_path(&path);
        prop_assert!(canonical.starts_with('/'));
        prop_assert!(!canonical.contains("//"), "{}", canonical);
        prop_assert_eq!(super::pattern::canonical_path(&canonical), canonical.clone());
        for segment in canonical.split('/') {
            prop_assert!(segment != "." && segment != "..", "{}", canonical);
        }
        // Every escape left names a reserved (or non-ASCII) byte, in upper-case hex.
        let bytes = canonical.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b != b'%' {
                continue;
            }
            if let (Some(h), Some(l)) = (bytes.get(i + 1), bytes.get(i + 2)) {
                if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() {
                    prop_assert!(!h.is_ascii_lowercase() && !l.is_ascii_lowercase(), "{}", canonical);
                    let decoded = u8::from_str_radix(&canonical[i + 1..i + 3], 16).unwrap_or(0);
                    prop_assert!(
                        !(decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded)),
                        "{}", canonical
                    );
                }
            }
        }
    }

    #[test]
    fn parameter_parsing_never_panics(query in prop::option::of(hostile_query()), body in hostile_body()) {
        let p = RequestParams::parse(query.as_deref(), &body);
        let _ = p.identifier_kinds();
        let _ = p.api_key();
        let _ = p.truthy("reveal_phone_number");
        let _ = p.get("details");
        let _ = p.note();
    }

    #[test]
    fn plain_query_values_round_trip(
        pairs in prop::collection::btree_map("[a-z][a-z0-9_]{0,8}", ".{0,16}", 0..8),
        plus in any::<bool>(),
    ) {
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v, plus)))
            .collect();
        let p = RequestParams::parse(Some(&query.join("&")), b"");
        for (k, v) in &pairs {
            prop_assert_eq!(p.get(k), Some(&Value::String(v.clone())), "{}", k);
        }
    }

    #[test]
    fn rails_arrays_and_arrays_of_objects_round_trip(
        titles in prop::collection::vec(".{0,10}", 1..6),
        emails in prop::collection::vec("[a-z]{1,6}@[a-z]{1,6}\\.com", 1..11),
        shuffle_seed in any::<u64>(),
    ) {
        let mut query: Vec<String> =
            titles.iter().map(|t| format!("person_titles[]={}", form_encode(t, true))).collect();
        query.extend(emails.iter().map(|e| format!("details[][email]={}", form_encode(e, false))));
        let p = RequestParams::parse(Some(&query.join("&")), b"");
        prop_assert_eq!(p.get("person_titles"), Some(&json!(titles)));
        let details: Vec<Value> = emails.iter().map(|e| json!({"email": e})).collect();
        prop_assert_eq!(p.get("details"), Some(&Value::Array(details.clone())));

        // Indexed keys in any order come back ordered by index.
        let mut indexed: Vec<String> = emails
            .iter()
            .enumerate()
            .map(|(i, e)| format!("details[{i}][email]={}", form_encode(e, false)))
            .collect();
        let n = indexed.len();
        for i in 0..n {
            let j = (shuffle_seed.rotate_left(i as u32) as usize) % n;
            indexed.swap(i, j);
        }
        let p = RequestParams::parse(Some(&indexed.join("&")), b"");
        prop_assert_eq!(p.get("details"), Some(&Value::Array(details)));
    }

    #[test]
    fn json_body_values_round_trip_and_lose_to_the_query(
        fields in prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..8),
        query_value in "[a-z]{0,6}",
    ) {
        let body = serde_json::to_vec(&Value::Object(fields.clone().into_iter().collect::<Map<_, _>>()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        // The query names every other key; Rails merges the query over the body.
        let in_query = |i: usize| i % 2 == 0;
        let query: Vec<String> = fields
            .keys()
            .enumerate()
            .filter(|(i, _)| in_query(*i))
            .map(|(_, k)| format!("{k}={query_value}"))
            .collect();
        let p = RequestParams::parse(Some(&query.join("&")), &body);
        prop_assert_eq!(p.note(), None);
        for (i, (k, v)) in fields.iter().enumerate() {
            let want = if in_query(i) { json!(query_value) } else { v.clone() };
            prop_assert_eq!(p.get(k), Some(&want), "{}", k);
        }
    }
}

// --- Response decoding --------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Coding {
    Gzip,
    Zlib,
    RawDeflate,
    Brotli,
    Identity,
}

impl Coding {
    fn header(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Zlib | Coding::RawDeflate => "deflate",
            Coding::Brotli => "br",
            Coding::Identity => "identity",
        }
    }

    fn encode(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        use super::testutil::{brotli, gzip, raw_deflate, zlib};
        match self {
            Coding::Gzip => gzip(data),
            Coding::Zlib => zlib(data),
            Coding::RawDeflate => raw_deflate(data),
            Coding::Brotli => brotli(data),
            Coding::Identity => Ok(data.to_vec()),
        }
    }
}

fn coding() -> impl Strategy<Value = Coding> {
    prop::sample::select(vec![
        Coding::Gzip,
        Coding::Zlib,
        Coding::RawDeflate,
        Coding::Brotli,
        Coding::Identity,
    ])
}

/// Content-Encoding headers, valid and not.
fn encoding_header() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        prop::sample::select(vec![
            "gzip", "x-gzip", "deflate", "br", "identity", "gzip, br", "br, gzip", "zstd", ""
        ])
        .prop_map(str::to_owned),
        ".{0,16}",
    ])
}

/// Bytes that start like a compressed stream more often than chance would.
fn encoded_looking_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|mut v| {
            v.splice(0..0, [0x1f, 0x8b, 0x08, 0x00]);
            v
        }),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|mut v| {
            v.splice(0..0, [0x78, 0x9c]);
            v
        }),
    ]
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn decoding_never_panics_and_respects_the_cap(
        header in encoding_header(),
        body in encoded_looking_bytes(),
        cap in 0usize..2048,
    ) {
        if let Ok(out) = decode_body(header.as_deref(), &body, cap) {
            prop_assert!(out.len() <= cap, "{} bytes out, cap {}", out.len(), cap);
        }
    }

    #[test]
    fn encoded_bodies_round_trip_and_the_cap_holds(
        data in prop::collection::vec(any::<u8>(), 0..4096),
        codings in prop::collection::vec(coding(), 1..4),
        repeat in 1usize..64,
    ) {
        // Repetition makes bodies that compress well, as JSON does.
        let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
        let mut stages = vec![data.clone()];
        for c in &codings {
            let next = c.encode(stages.last().map_or(&[][..], Vec::as_slice))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            stages.push(next);
        }
        let header: Vec<&str> = codings.iter().map(|c| c.header()).collect();
        let header = header.join(", ");
        let wire = stages.last().map_or(&[][..], Vec::as_slice);
        // Every stage's output fits: the original comes back.
        let roomy = stages.iter().map(Vec::len).max().unwrap_or(0);
        let out = decode_body(Some(&header), wire, roomy)
            .map_err(|e| TestCaseError::fail(format!("{header}: {e}")))?;
        prop_assert!(*out == data[..], "{}: decoded bytes differ", header);
        // A cap below the decoded size is always refused as too large.
        if !data.is_empty() {
            let err = decode_body(Some(&header), wire, data.len() - 1).err();
            prop_assert!(matches!(err, Some(DecodeError::TooLarge { .. })), "{}: {:?}", header, err);
        }
    }

    #[test]
    fn a_cut_gzip_or_zlib_stream_is_an_error_not_a_short_body(
        data in prop::collection::vec(any::<u8>(), 1..2048),
        zlib in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let (c, header) = if zlib { (Coding::Zlib, "deflate") } else { (Coding::Gzip, "gzip") };
        let wire = c.encode(&data).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let at = 1 + cut.index(wire.len() - 1);
        let decoded = decode_body(Some(header), &wire[..at], 1 << 20);
        prop_assert!(decoded.is_err(), "{} cut at {}/{} decoded to {:?} bytes", header, at, wire.len(), decoded.map(|d| d.len()));
    }
}

/// The generators' encoder is the inverse of the parser's decoding.
#[test]
fn form_encoding_matches_the_parser() {
    assert_eq!(form_encode("a b+c/é", true), "a+b%2Bc%2F%C3%A9");
    let p = RequestParams::parse(Some("k=a+b%2Bc%2F%C3%A9&j=a%20b"), b"");
    assert_eq!(p.get("k"), Some(&json!("a b+c/é")));
    assert_eq!(p.get("j"), Some(&json!("a b")));
}

// --- Pricing from a projected body ------------------------------------------------------------

/// Response bodies of the shapes the built-in rules read: their fields hold nulls, records,
/// empty and non-empty objects and arrays, entries with duplicate or odd `id`s, and scalars of
/// the wrong kind, beside fields no rule reads.
fn response_body() -> impl Strategy<Value = Value> {
    // Waterfall answers mark people `match_confidence` (the catalog's `unmatched` rule): with
    // and without data beside it, and of odd kinds.
    let confidence = prop_oneof![
        Just(json!("none")),
        Just(json!("low")),
        Just(json!("high")),
        Just(json!("")),
        Just(json!(0)),
        Just(json!(null)),
        Just(json!(["none"])),
    ];
    let beside = prop_oneof![
        Just(json!({})),
        Just(json!({"id": null, "name": "", "emails": [], "organization": {}})),
        Just(json!({"id": "p1"})),
        Just(json!({"id": "", "x": {"y": null}})),
        Just(json!({"name": "Ada"})),
        Just(json!({"id": 3, "phone_numbers": [null]})),
        Just(json!({"x": false})),
    ];
    let marked = (confidence, beside).prop_map(|(c, mut rest)| {
        if let Value::Object(map) = &mut rest {
            map.insert("match_confidence".to_owned(), c);
        }
        rest
    });
    let entry = prop_oneof![
        6 => marked.clone(),
        1 => Just(Value::Null),
        1 => (0..4u8).prop_map(|n| json!({"id": format!("p{n}"), "name": "x"})),
        1 => (0..4i64).prop_map(|n| json!({"id": n})),
        1 => Just(json!({"id": [1], "x": {}})),
        1 => Just(json!({"name": "no id"})),
        1 => json_value(),
    ];
    let field = prop_oneof![
        3 => marked,
        1 => json_value(),
        4 => prop::collection::vec(entry, 0..6).prop_map(Value::Array),
        1 => Just(json!({})),
        1 => Just(json!({"first_name": "Ada", "emails": []})),
        1 => (0.0..20.0f64).prop_map(|c| json!(c)),
    ];
    let key = prop_oneof![
        Just("person"),
        Just("matches"),
        Just("organization"),
        Just("organizations"),
        Just("accounts"),
        Just("people"),
        Just("contacts"),
        Just("news_articles"),
        Just("organization_job_postings"),
        Just("credits_consumed"),
        Just("pagination"),
    ];
    prop::collection::vec((key, field), 0..6).prop_map(|fields| {
        Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

proptest! {
    #![proptest_config(config(512))]

    /// The projection exists only for speed: every built-in endpoint must price every body
    /// exactly as a full parse of it would (credits, source, counts and notes).
    #[test]
    fn a_projected_body_prices_exactly_like_the_full_one(body in response_body(), raw in any::<bool>()) {
        let catalog = Catalog::builtin();
        let bytes = if raw { body.to_string().into_bytes() } else { b"{\"person\": [1,".to_vec() };
        let req = RequestParams::parse(Some("reveal_phone_number=true&reveal_personal_emails=true"), b"{\"details\":[{},{}]}");
        for ep in catalog.endpoints() {
            let resp = super::ResponseView {
                status: 200,
                content_encoding: None,
                body: &bytes,
                truncated: false,
                max_decoded: 1 << 20,
            };
            let fast = super::pricing::price(ep, &req, &resp);
            let full = super::pricing::price_with(ep, &req, &resp, |json| serde_json::from_slice::<Value>(json));
            prop_assert_eq!(fast.credits, full.credits, "endpoint {}", ep.name());
            prop_assert_eq!(fast.source, full.source);
            prop_assert_eq!(fast.records_matched, full.records_matched);
            prop_assert_eq!(fast.records_requested, full.records_requested);
            prop_assert_eq!(fast.note, full.note);
        }
    }
}
