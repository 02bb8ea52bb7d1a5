//! The built-in catalog against Apollo-shaped calls, and catalog loading and validation.

use std::error::Error;

use serde_json::{json, Value};

use super::testutil::{brotli, gzip, zlib};
use super::*;

type TestResult = Result<(), Box<dyn Error>>;

/// The proxy's default decode cap.
const CAP: usize = 64 << 20;

fn view<'a>(status: u16, content_encoding: Option<&'a str>, body: &'a [u8]) -> ResponseView<'a> {
    ResponseView {
        status,
        content_encoding,
        body,
        truncated: false,
        max_decoded: CAP,
    }
}

fn milli(lead: i64, direct_dial: i64, export: i64) -> Credits {
    Credits {
        lead_milli: lead,
        direct_dial_milli: direct_dial,
        export_milli: export,
    }
}

/// Prices a call against the built-in catalog: `query` is the raw query string, `request` the
/// JSON body (`Value::Null` for none), `response` the plain JSON body.
fn call(
    method: &str,
    path: &str,
    query: Option<&str>,
    request: Value,
    status: u16,
    response: Value,
) -> Pricing {
    let body = if request.is_null() {
        String::new()
    } else {
        request.to_string()
    };
    let req = RequestParams::parse(query, body.as_bytes());
    let response = response.to_string();
    price_raw(method, path, &req, view(status, None, response.as_bytes()))
}

/// What a call leaves for later, by the built-in catalog (arguments as for [`call`]).
fn deferred_of(
    method: &str,
    path: &str,
    query: Option<&str>,
    request: Value,
    status: u16,
    response: Value,
) -> Option<Deferred> {
    let body = if request.is_null() {
        String::new()
    } else {
        request.to_string()
    };
    let req = RequestParams::parse(query, body.as_bytes());
    let response = response.to_string();
    let catalog = Catalog::builtin();
    let ep = catalog.classify(method, path);
    let resp = view(status, None, response.as_bytes());
    let p = catalog.price(ep, &req, &resp);
    let units = Units {
        requested: p.records_requested,
        matched: p.records_matched,
    };
    catalog.deferred(ep, &req, &resp, units)
}

fn price_raw(method: &str, path: &str, req: &RequestParams, resp: ResponseView<'_>) -> Pricing {
    let catalog = Catalog::builtin();
    let ep = catalog.classify(method, path);
    catalog.price(ep, req, &resp)
}

fn person(id: &str) -> Value {
    json!({"id": id, "first_name": "Tim", "last_name": "Zheng", "email": "tim@apollo.io",
           "organization": {"id": "5e66b6381e05b4008c8331b8", "name": "Apollo.io"}})
}

fn bulk_response(matches: Value, credits_consumed: Option<Value>) -> Value {
    let mut body = json!({"status": "success", "error_code": null, "error_message": null,
        "total_requested_enrichments": 3, "unique_enriched_records": 2, "missing_records": 1,
        "matches": matches});
    if let (Some(credits), Some(map)) = (credits_consumed, body.as_object_mut()) {
        map.insert("credits_consumed".to_owned(), credits);
    }
    body
}

fn three_details() -> Value {
    json!({"details": [{"email": "a@x.com"}, {"email": "b@y.com"}, {"linkedin_url": "http://l/c"}]})
}

// --- The built-in catalog ---------------------------------------------------------------------

#[test]
fn builtin_catalog_parses() -> TestResult {
    let catalog = Catalog::from_toml(BUILTIN_TOML, BUILTIN_ORIGIN)?;
    assert_eq!(catalog.version(), "apollo-2026-12");
    let names: Vec<&str> = catalog.endpoints().map(Endpoint::name).collect();
    assert_eq!(
        names,
        [
            "people_match",
            "people_bulk_match",
            "organizations_enrich",
            "organizations_bulk_enrich",
            "organization_get",
            "person_get",
            "mixed_companies_search",
            "mixed_people_search",
            "mixed_people_api_search",
            "news_articles_search",
            "job_postings",
            "webhook_result",
            "usage_stats",
            "api_usage_stats",
            "users_api_profile",
            "auth_health",
        ]
    );
    assert_eq!(Catalog::builtin().endpoints().count(), names.len());
    Ok(())
}

#[test]
fn every_rule_is_routed_under_every_prefix() {
    let catalog = Catalog::builtin();
    let cases = [
        ("GET", "people/match", "people_match"),
        ("POST", "people/match", "people_match"),
        ("POST", "people/bulk_match", "people_bulk_match"),
        ("GET", "organizations/enrich", "organizations_enrich"),
        ("POST", "organizations/enrich", "organizations_enrich"),
        (
            "POST",
            "organizations/bulk_enrich",
            "organizations_bulk_enrich",
        ),
        (
            "GET",
            "organizations/5e66b6381e05b4008c8331b8",
            "organization_get",
        ),
        ("GET", "people/60a7c8f2", "person_get"),
        ("POST", "mixed_companies/search", "mixed_companies_search"),
        ("POST", "mixed_people/search", "mixed_people_search"),
        ("POST", "mixed_people/api_search", "mixed_people_api_search"),
        ("POST", "news_articles/search", "news_articles_search"),
        ("GET", "organizations/5e66/job_postings", "job_postings"),
        ("POST", "usage_stats/credit_usage_stats", "usage_stats"),
    ];
    for (method, path, name) in cases {
        for prefix in ["/api/v1/", "/v1/", "/"] {
            let path = format!("{prefix}{path}");
            assert_eq!(
                catalog.classify(method, &path).name(),
                name,
                "{method} {path}"
            );
            assert_eq!(
                catalog.classify(method, &format!("{path}/")).name(),
                name,
                "{path}/"
            );
        }
    }
}

#[test]
fn methods_are_case_insensitive_and_must_be_listed() {
    let catalog = Catalog::builtin();
    assert_eq!(
        catalog.classify("post", "/api/v1/people/match").name(),
        "people_match"
    );
    assert_eq!(
        catalog.classify("DELETE", "/api/v1/people/match").name(),
        "other"
    );
    assert_eq!(
        catalog
            .classify("GET", "/api/v1/mixed_people/api_search")
            .name(),
        "other"
    );
}

#[test]
fn the_most_literal_pattern_wins() {
    let catalog = Catalog::builtin();
    assert_eq!(
        catalog.classify("GET", "/v1/people/match").name(),
        "people_match"
    );
    assert_eq!(
        catalog.classify("GET", "/v1/people/abc").name(),
        "person_get"
    );
    assert_eq!(
        catalog.classify("GET", "/v1/organizations/enrich").name(),
        "organizations_enrich"
    );
    assert_eq!(
        catalog.classify("GET", "/v1/organizations/abc").name(),
        "organization_get"
    );
    assert_eq!(
        catalog
            .classify("GET", "/v1/organizations/abc/job_postings")
            .name(),
        "job_postings"
    );
}

#[test]
fn unknown_paths_are_other() {
    let catalog = Catalog::builtin();
    for path in [
        "/",
        "",
        "/api/v1/",
        "/api/v2/people/match",
        "/api/v1/people/match/extra",
        "/api/v1/people//",
        "/api/v1/people%2Fmatch",
        "/api/v1/mixed_people/search/../../x",
    ] {
        assert_eq!(catalog.classify("GET", path).name(), "other", "{path:?}");
    }
    let other = catalog.classify("GET", "/nope");
    assert!(!other.inspects_body());
    assert_eq!(other.worst_case_milli(&RequestParams::default()), None);
}

#[test]
fn endpoint_ids_round_trip() {
    let catalog = Catalog::builtin();
    let id = catalog.classify_id("POST", "/api/v1/people/bulk_match");
    assert_eq!(id, catalog.classify_id("post", "/v1/people/bulk_match/"));
    assert_eq!(catalog.endpoint(id).name(), "people_bulk_match");
    let other = catalog.classify_id("GET", "/api/v1/contacts");
    assert_ne!(other, id);
    assert_eq!(catalog.endpoint(other).name(), "other");
}

