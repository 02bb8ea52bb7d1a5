//! The sim's behaviour as a caller sees it: answers, billing, limits, determinism; then the same
//! over real TLS sockets with HTTP/1.1 and h2.

use super::*;
use serde_json::{json, Value};

const KEY: &str = "test-key";

fn sim_with(edit: impl FnOnce(&mut SimConfig)) -> Sim {
    let mut cfg = SimConfig::default();
    edit(&mut cfg);
    Sim::new(cfg)
}

fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

/// A call with the test API key.
fn call(sim: &Sim, method: &str, uri: &str, body: Value) -> Reply {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    sim.dispatch(
        &parts(method, uri, &[("x-api-key", KEY)]),
        &body,
        Instant::now(),
    )
}

fn billed_milli(reply: &Reply) -> i64 {
    reply
        .headers
        .get(BILLED_HEADER)
        .map_or(0, |value| value.to_str().unwrap().parse().unwrap())
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|value| value.to_str().unwrap())
}

/// Encodes a reply as the server would, without gzip.
async fn wire_bytes(reply: Reply) -> Bytes {
    reply
        .into_response(false)
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
}

mod auth {
    use super::*;

    #[tokio::test]
    async fn missing_or_empty_keys_get_apollos_plain_text_401() {
        let sim = Sim::new(SimConfig::default());
        let uri = "/api/v1/people/match?email=a@b.com";
        for headers in [
            &[][..],
            &[("x-api-key", "")],
            &[("authorization", "Bearer ")],
            &[("authorization", "Basic abc")],
        ] {
            let reply = sim.dispatch(&parts("GET", uri, headers), b"", Instant::now());
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
            assert!(reply
                .headers
                .keys()
                .all(|name| !name.as_str().starts_with("x-")));
            let response = reply.into_response(false);
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "text/plain; charset=utf-8"
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], INVALID_API_KEY.as_bytes());
        }
        assert_eq!(sim.billed().calls, 4);
        assert_eq!(sim.billed().billed_calls, 0);
    }

    #[test]
    fn accepts_every_way_apollo_takes_a_key() {
        let sim = Sim::new(SimConfig::default());
        let ok = |headers: &[(&str, &str)], uri: &str, body: &str| {
            let reply = sim.dispatch(
                &parts("POST", uri, headers),
                body.as_bytes(),
                Instant::now(),
            );
            reply.status == StatusCode::OK
        };
        let uri = "/api/v1/usage_stats/credit_usage_stats";
        assert!(ok(&[("x-api-key", "k")], uri, ""));
        assert!(ok(&[("authorization", "Bearer tok")], uri, ""));
        assert!(ok(&[], &format!("{uri}?api_key=k"), ""));
        assert!(ok(&[], uri, r#"{"api_key": "k"}"#));
        assert!(!ok(&[], uri, r#"{"api_key": ""}"#));
    }
}

mod billing {
    use super::*;

    #[test]
    fn people_match_bills_a_lead_per_person_and_no_phone_at_once() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "ada@acme.com"}),
        );
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body()["person"]["email"], "ada@acme.com");
        assert!(reply.body()["request_id"].is_i64());
        assert_eq!(billed_milli(&reply), 1_000);

        // A phone reveal bills only the person now; the phones come (and bill) with the job.
        let reply = call(
            &sim,
            "GET",
            "/v1/people/match?email=bob@acme.com&reveal_phone_number=true&poll_only=true",
            Value::Null,
        );
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(billed_milli(&reply), 1_000);
        assert!(reply.body()["person"].get("phone_numbers").is_none());

        let none = sim_with(|cfg| cfg.match_rate_pct = 0);
        let reply = call(
            &none,
            "POST",
            "/people/match",
            json!({"email": "ada@acme.com", "reveal_phone_number": true, "poll_only": true}),
        );
        assert_eq!(reply.body()["person"], Value::Null);
        assert_eq!(header(&reply, "x-sim-billed-milli"), None);
        assert_eq!(none.billed().billed_calls, 0);

        assert_eq!(
            sim.billed(),
            Billed {
                lead_milli: 2_000,
                direct_dial_milli: 0,
                export_milli: 0,
                calls: 2,
                billed_calls: 2,
            }
        );
        let jobs = sim.jobs();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].state, JobState::Pending);
        assert_eq!(jobs[0].billed_milli(), 0);
    }

    #[test]
    fn phone_reveals_and_waterfalls_need_a_webhook_or_poll_only() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "ada@acme.com", "reveal_phone_number": true}),
        );
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.body()["error_code"], "INVALID_PARAMETERS");
        assert!(reply.body()["error"]
            .as_str()
            .unwrap()
            .contains("webhook_url"));
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": [{"email": "a@b.com"}], "run_waterfall_email": true}),
        );
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.body()["status"], "failed");
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "ada@acme.com", "reveal_phone_number": true, "webhook_url": "https://hooks.example/apollo"}),
        );
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(sim.billed().billed_calls, 1);
        assert_eq!(sim.jobs().len(), 1);
    }

    #[test]
    fn request_ids_are_often_negative() {
        let sim = Sim::new(SimConfig::default());
        let negative = (0..40)
            .filter(|_| {
                let reply = call(
                    &sim,
                    "POST",
                    "/api/v1/people/match",
                    json!({"email": "x@y.com"}),
                );
                reply.body()["request_id"].as_i64().unwrap() < 0
            })
            .count();
        assert!((5..35).contains(&negative), "{negative} of 40");
    }

    #[test]
    fn bulk_match_lines_up_with_details_and_bills_each_person_once() {
        let sim = Sim::new(SimConfig::default());
        let emails: Vec<String> = (0..8).map(|i| format!("person{i}@example.com")).collect();
        let mut details: Vec<Value> = emails.iter().map(|email| json!({"email": email})).collect();
        // The same person twice more: once by the same email, once with different casing.
        details.push(json!({"email": emails[0]}));
        details.push(json!({"email": emails[0].to_uppercase(), "first_name": "Someone"}));

        let single = Sim::new(SimConfig::default());
        let found: Vec<bool> = emails
            .iter()
            .map(|email| {
                let reply = call(
                    &single,
                    "POST",
                    "/api/v1/people/match",
                    json!({"email": email}),
                );
                !reply.body()["person"].is_null()
            })
            .collect();
        assert!(found[0], "seed 42 matches the first email");
        assert!(found.iter().any(|f| !f), "seed 42 misses some email");
        let unique = found.iter().filter(|f| **f).count() as i64;

        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": details, "reveal_phone_number": true, "poll_only": true}),
        );
        let body = reply.body();
        assert_eq!(reply.status, StatusCode::OK);
        let matches = body["matches"].as_array().unwrap();
        assert_eq!(matches.len(), 10);
        for (i, found) in found.iter().enumerate() {
            assert_eq!(!matches[i].is_null(), *found, "match {i}");
        }
        assert_eq!(matches[8]["id"], matches[0]["id"]);
        assert_eq!(matches[9]["id"], matches[0]["id"]);
        assert_eq!(body["status"], "success");
        assert_eq!(body["error_code"], Value::Null);
        assert_eq!(body["error_message"], Value::Null);
        assert_eq!(body["total_requested_enrichments"], 10);
        assert_eq!(body["unique_enriched_records"], unique);
        assert_eq!(body["missing_records"], 8 - unique);
        // The synchronous answer bills (and reports) only the people; phones come later.
        assert_eq!(body["credits_consumed"], unique);
        assert_eq!(body["phone_enrichment"], json!({"status": "pending"}));
        assert!(body["request_id"].is_i64());
        assert_eq!(billed_milli(&reply), unique * 1_000);
        assert_eq!(sim.billed().lead_milli, unique * 1_000);
        assert_eq!(sim.billed().direct_dial_milli, 0);
    }

    #[test]
    fn bulk_match_reads_rails_query_details_and_can_omit_credits() {
        let sim = sim_with(|cfg| {
            cfg.match_rate_pct = 100;
            cfg.report_credits_consumed = false;
        });
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/bulk_match?details[][email]=a%40x.com&details[][first_name]=Ann&details[][email]=b%40y.com",
            Value::Null,
        );
        let body = reply.body();
        assert_eq!(body["total_requested_enrichments"], 2);
        assert_eq!(body["matches"][0]["first_name"], "Ann");
        assert_eq!(body["matches"][1]["email"], "b@y.com");
        assert!(body.get("credits_consumed").is_none());
        assert!(body.get("phone_enrichment").is_none());
        assert_eq!(billed_milli(&reply), 2_000);
    }

    #[tokio::test]
    async fn more_than_ten_details_is_a_free_400() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let details: Vec<Value> = (0..11)
            .map(|i| json!({"email": format!("p{i}@x.com")}))
            .collect();
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": details}),
        );
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(billed_milli(&reply), 0);
        assert!(header(&reply, "x-rate-limit-minute").is_some());
        assert_eq!(
            &wire_bytes(reply).await[..],
            br#"{"error_code":"RECORD_LIMIT_EXCEEDED","error_message":"cannot enrich more than 10 in a single request","status":"failed"}"#
        );
        assert_eq!(sim.billed().billed_calls, 0);
    }

    #[test]
    fn organization_enrich_bills_matches_only() {
        let sim = Sim::new(SimConfig::default());
        let (mut hits, mut misses) = (0, 0);
        for i in 0..30 {
            let reply = call(
                &sim,
                if i % 2 == 0 { "GET" } else { "POST" },
                &format!("/api/v1/organizations/enrich?domain=https://www.company{i}.com/"),
                Value::Null,
            );
            match reply.body().get("organization") {
                Some(org) => {
                    assert_eq!(org["primary_domain"], format!("company{i}.com"));
                    assert_eq!(billed_milli(&reply), 1_000);
                    hits += 1;
                }
                None => {
                    assert_eq!(reply.body(), &json!({}));
                    assert_eq!(billed_milli(&reply), 0);
                    misses += 1;
                }
            }
        }
        assert!(hits > 10 && misses > 3, "{hits} hits, {misses} misses");
        assert_eq!(sim.billed().lead_milli, hits * 1_000);
        let reply = call(&sim, "GET", "/api/v1/organizations/enrich", Value::Null);
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn bulk_enrich_bills_each_organization_returned() {
        let sim = Sim::new(SimConfig::default());
        let domains: Vec<String> = (0..10).map(|i| format!("firm{i}.io")).collect();
        let query: String = domains.iter().map(|d| format!("domains[]={d}&")).collect();
        let reply = call(
            &sim,
            "POST",
            &format!("/api/v1/organizations/bulk_enrich?{query}"),
            Value::Null,
        );
        let organizations = reply.body()["organizations"].as_array().unwrap().clone();
        assert_eq!(organizations.len(), 10);
        let found = organizations.iter().filter(|o| !o.is_null()).count() as i64;
        assert!(found > 0 && found < 10, "{found}");
        assert_eq!(reply.body()["missing_records"], 10 - found);
        assert_eq!(billed_milli(&reply), found * 1_000);
        // Each entry is what organizations/enrich says about that domain.
        for (domain, org) in domains.iter().zip(&organizations) {
            let single = call(
                &sim,
                "GET",
                &format!("/organizations/enrich?domain={domain}"),
                Value::Null,
            );
            assert_eq!(
                single.body().get("organization").unwrap_or(&Value::Null),
                org
            );
        }
    }

    #[test]
    fn records_by_id_cost_a_lead_unless_missing() {
        let sim = Sim::new(SimConfig::default());
        let person = call(
            &sim,
            "GET",
            "/api/v1/people/64a0c1e9b3d4a00123456789",
            Value::Null,
        );
        assert_eq!(person.body()["person"]["id"], "64a0c1e9b3d4a00123456789");
        assert_eq!(billed_milli(&person), 1_000);
        let org = call(
            &sim,
            "GET",
            "/api/v1/organizations/5e66b6381e05b4008c8331b8",
            Value::Null,
        );
        assert_eq!(org.body()["organization"]["id"], "5e66b6381e05b4008c8331b8");
        assert_eq!(billed_milli(&org), 1_000);
        for uri in [
            "/api/v1/people/missing-1",
            "/api/v1/organizations/missing-2",
            "/api/v1/organizations/missing-3/job_postings",
        ] {
            let reply = call(&sim, "GET", uri, Value::Null);
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(reply.body(), &json!({"error": "Not Found"}));
            assert_eq!(billed_milli(&reply), 0);
        }
        assert_eq!(sim.billed().lead_milli, 2_000);
    }

    #[test]
    fn company_search_bills_a_lead_per_non_empty_page() {
        let sim = Sim::new(SimConfig::default());
        let reply = call(
            &sim,
            "POST",
            "/api/v1/mixed_companies/search",
            json!({"page": 1}),
        );
        let body = reply.body();
        assert_eq!(body["organizations"].as_array().unwrap().len(), 25);
        assert_eq!(body["accounts"], json!([]));
        assert_eq!(body["pagination"]["per_page"], 25);
        assert_eq!(billed_milli(&reply), 1_000);
        let size = body.to_string().len();
        assert!(
            (50_000..75_000).contains(&size),
            "a page of 25 is {size} bytes"
        );

        let past_end = body["pagination"]["total_pages"].as_u64().unwrap() + 1;
        let reply = call(
            &sim,
            "POST",
            "/api/v1/mixed_companies/search",
            json!({"page": past_end}),
        );
        assert_eq!(reply.body()["organizations"], json!([]));
        assert_eq!(billed_milli(&reply), 0);

        // A keyword decides whether there are results at all.
        let searches: Vec<Reply> = (0..20)
            .map(|i| {
                call(
                    &sim,
                    "POST",
                    &format!(
                        "/api/v1/mixed_companies/search?q_organization_name=name{i}&per_page=5"
                    ),
                    Value::Null,
                )
            })
            .collect();
        let empty = searches
            .iter()
            .filter(|reply| reply.body()["organizations"] == json!([]))
            .inspect(|reply| assert_eq!(billed_milli(reply), 0))
            .count();
        assert!(empty > 0 && empty < 20, "{empty} of 20 empty");
        assert!(searches.iter().all(|reply| reply.body()["organizations"]
            .as_array()
            .unwrap()
            .len()
            <= 5));
    }

    #[tokio::test]
    async fn people_searches_legacy_is_deprecated_and_api_search_is_free() {
        let sim = Sim::new(SimConfig::default());
        let legacy = call(
            &sim,
            "POST",
            "/v1/mixed_people/search",
            json!({"per_page": 10}),
        );
        assert_eq!(legacy.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(billed_milli(&legacy), 0);
        assert!(header(&legacy, "x-rate-limit-minute").is_some());
        assert_eq!(
            &wire_bytes(legacy).await[..],
            br#"{"error":"This endpoint is deprecated for API callers. Please use the new mixed_people/api_search endpoint: https://docs.apollo.io/reference/people-api-search."}"#
        );
        assert_eq!(sim.billed().export_milli, 0);

        // Accounts from before the deprecation, on request: a page costs an export credit.
        let old = sim_with(|cfg| cfg.legacy_people_search = true);
        let legacy = call(
            &old,
            "POST",
            "/v1/mixed_people/search",
            json!({"per_page": 10}),
        );
        assert_eq!(legacy.body()["people"].as_array().unwrap().len(), 10);
        assert_eq!(
            legacy.body()["people"][0]["email"],
            "email_not_unlocked@domain.com"
        );
        assert_eq!(billed_milli(&legacy), 1_000);
        assert_eq!(old.billed().export_milli, 1_000);

        let api = call(
            &sim,
            "POST",
            "/api/v1/mixed_people/api_search",
            json!({"person_titles": ["CEO"]}),
        );
        let people = api.body()["people"].as_array().unwrap();
        assert!(!people.is_empty());
        assert!(people[0]["last_name_obfuscated"]
            .as_str()
            .unwrap()
            .contains("***"));
        assert!(people[0]["has_email"].is_boolean());
        assert!(api.body()["total_entries"].as_u64().unwrap() >= people.len() as u64);
        assert_eq!(billed_milli(&api), 0);
    }

    #[test]
    fn news_and_job_postings_bill_a_lead_per_non_empty_page() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let news = call(
            &sim,
            "POST",
            "/api/v1/news_articles/search?organization_ids[]=5e66b6381e05b4008c8331b8",
            Value::Null,
        );
        let articles = news.body()["news_articles"].as_array().unwrap();
        assert!(!articles.is_empty());
        assert_eq!(articles[0]["organization_id"], "5e66b6381e05b4008c8331b8");
        assert_eq!(billed_milli(&news), 1_000);
        let jobs = call(
            &sim,
            "GET",
            "/api/v1/organizations/5e66b6381e05b4008c8331b8/job_postings",
            Value::Null,
        );
        assert!(!jobs.body()["organization_job_postings"]
            .as_array()
            .unwrap()
            .is_empty());
        assert_eq!(billed_milli(&jobs), 1_000);

        let none = sim_with(|cfg| cfg.match_rate_pct = 0);
        let jobs = call(
            &none,
            "GET",
            "/api/v1/organizations/o1/job_postings?page=1",
            Value::Null,
        );
        assert_eq!(jobs.body(), &json!({"organization_job_postings": []}));
        assert_eq!(billed_milli(&jobs), 0);
    }

    #[test]
    fn usage_stats_follow_billing_debits_and_cycles() {
        let sim = sim_with(|cfg| {
            cfg.match_rate_pct = 100;
            cfg.initial_credits = 50;
        });
        call(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "a@b.com", "reveal_phone_number": "1", "poll_only": "1"}),
        );
        let debit = sim.dispatch(
            &parts("POST", "/__sim/debit", &[]),
            br#"{"credit_type":"lead","credits":5}"#,
            Instant::now(),
        );
        assert_eq!(debit.status, StatusCode::OK);
        let stats = call(
            &sim,
            "POST",
            "/api/v1/usage_stats/credit_usage_stats",
            Value::Null,
        );
        assert_eq!(billed_milli(&stats), 0);
        let body = stats.body();
        assert_eq!(
            body["lead_credit"],
            json!({"limit": 50, "consumed": 6, "left_over": 44})
        );
        // The phone reveal's job has not ended: no direct-dial credit is spent yet.
        assert_eq!(
            body["direct_dial_credit"],
            json!({"limit": 50, "consumed": 0, "left_over": 50})
        );
        assert_eq!(body["export_credit"]["consumed"], 0);
        assert!(body["current_credit_cycle_start"].is_string());
        // The debit is not something a call billed.
        assert_eq!(sim.billed().lead_milli, 1_000);

        let reset = sim.dispatch(
            &parts("POST", "/__sim/reset_cycle", &[]),
            b"",
            Instant::now(),
        );
        assert_eq!(reset.body()["lead_credit"]["consumed"], 0);
        assert_ne!(
            reset.body()["current_credit_cycle_start"],
            body["current_credit_cycle_start"]
        );
    }

    #[test]
    fn usage_stats_need_the_master_key_when_one_is_set_and_obey_faults() {
        let sim = sim_with(|cfg| cfg.master_key = Some("master".into()));
        let uri = "/api/v1/usage_stats/credit_usage_stats";
        let refused = call(&sim, "POST", uri, Value::Null);
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.body()["error_code"], "API_INACCESSIBLE");
        let ok = sim.dispatch(
            &parts("POST", uri, &[("x-api-key", "master")]),
            b"",
            Instant::now(),
        );
        assert_eq!(ok.status, StatusCode::OK);
        // Other endpoints take any key.
        let other = call(&sim, "GET", "/api/v1/people/p1", Value::Null);
        assert_eq!(other.status, StatusCode::OK);

        let fault = sim.dispatch(
            &parts("POST", "/__sim/usage_stats_fault", &[]),
            br#"{"status":429,"retry_after":7}"#,
            Instant::now(),
        );
        assert_eq!(fault.status, StatusCode::OK);
        let limited = sim.dispatch(
            &parts("POST", uri, &[("x-api-key", "master")]),
            b"",
            Instant::now(),
        );
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers.get("retry-after").unwrap(), "7");
        sim.dispatch(
            &parts("POST", "/__sim/usage_stats_fault", &[]),
            b"{}",
            Instant::now(),
        );
        let again = sim.dispatch(
            &parts("POST", uri, &[("x-api-key", "master")]),
            b"",
            Instant::now(),
        );
        assert_eq!(again.status, StatusCode::OK);
    }

    #[test]
    fn control_billed_matches_billed() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        call(&sim, "GET", "/api/v1/people/p1", Value::Null);
        call(&sim, "GET", "/api/v1/nowhere", Value::Null);
        let reply = sim.dispatch(&parts("GET", "/__sim/billed", &[]), b"", Instant::now());
        assert_eq!(reply.body(), &serde_json::to_value(sim.billed()).unwrap());
        assert_eq!(
            reply.body(),
            &json!({"lead_milli": 1000, "direct_dial_milli": 0, "export_milli": 0, "calls": 2, "billed_calls": 1})
        );
        let unknown = sim.dispatch(&parts("POST", "/__sim/billed", &[]), b"", Instant::now());
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        let bad = sim.dispatch(&parts("POST", "/__sim/debit", &[]), b"{}", Instant::now());
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }
}

