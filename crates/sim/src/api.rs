//! Apollo's endpoints: which path is which, what each answers, and what each call bills.
//!
//! The billing here is the sim's own reading of Apollo's documented pricing
//! (docs.apollo.io/docs/api-pricing and each endpoint's reference), written independently of
//! the proxy's catalog so that one can check the other: a matched person or organization costs
//! 1 lead credit, a non-empty page of companies, news or job postings 1 lead credit, a
//! non-empty legacy people page 1 export credit; no match (`null`, or with a waterfall flag an
//! object marked `match_confidence: "none"`), an empty page and `api_search` are free. Phone reveals and waterfalls bill later, when their job ends (`jobs.rs`): the
//! synchronous answer bills only the demographic part.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::account::{credits_json, Account, Charge};
use super::data::{self, PersonHints, Rng};
use super::jobs::{AsyncAsk, Jobs, NewJob};
use super::params::{count, list, text, Params};
use super::reply::Reply;
use super::{lock, SimConfig};

/// Most records `people/bulk_match` and `organizations/bulk_enrich` take in one call.
const MAX_BULK_RECORDS: usize = 10;
/// Apollo's answer to API callers of the legacy `mixed_people/search` (with a 422).
const MIXED_PEOPLE_SEARCH_DEPRECATED: &str = "This endpoint is deprecated for API callers. Please \
     use the new mixed_people/api_search endpoint: https://docs.apollo.io/reference/people-api-search.";
/// Page size when the caller names none, and the most Apollo returns.
const DEFAULT_PER_PAGE: u64 = 25;
const MAX_PER_PAGE: u64 = 100;

/// The Apollo endpoints the sim serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    PeopleMatch,
    PeopleBulkMatch,
    PersonShow,
    OrganizationsEnrich,
    OrganizationsBulkEnrich,
    OrganizationShow,
    JobPostings,
    MixedCompaniesSearch,
    MixedPeopleSearch,
    MixedPeopleApiSearch,
    NewsArticlesSearch,
    CreditUsageStats,
    WebhookResult,
}

impl Endpoint {
    /// The path under `api/v1/` (`:id` for an id): the rate-limit bucket and the name in a 429.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Endpoint::PeopleMatch => "people/match",
            Endpoint::PeopleBulkMatch => "people/bulk_match",
            Endpoint::PersonShow => "people/:id",
            Endpoint::OrganizationsEnrich => "organizations/enrich",
            Endpoint::OrganizationsBulkEnrich => "organizations/bulk_enrich",
            Endpoint::OrganizationShow => "organizations/:id",
            Endpoint::JobPostings => "organizations/:id/job_postings",
            Endpoint::MixedCompaniesSearch => "mixed_companies/search",
            Endpoint::MixedPeopleSearch => "mixed_people/search",
            Endpoint::MixedPeopleApiSearch => "mixed_people/api_search",
            Endpoint::NewsArticlesSearch => "news_articles/search",
            Endpoint::CreditUsageStats => "usage_stats/credit_usage_stats",
            Endpoint::WebhookResult => "webhook_result/:request_id",
        }
    }
}

/// A request path resolved to an endpoint, with the record id of `…/{id}` paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route<'a> {
    pub(crate) endpoint: Endpoint,
    id: &'a str,
}