#[test]
fn ties_go_to_the_earlier_endpoint() -> TestResult {
    let catalog = Catalog::from_toml(
        r#"
        version = "t"
        prefixes = [""]
        [[endpoint]]
        name = "first"
        methods = ["GET"]
        paths = ["a/{x}"]
        [[endpoint]]
        name = "second"
        methods = ["GET"]
        paths = ["{y}/b", "a/{x}"]
        "#,
        "ties.toml",
    )?;
    assert_eq!(catalog.classify("GET", "/a/b").name(), "first");
    assert_eq!(catalog.classify("GET", "/c/b").name(), "second");
    Ok(())
}

#[test]
fn body_inspection_is_requested_only_where_needed() {
    let catalog = Catalog::builtin();
    assert!(catalog.classify("POST", "/v1/people/match").inspects_body());
    assert!(catalog
        .classify("POST", "/v1/mixed_companies/search")
        .inspects_body());
    assert!(!catalog
        .classify("POST", "/v1/usage_stats/credit_usage_stats")
        .inspects_body());
}

#[test]
fn endpoints_print_their_rules() {
    let catalog = Catalog::builtin();
    let bulk = catalog.classify("POST", "/v1/people/bulk_match");
    assert_eq!(
        bulk.to_string(),
        "people_bulk_match  POST people/bulk_match: 1 lead per non-null `matches` entry (unique by `id`) \
         (or the reported `credits_consumed`); later, when the job ends: up to 8 direct_dial per matched \
         record when `reveal_phone_number` is requested (estimate 4); up to 5 lead per requested record \
         when `run_waterfall_email` is requested (estimate 1); up to 10 direct_dial per requested record \
         when `run_waterfall_phone` is requested (estimate 4) (or the result's `webhook_result.credits_consumed`)"
    );
    let search = catalog.classify("POST", "/v1/mixed_companies/search");
    assert_eq!(
        search.to_string(),
        "mixed_companies_search  POST mixed_companies/search: 1 lead if any of `organizations`, `accounts` is non-empty"
    );
    assert_eq!(bulk.methods(), ["POST"]);
    assert_eq!(bulk.paths(), ["people/bulk_match"]);
    let usage = catalog.classify("POST", "/v1/usage_stats/credit_usage_stats");
    assert!(usage.to_string().ends_with(": free"));
}

// --- people/match -----------------------------------------------------------------------------

#[test]
fn people_match_without_a_person_is_free() {
    let p = call(
        "POST",
        "/api/v1/people/match",
        None,
        json!({"email": "nobody@x.com"}),
        200,
        json!({"person": null, "request_id": -4_151_413_247_i64}),
    );
    assert_eq!(p.credits, Credits::default());
    assert_eq!(p.source, CreditSource::Catalog);
    assert_eq!((p.records_requested, p.records_matched), (Some(1), Some(0)));
    assert_eq!(p.note, None);
}

#[test]
fn people_match_with_a_person_costs_one_lead() {
    let p = call(
        "POST",
        "/api/v1/people/match",
        None,
        json!({"email": "tim@apollo.io"}),
        200,
        json!({"person": person("p1"), "request_id": -1}),
    );
    assert_eq!(p.credits, milli(1000, 0, 0));
    assert_eq!(p.source, CreditSource::Catalog);
    assert_eq!(p.records_matched, Some(1));
}

#[test]
fn people_match_phone_reveal_bills_later_not_in_the_answer() {
    let matched = json!({"person": person("p1"), "request_id": -4211});
    let args = || {
        (
            "GET",
            "/v1/people/match",
            Some("email=tim%40apollo.io&reveal_phone_number=true"),
        )
    };
    let (m, path, q) = args();
    let p = call(m, path, q, Value::Null, 200, matched.clone());
    // Apollo bills the +8 only when the job finds a mobile: nothing of it in the answer.
    assert_eq!(p.credits, milli(1000, 0, 0));
    let d = deferred_of(m, path, q, Value::Null, 200, matched.clone()).unwrap();
    assert_eq!(d.job_id.as_deref(), Some("-4211"));
    assert_eq!(Credits::from(d.worst), milli(0, 8000, 0));
    assert_eq!(Credits::from(d.estimate), milli(0, 4000, 0));
    assert_eq!(d.params, vec!["reveal_phone_number".to_owned()]);
    assert_eq!(
        d.to_json(),
        r#"{"job_id":"-4211","worst":{"lead":0,"direct_dial":8000,"export":0},"estimate":{"lead":0,"direct_dial":4000,"export":0},"params":["reveal_phone_number"]}"#
    );
    // Admission reserves both parts.
    let catalog = Catalog::builtin();
    let req = RequestParams::parse(q, b"");
    let ep = catalog.classify(m, path);
    assert_eq!(ep.worst_case(&req), Some(milli(1000, 8000, 0)));
    assert_eq!(ep.worst_case_milli(&req), Some(9000));
    // No person: no job, nothing deferred.
    assert!(deferred_of(
        m,
        path,
        q,
        Value::Null,
        200,
        json!({"person": null, "request_id": 5})
    )
    .is_none());
    // A non-2xx starts nothing.
    assert!(deferred_of(m, path, q, Value::Null, 422, matched.clone()).is_none());

    let p = call(
        "POST",
        "/v1/people/match",
        None,
        json!({"reveal_phone_number": false}),
        200,
        matched,
    );
    assert_eq!(p.credits, milli(1000, 0, 0));

    let p = call(
        "POST",
        "/v1/people/match",
        None,
        json!({"reveal_phone_number": true}),
        200,
        json!({"person": null}),
    );
    assert_eq!(p.credits, Credits::default());
    assert_eq!(p.source, CreditSource::Catalog);
}

#[test]
fn query_parameters_count_on_a_post_with_a_json_body() {
    let d = deferred_of(
        "POST",
        "/v1/people/match",
        Some("reveal_phone_number=1"),
        json!({"email": "tim@apollo.io"}),
        200,
        json!({"person": person("p1"), "request_id": 7}),
    )
    .unwrap();
    assert_eq!(Credits::from(d.worst), milli(0, 8000, 0));
}

// --- people/bulk_match ------------------------------------------------------------------------

#[test]
fn bulk_match_charges_each_non_null_match() {
    let p = call(
        "POST",
        "/api/v1/people/bulk_match",
        None,
        three_details(),
        200,
        bulk_response(json!([person("p1"), null, person("p2")]), None),
    );
    assert_eq!(p.credits, milli(2000, 0, 0));
    assert_eq!(p.source, CreditSource::Catalog);
    assert_eq!((p.records_requested, p.records_matched), (Some(3), Some(2)));
}

#[test]
fn bulk_match_phone_reveal_defers_eight_per_match() {
    let mut request = three_details();
    if let Some(map) = request.as_object_mut() {
        map.insert("reveal_phone_number".to_owned(), json!(true));
    }
    let mut answer = bulk_response(json!([person("p1"), null, person("p2")]), None);
    answer["request_id"] = json!(-99);
    let args = ("POST", "/api/v1/people/bulk_match");
    let p = call(args.0, args.1, None, request.clone(), 200, answer.clone());
    assert_eq!(p.credits, milli(2000, 0, 0));
    let d = deferred_of(args.0, args.1, None, request.clone(), 200, answer).unwrap();
    assert_eq!(Credits::from(d.worst), milli(0, 16_000, 0));
    assert_eq!(Credits::from(d.estimate), milli(0, 8000, 0));
    // Admission: every requested record may match and have a mobile.
    let catalog = Catalog::builtin();
    let req = RequestParams::parse(None, request.to_string().as_bytes());
    let ep = catalog.classify(args.0, args.1);
    assert_eq!(ep.worst_case(&req), Some(milli(3000, 24_000, 0)));
    // A waterfall bills per requested record, matched or not.
    let mut waterfall = three_details();
    waterfall["run_waterfall_email"] = json!(true);
    let answer = json!({"matches": [person("p1"), null, null], "request_id": 3});
    let d = deferred_of(args.0, args.1, None, waterfall, 200, answer).unwrap();
    assert_eq!(Credits::from(d.worst), milli(15_000, 0, 0));
    assert_eq!(Credits::from(d.estimate), milli(3000, 0, 0));
}

/// An unmatched person as a waterfall answer returns it: an object, not `null`.
fn no_match(confidence: &str) -> Value {
    json!({"id": null, "first_name": null, "email": null, "organization": null,
           "match_confidence": confidence})
}

