//! Apollo's asynchronous enrichment jobs: phone reveals and waterfalls, and
//! `GET webhook_result/{request_id}`, where their outcome is polled.
//!
//! A `people/match` or `people/bulk_match` call with `reveal_phone_number`, `run_waterfall_email`
//! or `run_waterfall_phone` answers at once with the demographic part (billed then) and a
//! `request_id`; the rest is a job that ends [`SimConfig::job_delay`] later. Only when it ends
//! does it bill, and what it bills depends on what it found:
//! - a phone reveal: [`MOBILE_CREDITS`] direct-dial credits per person whose mobile was found
//!   ([`SimConfig::mobile_rate_pct`] of people, a function of (seed, person id));
//! - a waterfall: every vendor lookup, found or not: [`WATERFALL_EMAIL_LOOKUP_MILLI`] lead per
//!   email lookup, [`WATERFALL_PHONE_LOOKUP_MILLI`] direct-dial per phone lookup. Vendors are tried
//!   in turn until one finds something, so a person whose email no vendor has costs every lookup.
//!
//! Billing is lazy: every request (and [`Sim::billed`](super::Sim::billed)) first ends the jobs
//! whose time has come, so totals include a job's charge from the instant it ends, whoever polls.
//! The delay is the same for every job, so jobs end in the order they started and a queue is
//! enough to find the ended ones.
//!
//! The poll answers follow docs.apollo.io/reference/poll-webhook-result (and the OpenAPI's
//! examples): `404 {"error_code":"result_pending","retry_after_seconds":N}` while running;
//! `200 {"request_id":"<id>","webhook_status":"success","request_type":"phone"|"waterfall",
//! "last_dispatched_at":…,"failure_reason":null,"webhook_result":{…,"credits_consumed":N,
//! "people":[…]}}` once done, for [`SimConfig::result_ttl`]; then `410 request_id_expired`;
//! `404 request_id_unknown` for an id no job has; `400 invalid_request_id` for one that is not
//! a signed 64-bit integer. The sim never POSTs to a `webhook_url` (it sends nothing anywhere);
//! it answers polls as if the webhook had been delivered when the job ended.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::account::{credits_json, Charge};
use super::data::{self, Rng};
use super::params::{text, truthy, Params};
use super::reply::Reply;
use super::SimConfig;

/// Direct-dial credits a phone reveal bills per person whose mobile was found.
pub(crate) const MOBILE_CREDITS: i64 = 8;
/// Lead credits (thousandths) one waterfall email vendor lookup bills, found or not.
pub(crate) const WATERFALL_EMAIL_LOOKUP_MILLI: i64 = 500;
/// Direct-dial credits (thousandths) one waterfall phone vendor lookup bills, found or not.
pub(crate) const WATERFALL_PHONE_LOOKUP_MILLI: i64 = 2_250;
/// Email vendors a waterfall tries at most, in turn.
const EMAIL_VENDORS: [(&str, &str); 3] = [
    ("icypeas_single_email_search", "Icypeas"),
    ("findymail_email_finder", "Findymail"),
    ("datagma_email_finder", "Datagma"),
];
/// Phone vendors a waterfall tries at most, in turn.
const PHONE_VENDORS: [(&str, &str); 2] = [
    ("prospeo_mobile_finder", "Prospeo"),
    ("kaspr_phone_finder", "Kaspr"),
];
/// Percent of people some email vendor knows, and some phone vendor.
const WATERFALL_EMAIL_FOUND_PCT: u8 = 65;
const WATERFALL_PHONE_FOUND_PCT: u8 = 45;

/// What a call asked to run asynchronously, read from its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct AsyncAsk {
    pub(crate) reveal_phone: bool,
    pub(crate) waterfall_email: bool,
    pub(crate) waterfall_phone: bool,
    /// A `webhook_url` was given (else `poll_only`).
    pub(crate) webhook: bool,
}

/// Why an asynchronous ask was refused (a free 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AskError(pub(crate) String);