/// Phone reveals and waterfalls: what the synchronous answer bills, what the job bills when it
/// ends, and webhook_result's answers over a job's life.
mod jobs {
    use super::*;

    const DELAY: Duration = Duration::from_secs(5);

    fn async_sim(edit: impl FnOnce(&mut SimConfig)) -> Sim {
        sim_with(|cfg| {
            cfg.match_rate_pct = 100;
            cfg.job_delay = DELAY;
            edit(cfg);
        })
    }

    fn call_at(sim: &Sim, method: &str, uri: &str, body: Value, now: Instant) -> Reply {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        sim.dispatch(&parts(method, uri, &[("x-api-key", KEY)]), &body, now)
    }

    fn poll(sim: &Sim, request_id: &Value, now: Instant) -> Reply {
        call_at(
            sim,
            "GET",
            &format!("/api/v1/webhook_result/{request_id}"),
            Value::Null,
            now,
        )
    }

    fn emails(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| json!({"email": format!("lead{i}@example.com")}))
            .collect()
    }

    fn listed(sim: &Sim, now: Instant) -> Vec<Value> {
        let reply = sim.dispatch(&parts("GET", "/__sim/jobs", &[]), b"", now);
        assert_eq!(reply.status, StatusCode::OK);
        reply.body()["jobs"].as_array().unwrap().clone()
    }

    #[test]
    fn a_phone_reveal_bills_eight_per_mobile_found_when_the_job_ends() {
        let sim = async_sim(|_| {});
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": emails(10), "reveal_phone_number": true, "poll_only": true}),
            t0,
        );
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(billed_milli(&reply), 10_000, "only the people, at once");
        let request_id = reply.body()["request_id"].clone();
        assert!(request_id.is_i64());

        // While the job runs: pending, nothing more billed, and the listing says so.
        let pending = poll(&sim, &request_id, t0 + Duration::from_millis(1_500));
        assert_eq!(pending.status, StatusCode::NOT_FOUND);
        assert_eq!(
            pending.body(),
            &json!({"error_code": "result_pending", "retry_after_seconds": 4})
        );
        assert_eq!(billed_milli(&pending), 0);
        assert_eq!(sim.billed().direct_dial_milli, 0);
        assert_eq!(sim.jobs()[0].state, JobState::Pending);
        let jobs = listed(&sim, t0 + Duration::from_secs(1));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0]["request_id"], request_id);
        assert_eq!(jobs[0]["state"], "pending");
        assert_eq!(jobs[0]["direct_dial_milli"], 0);

        // Once it ends: the result, its own credits, and the bill all agree.
        let done = poll(&sim, &request_id, t0 + DELAY);
        assert_eq!(done.status, StatusCode::OK);
        let body = done.body();
        assert_eq!(body["request_id"], request_id.to_string());
        assert_eq!(body["webhook_status"], "success");
        assert_eq!(body["request_type"], "phone");
        assert_eq!(
            body["last_dispatched_at"],
            Value::Null,
            "poll_only: no webhook"
        );
        let result = &body["webhook_result"];
        let people = result["people"].as_array().unwrap();
        assert_eq!(people.len(), 10);
        let mobiles = people
            .iter()
            .filter(|person| {
                person["phone_numbers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|phone| phone["type_cd"] == "mobile")
            })
            .count() as i64;
        assert!(
            mobiles > 0 && mobiles < 10,
            "a mobile for only some people: {mobiles} of 10"
        );
        assert_eq!(result["credits_consumed"], mobiles * 8);
        assert_eq!(billed_milli(&done), 0, "polling is free");
        let billed = sim.billed();
        assert_eq!(billed.direct_dial_milli, mobiles * 8_000);
        assert_eq!(billed.lead_milli, 10_000);
        let summary = &sim.jobs()[0];
        assert_eq!(summary.state, JobState::Done);
        assert_eq!(summary.request_id, request_id.as_i64().unwrap());
        assert_eq!(summary.direct_dial_milli, mobiles * 8_000);
        let jobs = listed(&sim, t0 + DELAY);
        assert_eq!(jobs[0]["state"], "done");
        assert_eq!(jobs[0]["direct_dial_milli"], mobiles * 8_000);
        assert_eq!(jobs[0]["billed_milli"], mobiles * 8_000);

        // The balance moved too, and polling again changes nothing.
        let stats = call_at(
            &sim,
            "POST",
            "/api/v1/usage_stats/credit_usage_stats",
            Value::Null,
            t0 + DELAY,
        );
        assert_eq!(stats.body()["direct_dial_credit"]["consumed"], mobiles * 8);
        let again = poll(&sim, &request_id, t0 + DELAY * 2);
        assert_eq!(again.body(), done.body());
        assert_eq!(sim.billed().direct_dial_milli, mobiles * 8_000);
    }

    #[test]
    fn the_job_bills_when_it_ends_even_if_nobody_polls() {
        let sim = async_sim(|_| {});
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "lead3@example.com", "reveal_phone_number": true, "webhook_url": "https://hooks.example/a"}),
            t0,
        );
        assert_eq!(reply.body()["person"]["email"], "lead3@example.com");
        // Any later request (here the billed totals) sees the job ended.
        let billed = control_billed(&sim, t0 + DELAY);
        let jobs = listed(&sim, t0 + DELAY);
        assert_eq!(jobs[0]["state"], "done");
        assert_eq!(jobs[0]["endpoint"], "people/match");
        assert_eq!(billed["direct_dial_milli"], jobs[0]["direct_dial_milli"]);
        // With a webhook the result says when it was dispatched.
        let done = poll(&sim, &reply.body()["request_id"], t0 + DELAY);
        assert!(done.body()["last_dispatched_at"].is_string());
    }

    fn control_billed(sim: &Sim, now: Instant) -> Value {
        sim.dispatch(&parts("GET", "/__sim/billed", &[]), b"", now)
            .body()
            .clone()
    }

    #[test]
    fn mobiles_are_found_for_about_the_configured_share_of_people() {
        let sim = async_sim(|cfg| cfg.mobile_rate_pct = 60);
        let t0 = Instant::now();
        for batch in 0..10 {
            let details: Vec<Value> = (0..10)
                .map(|i| json!({"email": format!("p{batch}-{i}@example.com")}))
                .collect();
            call_at(
                &sim,
                "POST",
                "/api/v1/people/bulk_match",
                json!({"details": details, "reveal_phone_number": true, "poll_only": true}),
                t0,
            );
        }
        let found = sim.billed_at(t0 + DELAY).direct_dial_milli / 8_000;
        assert!((45..75).contains(&found), "{found} of 100 people");
        let none = async_sim(|cfg| cfg.mobile_rate_pct = 0);
        call_at(
            &none,
            "POST",
            "/api/v1/people/match",
            json!({"email": "x@y.com", "reveal_phone_number": true, "poll_only": true}),
            t0,
        );
        assert_eq!(none.billed_at(t0 + DELAY).direct_dial_milli, 0);
    }

    #[test]
    fn a_waterfall_leaves_the_counts_out_and_bills_each_lookup_later() {
        let sim = async_sim(|_| {});
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": emails(4), "run_waterfall_email": true, "run_waterfall_phone": true, "poll_only": true}),
            t0,
        );
        let body = reply.body();
        assert_eq!(reply.status, StatusCode::OK);
        for absent in [
            "credits_consumed",
            "unique_enriched_records",
            "missing_records",
        ] {
            assert!(body.get(absent).is_none(), "{absent} is absent, not zero");
        }
        assert_eq!(body["waterfall"]["status"], "accepted");
        assert_eq!(body["matches"].as_array().unwrap().len(), 4);
        assert_eq!(billed_milli(&reply), 4_000, "demographics at once");

        let done = poll(&sim, &body["request_id"], t0 + DELAY);
        assert_eq!(done.status, StatusCode::OK);
        assert_eq!(done.body()["request_type"], "waterfall");
        let result = &done.body()["webhook_result"];
        let people = result["people"].as_array().unwrap();
        assert_eq!(people.len(), 4);
        // Every vendor asked is billed, whether or not it found anything.
        let lookups = |field: &str| -> i64 {
            people
                .iter()
                .map(|p| {
                    p["waterfall"][field][0]["vendors"]
                        .as_array()
                        .unwrap()
                        .len() as i64
                })
                .sum()
        };
        let (email_lookups, phone_lookups) = (lookups("emails"), lookups("phone_numbers"));
        assert!(email_lookups >= 4 && phone_lookups >= 4);
        let expected = email_lookups * 500 + phone_lookups * 2_250;
        let reported = (result["credits_consumed"].as_f64().unwrap() * 1_000.0).round() as i64;
        assert_eq!(reported, expected);
        let billed = sim.billed();
        assert_eq!(billed.lead_milli, 4_000 + email_lookups * 500);
        assert_eq!(billed.direct_dial_milli, phone_lookups * 2_250);
        assert_eq!(result["target_fields"], json!(["emails", "phone_numbers"]));

        // people/match takes the same flags.
        let single = call_at(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "lead0@example.com", "run_waterfall_email": true, "poll_only": true}),
            t0,
        );
        assert_eq!(single.body()["waterfall"]["status"], "accepted");
        assert_eq!(billed_milli(&single), 1_000);
    }

    #[test]
    fn a_waterfall_marks_unmatched_details_none_and_bills_them_nothing() {
        let sim = async_sim(|_| {});
        let t0 = Instant::now();
        // Ids that start with `missing` never match.
        let details = json!([{"email": "lead0@example.com"}, {"id": "missing-1"}, {"email": "lead1@example.com"}]);
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": details, "run_waterfall_email": true, "poll_only": true}),
            t0,
        );
        assert_eq!(reply.status, StatusCode::OK);
        let matches = reply.body()["matches"].as_array().unwrap().clone();
        assert_eq!(matches[1], json!({"id": null, "match_confidence": "none"}));
        assert!(matches[0]["id"].is_string() && matches[2]["id"].is_string());
        assert_eq!(billed_milli(&reply), 2_000, "the unmatched detail is free");
        let done = poll(&sim, &reply.body()["request_id"], t0 + DELAY);
        let people = done.body()["webhook_result"]["people"]
            .as_array()
            .unwrap()
            .clone();
        let ids: Vec<&Value> = people.iter().map(|p| &p["id"]).collect();
        assert_eq!(
            ids,
            vec![&matches[0]["id"], &matches[2]["id"]],
            "the job runs over matches only"
        );

        // Without a waterfall the same miss is `null`, as in a standard answer; people/match too.
        let plain = call_at(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": details}),
            t0,
        );
        assert_eq!(plain.body()["matches"][1], Value::Null);
        assert_eq!(plain.body()["missing_records"], 1);
        for (flags, person) in [
            (
                json!({"run_waterfall_phone": true, "poll_only": true}),
                json!({"id": null, "match_confidence": "none"}),
            ),
            (
                json!({"reveal_phone_number": true, "poll_only": true}),
                Value::Null,
            ),
            (json!({}), Value::Null),
        ] {
            let mut body = json!({"id": "missing-2"});
            body.as_object_mut()
                .unwrap()
                .extend(flags.as_object().unwrap().clone());
            let single = call_at(&sim, "POST", "/api/v1/people/match", body, t0);
            assert_eq!(single.body()["person"], person, "{flags}");
            assert_eq!(billed_milli(&single), 0);
        }
    }

    #[test]
    fn a_call_that_matched_no_one_bills_nothing_later() {
        let sim = async_sim(|cfg| cfg.match_rate_pct = 0);
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": emails(3), "reveal_phone_number": true, "run_waterfall_phone": true, "poll_only": true}),
            t0,
        );
        assert_eq!(reply.body()["phone_enrichment"]["status"], "skipped");
        let done = poll(&sim, &reply.body()["request_id"], t0 + DELAY);
        assert_eq!(done.status, StatusCode::OK);
        assert_eq!(done.body()["webhook_result"]["credits_consumed"], 0);
        assert_eq!(done.body()["webhook_result"]["people"], json!([]));
        assert_eq!(sim.billed().direct_dial_milli + sim.billed().lead_milli, 0);
    }

    #[test]
    fn results_expire_and_bad_ids_are_told_apart() {
        let sim = async_sim(|cfg| cfg.result_ttl = Duration::from_secs(60));
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "a@b.com", "reveal_phone_number": true, "poll_only": true}),
            t0,
        );
        let id = reply.body()["request_id"].clone();
        assert_eq!(poll(&sim, &id, t0 + DELAY).status, StatusCode::OK);
        let expired = poll(&sim, &id, t0 + DELAY + Duration::from_secs(60));
        assert_eq!(expired.status, StatusCode::GONE);
        assert_eq!(expired.body(), &json!({"error_code": "request_id_expired"}));
        assert_eq!(listed(&sim, t0 + DELAY * 20)[0]["state"], "expired");

        let unknown = poll(&sim, &json!(12345), t0);
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.body(), &json!({"error_code": "request_id_unknown"}));
        // A plain match has a request_id too, but no job behind it.
        let plain = call_at(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "a@b.com"}),
            t0,
        );
        let plain = poll(&sim, &plain.body()["request_id"], t0 + DELAY);
        assert_eq!(plain.body()["error_code"], "request_id_unknown");
        for bad in ["abc", "9223372036854775808", "1.5", "0x10"] {
            let reply = call_at(
                &sim,
                "GET",
                &format!("/api/v1/webhook_result/{bad}"),
                Value::Null,
                t0,
            );
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(reply.body(), &json!({"error_code": "invalid_request_id"}));
        }
        assert_eq!(sim.billed().billed_calls, 2, "polls are free");
    }

    #[test]
    fn results_are_polled_under_every_prefix_with_a_key() {
        let sim = async_sim(|_| {});
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "a@b.com", "reveal_phone_number": true, "poll_only": true}),
            t0,
        );
        let id = reply.body()["request_id"].as_i64().unwrap();
        for prefix in ["/api/v1/", "/v1/", "/"] {
            let uri = format!("{prefix}webhook_result/{id}");
            let reply = call_at(&sim, "GET", &uri, Value::Null, t0 + DELAY);
            assert_eq!(reply.status, StatusCode::OK, "{uri}");
            assert!(header(&reply, "x-rate-limit-minute").is_some());
            let anonymous = sim.dispatch(&parts("GET", &uri, &[]), b"", t0 + DELAY);
            assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
        }
        let post = call_at(
            &sim,
            "POST",
            &format!("/api/v1/webhook_result/{id}"),
            Value::Null,
            t0 + DELAY,
        );
        assert_eq!(post.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn credits_consumed_can_be_left_out_of_results() {
        let sim = async_sim(|cfg| cfg.report_job_credits_consumed = false);
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": emails(5), "reveal_phone_number": true, "poll_only": true}),
            t0,
        );
        let done = poll(&sim, &reply.body()["request_id"], t0 + DELAY);
        let result = &done.body()["webhook_result"];
        assert!(result.get("credits_consumed").is_none());
        // The payload still prices: 8 per person with a mobile.
        let mobiles = result["people"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                p["phone_numbers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["type_cd"] == "mobile")
            })
            .count() as i64;
        assert_eq!(sim.billed().direct_dial_milli, mobiles * 8_000);
    }

    #[test]
    fn polls_can_be_refused_with_429_for_a_number_of_calls() {
        let sim = async_sim(|_| {});
        let t0 = Instant::now();
        let reply = call_at(
            &sim,
            "POST",
            "/api/v1/people/match",
            json!({"email": "a@b.com", "reveal_phone_number": true, "poll_only": true}),
            t0,
        );
        let id = reply.body()["request_id"].clone();
        let fault = sim.dispatch(
            &parts("POST", "/__sim/webhook_result_fault", &[]),
            br#"{"status": 429, "retry_after": 3, "calls": 2}"#,
            t0,
        );
        assert_eq!(fault.status, StatusCode::OK);
        for _ in 0..2 {
            let limited = poll(&sim, &id, t0 + DELAY);
            assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(header(&limited, "retry-after"), Some("3"));
        }
        assert_eq!(poll(&sim, &id, t0 + DELAY).status, StatusCode::OK);

        // For a while, then by itself no more; `{}` clears at once.
        sim.dispatch(
            &parts("POST", "/__sim/webhook_result_fault", &[]),
            br#"{"for_ms": 1000}"#,
            t0,
        );
        assert_eq!(
            poll(&sim, &id, t0 + Duration::from_millis(500)).status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(poll(&sim, &id, t0 + DELAY).status, StatusCode::OK);
        sim.dispatch(
            &parts("POST", "/__sim/webhook_result_fault", &[]),
            br#"{"status": 503}"#,
            t0,
        );
        assert_eq!(
            poll(&sim, &id, t0 + DELAY).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        sim.dispatch(
            &parts("POST", "/__sim/webhook_result_fault", &[]),
            b"{}",
            t0,
        );
        assert_eq!(poll(&sim, &id, t0 + DELAY).status, StatusCode::OK);
        for bad in [
            &br#"{"status": 200}"#[..],
            br#"{"calls": -1}"#,
            br#"{"retry": 1}"#,
        ] {
            let reply = sim.dispatch(&parts("POST", "/__sim/webhook_result_fault", &[]), bad, t0);
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn jobs_are_deterministic_per_seed() {
        let run = |seed: u64| {
            let sim = async_sim(|cfg| cfg.seed = seed);
            let t0 = Instant::now();
            let reply = call_at(
                &sim,
                "POST",
                "/api/v1/people/bulk_match",
                json!({"details": emails(10), "reveal_phone_number": true, "run_waterfall_email": true, "poll_only": true}),
                t0,
            );
            let id = reply.body()["request_id"].clone();
            let done = poll(&sim, &id, t0 + DELAY);
            let mut result = done.body()["webhook_result"].clone();
            // Only the wall-clock timestamps differ between runs.
            result["request_initiated"] = Value::Null;
            result["request_completed"] = Value::Null;
            (id, result, sim.billed())
        };
        let (first, second) = (run(42), run(42));
        assert_eq!(first.0, second.0);
        assert_eq!(first.1, second.1);
        assert_eq!(first.2, second.2);
        assert_ne!(run(7).1, first.1);
    }
}

mod requests {
    use super::*;

    #[test]
    fn unknown_paths_are_free_404s() {
        let sim = Sim::new(SimConfig::default());
        for (method, uri) in [
            ("GET", "/api/v1/contacts"),
            ("DELETE", "/api/v1/people/p1"),
            ("GET", "/api/v1/people/bulk_match"),
        ] {
            let reply = call(&sim, method, uri, Value::Null);
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {uri}");
            assert_eq!(reply.body(), &json!({"error": "Not Found"}));
        }
        assert_eq!(sim.billed().billed_calls, 0);
    }

    #[test]
    fn malformed_parameters_are_free_400s() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        for (uri, body) in [
            ("/api/v1/people/match", &b"{\"email\": "[..]),
            ("/api/v1/people/match", b"[\"email\"]"),
            ("/api/v1/people/match?a=1&a[b]=2", b""),
        ] {
            let reply = sim.dispatch(
                &parts("POST", uri, &[("x-api-key", KEY)]),
                body,
                Instant::now(),
            );
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
            assert_eq!(reply.body()["error_code"], "INVALID_REQUEST");
            assert!(reply.body()["error"].is_string());
            assert!(header(&reply, "x-minute-usage").is_some());
        }
        assert_eq!(sim.billed().billed_calls, 0);
    }

    #[test]
    fn paths_are_routed_like_rails() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        for uri in [
            "//api/v1/people/match",
            "/api//v1///people/match/",
            "/api/v1/%70eople/match",
            "/api/v1/people/%6D%61tch",
            "//v1/people/match",
        ] {
            let reply = call(&sim, "POST", uri, json!({"email": "ada@acme.com"}));
            assert_eq!(reply.status, StatusCode::OK, "{uri}");
            assert_eq!(billed_milli(&reply), 1_000, "{uri}");
        }
        // A reserved character stays escaped, so it is not a separator.
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people%2Fmatch",
            json!({"email": "a@b.c"}),
        );
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        let control = sim.dispatch(&parts("GET", "//__sim/billed", &[]), b"", Instant::now());
        assert_eq!(control.body()["lead_milli"], 5_000);
    }

    #[test]
    fn form_encoded_bodies_carry_rails_parameters() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let form =
            "details[][email]=a%40x.com&details[][first_name]=Ann&details[][email]=b%40y.com\
                    &reveal_phone_number=true&poll_only=true&api_key=form-key";
        let reply = sim.dispatch(
            &parts(
                "POST",
                "/api/v1/people/bulk_match",
                &[("content-type", "application/x-www-form-urlencoded")],
            ),
            form.as_bytes(),
            Instant::now(),
        );
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.body();
        assert_eq!(body["total_requested_enrichments"], 2);
        assert_eq!(body["matches"][0]["first_name"], "Ann");
        assert_eq!(body["phone_enrichment"]["status"], "pending");
        assert_eq!(billed_milli(&reply), 2_000);
        assert_eq!(
            sim.jobs().len(),
            1,
            "the phone reveal was read from the form"
        );
    }

    #[test]
    fn compressed_bodies_are_decoded() {
        use std::io::Write;
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let json = br#"{"email": "zip@acme.com", "reveal_phone_number": true, "poll_only": true}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(json).unwrap();
        let mut br = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        br.write_all(json).unwrap();
        for (coding, body) in [("gzip", gz.finish().unwrap()), ("br", br.into_inner())] {
            let reply = sim.dispatch(
                &parts(
                    "POST",
                    "/api/v1/people/match",
                    &[("x-api-key", KEY), ("content-encoding", coding)],
                ),
                &body,
                Instant::now(),
            );
            assert_eq!(reply.status, StatusCode::OK, "{coding}");
            assert_eq!(reply.body()["person"]["email"], "zip@acme.com");
        }
        assert_eq!(sim.jobs().len(), 2);
        let reply = sim.dispatch(
            &parts(
                "POST",
                "/api/v1/people/match",
                &[("x-api-key", KEY), ("content-encoding", "compress")],
            ),
            b"xx",
            Instant::now(),
        );
        assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(sim.billed().billed_calls, 2);
    }

    #[test]
    fn body_parameters_win_over_the_query() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/match?email=query@x.com&first_name=Q",
            json!({"email": "body@x.com"}),
        );
        assert_eq!(reply.body()["person"]["email"], "body@x.com");
        assert_eq!(reply.body()["person"]["first_name"], "Q");
    }
}