fn with_confidence(mut person: Value, confidence: &str) -> Value {
    person["match_confidence"] = json!(confidence);
    person
}

#[test]
fn people_match_marked_match_confidence_none_is_free_and_starts_no_job() {
    let args = (
        "POST",
        "/api/v1/people/match",
        Some("run_waterfall_email=true"),
    );
    let request = json!({"email": "nobody@x.com"});
    for unmatched in [no_match("none"), with_confidence(person("p1"), "none")] {
        let answer = json!({"person": unmatched, "request_id": 12,
            "waterfall": {"status": "accepted"}});
        let p = call(args.0, args.1, args.2, request.clone(), 200, answer.clone());
        assert_eq!(p.credits, Credits::default(), "{answer}");
        assert_eq!(p.source, CreditSource::Catalog);
        assert_eq!((p.records_requested, p.records_matched), (Some(1), Some(0)));
        assert!(deferred_of(args.0, args.1, args.2, request.clone(), 200, answer).is_none());
    }
}

#[test]
fn people_match_low_confidence_bills_only_with_data() {
    let args = (
        "POST",
        "/api/v1/people/match",
        Some("run_waterfall_email=true"),
    );
    let request = json!({"email": "tim@apollo.io"});
    for (person, billed) in [
        (no_match("low"), 0),
        (with_confidence(person("p1"), "low"), 1000),
        (with_confidence(person("p1"), "high"), 1000),
        (person("p1"), 1000),
        (Value::Null, 0),
    ] {
        let answer = json!({"person": person, "request_id": 12});
        let p = call(args.0, args.1, args.2, request.clone(), 200, answer.clone());
        assert_eq!(p.credits, milli(billed, 0, 0), "{answer}");
        assert_eq!(p.records_matched, Some(billed / 1000));
        let d = deferred_of(args.0, args.1, args.2, request.clone(), 200, answer);
        assert_eq!(d.is_some(), billed > 0);
    }
}

#[test]
fn bulk_match_waterfall_does_not_bill_details_marked_none() {
    let args = ("POST", "/api/v1/people/bulk_match");
    let mut request = three_details();
    request["run_waterfall_email"] = json!(true);
    request["reveal_phone_number"] = json!(true);
    // A waterfall answer has no `credits_consumed`: the catalog prices the matches.
    let answer = json!({"status": "success", "total_requested_enrichments": 3,
        "matches": [with_confidence(person("p1"), "high"), no_match("none"), null],
        "waterfall": {"status": "accepted"}, "request_id": 7});
    let p = call(args.0, args.1, None, request.clone(), 200, answer.clone());
    assert_eq!(p.credits, milli(1000, 0, 0));
    assert_eq!(p.source, CreditSource::Catalog);
    assert_eq!((p.records_requested, p.records_matched), (Some(3), Some(1)));
    // The phone reveal is deferred for the one match only; the waterfall per record asked.
    let d = deferred_of(args.0, args.1, None, request.clone(), 200, answer).unwrap();
    assert_eq!(Credits::from(d.worst), milli(15_000, 8000, 0));

    // Normal matches without the marker still count, each distinct person once.
    let answer = json!({"matches": [person("p1"), person("p2"), person("p1")], "request_id": 8});
    let p = call(args.0, args.1, None, request.clone(), 200, answer);
    assert_eq!((p.credits, p.records_matched), (milli(2000, 0, 0), Some(3)));

    // Nobody matched: nothing now, and no job to bill later.
    let answer = json!({"matches": [no_match("none"), null, no_match("low")], "request_id": 9});
    let p = call(args.0, args.1, None, request.clone(), 200, answer.clone());
    assert_eq!(
        (p.credits, p.records_matched),
        (Credits::default(), Some(0))
    );
    assert!(deferred_of(args.0, args.1, None, request, 200, answer).is_none());
}

#[test]
fn the_unmatched_rule_is_validated_and_optional() -> TestResult {
    let catalog = |unmatched: &str| {
        format!(
            "version = \"t\"\nprefixes = [\"\"]\n{unmatched}\n[[endpoint]]\nname = \"m\"\nmethods = [\"POST\"]\npaths = [\"m\"]\nrecords_matched = {{ nonnull_items = \"matches\" }}\n[[endpoint.charge]]\ncredit_type = \"lead\"\ncredits = 1\nper = \"each\"\nfield = \"matches\"\n"
        )
    };
    assert_eq!(
        load_error(&catalog("unmatched = { field = \"a.b\", equals = [\"x\"] }")),
        "my.toml:3: catalog: `unmatched.field = \"a.b\"` must be one key of the object, like \"match_confidence\""
    );
    assert!(load_error(&catalog("unmatched = { field = \"c\" }"))
        .starts_with("my.toml:3: catalog: `unmatched` needs `equals = [...]`"));
    assert!(load_error(&catalog(
        "unmatched = { field = \"c\", equals = [\"n\"], unless_data = [\"n\"] }"
    ))
    .contains("\"n\" is in both `equals` and `unless_data`"));
    assert!(
        load_error(&catalog("unmatched = { field = \"c\", equal = [\"n\"] }"))
            .contains("unknown field `equal`")
    );

    let body = json!({"matches": [{"c": "nope", "id": 1}, {"c": "yes"}]}).to_string();
    let req = RequestParams::parse(None, b"");
    let with = Catalog::from_toml(
        &catalog("unmatched = { field = \"c\", equals = [\"nope\"] }"),
        "t",
    )?;
    let without = Catalog::from_toml(&catalog(""), "t")?;
    assert!(with.unmatched_rule().is_some() && without.unmatched_rule().is_none());
    for (cat, lead) in [(with, 1000), (without, 2000)] {
        let p = cat.price(
            cat.classify("POST", "/m"),
            &req,
            &view(200, None, body.as_bytes()),
        );
        assert_eq!(
            (p.credits, p.records_matched),
            (milli(lead, 0, 0), Some(lead / 1000))
        );
    }
    Ok(())
}

#[test]
fn bulk_match_bills_duplicate_people_once() {
    let p = call(
        "POST",
        "/api/v1/people/bulk_match",
        None,
        three_details(),
        200,
        bulk_response(json!([person("p1"), person("p1"), null]), None),
    );
    assert_eq!(p.credits, milli(1000, 0, 0));
    assert_eq!(p.records_matched, Some(2));
}

#[test]
fn bulk_match_prefers_the_reported_figure() {
    let p = call(
        "POST",
        "/api/v1/people/bulk_match",
        None,
        three_details(),
        200,
        bulk_response(json!([person("p1"), null, person("p2")]), Some(json!(1.01))),
    );
    assert_eq!(p.credits, milli(1010, 0, 0));
    assert_eq!(p.source, CreditSource::Reported);
    assert_eq!(p.records_matched, Some(2));

    let p = call(
        "POST",
        "/api/v1/people/bulk_match",
        None,
        three_details(),
        200,
        bulk_response(json!([null, null, null]), Some(json!(0))),
    );
    assert_eq!(
        (p.credits, p.source),
        (Credits::default(), CreditSource::Reported)
    );
}

#[test]
fn a_reported_figure_is_split_by_the_catalog_count() {
    // With a phone reveal the synchronous answer reports only its demographic part (the
    // phones bill later, as a settlement): the figure is all lead, whatever it is.
    let request =
        json!({"details": [{"email": "a@x.com"}, {"id": "p2"}], "reveal_phone_number": "true"});
    let matches = json!([person("p1"), person("p2")]);
    for (figure, want) in [(json!(2), 2000), (json!(1.01), 1010), (json!(18), 18_000)] {
        let p = call(
            "POST",
            "/v1/people/bulk_match",
            None,
            request.clone(),
            200,
            bulk_response(matches.clone(), Some(figure)),
        );
        assert_eq!(
            (p.credits, p.source),
            (milli(want, 0, 0), CreditSource::Reported)
        );
    }
}