/// `path` as Rails routes it: repeated slashes collapse into one, and percent-encoded
/// unreserved characters (letters, digits, `-`, `.`, `_`, `~`) decode, so
/// `//api/v1/%70eople/match` is `/api/v1/people/match`. Other escapes (`%2F`) stay as they are.
pub(crate) fn canonical_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let needs_work = bytes.windows(2).any(|w| w == b"//") || bytes.contains(&b'%');
    if !needs_work {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '/' if out.ends_with('/') => {}
            '%' => {
                let decoded = rest
                    .get(..2)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .filter(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b));
                match decoded {
                    Some(byte) => {
                        out.push(char::from(byte));
                        rest = &rest[2..];
                    }
                    None => out.push('%'),
                }
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Collection actions, never record ids.
const ACTIONS: [&str; 4] = ["match", "bulk_match", "enrich", "bulk_enrich"];

/// Resolves `method` + `path` (under `/api/v1/`, `/v1/` or the root); `None` for anything else.
pub(crate) fn route<'a>(method: &Method, path: &'a str) -> Option<Route<'a>> {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/v1/"))
        .or_else(|| path.strip_prefix('/'))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segments: Vec<&str> = rest.split('/').collect();
    let (get, post) = (method == Method::GET, method == Method::POST);
    let is_id = |id: &str| !id.is_empty() && !ACTIONS.contains(&id);
    let (endpoint, id) = match segments.as_slice() {
        ["people", "match"] if get || post => (Endpoint::PeopleMatch, ""),
        ["people", "bulk_match"] if post => (Endpoint::PeopleBulkMatch, ""),
        ["people", id] if get && is_id(id) => (Endpoint::PersonShow, *id),
        ["organizations", "enrich"] if get || post => (Endpoint::OrganizationsEnrich, ""),
        ["organizations", "bulk_enrich"] if post => (Endpoint::OrganizationsBulkEnrich, ""),
        ["organizations", id] if get && is_id(id) => (Endpoint::OrganizationShow, *id),
        ["organizations", id, "job_postings"] if get && is_id(id) => (Endpoint::JobPostings, *id),
        ["mixed_companies", "search"] if post => (Endpoint::MixedCompaniesSearch, ""),
        ["mixed_people", "search"] if post => (Endpoint::MixedPeopleSearch, ""),
        ["mixed_people", "api_search"] if post => (Endpoint::MixedPeopleApiSearch, ""),
        ["news_articles", "search"] if post => (Endpoint::NewsArticlesSearch, ""),
        ["usage_stats", "credit_usage_stats"] if post => (Endpoint::CreditUsageStats, ""),
        ["webhook_result", id] if get && !id.is_empty() => (Endpoint::WebhookResult, *id),
        _ => return None,
    };
    Some(Route { endpoint, id })
}

/// What an authenticated, admitted call needs besides its parameters.
pub(crate) struct Ctx<'a> {
    pub(crate) cfg: &'a SimConfig,
    /// The call's sequence number, for ids that differ per call (`request_id`).
    pub(crate) call: u64,
    pub(crate) account: &'a Mutex<Account>,
    pub(crate) jobs: &'a Mutex<Jobs>,
    /// When the call is answered (jobs end `job_delay` after it).
    pub(crate) now: Instant,
}

impl Ctx<'_> {
    /// This call's `request_id`: Apollo's are arbitrary 64-bit integers, often negative.
    fn request_id(&self) -> i64 {
        data::hash(self.cfg.seed, &["request_id", &self.call.to_string()]) as i64
    }

    /// Starts the job of an asynchronous ask.
    fn start_job(
        &self,
        endpoint: &'static str,
        ask: AsyncAsk,
        requested: usize,
        people: &[&str],
    ) -> i64 {
        let request_id = self.request_id();
        lock(self.jobs).start(
            self.cfg,
            NewJob {
                request_id,
                endpoint,
                ask,
                requested,
                people,
            },
            self.now,
        );
        request_id
    }
}

/// The synchronous answer's note that a waterfall was accepted (the OpenAPI's example).
fn waterfall_accepted(ask: AsyncAsk) -> Value {
    let message = if ask.webhook {
        "Waterfall enrichment request accepted. Results will be sent to the provided webhook URL."
    } else {
        "Waterfall enrichment request accepted. Poll webhook_result with the request_id for results."
    };
    json!({"status": "accepted", "message": message})
}

/// An answer and what the call billed.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) reply: Reply,
    pub(crate) charge: Charge,
}

impl Answer {
    /// A 200 that cost `charge` (possibly nothing).
    fn ok(body: Value, charge: Charge) -> Self {
        Self {
            reply: Reply::json(StatusCode::OK, body),
            charge,
        }
    }

    /// Any answer that costs nothing.
    fn free(reply: Reply) -> Self {
        Self {
            reply,
            charge: Charge::NONE,
        }
    }
}