impl AsyncAsk {
    /// The asynchronous part `params` ask for: `None` when they ask for none.
    ///
    /// Apollo's reference says `webhook_url` is mandatory with `reveal_phone_number` and with a
    /// waterfall flag, and poll-webhook-result adds `poll_only: true` (without `webhook_url`)
    /// for callers that poll instead. With neither the sim answers a free 400, the documented
    /// reading of "must".
    pub(crate) fn of(params: &Params) -> Result<Option<AsyncAsk>, AskError> {
        let mut ask = AsyncAsk {
            reveal_phone: truthy(params.get("reveal_phone_number")),
            waterfall_email: truthy(params.get("run_waterfall_email")),
            waterfall_phone: truthy(params.get("run_waterfall_phone")),
            webhook: false,
        };
        if !(ask.reveal_phone || ask.waterfall()) {
            return Ok(None);
        }
        match text(params, "webhook_url") {
            Some(url) if is_web_url(url) => ask.webhook = true,
            Some(url) => {
                return Err(AskError(format!(
                    "webhook_url {url:?} is not a valid URL; give an https:// URL Apollo can reach"
                )))
            }
            None if truthy(params.get("poll_only")) => {}
            None => {
                return Err(AskError(format!(
                    "{} requires a valid webhook_url, or poll_only set to true to poll \
                     webhook_result instead",
                    ask.flags()
                )))
            }
        }
        Ok(Some(ask))
    }

    pub(crate) fn waterfall(self) -> bool {
        self.waterfall_email || self.waterfall_phone
    }

    /// The flags that were set, for an error message.
    fn flags(self) -> String {
        [
            (self.reveal_phone, "reveal_phone_number"),
            (self.waterfall_email, "run_waterfall_email"),
            (self.waterfall_phone, "run_waterfall_phone"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(" and ")
    }

    /// `phone` or `waterfall`, as webhook_result's `request_type` names it.
    fn request_type(self) -> &'static str {
        if self.waterfall() {
            "waterfall"
        } else {
            "phone"
        }
    }
}

/// `http(s)://host…`.
fn is_web_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|rest| {
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        !host.is_empty() && !host.contains(char::is_whitespace)
    })
}

/// What one vendor waterfall did for one person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lookups {
    /// Vendors asked (each one billed).
    asked: u8,
    /// Whether the last one asked found something.
    found: bool,
}

impl Lookups {
    /// Vendors in turn until one finds: a function of (seed, kind, person).
    fn run(seed: u64, kind: &str, person: &str, found_pct: u8, vendors: usize) -> Self {
        if !data::chance(seed, found_pct, &["waterfall-found", kind, person]) {
            return Self {
                asked: vendors as u8,
                found: false,
            };
        }
        let asked = 1 + (data::hash(seed, &["waterfall-vendor", kind, person]) % vendors as u64);
        Self {
            asked: asked as u8,
            found: true,
        }
    }
}

/// One matched person in a job, and what the job finds for them.
#[derive(Debug, Clone)]
struct JobPerson {
    id: String,
    /// With a phone reveal: whether a mobile number is found.
    mobile: Option<bool>,
    email: Option<Lookups>,
    phone: Option<Lookups>,
}

impl JobPerson {
    fn email_found(&self) -> bool {
        self.email.is_some_and(|l| l.found)
    }

    /// A mobile from the native reveal or from a phone vendor.
    fn mobile_found(&self) -> bool {
        self.mobile == Some(true) || self.phone.is_some_and(|l| l.found)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Running: webhook_result answers `404 result_pending`; nothing billed yet.
    Pending,
    /// Ended and billed: webhook_result answers 200.
    Done,
    /// Past [`SimConfig::result_ttl`]: webhook_result answers `410 request_id_expired`.
    Expired,
}

impl JobState {
    /// `pending`, `done` or `expired`.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Done => "done",
            JobState::Expired => "expired",
        }
    }
}

#[derive(Debug)]
struct Job {
    request_id: i64,
    /// `people/match` or `people/bulk_match`.
    endpoint: &'static str,
    ask: AsyncAsk,
    /// Details the call sent (1 for people/match).
    requested: usize,
    /// Distinct matched people, in the order of the call.
    people: Vec<JobPerson>,
    started: jiff::Timestamp,
    ends_at: Instant,
    /// What the job bills when it ends.
    charge: Charge,
    /// Whether it has ended and billed.
    billed: bool,
}

impl Job {
    fn state(&self, now: Instant, ttl: Duration) -> JobState {
        if now < self.ends_at && !self.billed {
            JobState::Pending
        } else if now.saturating_duration_since(self.ends_at) >= ttl {
            JobState::Expired
        } else {
            JobState::Done
        }
    }