#[test]
fn a_non_numeric_reported_figure_falls_back_to_the_catalog() {
    let p = call(
        "POST",
        "/v1/people/bulk_match",
        None,
        three_details(),
        200,
        bulk_response(json!([person("p1")]), Some(json!("1.01"))),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Catalog)
    );
    assert_eq!(
        p.note.as_deref(),
        Some("reported `credits_consumed` is not a non-negative number; priced from the catalog")
    );
    let p = call(
        "POST",
        "/v1/people/bulk_match",
        None,
        three_details(),
        200,
        bulk_response(json!([person("p1")]), Some(Value::Null)),
    );
    assert_eq!((p.source, p.note), (CreditSource::Catalog, None));
}

#[test]
fn bulk_match_over_ten_details_is_rejected_and_free() {
    let details: Vec<Value> = (0..11)
        .map(|i| json!({"email": format!("p{i}@x.com")}))
        .collect();
    let p = call(
        "POST",
        "/api/v1/people/bulk_match",
        None,
        json!({"details": details}),
        400,
        json!({"status": "failed", "error_code": "RECORD_LIMIT_EXCEEDED",
               "error_message": "cannot enrich more than 10 in a single request"}),
    );
    assert_eq!(p.credits, Credits::default());
    assert_eq!(p.source, CreditSource::None);
    assert_eq!((p.records_requested, p.records_matched), (Some(11), None));
}

#[test]
fn bulk_match_details_from_rails_query_keys() {
    let p = call("POST", "/v1/people/bulk_match",
        Some("details[][email]=a%40x.com&details[][first_name]=A&details[][email]=b%40y.com&reveal_phone_number=yes"),
        Value::Null, 200, bulk_response(json!([person("p1"), null]), None));
    assert_eq!(p.records_requested, Some(2));
    // The phone reveal is deferred (settled later), so the answer bills the match only.
    assert_eq!(p.credits, milli(1000, 0, 0));
}

// --- organizations ----------------------------------------------------------------------------

#[test]
fn organizations_enrich_no_match_is_an_empty_object() {
    for method in ["GET", "POST"] {
        let p = call(
            method,
            "/api/v1/organizations/enrich",
            Some("domain=nomatch.example"),
            Value::Null,
            200,
            json!({}),
        );
        assert_eq!(
            (p.credits, p.source),
            (Credits::default(), CreditSource::Catalog),
            "{method}"
        );
        assert_eq!(p.records_matched, Some(0));

        let p = call(
            method,
            "/api/v1/organizations/enrich",
            Some("domain=apollo.io"),
            Value::Null,
            200,
            json!({"organization": {"id": "5e66", "name": "Apollo.io", "primary_domain": "apollo.io"}}),
        );
        assert_eq!(
            (p.credits, p.source),
            (milli(1000, 0, 0), CreditSource::Catalog),
            "{method}"
        );
        assert_eq!(p.records_matched, Some(1));
    }
    let p = call(
        "GET",
        "/v1/organizations/enrich",
        None,
        Value::Null,
        200,
        json!({"organization": {}}),
    );
    assert_eq!(p.credits, Credits::default());
}

#[test]
fn organizations_bulk_enrich_charges_each_organization() {
    let p = call(
        "POST",
        "/api/v1/organizations/bulk_enrich",
        None,
        json!({"domains": ["apollo.io", "nomatch.example", "google.com"]}),
        200,
        json!({"status": "success", "total_requested_domains": 3, "unique_enriched_records": 2,
               "missing_records": 1, "organizations": [{"id": "o1"}, null, {"id": "o2"}]}),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(2000, 0, 0), CreditSource::Catalog)
    );
    assert_eq!((p.records_requested, p.records_matched), (Some(3), Some(2)));

    let p = call(
        "POST",
        "/v1/organizations/bulk_enrich",
        Some("domains[]=a.com&domains[]=b.com"),
        Value::Null,
        200,
        json!({"organizations": []}),
    );
    assert_eq!(
        (p.credits, p.records_requested, p.records_matched),
        (Credits::default(), Some(2), Some(0))
    );
}

#[test]
fn get_by_id_costs_one_lead_on_200_only() {
    for (path, field) in [
        (
            "/api/v1/organizations/5e66b6381e05b4008c8331b8",
            "organization",
        ),
        ("/api/v1/people/60a7c8f2", "person"),
    ] {
        let p = call(
            "GET",
            path,
            None,
            Value::Null,
            200,
            json!({ field: {"id": "x"} }),
        );
        assert_eq!(
            (p.credits, p.source),
            (milli(1000, 0, 0), CreditSource::Catalog),
            "{path}"
        );
        assert_eq!(p.records_matched, Some(1));

        let p = call(
            "GET",
            path,
            None,
            Value::Null,
            404,
            json!({"error": "not found"}),
        );
        assert_eq!(
            (p.credits, p.source),
            (Credits::default(), CreditSource::None),
            "{path}"
        );
        assert_eq!(p.records_matched, None);
    }
}

#[test]
fn a_success_charge_survives_an_unreadable_body() {
    let req = RequestParams::default();
    let p = price_raw(
        "GET",
        "/v1/people/abc",
        &req,
        view(200, None, b"<html>oops</html>"),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Catalog)
    );
    assert_eq!(p.records_matched, None);
    assert!(p
        .note
        .is_some_and(|n| n.starts_with("response body is not JSON")));
}

// --- search -----------------------------------------------------------------------------------

fn companies_page(organizations: Value, accounts: Value) -> Value {
    json!({"breadcrumbs": [], "partial_results_only": false,
           "pagination": {"page": 1, "per_page": 25, "total_entries": 1184, "total_pages": 48},
           "accounts": accounts, "organizations": organizations})
}

#[test]
fn mixed_companies_search_charges_non_empty_pages() {
    let search = |page: Value| {
        call(
            "POST",
            "/api/v1/mixed_companies/search",
            None,
            json!({"q_organization_name": "apollo"}),
            200,
            page,
        )
    };

    let p = search(companies_page(json!([]), json!([])));
    assert_eq!(
        (p.credits, p.source, p.records_matched),
        (Credits::default(), CreditSource::Catalog, None)
    );

    let p = search(companies_page(
        json!([{"id": "o1"}, {"id": "o2"}]),
        json!([]),
    ));
    assert_eq!((p.credits, p.records_matched), (milli(1000, 0, 0), None));

    let p = search(companies_page(json!([]), json!([{"id": "a1"}])));
    assert_eq!((p.credits, p.records_matched), (milli(1000, 0, 0), None));

    let p = search(json!({"organizations": [{"id": "o1"}]}));
    assert_eq!(p.credits, milli(1000, 0, 0));
}

#[test]
fn legacy_people_search_charges_an_export_credit_per_page() {
    let p = call(
        "POST",
        "/v1/mixed_people/search",
        None,
        json!({"person_titles": ["CEO"]}),
        200,
        json!({"people": [person("p1")], "contacts": [], "pagination": {"page": 1}}),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(0, 0, 1000), CreditSource::Catalog)
    );
    let p = call(
        "POST",
        "/v1/mixed_people/search",
        None,
        Value::Null,
        200,
        json!({"people": [], "contacts": []}),
    );
    assert_eq!(p.credits, Credits::default());
}

#[test]
fn people_api_search_is_free() {
    let p = call(
        "POST",
        "/api/v1/mixed_people/api_search",
        Some("person_titles[]=CEO"),
        Value::Null,
        200,
        json!({"total_entries": 2, "people": [
            {"id": "p1", "first_name": "Tim", "last_name_obfuscated": "Zh***g", "has_email": true},
            {"id": "p2", "first_name": "Ann", "last_name_obfuscated": "Hu***n", "has_email": false}]}),
    );
    assert_eq!(
        (p.credits, p.source, p.records_matched),
        (Credits::default(), CreditSource::Catalog, None)
    );

    // Free whatever the body says.
    let req = RequestParams::default();
    let p = price_raw(
        "POST",
        "/api/v1/mixed_people/api_search",
        &req,
        view(200, None, b"not json"),
    );
    assert_eq!(
        (p.credits, p.source),
        (Credits::default(), CreditSource::Catalog)
    );
    assert!(
        p.note.is_none(),
        "a free endpoint that counts nothing never reads the body"
    );
}