/// Answers one call of `route`.
pub(crate) fn answer(ctx: &Ctx<'_>, route: Route<'_>, params: &Params) -> Answer {
    let seed = ctx.cfg.seed;
    match route.endpoint {
        Endpoint::PeopleMatch => people_match(ctx, params),
        Endpoint::PeopleBulkMatch => people_bulk_match(ctx, params),
        Endpoint::OrganizationsEnrich => organizations_enrich(ctx.cfg, params),
        Endpoint::OrganizationsBulkEnrich => organizations_bulk_enrich(ctx.cfg, params),
        Endpoint::PersonShow | Endpoint::OrganizationShow | Endpoint::JobPostings
            if route.id.starts_with("missing") =>
        {
            Answer::free(Reply::not_found())
        }
        Endpoint::PersonShow => Answer::ok(
            json!({"person": data::person(seed, route.id, &PersonHints::default())}),
            Charge::credits(1, 0),
        ),
        Endpoint::OrganizationShow => Answer::ok(
            json!({"organization": data::organization(seed, route.id)}),
            Charge::credits(1, 0),
        ),
        Endpoint::JobPostings => {
            let page = Page::of(ctx.cfg, "job_postings", route.id, params, 60);
            let postings = page.records(|id| data::job_posting(seed, id, route.id));
            paid_page(
                json!({"organization_job_postings": postings}),
                &page,
                Charge::credits(1, 0),
            )
        }
        Endpoint::MixedCompaniesSearch => {
            let page = Page::search(ctx.cfg, "companies", params, 5_000);
            let organizations = page.records(|id| data::organization(seed, id));
            let body = json!({
                "breadcrumbs": [],
                "partial_results_only": false,
                "has_join": false,
                "disable_eu_prospecting": false,
                "pagination": page.pagination(),
                "accounts": [],
                "organizations": organizations,
            });
            paid_page(body, &page, Charge::credits(1, 0))
        }
        // Apollo answers API callers of the legacy search with a free 422.
        Endpoint::MixedPeopleSearch if !ctx.cfg.legacy_people_search => Answer::free(Reply::json(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": MIXED_PEOPLE_SEARCH_DEPRECATED}),
        )),
        Endpoint::MixedPeopleSearch => {
            let page = Page::search(ctx.cfg, "people", params, 5_000);
            let people = page.records(|id| {
                let mut person = data::person(seed, id, &PersonHints::default());
                // The legacy search never reveals emails.
                person["email"] = json!("email_not_unlocked@domain.com");
                person
            });
            let body = json!({
                "breadcrumbs": [],
                "partial_results_only": false,
                "disable_eu_prospecting": false,
                "pagination": page.pagination(),
                "contacts": [],
                "people": people,
            });
            paid_page(body, &page, Charge::exports(1))
        }
        Endpoint::MixedPeopleApiSearch => {
            let page = Page::search(ctx.cfg, "people", params, 5_000);
            let people = page.records(|id| data::obfuscated_person(seed, id));
            Answer::free(Reply::json(
                StatusCode::OK,
                json!({"total_entries": page.total_entries, "people": people}),
            ))
        }
        Endpoint::NewsArticlesSearch => {
            let page = Page::search(ctx.cfg, "news", params, 200);
            let org_ids: Vec<&str> = list(params.get("organization_ids"))
                .unwrap_or_default()
                .into_iter()
                .filter_map(Value::as_str)
                .collect();
            let articles = page.records(|id| {
                // Spread the articles over the organizations asked about.
                let org = match org_ids.len() {
                    0 => Rng::new(seed, &["news-org", id]).hex_id(),
                    n => org_ids[(data::hash(seed, &[id]) % n as u64) as usize].to_owned(),
                };
                data::news_article(seed, id, &org)
            });
            let body = json!({"pagination": page.pagination(), "news_articles": articles});
            paid_page(body, &page, Charge::credits(1, 0))
        }
        Endpoint::CreditUsageStats => {
            Answer::free(Reply::json(StatusCode::OK, lock(ctx.account).usage_stats()))
        }
        Endpoint::WebhookResult => Answer::free(lock(ctx.jobs).poll(ctx.cfg, route.id, ctx.now)),
    }
}

/// `people/match`: the person is 1 lead credit. A phone reveal or waterfall starts a job
/// that bills when it ends; the answer carries its `request_id`, but no phone numbers.
fn people_match(ctx: &Ctx<'_>, params: &Params) -> Answer {
    let ask = match AsyncAsk::of(params) {
        Ok(ask) => ask,
        Err(err) => {
            return Answer::free(Reply::error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETERS",
                err.0,
            ))
        }
    };
    let found = match_person(ctx.cfg, params);
    let request_id = match ask {
        Some(ask) => {
            let people: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
            ctx.start_job("people/match", ask, 1, &people)
        }
        None => ctx.request_id(),
    };
    let waterfall = ask.is_some_and(|ask| ask.waterfall());
    let (person, charge) = match found {
        Some((_, person)) => (person, Charge::credits(1, 0)),
        None => (no_match(waterfall), Charge::NONE),
    };
    let mut body = json!({"person": person});
    if let Some(ask) = ask.filter(|ask| ask.waterfall()) {
        body["waterfall"] = waterfall_accepted(ask);
    }
    body["request_id"] = json!(request_id);
    Answer::ok(body, charge)
}