    /// The 200 answer of webhook_result.
    fn result(&self, cfg: &SimConfig) -> Value {
        let ended = self
            .started
            .checked_add(
                jiff::SignedDuration::try_from(cfg.job_delay).unwrap_or(jiff::SignedDuration::ZERO),
            )
            .unwrap_or(self.started);
        let people: Vec<Value> = self
            .people
            .iter()
            .map(|person| self.person_result(cfg.seed, person))
            .collect();
        let mut result = if self.ask.waterfall() {
            let count =
                |found: fn(&JobPerson) -> bool| self.people.iter().filter(|p| found(p)).count();
            let emails = count(JobPerson::email_found);
            let mobiles = count(JobPerson::mobile_found);
            let enriched = count(|p| p.email_found() || p.mobile_found());
            let mut fields = Vec::new();
            if self.ask.waterfall_email {
                fields.push("emails");
            }
            if self.ask.waterfall_phone || self.ask.reveal_phone {
                fields.push("phone_numbers");
            }
            json!({
                "status": "success",
                "total_requested_enrichments": self.requested,
                "target_fields": fields,
                "records_enriched": enriched,
                "email_records_enriched": emails,
                "mobile_records_enriched": mobiles,
                "enrichment_not_found": self.people.len() - enriched,
                "email_records_not_found": if self.ask.waterfall_email { self.people.len() - emails } else { 0 },
                "mobile_records_not_found": if self.ask.waterfall_phone || self.ask.reveal_phone { self.people.len() - mobiles } else { 0 },
                "request_id": self.request_id.to_string(),
                "request_initiated": self.started.to_string(),
                "request_completed": ended.to_string(),
                "people": people,
            })
        } else {
            json!({
                "status": "success",
                "total_requested_enrichments": self.requested,
                "unique_enriched_records": self.people.len(),
                "missing_records": self.requested.saturating_sub(self.people.len()),
                "people": people,
            })
        };
        if cfg.report_job_credits_consumed {
            result["credits_consumed"] = credits_json(self.charge.total_milli());
        }
        json!({
            "request_id": self.request_id.to_string(),
            "webhook_status": "success",
            "request_type": self.ask.request_type(),
            "last_dispatched_at": if self.ask.webhook { Value::String(ended.to_string()) } else { Value::Null },
            "failure_reason": null,
            "webhook_result": result,
        })
    }

    /// One entry of the result's `people`.
    fn person_result(&self, seed: u64, person: &JobPerson) -> Value {
        let mut rng = Rng::new(seed, &["phones", &person.id]);
        let mut phones = Vec::new();
        // Apollo lists every number it has; the company's line is not a mobile and is free.
        phones.push(phone_number(&mut rng, "work_hq", 0));
        if person.mobile == Some(true) {
            phones.push(phone_number(&mut rng, "mobile", 1));
        }
        let mut entry = json!({"id": person.id, "status": "success"});
        if self.ask.waterfall() {
            let mut waterfall = serde_json::Map::new();
            let mut emails = Vec::new();
            if let Some(lookups) = person.email {
                let (vendors, found) =
                    vendor_trail(&mut rng, &EMAIL_VENDORS, lookups, "emails", |rng| {
                        json!(format!("{}@{}", rng.hex_id(), "mail.example"))
                    });
                waterfall.insert("emails".into(), json!([{"vendors": vendors}]));
                if let Some(email) = found {
                    emails.push(json!({
                        "email": email,
                        "email_source_cd": null,
                        "position": 0,
                        "email_status_cd": "Verified",
                        "third_party_data_provider_id": EMAIL_VENDORS
                            .get(usize::from(lookups.asked).saturating_sub(1))
                            .map(|(id, _)| *id),
                        "vendor_validation_statuses": [],
                    }));
                }
            }
            if let Some(lookups) = person.phone {
                let (vendors, found) =
                    vendor_trail(&mut rng, &PHONE_VENDORS, lookups, "phone_numbers", |rng| {
                        json!(format!(
                            "+1{}{:07}",
                            rng.range(201, 989),
                            rng.range(0, 9_999_999)
                        ))
                    });
                waterfall.insert("phone_numbers".into(), json!([{"vendors": vendors}]));
                if let Some(Value::String(number)) = found {
                    let position = phones.len();
                    let mut phone = phone_number(&mut rng, "mobile", position);
                    phone["raw_number"] = json!(number);
                    phone["sanitized_number"] = json!(number);
                    phones.push(phone);
                }
            }
            entry["waterfall"] = Value::Object(waterfall);
            entry["emails"] = json!(emails);
        }
        entry["phone_numbers"] = json!(phones);
        entry
    }
}