#[test]
fn news_and_job_postings_charge_non_empty_pages() {
    let p = call(
        "POST",
        "/api/v1/news_articles/search",
        None,
        json!({"organization_ids": ["o1"]}),
        200,
        json!({"pagination": {"page": 1}, "news_articles": []}),
    );
    assert_eq!(
        (p.credits, p.source),
        (Credits::default(), CreditSource::Catalog)
    );
    let p = call(
        "POST",
        "/api/v1/news_articles/search",
        None,
        Value::Null,
        200,
        json!({"pagination": {"page": 1}, "news_articles": [{"title": "Apollo raises"}]}),
    );
    assert_eq!((p.credits, p.records_matched), (milli(1000, 0, 0), None));

    let p = call(
        "GET",
        "/api/v1/organizations/o1/job_postings",
        None,
        Value::Null,
        200,
        json!({"organization_job_postings": []}),
    );
    assert_eq!(
        (p.credits, p.source),
        (Credits::default(), CreditSource::Catalog)
    );
    let p = call(
        "GET",
        "/api/v1/organizations/o1/job_postings",
        None,
        Value::Null,
        200,
        json!({"organization_job_postings": [{"title": "SRE"}, {"title": "PM"}]}),
    );
    assert_eq!((p.credits, p.records_matched), (milli(1000, 0, 0), None));
}

#[test]
fn usage_stats_is_free() {
    let p = call(
        "POST",
        "/api/v1/usage_stats/credit_usage_stats",
        None,
        Value::Null,
        200,
        json!({"lead_credit": {"limit": 1000, "consumed": 10, "left_over": 990}}),
    );
    assert_eq!(
        (p.credits, p.source, p.note),
        (Credits::default(), CreditSource::Catalog, None)
    );
}

// --- unknown endpoints and failures -----------------------------------------------------------

#[test]
fn unknown_endpoints_are_free_and_unpriced() {
    let p = call(
        "POST",
        "/api/v1/contacts",
        None,
        json!({"first_name": "A"}),
        200,
        json!({"contact": {"id": "c"}}),
    );
    assert_eq!(p.credits, Credits::default());
    assert_eq!(p.source, CreditSource::None);
    assert_eq!(
        (p.records_requested, p.records_matched, p.note),
        (None, None, None)
    );
}

#[test]
fn non_2xx_responses_are_free() {
    let limited = json!({"message": "The maximum number of api calls allowed for api/v1/people/match is 600 times per hour."});
    let p = call(
        "POST",
        "/api/v1/people/match",
        None,
        json!({"email": "a@x.com"}),
        429,
        limited,
    );
    assert_eq!(
        (p.credits, p.source, p.records_matched),
        (Credits::default(), CreditSource::None, None)
    );
    assert_eq!(p.records_requested, Some(1));

    let req = RequestParams::default();
    let unauthorized = b"Invalid API key. See https://docs.apollo.io/reference/authentication for how to authenticate.";
    let p = price_raw(
        "POST",
        "/api/v1/people/match",
        &req,
        view(401, None, unauthorized),
    );
    assert_eq!((p.source, p.note), (CreditSource::None, None));
    let p = price_raw(
        "POST",
        "/api/v1/people/match",
        &req,
        view(500, Some("zstd"), b""),
    );
    assert_eq!((p.source, p.note), (CreditSource::None, None));
}

// --- paths as Apollo's router reads them ---------------------------------------------------------

#[test]
fn paths_are_classified_in_canonical_form() {
    let catalog = Catalog::builtin();
    for path in [
        "/api/v1/people/match",
        "//api/v1/people/match",
        "/api//v1//people/match",
        "/api/v1/people/match/",
        "/api/v1/%70eople/match",
        "/api/v1/people/%6D%61%74%63%68",
        "/v1/./people/match",
        "//v1/people/match",
        "//people/match",
    ] {
        assert_eq!(
            catalog.classify("POST", path).name(),
            "people_match",
            "{path:?}"
        );
    }
    // An escaped reserved character is not a separator: one segment, no endpoint.
    assert_eq!(
        catalog.classify("POST", "/api/v1/people%2Fmatch").name(),
        "other"
    );
    assert_eq!(
        catalog.classify("POST", "/api/v1/people%2fmatch").name(),
        "other"
    );
    // `organizations//job_postings` is `organizations/job_postings`: a record id to Rails.
    assert_eq!(
        catalog
            .classify("GET", "/v1/organizations//job_postings")
            .name(),
        "organization_get"
    );
}

// --- catalog 2026 ---------------------------------------------------------------------------------