/// `people/bulk_match`: 1 lead credit per distinct matched person; `matches[i]` answers
/// `details[i]`. A phone reveal or waterfall starts a job over the matched people that bills
/// when it ends. With a waterfall, Apollo leaves `credits_consumed`, `unique_enriched_records`
/// and `missing_records` out entirely.
fn people_bulk_match(ctx: &Ctx<'_>, params: &Params) -> Answer {
    let cfg = ctx.cfg;
    let Some(details) = list(params.get("details")) else {
        return Answer::free(bulk_failure(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "invalid request, missing details",
        ));
    };
    if details.len() > MAX_BULK_RECORDS {
        return Answer::free(record_limit_exceeded());
    }
    let ask = match AsyncAsk::of(params) {
        Ok(ask) => ask,
        Err(err) => {
            return Answer::free(bulk_failure(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETERS",
                &err.0,
            ))
        }
    };
    let mut people = HashSet::new();
    let mut order = Vec::new();
    let marked = ask.is_some_and(|ask| ask.waterfall());
    let matches: Vec<Value> = details
        .iter()
        .map(|detail| {
            match detail
                .as_object()
                .and_then(|detail| match_person(cfg, detail))
            {
                Some((id, person)) => {
                    if people.insert(id.clone()) {
                        order.push(id);
                    }
                    person
                }
                None => no_match(marked),
            }
        })
        .collect();
    let unique = people.len() as u64;
    let charge = Charge::credits(unique, 0);
    let request_id = match ask {
        Some(ask) => {
            let ids: Vec<&str> = order.iter().map(String::as_str).collect();
            ctx.start_job("people/bulk_match", ask, details.len(), &ids)
        }
        None => ctx.request_id(),
    };
    let mut body = json!({
        "status": "success",
        "error_code": null,
        "error_message": null,
        "total_requested_enrichments": details.len(),
    });
    let waterfall = ask.filter(|ask| ask.waterfall());
    if waterfall.is_none() {
        body["unique_enriched_records"] = json!(unique);
        body["missing_records"] = json!(matches.iter().filter(|m| m.is_null()).count());
        if cfg.report_credits_consumed {
            body["credits_consumed"] = credits_json(charge.total_milli());
        }
    }
    body["matches"] = json!(matches);
    if let Some(ask) = waterfall {
        body["waterfall"] = waterfall_accepted(ask);
    }
    if ask.is_some_and(|ask| ask.reveal_phone) {
        let status = if unique > 0 { "pending" } else { "skipped" };
        body["phone_enrichment"] = json!({"status": status});
    }
    body["request_id"] = json!(request_id);
    Answer::ok(body, charge)
}

/// How an answer shows a person Apollo could not match, billed nothing: `null` in a standard
/// answer; with a waterfall flag, an object marked `match_confidence: "none"`
/// (https://docs.apollo.io/reference/bulk-people-enrichment: "With waterfall enrichment, this
/// is indicated by `match_confidence: none`; for standard requests, unmatched people are
/// returned as `null`").
fn no_match(waterfall: bool) -> Value {
    if waterfall {
        json!({"id": null, "match_confidence": "none"})
    } else {
        Value::Null
    }
}

/// `organizations/enrich?domain=…`: the organization is 1 lead credit; no match is `{}`.
fn organizations_enrich(cfg: &SimConfig, params: &Params) -> Answer {
    let Some(domain) = text(params, "domain").and_then(normalize_domain) else {
        return Answer::free(Reply::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_PARAMETERS",
            "domain is required",
        ));
    };
    match enrich_domain(cfg, &domain) {
        Some(organization) => {
            Answer::ok(json!({"organization": organization}), Charge::credits(1, 0))
        }
        None => Answer::free(Reply::json(StatusCode::OK, json!({}))),
    }
}