/// The `vendors` trail of one waterfall, and what the last vendor found.
fn vendor_trail(
    rng: &mut Rng,
    vendors: &[(&str, &str)],
    lookups: Lookups,
    field: &str,
    found: impl Fn(&mut Rng) -> Value,
) -> (Vec<Value>, Option<Value>) {
    let mut trail = Vec::new();
    let mut value = None;
    for (i, (id, name)) in vendors.iter().take(usize::from(lookups.asked)).enumerate() {
        let last = i + 1 == usize::from(lookups.asked);
        let hit = (last && lookups.found).then(|| found(rng));
        let mut vendor = json!({
            "id": format!("{id}-1"),
            "name": name,
            "status": if hit.is_some() { "UNVERIFIED" } else { "NOT_FOUND" },
            "usedForVerification": false,
            "statusCode": null,
            "statusMessage": null,
            "authMechanism": "native",
        });
        vendor[field] = json!(hit.iter().cloned().collect::<Vec<_>>());
        trail.push(vendor);
        value = value.or(hit);
    }
    (trail, value)
}

/// A phone number entry in Apollo's shape.
fn phone_number(rng: &mut Rng, type_cd: &str, position: usize) -> Value {
    let (area, exchange, line) = (
        rng.range(201, 989),
        rng.range(200, 999),
        rng.range(1000, 9999),
    );
    let id = rng.hex_id();
    json!({
        "_id": id,
        "confidence_cd": "high",
        "dnc_status_cd": "not_found",
        "position": position,
        "raw_number": format!("+1 {area}-{exchange}-{line}"),
        "sanitized_number": format!("+1{area}{exchange}{line}"),
        "status_cd": "valid_number",
        "type_cd": type_cd,
        "id": id,
        "key": id,
    })
}

/// How webhook_result misbehaves for fault tests, set by `POST /__sim/webhook_result_fault`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PollFault {
    /// Answer this status instead (429 carries `retry-after`).
    pub(crate) status: Option<StatusCode>,
    /// `retry-after` seconds on a 429.
    pub(crate) retry_after: u64,
    /// Only for this many more polls (`None`: until `until` or cleared).
    pub(crate) calls: Option<u64>,
    /// Only until then (`None`: until `calls` run out or cleared).
    pub(crate) until: Option<Instant>,
}

impl PollFault {
    /// The reply that replaces this poll's answer, if the fault is in force at `now`.
    fn take(&mut self, now: Instant) -> Option<Reply> {
        let status = self.status?;
        if self.until.is_some_and(|until| now >= until) || self.calls == Some(0) {
            *self = PollFault::default();
            return None;
        }
        if let Some(calls) = &mut self.calls {
            *calls -= 1;
        }
        let mut reply = if status == StatusCode::TOO_MANY_REQUESTS {
            Reply::json(
                status,
                json!({"message": "The maximum number of api calls allowed for api/v1/webhook_result/show is 60 times per minute. Please upgrade your plan from https://app.apollo.io/#/settings/plans/upgrade."}),
            )
        } else {
            Reply::error(status, "SIM_FAULT", "injected webhook_result fault")
        };
        if status == StatusCode::TOO_MANY_REQUESTS {
            reply.headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(self.retry_after.max(1)),
            );
        }
        Some(reply)
    }
}

/// Every job the sim has started; lives behind the sim's mutex.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    by_id: HashMap<i64, Job>,
    /// Ids in the order the jobs started, for `/__sim/jobs`.
    order: Vec<i64>,
    /// Ids of jobs that have not billed yet, in the order they end.
    unbilled: VecDeque<i64>,
    /// What ended jobs have billed so far.
    billed: Charge,
    pub(crate) fault: PollFault,
}

/// What a call that starts a job knows about it.
pub(crate) struct NewJob<'a> {
    pub(crate) request_id: i64,
    pub(crate) endpoint: &'static str,
    pub(crate) ask: AsyncAsk,
    pub(crate) requested: usize,
    /// Ids of the people the call matched; repeats are billed once.
    pub(crate) people: &'a [&'a str],
}