mod limits {
    use super::*;

    #[test]
    fn past_the_limit_is_a_free_429_with_retry_after() {
        let sim = sim_with(|cfg| {
            cfg.match_rate_pct = 100;
            cfg.rate_limit_minute = 0;
            cfg.rate_limit_hourly = 3;
        });
        let uri = "/api/v1/people/match?email=a@b.com";
        for used in 1..=3 {
            let reply = call(&sim, "GET", uri, Value::Null);
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(
                header(&reply, "x-hourly-usage"),
                Some(used.to_string().as_str())
            );
            assert_eq!(
                header(&reply, "x-hourly-requests-left"),
                Some((3 - used).to_string().as_str())
            );
            assert_eq!(header(&reply, "x-rate-limit-minute"), Some(""));
            assert_eq!(header(&reply, "x-minute-usage"), None);
            assert_eq!(header(&reply, "x-rate-limit-24-hour"), Some(""));
        }
        let reply = call(&sim, "GET", uri, Value::Null);
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = header(&reply, "retry-after").unwrap().parse().unwrap();
        assert!((1..=3_600).contains(&retry));
        assert_eq!(header(&reply, "x-hourly-requests-left"), Some("0"));
        assert_eq!(billed_milli(&reply), 0);
        let message = reply.body()["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "The maximum number of api calls allowed for api/v1/people/match is 3 times per hour."
            ),
            "{message}"
        );
        assert_eq!(sim.billed().billed_calls, 3);
        assert_eq!(sim.billed().calls, 4);