/// `organizations/bulk_enrich` with `domains[]`: 1 lead credit per organization returned.
fn organizations_bulk_enrich(cfg: &SimConfig, params: &Params) -> Answer {
    let Some(domains) = list(params.get("domains")) else {
        return Answer::free(bulk_failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_PARAMETERS",
            "domains must be a list of domains",
        ));
    };
    if domains.len() > MAX_BULK_RECORDS {
        return Answer::free(record_limit_exceeded());
    }
    let organizations: Vec<Value> = domains
        .iter()
        .map(|domain| {
            domain
                .as_str()
                .and_then(normalize_domain)
                .and_then(|domain| enrich_domain(cfg, &domain))
                .unwrap_or(Value::Null)
        })
        .collect();
    let found: Vec<&Value> = organizations.iter().filter(|o| !o.is_null()).collect();
    let unique: HashSet<&str> = found
        .iter()
        .filter_map(|org| org.get("id").and_then(Value::as_str))
        .collect();
    let body = json!({
        "status": "success",
        "error_code": null,
        "error_message": null,
        "total_requested_domains": domains.len(),
        "unique_enriched_records": unique.len(),
        "missing_records": domains.len() - found.len(),
        "organizations": organizations,
    });
    let charge = Charge::credits(found.len() as u64, 0);
    Answer::ok(body, charge)
}

/// `{"status":"failed","error_code":…,"error_message":…}`, the bulk endpoints' error shape.
fn bulk_failure(status: StatusCode, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"status": "failed", "error_code": code, "error_message": message}),
    )
}

fn record_limit_exceeded() -> Reply {
    bulk_failure(
        StatusCode::BAD_REQUEST,
        "RECORD_LIMIT_EXCEEDED",
        "cannot enrich more than 10 in a single request",
    )
}

/// The person `params` identify, with its id, if they match anyone.
///
/// Apollo matches on `id`, else `email`, `hashed_email`, `linkedin_url`, or a name with an
/// optional company. The first of those present is the identifier: whether it matches and who it
/// is are a function of (seed, identifier), so repeating one in a bulk call finds the same person.
/// Ids match unless they start with `missing`.
fn match_person(cfg: &SimConfig, params: &Params) -> Option<(String, Value)> {
    let domain = text(params, "domain").and_then(normalize_domain);
    let full_name = text(params, "name").and_then(|name| name.split_once(' '));
    let hints = PersonHints {
        email: text(params, "email"),
        first_name: text(params, "first_name").or(full_name.map(|(first, _)| first)),
        last_name: text(params, "last_name").or(full_name.map(|(_, last)| last.trim())),
        linkedin_url: text(params, "linkedin_url"),
        domain: domain.as_deref(),
        organization_name: text(params, "organization_name"),
    };
    let id = match text(params, "id") {
        Some(id) if id.starts_with("missing") => return None,
        Some(id) => id.to_owned(),
        None => {
            let identifier = person_identifier(params, &hints)?;
            if !data::chance(cfg.seed, cfg.match_rate_pct, &["match", &identifier]) {
                return None;
            }
            Rng::new(cfg.seed, &["person-id", &identifier]).hex_id()
        }
    };
    let person = data::person(cfg.seed, &id, &hints);
    Some((id, person))
}

/// The normalized identifier of a person match, `kind:value`.
fn person_identifier(params: &Params, hints: &PersonHints<'_>) -> Option<String> {
    if let Some(email) = hints.email {
        return Some(format!("email:{}", email.to_lowercase()));
    }
    if let Some(hashed) = text(params, "hashed_email") {
        return Some(format!("hashed_email:{}", hashed.to_lowercase()));
    }
    if let Some(url) = hints.linkedin_url {
        let url = url.to_lowercase();
        let url = url.trim_end_matches('/');
        let url = url.split_once("://").map_or(url, |(_, rest)| rest);
        return Some(format!(
            "linkedin:{}",
            url.strip_prefix("www.").unwrap_or(url)
        ));
    }
    let (first, last) = (hints.first_name?, hints.last_name?);
    let company = hints.domain.or(hints.organization_name).unwrap_or_default();
    Some(format!("name:{first} {last}@{company}").to_lowercase())
}

/// The organization at `domain` (normalized), if the domain matches.
fn enrich_domain(cfg: &SimConfig, domain: &str) -> Option<Value> {
    data::chance(cfg.seed, cfg.match_rate_pct, &["match", "domain", domain])
        .then(|| data::organization_for_domain(cfg.seed, domain))
}