impl Jobs {
    /// Starts a job at `now`; it ends `cfg.job_delay` later.
    pub(crate) fn start(&mut self, cfg: &SimConfig, job: NewJob<'_>, now: Instant) {
        let seed = cfg.seed;
        let mut seen = std::collections::HashSet::new();
        let people: Vec<JobPerson> = job
            .people
            .iter()
            .filter(|id| seen.insert(**id))
            .map(|id| JobPerson {
                id: (*id).to_owned(),
                mobile: job
                    .ask
                    .reveal_phone
                    .then(|| data::chance(seed, cfg.mobile_rate_pct, &["mobile", id])),
                email: job.ask.waterfall_email.then(|| {
                    Lookups::run(
                        seed,
                        "email",
                        id,
                        WATERFALL_EMAIL_FOUND_PCT,
                        EMAIL_VENDORS.len(),
                    )
                }),
                phone: job.ask.waterfall_phone.then(|| {
                    Lookups::run(
                        seed,
                        "phone",
                        id,
                        WATERFALL_PHONE_FOUND_PCT,
                        PHONE_VENDORS.len(),
                    )
                }),
            })
            .collect();
        let mut charge = Charge::NONE;
        for person in &people {
            if person.mobile == Some(true) {
                charge.direct_dial_milli += MOBILE_CREDITS * 1_000;
            }
            if let Some(lookups) = person.email {
                charge.lead_milli += i64::from(lookups.asked) * WATERFALL_EMAIL_LOOKUP_MILLI;
            }
            if let Some(lookups) = person.phone {
                charge.direct_dial_milli += i64::from(lookups.asked) * WATERFALL_PHONE_LOOKUP_MILLI;
            }
        }
        let record = Job {
            request_id: job.request_id,
            endpoint: job.endpoint,
            ask: job.ask,
            requested: job.requested,
            people,
            started: jiff::Timestamp::now(),
            ends_at: now + cfg.job_delay,
            charge,
            billed: false,
        };
        // Request ids are 64-bit hashes of the call number: a repeat is not expected, and
        // would only replace an older job.
        if self.by_id.insert(job.request_id, record).is_none() {
            self.order.push(job.request_id);
        }
        self.unbilled.push_back(job.request_id);
    }

    /// Ends the jobs due by `now`; returns what they bill (to debit from the balance).
    pub(crate) fn advance(&mut self, now: Instant) -> Charge {
        let mut due = Charge::NONE;
        while let Some(id) = self.unbilled.front().copied() {
            match self.by_id.get_mut(&id) {
                Some(job) if job.ends_at > now => break,
                Some(job) if !job.billed => {
                    job.billed = true;
                    due.lead_milli += job.charge.lead_milli;
                    due.direct_dial_milli += job.charge.direct_dial_milli;
                    due.export_milli += job.charge.export_milli;
                }
                _ => {}
            }
            self.unbilled.pop_front();
        }
        self.billed.lead_milli += due.lead_milli;
        self.billed.direct_dial_milli += due.direct_dial_milli;
        self.billed.export_milli += due.export_milli;
        due
    }

    /// What ended jobs have billed so far.
    pub(crate) fn billed(&self) -> Charge {
        self.billed
    }

    /// Every job in the order it started, as [`JobSummary`]s at `now`.
    pub(crate) fn summaries(&self, cfg: &SimConfig, now: Instant) -> Vec<JobSummary> {
        self.order
            .iter()
            .filter_map(|id| self.by_id.get(id))
            .map(|job| {
                let billed = if job.billed { job.charge } else { Charge::NONE };
                JobSummary {
                    request_id: job.request_id,
                    endpoint: job.endpoint,
                    request_type: job.ask.request_type(),
                    state: job.state(now, cfg.result_ttl),
                    people: job.people.len(),
                    lead_milli: billed.lead_milli,
                    direct_dial_milli: billed.direct_dial_milli,
                    export_milli: billed.export_milli,
                }
            })
            .collect()
    }

    /// Answers `GET webhook_result/{raw_id}` at `now` (after [`Jobs::advance`]).
    pub(crate) fn poll(&mut self, cfg: &SimConfig, raw_id: &str, now: Instant) -> Reply {
        if let Some(fault) = self.fault.take(now) {
            return fault;
        }
        let Ok(request_id) = raw_id.parse::<i64>() else {
            return Reply::json(
                StatusCode::BAD_REQUEST,
                json!({"error_code": "invalid_request_id"}),
            );
        };
        let Some(job) = self.by_id.get(&request_id) else {
            return Reply::json(
                StatusCode::NOT_FOUND,
                json!({"error_code": "request_id_unknown"}),
            );
        };
        match job.state(now, cfg.result_ttl) {
            JobState::Pending => {
                let left = job.ends_at.duration_since(now);
                let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Reply::json(
                    StatusCode::NOT_FOUND,
                    json!({"error_code": "result_pending", "retry_after_seconds": secs.max(1)}),
                )
            }
            JobState::Expired => Reply::json(
                StatusCode::GONE,
                json!({"error_code": "request_id_expired"}),
            ),
            JobState::Done => Reply::json(StatusCode::OK, job.result(cfg)),
        }
    }

