#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Property tests for configuration parsing: `Config::from_toml` never panics, whatever the
//! text (arbitrary, or the example config with random damage), and every config generated from
//! the documented keys and value forms parses to exactly those values and validates.
//!
//! proptest rather than `cargo fuzz`: cargo-fuzz needs a nightly toolchain, and only stable
//! Rust (1.95) is installed here and in CI; see `crates/catalog/src/proptests.rs`. These live in
//! `tests/` because they need nothing private: `Config::from_toml` is the public entry point.

use std::time::Duration;

use creditmeter::config::{ByteSize, Config, Durability, HumanDuration, Synchronous};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../config/creditmeter.toml");

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

/// A duration as a user might write it, and its value.
fn duration() -> impl Strategy<Value = (String, Duration)> {
    prop_oneof![
        (1u64..100_000).prop_map(|n| (format!("{n}"), Duration::from_secs(n))),
        (1u64..100_000).prop_map(|n| (format!("\"{n}ms\""), Duration::from_millis(n))),
        (1u64..100_000).prop_map(|n| (format!("\"{n}s\""), Duration::from_secs(n))),
        (1u64..10_000).prop_map(|n| (format!("\"{n}m\""), Duration::from_secs(n * 60))),
        (1u64..10_000).prop_map(|n| (format!("\"{n}min\""), Duration::from_secs(n * 60))),
        (1u64..1_000).prop_map(|n| (format!("\"{n}h\""), Duration::from_secs(n * 3600))),
        (1u64..100).prop_map(|n| (format!("\"{n}d\""), Duration::from_secs(n * 86_400))),
        (1u64..1_000).prop_map(|n| (format!("\"{n}.5s\""), Duration::from_millis(n * 1000 + 500))),
    ]
}