/// `https://www.Acme.com/about` → `acme.com`; `None` when nothing is left.
fn normalize_domain(raw: &str) -> Option<String> {
    let raw = raw.trim().to_ascii_lowercase();
    let host = raw.split_once("://").map_or(raw.as_str(), |(_, rest)| rest);
    let host = host.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.strip_prefix("www.").unwrap_or(host);
    (!host.is_empty()).then(|| host.to_owned())
}

/// A page of a result list: how many results a query has, and which of them this page holds.
#[derive(Debug)]
struct Page {
    seed: u64,
    /// Identifies the query: results are a function of (seed, key).
    key: String,
    number: u64,
    per_page: u64,
    total_entries: u64,
}

impl Page {
    /// A page of a search: the filters are every parameter but paging and the key.
    fn search(cfg: &SimConfig, kind: &str, params: &Params, max_entries: u64) -> Self {
        let filters: Params = params
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "page" | "per_page" | "api_key"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        // No filter lists everything; serde_json's maps are sorted, so the key is canonical.
        let always = filters.is_empty();
        Self::new(
            cfg,
            kind,
            &Value::Object(filters).to_string(),
            params,
            max_entries,
            always,
        )
    }

    /// A page of a record's list (an organization's job postings).
    fn of(cfg: &SimConfig, kind: &str, id: &str, params: &Params, max_entries: u64) -> Self {
        Self::new(cfg, kind, id, params, max_entries, false)
    }

    fn new(
        cfg: &SimConfig,
        kind: &str,
        query: &str,
        params: &Params,
        max_entries: u64,
        always_matches: bool,
    ) -> Self {
        let key = format!("{kind}:{query}");
        let matches =
            always_matches || data::chance(cfg.seed, cfg.match_rate_pct, &["match", &key]);
        let total_entries = if matches {
            1 + data::hash(cfg.seed, &["total", &key]) % max_entries
        } else {
            0
        };
        Self {
            seed: cfg.seed,
            number: count(params.get("page")).unwrap_or(1),
            per_page: count(params.get("per_page"))
                .unwrap_or(DEFAULT_PER_PAGE)
                .min(MAX_PER_PAGE),
            key,
            total_entries,
        }
    }

    /// The positions in the whole result list of this page's records.
    fn positions(&self) -> std::ops::Range<u64> {
        let first = (self.number - 1).saturating_mul(self.per_page);
        let end = first.saturating_add(self.per_page).min(self.total_entries);
        first..end.max(first)
    }

    fn is_empty(&self) -> bool {
        self.positions().is_empty()
    }

    /// This page's records, each made by `record` from its id.
    fn records(&self, record: impl Fn(&str) -> Value) -> Vec<Value> {
        self.positions()
            .map(|position| {
                record(&Rng::new(self.seed, &[&self.key, &position.to_string()]).hex_id())
            })
            .collect()
    }

    fn pagination(&self) -> Value {
        json!({
            "page": self.number,
            "per_page": self.per_page,
            "total_entries": self.total_entries,
            "total_pages": self.total_entries.div_ceil(self.per_page),
        })
    }
}