    /// The body of `GET /__sim/jobs`: every job in the order it started.
    pub(crate) fn listing(&self, cfg: &SimConfig, now: Instant) -> Value {
        let jobs: Vec<Value> = self
            .summaries(cfg, now)
            .iter()
            .map(|job| {
                json!({
                    "request_id": job.request_id,
                    "endpoint": job.endpoint,
                    "request_type": job.request_type,
                    "state": job.state.name(),
                    "people": job.people,
                    "lead_milli": job.lead_milli,
                    "direct_dial_milli": job.direct_dial_milli,
                    "export_milli": job.export_milli,
                    "billed_milli": job.billed_milli(),
                })
            })
            .collect();
        json!({"jobs": jobs})
    }
}

/// One asynchronous job as a test sees it ([`Sim::jobs`](super::Sim::jobs), `GET /__sim/jobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    /// The `request_id` the synchronous answer carried.
    pub request_id: i64,
    /// `people/match` or `people/bulk_match`.
    pub endpoint: &'static str,
    /// `phone` or `waterfall`.
    pub request_type: &'static str,
    pub state: JobState,
    /// Distinct people the job enriches.
    pub people: usize,
    /// What the job billed when it ended (0 while pending), in thousandths of a credit.
    pub lead_milli: i64,
    pub direct_dial_milli: i64,
    pub export_milli: i64,
}

impl JobSummary {
    /// All the job billed.
    pub fn billed_milli(&self) -> i64 {
        self.lead_milli + self.direct_dial_milli + self.export_milli
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(value: Value) -> Params {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn an_async_ask_needs_a_webhook_or_poll_only() {
        assert_eq!(AsyncAsk::of(&params(json!({"email": "a@b.c"}))), Ok(None));
        let ask = AsyncAsk::of(&params(
            json!({"reveal_phone_number": true, "webhook_url": "https://hooks.example/x"}),
        ))
        .unwrap()
        .unwrap();
        assert!(ask.reveal_phone && ask.webhook && !ask.waterfall());
        let ask = AsyncAsk::of(&params(
            json!({"run_waterfall_email": "true", "poll_only": "true"}),
        ))
        .unwrap()
        .unwrap();
        assert!(ask.waterfall_email && !ask.webhook);
        assert_eq!(ask.request_type(), "waterfall");
        let err = AsyncAsk::of(&params(
            json!({"reveal_phone_number": true, "run_waterfall_phone": true}),
        ))
        .unwrap_err();
        assert!(
            err.0
                .starts_with("reveal_phone_number and run_waterfall_phone requires"),
            "{}",
            err.0
        );
        assert!(AsyncAsk::of(&params(
            json!({"reveal_phone_number": true, "webhook_url": "not a url"})
        ))
        .is_err());
        assert!(AsyncAsk::of(&params(
            json!({"reveal_phone_number": true, "poll_only": false})
        ))
        .is_err());
    }

    #[test]
    fn vendor_lookups_stop_at_the_first_find() {
        let runs: Vec<Lookups> = (0..200)
            .map(|i| Lookups::run(42, "email", &format!("p{i}"), 65, 3))
            .collect();
        assert!(runs.iter().all(|l| (1..=3).contains(&l.asked)));
        assert!(runs.iter().filter(|l| !l.found).all(|l| l.asked == 3));
        let found = runs.iter().filter(|l| l.found).count();
        assert!((100..160).contains(&found), "{found} of 200 found");
        assert_eq!(
            Lookups::run(42, "email", "p1", 65, 3),
            Lookups::run(42, "email", "p1", 65, 3)
        );
    }

    #[test]
    fn faults_run_out_by_count() {
        let mut fault = PollFault {
            status: Some(StatusCode::TOO_MANY_REQUESTS),
            retry_after: 3,
            calls: Some(2),
            until: None,
        };
        let now = Instant::now();
        let first = fault.take(now).unwrap();
        assert_eq!(first.headers.get("retry-after").unwrap(), "3");
        assert!(fault.take(now).is_some());
        assert!(fault.take(now).is_none());
        assert_eq!(fault, PollFault::default());
    }
}