#[test]
fn named_free_endpoints_cost_nothing() {
    let catalog = Catalog::builtin();
    for (method, path, name) in [
        ("POST", "usage_stats/api_usage_stats", "api_usage_stats"),
        ("GET", "users/api_profile", "users_api_profile"),
        ("GET", "auth/health", "auth_health"),
        ("POST", "usage_stats/credit_usage_stats", "usage_stats"),
    ] {
        for prefix in ["/api/v1/", "/v1/", "/"] {
            let full = format!("{prefix}{path}");
            let ep = catalog.classify(method, &full);
            assert_eq!(ep.name(), name, "{method} {full}");
            let p = catalog.price(
                ep,
                &RequestParams::default(),
                &view(200, None, br#"{"healthy": true, "is_logged_in": true}"#),
            );
            assert_eq!(
                (p.credits, p.source),
                (milli(0, 0, 0), CreditSource::Catalog)
            );
            assert_eq!(ep.worst_case_milli(&RequestParams::default()), Some(0));
        }
    }
    // The documented methods only: a POST to a GET endpoint is not it.
    assert_eq!(catalog.classify("POST", "/v1/auth/health").name(), "other");
}

fn orgs(ids: &[Option<&str>]) -> Value {
    let organizations: Vec<Value> = ids
        .iter()
        .map(|id| id.map_or(Value::Null, |id| json!({"id": id, "name": id})))
        .collect();
    json!({"status": "success", "total_requested_domains": ids.len(),
           "organizations": organizations})
}

#[test]
fn organizations_bulk_enrich_counts_details_before_domains() {
    let catalog = Catalog::builtin();
    let ep = catalog.classify("POST", "/api/v1/organizations/bulk_enrich");
    let requested = |query: Option<&str>, body: Value| {
        let req = RequestParams::parse(query, body.to_string().as_bytes());
        let p = catalog.price(
            ep,
            &req,
            &view(200, None, orgs(&[Some("o1"), None]).to_string().as_bytes()),
        );
        (p.records_requested, p.credits, ep.worst_case_milli(&req))
    };
    let details =
        json!({"details": [{"domain": "a.com"}, {"name": "google"}, {"linkedin_url": "l"}]});
    // `details` only, `domains[]` only, and both: `details` takes precedence.
    assert_eq!(
        requested(None, details.clone()),
        (Some(3), milli(1000, 0, 0), Some(3000))
    );
    assert_eq!(
        requested(Some("domains[]=a.com&domains[]=b.com"), json!({})),
        (Some(2), milli(1000, 0, 0), Some(2000))
    );
    assert_eq!(
        requested(Some("domains[]=a.com&domains[]=b.com"), details),
        (Some(3), milli(1000, 0, 0), Some(3000))
    );
    // Neither: the most Apollo accepts in one call.
    assert_eq!(
        requested(None, json!({})),
        (None, milli(1000, 0, 0), Some(10_000))
    );
    // One credit per organization found, duplicates once.
    let req = RequestParams::parse(Some("domains[]=a.com&domains[]=a.com&domains[]=c.com"), b"");
    let p = catalog.price(
        ep,
        &req,
        &view(
            200,
            None,
            orgs(&[Some("o1"), Some("o1"), Some("o3")])
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!((p.credits, p.records_matched), (milli(2000, 0, 0), Some(3)));
}

#[test]
fn deprecated_people_search_answers_are_free() {
    let p = call(
        "POST",
        "/api/v1/mixed_people/search",
        None,
        json!({"person_titles": ["CEO"]}),
        422,
        json!({"error": "This endpoint is deprecated for API callers. Please use the new mixed_people/api_search endpoint"}),
    );
    assert_eq!((p.credits, p.source), (milli(0, 0, 0), CreditSource::None));
}

// --- request bodies Apollo accepts ----------------------------------------------------------------

fn request(content_type: Option<&str>, encoding: Option<&str>, bytes: &[u8]) -> RequestParams {
    RequestParams::from_request(
        None,
        &RequestBody {
            content_type,
            content_encoding: encoding,
            bytes,
            max_decoded: 1 << 20,
        },
    )
}

#[test]
fn form_and_compressed_request_bodies_price_like_json() -> TestResult {
    let catalog = Catalog::builtin();
    let answer = bulk_response(json!([person("p1"), null, person("p2")]), None).to_string();
    let price = |req: &RequestParams, path: &str| {
        let ep = catalog.classify("POST", path);
        let p = catalog.price(ep, req, &view(200, None, answer.as_bytes()));
        (p.credits, p.source, p.records_requested, ep.worst_case(req))
    };
    let json_body = br#"{"details":[{"email":"a@x.com"},{"email":"b@y.com","id":"p2"},{"email":"c@z.com"}],"reveal_phone_number":true}"#;
    // Rails keys: a key the last element already has starts the next one.
    let form_body = b"details[][email]=a%40x.com&details[][email]=b%40y.com&details[][id]=p2&details[][email]=c%40z.com&reveal_phone_number=true";
    let want = price(
        &request(Some("application/json"), None, json_body),
        "/v1/people/bulk_match",
    );
    assert_eq!(want.2, Some(3));
    for req in [
        request(Some("application/x-www-form-urlencoded"), None, form_body),
        request(None, None, form_body),
        request(Some("application/json"), Some("gzip"), &gzip(json_body)?),
        request(
            Some("application/x-www-form-urlencoded"),
            Some("br"),
            &brotli(form_body)?,
        ),
        request(None, Some("deflate"), &zlib(form_body)?),
    ] {
        assert_eq!(req.note(), None);
        assert_eq!(price(&req, "/v1/people/bulk_match"), want);
        // Through the doubled slash a base URL with a trailing slash makes, too.
        assert_eq!(price(&req, "//api/v1/people/bulk_match"), want);
    }
    Ok(())
}

#[test]
fn unreadable_request_bodies_are_priced_at_the_worst_case() -> TestResult {
    let catalog = Catalog::builtin();
    let match_ep = catalog.classify("POST", "/api/v1/people/match");
    let every_flag = RequestParams::parse(
        Some("reveal_phone_number=true&run_waterfall_email=true&run_waterfall_phone=true"),
        b"",
    );
    let cut = {
        let full = gzip(br#"{"email":"a@x.com","reveal_phone_number":true}"#)?;
        full[..full.len() - 9].to_vec()
    };
    let bomb = gzip(&vec![b' '; 4 << 20])?;
    for (req, why) in [
        (
            request(Some("application/json"), None, b"{\"email\": "),
            "not valid JSON",
        ),
        (
            request(Some("text/plain"), None, b"email=a"),
            "Content-Type `text/plain`",
        ),
        (
            request(None, Some("gzip"), &cut),
            "could not be decoded: gzip",
        ),
        (request(None, Some("gzip"), &bomb), "exceeds 1 MiB cap"),
    ] {
        // Reserved at the worst case: as if every parameter a charge depends on were set.
        assert_eq!(
            match_ep.worst_case(&req),
            match_ep.worst_case(&every_flag),
            "{why}"
        );
        let answer = json!({"person": person("p1"), "request_id": -42}).to_string();
        let p = catalog.price(match_ep, &req, &view(200, None, answer.as_bytes()));
        let expected = catalog.price(match_ep, &every_flag, &view(200, None, answer.as_bytes()));
        assert_eq!(p.credits, expected.credits, "{why}");
        assert_eq!(p.source, CreditSource::Estimated, "{why}");
        let note = p.note.unwrap_or_default();
        assert!(
            note.contains(why) && note.contains("priced as if it asked for everything"),
            "{note}"
        );
        // A miss is still free: the charges read the answer, and there is nothing in it.
        let p = catalog.price(match_ep, &req, &view(200, None, br#"{"person": null}"#));
        assert_eq!(p.credits, milli(0, 0, 0), "{why}");

        // Where no charge depends on a parameter, the answer alone prices the call exactly.
        let ep = catalog.classify("POST", "/api/v1/organizations/enrich");
        let p = catalog.price(
            ep,
            &req,
            &view(200, None, br#"{"organization": {"id": "o"}}"#),
        );
        assert_eq!(
            (p.credits, p.source, p.note),
            (milli(1000, 0, 0), CreditSource::Catalog, None)
        );
    }
    // A readable plain request is exact.
    let p = catalog.price(
        match_ep,
        &request(Some("application/json"), None, br#"{"email":"a@x.com"}"#),
        &view(
            200,
            None,
            json!({"person": person("p1")}).to_string().as_bytes(),
        ),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Catalog)
    );
    Ok(())
}

// --- response encodings -----------------------------------------------------------------------

#[test]
fn compressed_responses_are_priced() -> TestResult {
    let body = bulk_response(json!([person("p1"), null, person("p2")]), None).to_string();
    let req = RequestParams::parse(None, three_details().to_string().as_bytes());
    let encoded = [
        ("gzip", gzip(body.as_bytes())?),
        ("deflate", zlib(body.as_bytes())?),
        ("br", brotli(body.as_bytes())?),
        ("gzip, br", brotli(&gzip(body.as_bytes())?)?),
    ];
    for (encoding, bytes) in &encoded {
        let p = price_raw(
            "POST",
            "/v1/people/bulk_match",
            &req,
            view(200, Some(encoding), bytes),
        );
        assert_eq!(
            (p.credits, p.source, p.note),
            (milli(2000, 0, 0), CreditSource::Catalog, None),
            "{encoding}"
        );
    }
    Ok(())
}

#[test]
fn a_gzip_bomb_is_stopped_at_the_cap() -> TestResult {
    let mut bomb_json = b"{\"person\":{\"id\":\"p1\",\"pad\":\"".to_vec();
    bomb_json.resize(8 << 20, b'a');
    let bomb = gzip(&bomb_json)?;
    let resp = ResponseView {
        max_decoded: 1 << 20,
        ..view(200, Some("gzip"), &bomb)
    };
    let p = price_raw("POST", "/v1/people/match", &RequestParams::default(), resp);
    // Apollo billed the 2xx: the most a plain match costs.
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Estimated)
    );
    assert_eq!(
        p.note.as_deref(),
        Some("decoded body exceeds 1 MiB cap; priced at the catalog's worst case for the request")
    );
    assert_eq!(p.records_matched, None);
    Ok(())
}

#[test]
fn truncated_bodies_are_priced_at_the_worst_case() -> TestResult {
    let body = gzip(json!({"person": person("p1")}).to_string().as_bytes())?;
    let half = &body[..body.len() / 2];
    let req = RequestParams::default();

    let resp = ResponseView {
        truncated: true,
        ..view(200, Some("gzip"), half)
    };
    let p = price_raw("POST", "/v1/people/match", &req, resp);
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Estimated)
    );
    assert_eq!(
        p.note,
        Some(format!(
            "response body is incomplete ({} bytes kept for pricing); \
             priced at the catalog's worst case for the request",
            half.len()
        ))
    );

    // A bulk match cut short: one credit per detail asked for, or the most Apollo accepts.
    let resp = ResponseView {
        truncated: true,
        ..view(200, None, b"{\"matches\": [")
    };
    let details = RequestParams::parse(None, three_details().to_string().as_bytes());
    let p = price_raw("POST", "/v1/people/bulk_match", &details, resp);
    assert_eq!(
        (p.credits, p.source),
        (milli(3000, 0, 0), CreditSource::Estimated)
    );
    let p = price_raw("POST", "/v1/people/bulk_match", &req, resp);
    assert_eq!(
        (p.credits, p.source),
        (milli(10_000, 0, 0), CreditSource::Estimated)
    );
    // An endpoint that charges per 2xx needs no body: exact, whatever happened to it.
    let p = price_raw("GET", "/v1/people/p1", &req, resp);
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Catalog)
    );
    // Free endpoints stay free, non-2xx answers stay 0.
    let p = price_raw("POST", "/v1/mixed_people/api_search", &req, resp);
    assert_eq!(
        (p.credits, p.source),
        (milli(0, 0, 0), CreditSource::Catalog)
    );
    let p = price_raw(
        "POST",
        "/v1/people/match",
        &req,
        ResponseView {
            status: 503,
            ..resp
        },
    );
    assert_eq!((p.credits, p.source), (milli(0, 0, 0), CreditSource::None));

    // Cut short upstream (the tap did not truncate it): a decode error.
    let p = price_raw(
        "POST",
        "/v1/people/match",
        &req,
        view(200, Some("gzip"), half),
    );
    assert_eq!(p.source, CreditSource::Estimated);
    assert!(p
        .note
        .is_some_and(|n| n.starts_with("gzip decode failed: ")));
    Ok(())
}

#[test]
fn unknown_encodings_are_named() {
    let p = price_raw(
        "POST",
        "/v1/people/match",
        &RequestParams::default(),
        view(200, Some("zstd"), b"\x28\xb5"),
    );
    assert_eq!(p.source, CreditSource::Estimated);
    assert_eq!(
        p.note.as_deref(),
        Some("unsupported content-encoding `zstd`; priced at the catalog's worst case for the request")
    );
}

#[test]
fn malformed_json_is_noted() {
    let req = RequestParams::default();
    let p = price_raw(
        "POST",
        "/v1/people/match",
        &req,
        view(200, None, br#"{"person": {"id": "#),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(1000, 0, 0), CreditSource::Estimated)
    );
    assert!(p
        .note
        .is_some_and(|n| n.starts_with("response body is not JSON: ")));

    let p = price_raw("POST", "/v1/people/match", &req, view(200, None, b"[1,2]"));
    assert_eq!(
        p.note.as_deref(),
        Some("response body is a JSON array, not an object; priced at the catalog's worst case for the request")
    );

    let p = price_raw("POST", "/v1/people/match", &req, view(200, None, b""));
    assert_eq!(p.source, CreditSource::Estimated);
}

#[test]
fn wrong_shapes_are_noted() {
    let p = call(
        "POST",
        "/v1/people/match",
        None,
        json!({"reveal_phone_number": true}),
        200,
        json!({"person": 5}),
    );
    let catalog = Catalog::builtin();
    let reveal = RequestParams::parse(None, br#"{"reveal_phone_number": true}"#);
    let ep = catalog.classify("POST", "/v1/people/match");
    // The row holds the answer's own worst case; the phone reveal's worst case is recorded by
    // the deferred charge (a settlement at its worst), so it is not counted twice.
    let worst = ep.synchronous_worst_case(&reveal);
    assert_eq!(
        (Some(p.credits), p.source, p.records_matched),
        (worst, CreditSource::Estimated, None)
    );
    assert_eq!(worst.map(|c| c.direct_dial_milli), Some(0));
    assert_eq!(
        ep.worst_case(&reveal).map(|c| c.direct_dial_milli),
        Some(8000)
    );
    assert_eq!(
        p.note.as_deref(),
        Some("response field `person` is a number, expected an object; priced at the catalog's worst case for the request")
    );

    let p = call(
        "POST",
        "/v1/people/bulk_match",
        None,
        three_details(),
        200,
        json!({"matches": "x"}),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(3000, 0, 0), CreditSource::Estimated)
    );
    assert_eq!(
        p.note.as_deref(),
        Some("response field `matches` is a string, expected an array; priced at the catalog's worst case for the request")
    );

    // A reported figure is not trusted from an answer whose matches cannot be read.
    let p = call(
        "POST",
        "/v1/people/bulk_match",
        None,
        three_details(),
        200,
        json!({"matches": 7, "credits_consumed": 2}),
    );
    assert_eq!(
        (p.credits, p.source),
        (milli(3000, 0, 0), CreditSource::Estimated)
    );
    assert!(p.note.is_some());
}

#[test]
fn arbitrary_bytes_never_panic() {
    let catalog = Catalog::builtin();
    let req = RequestParams::parse(
        Some("details[][email]=%ff&reveal_phone_number=1&%%%=&[]=["),
        b"\xff\xfe{",
    );
    let bodies: [&[u8]; 6] = [
        b"",
        b"\x1f\x8b\x08\x00",
        b"{}",
        b"null",
        b"{\"matches\":[null,{},[],1]}",
        &[0xff; 64],
    ];
    for ep in catalog.endpoints() {
        for body in bodies {
            for encoding in [
                None,
                Some("gzip"),
                Some("deflate"),
                Some("br"),
                Some("identity, ,gzip"),
                Some("\u{0}"),
            ] {
                for status in [200, 204, 299, 300, 404] {
                    let p = catalog.price(ep, &req, &view(status, encoding, body));
                    assert!(p.credits.total_milli() >= 0);
                }
            }
        }
        let _ = ep.worst_case_milli(&req);
    }
}

// --- worst case -------------------------------------------------------------------------------

#[test]
fn worst_case_bounds_a_request() {
    let catalog = Catalog::builtin();
    let worst = |method: &str, path: &str, query: Option<&str>, body: Value| {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        catalog
            .classify(method, path)
            .worst_case_milli(&RequestParams::parse(query, body.as_bytes()))
    };
    assert_eq!(
        worst(
            "POST",
            "/v1/people/match",
            None,
            json!({"email": "a@x.com"})
        ),
        Some(1000)
    );
    assert_eq!(
        worst(
            "POST",
            "/v1/people/match",
            Some("reveal_phone_number=true"),
            Value::Null
        ),
        Some(9000)
    );
    assert_eq!(
        worst("POST", "/v1/people/bulk_match", None, three_details()),
        Some(3000)
    );
    let mut reveal = three_details();
    if let Some(map) = reveal.as_object_mut() {
        map.insert("reveal_phone_number".to_owned(), json!(true));
    }
    assert_eq!(
        worst("POST", "/v1/people/bulk_match", None, reveal),
        Some(27_000)
    );
    // No `details`: at most the 10 Apollo accepts in one call.
    assert_eq!(
        worst("POST", "/v1/people/bulk_match", None, Value::Null),
        Some(10_000)
    );
    assert_eq!(
        worst("POST", "/v1/mixed_companies/search", None, Value::Null),
        Some(1000)
    );
    assert_eq!(
        worst("POST", "/v1/mixed_people/api_search", None, Value::Null),
        Some(0)
    );
    assert_eq!(
        worst("GET", "/v1/organizations/x", None, Value::Null),
        Some(1000)
    );
}

// --- loading and validation -------------------------------------------------------------------

/// A minimal valid catalog with `extra` appended to its one endpoint.
fn with_endpoint(extra: &str) -> String {
    format!(
        "version = \"t\"\nprefixes = [\"/v1\"]\n\n[[endpoint]]\nname = \"e\"\nmethods = [\"GET\"]\npaths = [\"e\"]\n{extra}"
    )
}

fn load_error(text: &str) -> String {
    match Catalog::from_toml(text, "my.toml") {
        Ok(_) => "loaded".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fractional_credits_are_kept_in_thousandths() -> TestResult {
    let catalog = Catalog::from_toml(
        &with_endpoint(
            "[[endpoint.charge]]\ncredit_type = \"export\"\ncredits = 0.25\nper = \"success\"\n",
        ),
        "frac.toml",
    )?;
    let ep = catalog.classify("GET", "/v1/e");
    let p = catalog.price(ep, &RequestParams::default(), &view(200, None, b""));
    assert_eq!(
        (p.credits, p.source),
        (milli(0, 0, 250), CreditSource::Catalog)
    );
    assert!(!ep.inspects_body());
    Ok(())
}

#[test]
fn unknown_keys_are_rejected_with_their_line() {
    let err = load_error(&with_endpoint("colour = \"red\"\n"));
    assert!(
        err.starts_with("my.toml:8: unknown field `colour`"),
        "{err}"
    );

    let err = load_error(&with_endpoint("[[endpoint.charge]]\ncredit_type = \"lead\"\ncredits = 1\nper = \"success\"\nwhen = \"x\"\n"));
    assert!(err.starts_with("my.toml:12: unknown field `when`"), "{err}");

    let err = load_error("version = \"t\"\nprefixes = [\"\"]\nendpoints = []\n");
    assert!(
        err.starts_with("my.toml:3: unknown field `endpoints`"),
        "{err}"
    );
}

#[test]
fn unknown_credit_types_and_bases_are_rejected() {
    let err = load_error(&with_endpoint(
        "[[endpoint.charge]]\ncredit_type = \"mobile\"\ncredits = 1\nper = \"success\"\n",
    ));
    assert!(
        err.starts_with("my.toml:9: unknown variant `mobile`"),
        "{err}"
    );
    assert!(err.contains("`direct_dial`"), "{err}");

    let err = load_error(&with_endpoint(
        "[[endpoint.charge]]\ncredit_type = \"lead\"\ncredits = 1\nper = \"row\"\n",
    ));
    assert!(
        err.starts_with("my.toml:11: unknown variant `row`"),
        "{err}"
    );

    let err = load_error(&with_endpoint("records_matched = { count = \"x\" }\n"));
    assert!(
        err.starts_with("my.toml:8: unknown variant `count`"),
        "{err}"
    );
}

#[test]
fn charges_need_the_fields_their_basis_reads() {
    let charge = |body: &str| {
        load_error(&with_endpoint(&format!(
            "[[endpoint.charge]]\ncredit_type = \"lead\"\ncredits = 1\n{body}"
        )))
    };
    assert_eq!(
        charge("per = \"each\"\n"),
        "my.toml:8: endpoint `e`, charge 1: per = \"each\" needs exactly one `field`"
    );
    assert_eq!(
        charge("per = \"present\"\nfields = [\"a\", \"b\"]\n"),
        "my.toml:8: endpoint `e`, charge 1: per = \"present\" needs exactly one `field`"
    );
    assert_eq!(charge("per = \"nonempty\"\n"), "my.toml:8: endpoint `e`, charge 1: per = \"nonempty\" needs `fields = [...]` (or one `field`)");
    assert_eq!(charge("per = \"success\"\nfield = \"a\"\n"), "my.toml:8: endpoint `e`, charge 1: per = \"success\" charges every 2xx and takes no `field`");
    assert_eq!(
        charge("per = \"present\"\nfield = \"a\"\nunique_by = \"id\"\n"),
        "my.toml:8: endpoint `e`, charge 1: `unique_by` only applies to per = \"each\""
    );
    assert_eq!(charge("per = \"present\"\nfield = \"a.\"\n"), "my.toml:8: endpoint `e`, charge 1: field `a.` must be a key or a dotted path of keys, like `person` or `a.b`");
    assert_eq!(
        charge("per = \"present\"\nfield = \"a\"\nif_param = \"\"\n"),
        "my.toml:8: endpoint `e`, charge 1: `if_param` needs a parameter name"
    );
    let negative = load_error(&with_endpoint(
        "[[endpoint.charge]]\ncredit_type = \"lead\"\ncredits = -1\nper = \"success\"\n",
    ));
    assert_eq!(
        negative,
        "my.toml:8: endpoint `e`, charge 1: `credits = -1` must be between 0 and 1000000"
    );
    let nan = load_error(&with_endpoint(
        "[[endpoint.charge]]\ncredit_type = \"lead\"\ncredits = nan\nper = \"success\"\n",
    ));
    assert!(nan.contains("`credits = NaN` must be between"), "{nan}");
}

#[test]
fn endpoints_are_validated() {
    let endpoint = |name: &str, methods: &str, paths: &str| {
        load_error(&format!(
            "version = \"t\"\nprefixes = [\"\"]\n[[endpoint]]\nname = \"{name}\"\nmethods = {methods}\npaths = {paths}\n"
        ))
    };
    assert_eq!(
        endpoint("other", "[\"GET\"]", "[\"x\"]"),
        "my.toml:4: endpoint `other`: `other` is reserved for calls no endpoint matches"
    );
    assert!(endpoint("People Match", "[\"GET\"]", "[\"x\"]")
        .contains("lower-case letters, digits and `_`"));
    assert!(
        endpoint("e", "[]", "[\"x\"]").starts_with("my.toml:5: endpoint `e`: `methods` must list")
    );
    assert!(endpoint("e", "[\"GE T\"]", "[\"x\"]")
        .starts_with("my.toml:5: endpoint `e`: `GE T` is not an HTTP method"));
    assert!(
        endpoint("e", "[\"GET\"]", "[]").starts_with("my.toml:6: endpoint `e`: `paths` must list")
    );
    assert_eq!(
        endpoint("e", "[\"GET\"]", "[\"ok\", \"people/{}\"]"),
        "my.toml:6: endpoint `e`: parameter `{}` needs a name of letters, digits and `_`, like `{id}`"
    );
    assert!(endpoint("e", "[\"GET\"]", "[\"/people\"]").contains("write `people`"));

    let records = |rule: &str| load_error(&with_endpoint(rule));
    assert!(records("records_requested = { fixed = -1 }\n")
        .contains("`fixed = -1` must not be negative"));
    assert!(records("records_requested = { param_len = \"\" }\n")
        .contains("`param_len` needs a parameter name"));
    assert!(records("records_requested = { param_len = [] }\n")
        .contains("`param_len` needs a parameter name (or a list of them)"));
    assert!(
        records("records_requested = { param_len = \"d\", max = -2 }\n")
            .contains("`max = -2` must not be negative")
    );
    assert!(records("records_requested = { fixed = 1, max = 3 }\n")
        .contains("`max` only applies to `param_len`"));
    assert!(
        records("records_requested = { param_len = \"d\", fixed = 1 }\n")
            .contains("either `param_len` or `fixed`")
    );
    assert!(records("records_requested = {}\n").contains("needs `param_len"));
    assert!(records("records_requested = { count = 1 }\n").contains("unknown field `count`"));
    assert!(records("records_matched = { items = [] }\n")
        .contains("`items` must list at least one field"));
    assert!(records("reported = \"\"\n").starts_with("my.toml:8: endpoint `e`: field `` must be"));
}

#[test]
fn duplicate_names_are_rejected() {
    let text = format!(
        "{}\n[[endpoint]]\nname = \"e\"\nmethods = [\"POST\"]\npaths = [\"f\"]\n",
        with_endpoint("")
    );
    assert_eq!(
        load_error(&text),
        "my.toml:10: endpoint `e`: the name is already used by an earlier endpoint; names must be unique"
    );
}

#[test]
fn catalog_level_keys_are_validated() {
    assert!(load_error("prefixes = [\"\"]\n").contains("missing field `version`"));
    assert_eq!(
        load_error("version = \" \"\nprefixes = [\"\"]\n"),
        "my.toml:1: catalog: `version` must not be empty"
    );
    assert!(load_error("version = \"t\"\nprefixes = []\n")
        .starts_with("my.toml:2: catalog: `prefixes` must list"));
    assert!(load_error("version = \"t\"\nprefixes = [\"/v1/\"]\n")
        .starts_with("my.toml:2: catalog: prefix `/v1/` must start with `/`"));
    assert!(load_error("version = \"t\"\nprefixes = [\"/{v}\"]\n").contains("must not contain"));
    assert!(load_error("version = \"t\"\nprefixes = [\"\"\n").starts_with("my.toml:"));
}

#[test]
fn an_empty_catalog_prices_everything_as_other() -> TestResult {
    let catalog = Catalog::from_toml("version = \"empty\"\nprefixes = [\"\"]\n", "empty.toml")?;
    assert_eq!(catalog.endpoints().count(), 0);
    assert_eq!(catalog.classify("GET", "/v1/people/match").name(), "other");
    Ok(())
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() -> TestResult {
    let dir = std::env::temp_dir().join(format!("creditmeter-catalog-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let good = dir.join("good.toml");
    std::fs::write(&good, with_endpoint(""))?;
    assert_eq!(Catalog::load(&good)?.version(), "t");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, with_endpoint("oops = 1\n"))?;
    let err = Catalog::load(&bad)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with(&format!("{}:8: unknown field `oops`", bad.display())),
        "{err}"
    );

    let missing = dir.join("missing.toml");
    let err = Catalog::load(&missing).err();
    assert!(matches!(&err, Some(CatalogError::Read { path, .. }) if *path == missing));
    assert!(err
        .and_then(|e| e.source().map(|s| s.to_string()))
        .is_some());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