/// A page that costs `charge` unless it is empty.
fn paid_page(body: Value, page: &Page, charge: Charge) -> Answer {
    if page.is_empty() {
        Answer::free(Reply::json(StatusCode::OK, body))
    } else {
        Answer::ok(body, charge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_every_mount_and_method() {
        for prefix in ["/api/v1/", "/v1/", "/"] {
            let path = format!("{prefix}people/match");
            assert_eq!(
                route(&Method::GET, &path).unwrap().endpoint,
                Endpoint::PeopleMatch
            );
            assert_eq!(
                route(&Method::POST, &path).unwrap().endpoint,
                Endpoint::PeopleMatch
            );
        }
        let cases = [
            (
                Method::POST,
                "/api/v1/people/bulk_match",
                Some((Endpoint::PeopleBulkMatch, "")),
            ),
            (Method::GET, "/api/v1/people/bulk_match", None),
            (
                Method::GET,
                "/v1/people/abc",
                Some((Endpoint::PersonShow, "abc")),
            ),
            (
                Method::GET,
                "/organizations/enrich",
                Some((Endpoint::OrganizationsEnrich, "")),
            ),
            (
                Method::POST,
                "/organizations/enrich",
                Some((Endpoint::OrganizationsEnrich, "")),
            ),
            (Method::GET, "/api/v1/organizations/bulk_enrich", None),
            (
                Method::GET,
                "/api/v1/organizations/o1/",
                Some((Endpoint::OrganizationShow, "o1")),
            ),
            (
                Method::GET,
                "/api/v1/organizations/o1/job_postings",
                Some((Endpoint::JobPostings, "o1")),
            ),
            (
                Method::POST,
                "/api/v1/mixed_people/api_search",
                Some((Endpoint::MixedPeopleApiSearch, "")),
            ),
            (
                Method::POST,
                "/api/v1/usage_stats/credit_usage_stats",
                Some((Endpoint::CreditUsageStats, "")),
            ),
            (Method::DELETE, "/api/v1/people/abc", None),
            (Method::GET, "/api/v1/people", None),
            (Method::GET, "/api/v2/people/match", None),
            (Method::POST, "/api/v1/contacts/search", None),
            (
                Method::GET,
                "/api/v1/webhook_result/-42",
                Some((Endpoint::WebhookResult, "-42")),
            ),
            (Method::GET, "/api/v1/webhook_result/", None),
            (Method::POST, "/api/v1/webhook_result/1", None),
        ];
        for (method, path, expected) in cases {
            let got = route(&method, path).map(|r| (r.endpoint, r.id));
            assert_eq!(got, expected, "{method} {path}");
        }
    }

    #[test]
    fn canonical_paths_collapse_slashes_and_decode_unreserved() {
        for (raw, canonical) in [
            ("/api/v1/people/match", "/api/v1/people/match"),
            ("//api/v1/people/match", "/api/v1/people/match"),
            ("/api///v1//people/match//", "/api/v1/people/match/"),
            ("/api/v1/%70eople/%6datch", "/api/v1/people/match"),
            ("/a/%7E%2D%2E%5F", "/a/~-._"),
            ("/a%2Fb/%20c", "/a%2Fb/%20c"),
            ("/bad%zz%4", "/bad%zz%4"),
            ("/caf%C3%A9", "/caf%C3%A9"),
        ] {
            assert_eq!(canonical_path(raw), canonical, "{raw}");
        }
        assert!(matches!(canonical_path("/api/v1/x"), Cow::Borrowed(_)));
    }

    #[test]
    fn normalizes_domains() {
        assert_eq!(
            normalize_domain(" https://www.Acme.com/about?x=1 ").as_deref(),
            Some("acme.com")
        );
        assert_eq!(normalize_domain("acme.io").as_deref(), Some("acme.io"));
        assert_eq!(normalize_domain("https://"), None);
    }

    #[test]
    fn identifiers_prefer_the_strongest_key() {
        let params = |value: Value| value.as_object().unwrap().clone();
        let id = |p: &Params| {
            let hints = PersonHints {
                email: text(p, "email"),
                first_name: text(p, "first_name"),
                last_name: text(p, "last_name"),
                linkedin_url: text(p, "linkedin_url"),
                domain: text(p, "domain"),
                organization_name: text(p, "organization_name"),
            };
            person_identifier(p, &hints)
        };
        assert_eq!(
            id(&params(
                json!({"email": "Ada@Acme.com", "first_name": "Ada", "last_name": "L"})
            ))
            .as_deref(),
            Some("email:ada@acme.com")
        );
        assert_eq!(
            id(&params(
                json!({"linkedin_url": "https://www.linkedin.com/in/ada/"})
            ))
            .as_deref(),
            Some("linkedin:linkedin.com/in/ada")
        );
        assert_eq!(
            id(&params(
                json!({"first_name": "Ada", "last_name": "Lovelace", "domain": "acme.com"})
            ))
            .as_deref(),
            Some("name:ada lovelace@acme.com")
        );
        assert_eq!(id(&params(json!({"first_name": "Ada"}))), None);
    }

    #[test]
    fn pages_hold_the_right_slice() {
        let page = |number: u64, per_page: u64, total_entries: u64| Page {
            seed: 42,
            key: "k".into(),
            number,
            per_page,
            total_entries,
        };
        assert_eq!(page(1, 25, 60).positions(), 0..25);
        assert_eq!(page(3, 25, 60).positions(), 50..60);
        assert!(page(4, 25, 60).is_empty());
        assert!(page(1, 25, 0).is_empty());
        assert!(page(u64::MAX, 100, 60).is_empty());
        assert_eq!(page(3, 25, 60).pagination()["total_pages"], 3);
    }
}