        // Other endpoints and other keys have their own counters.
        let other = call(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": []}),
        );
        assert_eq!(other.status, StatusCode::OK);
        let reply = sim.dispatch(
            &parts("GET", uri, &[("x-api-key", "another")]),
            b"",
            Instant::now(),
        );
        assert_eq!(reply.status, StatusCode::OK);
    }

    #[test]
    fn legacy_accounts_get_daily_headers() {
        let sim = sim_with(|cfg| {
            cfg.rate_limit_daily = 50_000;
            cfg.legacy_daily_headers = true;
        });
        let reply = call(&sim, "POST", "/api/v1/mixed_companies/search", Value::Null);
        assert_eq!(header(&reply, "x-rate-limit-daily"), Some("50000"));
        assert_eq!(header(&reply, "x-daily-usage"), Some("1"));
        assert_eq!(header(&reply, "x-daily-requests-left"), Some("49999"));
        assert_eq!(header(&reply, "x-rate-limit-minute"), Some("1000"));
        assert_eq!(header(&reply, "x-minute-requests-left"), Some("999"));
        assert_eq!(header(&reply, "x-rate-limit-24-hour"), None);
    }
}

mod determinism {
    use super::*;

    async fn transcript(sim: &Sim) -> Vec<Bytes> {
        let requests = [
            (
                "POST",
                "/api/v1/people/match",
                json!({"email": "ada@acme.com"}),
            ),
            (
                "POST",
                "/api/v1/people/bulk_match",
                json!({"details": [{"email": "a@x.com"}, {"linkedin_url": "http://linkedin.com/in/b"}, {"first_name": "C", "last_name": "D", "domain": "e.com"}]}),
            ),
            (
                "GET",
                "/api/v1/organizations/enrich?domain=acme.com",
                Value::Null,
            ),
            (
                "POST",
                "/api/v1/mixed_companies/search",
                json!({"q_organization_keyword_tags": ["saas"], "page": 2}),
            ),
            ("POST", "/api/v1/mixed_people/search", Value::Null),
            ("POST", "/api/v1/news_articles/search", Value::Null),
        ];
        let mut out = Vec::new();
        for (method, uri, body) in requests {
            out.push(wire_bytes(call(sim, method, uri, body)).await);
        }
        out
    }