/// A size as a user might write it, and its value in bytes.
fn size() -> impl Strategy<Value = (String, u64)> {
    let unit = prop::sample::select(vec![
        ("", 1u64),
        ("B", 1),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("KB", 1_000),
        ("kB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
    ]);
    prop_oneof![
        (1u64..1 << 40).prop_map(|n| (format!("{n}"), n)),
        (1u64..4096, unit).prop_map(|(n, (u, scale))| (format!("\"{n}{u}\""), n * scale)),
    ]
}

#[derive(Debug, Clone)]
struct Generated {
    proxy_port: u16,
    admin_port: u16,
    base_url: String,
    header_read_timeout: Option<(String, Duration)>,
    upstream_timeout: Option<(String, Duration)>,
    connect_timeout: Option<(String, Duration)>,
    max_request_body: Option<(String, u64)>,
    max_inspect: Option<(String, u64)>,
    max_decoded: Option<(String, u64)>,
    durability: Option<Durability>,
    synchronous: Option<Synchronous>,
    batch_max: Option<usize>,
    max_label_values: Option<usize>,
    require_table: Option<bool>,
    protect_metrics: Option<bool>,
    grace: Option<(String, Duration)>,
}

fn generated() -> impl Strategy<Value = Generated> {
    let url = (
        prop::sample::select(vec!["http", "https", "HTTPS"]),
        prop::sample::select(vec![
            "api.apollo.io",
            "127.0.0.1:8090",
            "localhost",
            "[::1]:443",
        ]),
        prop::sample::select(vec!["", "/", "/apollo", "/a/b/"]),
    )
        .prop_map(|(s, h, p)| format!("{s}://{h}{p}"));
    (
        (1024u16..u16::MAX, 1u16..1000, url),
        (
            prop::option::of(duration()),
            prop::option::of(duration()),
            prop::option::of(duration()),
            prop::option::of(size()),
            prop::option::of(size()),
            prop::option::of(size()),
        ),
        (
            prop::option::of(prop::sample::select(vec![
                Durability::Commit,
                Durability::Background,
            ])),
            prop::option::of(prop::sample::select(vec![
                Synchronous::Normal,
                Synchronous::Full,
            ])),
            prop::option::of(1usize..100_000),
            prop::option::of(1usize..100_000),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(duration()),
        ),
    )
        .prop_map(|((proxy_port, admin_offset, base_url), d, o)| Generated {
            proxy_port,
            admin_port: proxy_port.wrapping_sub(admin_offset).max(1),
            base_url,
            header_read_timeout: d.0,
            upstream_timeout: d.1,
            connect_timeout: d.2,
            max_request_body: d.3,
            max_inspect: d.4,
            max_decoded: d.5,
            durability: o.0,
            synchronous: o.1,
            batch_max: o.2,
            max_label_values: o.3,
            require_table: o.4,
            protect_metrics: o.5,
            grace: o.6,
        })
}

fn render(g: &Generated) -> String {
    let mut t = String::from("# generated\n[proxy]\n");
    t += &format!("listen = \"127.0.0.1:{}\"\n", g.proxy_port);
    if let Some((text, _)) = &g.header_read_timeout {
        t += &format!("header_read_timeout = {text}\n");
    }
    if let Some((text, _)) = &g.max_request_body {
        t += &format!("max_request_body = {text}\n");
    }
    t += &format!("\n[admin]\nlisten = \"127.0.0.1:{}\"\n", g.admin_port);
    if let Some(b) = g.protect_metrics {
        t += &format!("protect_metrics = {b}\n");
    }
    t += &format!("\n[upstream]\nbase_url = \"{}\"\n", g.base_url);
    if let Some((text, _)) = &g.upstream_timeout {
        t += &format!("timeout = {text}\n");
    }
    if let Some((text, _)) = &g.connect_timeout {
        t += &format!("connect_timeout = {text}\n");
    }
    t += "\n[ledger]\npath = \"ledger.db\"\n";
    if let Some(d) = g.durability {
        t += &format!(
            "durability = \"{}\"\n",
            if d == Durability::Commit {
                "commit"
            } else {
                "background"
            }
        );
    }
    if let Some(s) = g.synchronous {
        t += &format!(
            "synchronous = \"{}\"\n",
            if s == Synchronous::Normal {
                "normal"
            } else {
                "full"
            }
        );
    }
    if let Some(n) = g.batch_max {
        t += &format!("batch_max = {n}\n");
    }
    t += "\n[catalog]\n";
    if let Some((text, _)) = &g.max_inspect {
        t += &format!("max_inspect = {text}\n");
    }
    if let Some((text, _)) = &g.max_decoded {
        t += &format!("max_decoded = {text}\n");
    }
    if let Some(b) = g.require_table {
        t += &format!("\n[attribution]\nrequire_table = {b}\n");
    }
    if let Some(n) = g.max_label_values {
        t += &format!("\n[metrics]\nmax_label_values = {n}\n");
    }
    if let Some((text, _)) = &g.grace {
        t += &format!("\n[shutdown]\ngrace = {text}\n");
    }
    t
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = Config::from_toml(&text).map(|c| c.validate());
    }

    #[test]
    fn a_damaged_example_config_never_panics(
        at in any::<prop::sample::Index>(),
        cut in 0usize..40,
        insert in prop_oneof![".{0,20}", "[\\[\\]=\"\n#.]{0,20}", "[a-z_]{1,12} = [0-9\"a-z]{0,10}\n"],
    ) {
        let mut text = EXAMPLE.to_owned();
        let mut i = at.index(text.len());
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        let mut end = (i + cut).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.replace_range(i..end, &insert);
        let _ = Config::from_toml(&text).map(|c| c.validate());
    }

    #[test]
    fn human_durations_and_sizes_never_panic(text in ".{0,24}", digits in "[0-9.]{1,30}[a-zA-Z]{0,4}") {
        let _ = HumanDuration::parse(&text);
        let _ = HumanDuration::parse(&digits);
        let _ = ByteSize::parse(&text);
        let _ = ByteSize::parse(&digits);
    }

    #[test]
    fn generated_configs_parse_to_their_values_and_validate(g in generated()) {
        let text = render(&g);
        let c = Config::from_toml(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        c.validate().map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(c.proxy.listen.port(), g.proxy_port);
        prop_assert_eq!(c.admin.listen.port(), g.admin_port);
        prop_assert_eq!(&c.upstream.base_url, &g.base_url);
        let d = Config::default();
        let dur = |v: &Option<(String, Duration)>, default: HumanDuration| v.as_ref().map_or(default.0, |(_, d)| *d);
        let bytes = |v: &Option<(String, u64)>, default: ByteSize| v.as_ref().map_or(default.0, |(_, n)| *n);
        prop_assert_eq!(c.proxy.header_read_timeout.0, dur(&g.header_read_timeout, d.proxy.header_read_timeout));
        prop_assert_eq!(c.upstream.timeout.0, dur(&g.upstream_timeout, d.upstream.timeout));
        prop_assert_eq!(c.upstream.connect_timeout.0, dur(&g.connect_timeout, d.upstream.connect_timeout));
        prop_assert_eq!(c.shutdown.grace.0, dur(&g.grace, d.shutdown.grace));
        prop_assert_eq!(c.proxy.max_request_body.0, bytes(&g.max_request_body, d.proxy.max_request_body));
        prop_assert_eq!(c.catalog.max_inspect.0, bytes(&g.max_inspect, d.catalog.max_inspect));
        prop_assert_eq!(c.catalog.max_decoded.0, bytes(&g.max_decoded, d.catalog.max_decoded));
        prop_assert_eq!(c.ledger.durability, g.durability.unwrap_or(d.ledger.durability));
        prop_assert_eq!(c.ledger.synchronous, g.synchronous.unwrap_or(d.ledger.synchronous));
        prop_assert_eq!(c.ledger.batch_max, g.batch_max.unwrap_or(d.ledger.batch_max));
        prop_assert_eq!(c.metrics.max_label_values, g.max_label_values.unwrap_or(d.metrics.max_label_values));
        prop_assert_eq!(c.attribution.require_table, g.require_table.unwrap_or(false));
        prop_assert_eq!(c.admin.protect_metrics, g.protect_metrics.unwrap_or(false));
    }

    #[test]
    fn an_unknown_key_anywhere_is_named(g in generated(), key in "[a-z]{3,10}_x", section in 0usize..9) {
        // Insert `key = 1` under the n-th section header (or at the top).
        let text = render(&g);
        let mut lines: Vec<&str> = text.lines().collect();
        let headers: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.starts_with('[')).map(|(i, _)| i).collect();
        let at = headers.get(section % (headers.len() + 1)).map_or(0, |i| i + 1);
        let line = format!("{key} = 1");
        lines.insert(at, &line);
        let err = Config::from_toml(&lines.join("\n")).err().map(|e| e.to_string()).unwrap_or_default();
        prop_assert!(err.contains(&key), "{}", err);
        prop_assert!(err.contains(&format!("line {}", at + 1)), "{}", err);
    }
}