    #[tokio::test]
    async fn the_same_seed_gives_the_same_bytes() {
        let first = transcript(&Sim::new(SimConfig::default())).await;
        let second = transcript(&Sim::new(SimConfig::default())).await;
        assert_eq!(first, second);
        let other = transcript(&sim_with(|cfg| cfg.seed = 7)).await;
        assert_ne!(first, other);
    }

    #[test]
    fn a_bulk_match_of_ten_is_about_twenty_kilobytes() {
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let details: Vec<Value> = (0..10)
            .map(|i| json!({"email": format!("p{i}@x.com")}))
            .collect();
        let reply = call(
            &sim,
            "POST",
            "/api/v1/people/bulk_match",
            json!({"details": details}),
        );
        let size = reply.body().to_string().len();
        assert!((17_000..28_000).contains(&size), "{size} bytes");
    }
}

/// The sim on real sockets: TLS with ALPN, HTTP/1.1 and h2, gzip, graceful shutdown.
mod wire {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::io::Read;
    use tokio::sync::oneshot;

    /// A test CA, and a server config for "localhost" signed by it that offers h2 and http/1.1.
    fn tls_configs() -> (Arc<rustls::ServerConfig>, rustls::ClientConfig) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sim test CA");
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), client)
    }

    type TestClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

    fn client(tls: rustls::ClientConfig, h2: bool) -> TestClient {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let mut client = Client::builder(TokioExecutor::new());
        if h2 {
            client.http2_only(true);
            client.build(builder.enable_http2().build())
        } else {
            client.build(builder.enable_http1().build())
        }
    }

    #[tokio::test]
    async fn serves_h1_and_h2_over_tls_with_gzip() {
        let (server_tls, client_tls) = tls_configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sim = sim_with(|cfg| cfg.match_rate_pct = 100);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let sim = sim.clone();
            async move {
                sim.serve(listener, Some(server_tls), async {
                    stopped.await.ok();
                })
                .await
            }
        });

        for (h2, version) in [
            (false, http::Version::HTTP_11),
            (true, http::Version::HTTP_2),
        ] {
            let client = client(client_tls.clone(), h2);
            let request = Request::get(format!(
                "https://localhost:{port}/api/v1/people/match?email=ada%40acme.com&reveal_phone_number=true&poll_only=true"
            ))
            .header("x-api-key", KEY)
            .header("accept-encoding", "gzip, br")
            .body(Empty::new())
            .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.version(), version);
            let headers = response.headers().clone();
            assert_eq!(headers["content-encoding"], "gzip");
            assert_eq!(headers["content-type"], "application/json; charset=utf-8");
            assert_eq!(headers["x-sim-billed-milli"], "1000");
            assert_eq!(headers["x-rate-limit-minute"], "1000");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(headers["content-length"], body.len().to_string().as_str());
            let mut json = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut json)
                .unwrap();
            let json: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(json["person"]["email"], "ada@acme.com");

            // Without Accept-Encoding the body is identity, and the 401 is plain text.
            let request = Request::get(format!("https://localhost:{port}/v1/people/match"))
                .body(Empty::new())
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert!(response.headers().get("content-encoding").is_none());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], INVALID_API_KEY.as_bytes());
        }

        let billed = sim.billed();
        assert_eq!(
            (billed.lead_milli, billed.calls, billed.billed_calls),
            (2_000, 4, 2)
        );
        assert_eq!(sim.jobs().len(), 2);
        // Shutdown drains the clients' idle keep-alive connections and returns.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_job_pends_then_answers_over_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sim = sim_with(|cfg| {
            cfg.match_rate_pct = 100;
            cfg.job_delay = Duration::from_secs(1);
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let sim = sim.clone();
            async move {
                sim.serve(listener, None, async {
                    stopped.await.ok();
                })
                .await
            }
        });
        let client: Client<HttpConnector, http_body_util::Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let send = |method: &str, uri: String, body: &'static str| {
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .header("x-api-key", KEY)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(http_body_util::Full::new(Bytes::from_static(
                    body.as_bytes(),
                )))
                .unwrap();
            let client = client.clone();
            async move {
                let response = client.request(request).await.unwrap();
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, serde_json::from_slice::<Value>(&body).unwrap())
            }
        };
        // A form body through a doubled slash: both read as Apollo reads them.
        let (status, answer) = send(
            "POST",
            format!("http://{addr}//api/v1/people/match"),
            "email=ada%40acme.com&reveal_phone_number=true&poll_only=true",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let id = answer["request_id"].as_i64().unwrap();
        let poll = format!("http://{addr}/v1/webhook_result/{id}");
        let (status, pending) = send("GET", poll.clone(), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(pending["error_code"], "result_pending");
        let wait = pending["retry_after_seconds"].as_u64().unwrap();
        assert_eq!(wait, 1);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let (status, done) = send("GET", poll, "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(done["request_id"], id.to_string());
        let credits = done["webhook_result"]["credits_consumed"].as_i64().unwrap();
        assert_eq!(sim.billed().direct_dial_milli, credits * 1_000);
        assert_eq!(sim.billed().lead_milli, 1_000);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_broken_connection_does_not_stop_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sim = Sim::new(SimConfig::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let sim = sim.clone();
            async move {
                sim.serve(listener, None, async {
                    stopped.await.ok();
                })
                .await
            }
        });
        {
            use tokio::io::AsyncWriteExt;
            let mut garbage = TcpStream::connect(addr).await.unwrap();
            garbage.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
        }
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let response = client
            .request(
                Request::get(format!("http://{addr}/__sim/billed"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            serde_json::to_value(Billed::default()).unwrap()
        );
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
