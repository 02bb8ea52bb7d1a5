//! Deterministic fake Apollo records: people, organizations, news articles, job postings.
//!
//! Everything here is a pure function of the sim's seed and a string (an identifier the caller
//! sent, or a record id). [`hash`] is FNV-1a over the seed and the parts, finished with a
//! splitmix64 mix; a record's fields come from a splitmix64 stream ([`Rng`]) seeded by that hash.
//! There is no other source of randomness, so one seed always yields the same bytes.
//!
//! Sizes follow Apollo's: a person is about 2 KB of JSON, a full organization about 2.4 KB.

use serde_json::{json, Value};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Hashes the seed and `parts` to 64 well-mixed bits.
pub(crate) fn hash(seed: u64, parts: &[&str]) -> u64 {
    let fnv = |h: u64, byte: u8| (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    let mut h = seed.to_le_bytes().into_iter().fold(FNV_OFFSET, fnv);
    for part in parts {
        h = part.bytes().fold(h, fnv);
        // 0xff never occurs in UTF-8, so ["ab", "c"] and ["a", "bc"] hash differently.
        h = fnv(h, 0xff);
    }
    mix(h)
}

/// True for `pct` percent of the possible `parts`, always the same answer for the same parts.
pub(crate) fn chance(seed: u64, pct: u8, parts: &[&str]) -> bool {
    hash(seed, parts) % 100 < u64::from(pct)
}

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 stream.
pub(crate) struct Rng(u64);

impl Rng {
    /// A stream seeded by [`hash`]`(seed, parts)`.
    pub(crate) fn new(seed: u64, parts: &[&str]) -> Self {
        Self(hash(seed, parts))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in `lo..=hi` (modulo bias is irrelevant here).
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi.saturating_sub(lo) + 1)
    }

    fn percent(&mut self, pct: u64) -> bool {
        self.next_u64() % 100 < pct
    }

    /// One element of a non-empty constant table.
    fn pick<T: Copy, const N: usize>(&mut self, items: &[T; N]) -> T {
        const { assert!(N > 0) };
        items[(self.next_u64() % N as u64) as usize]
    }

    /// A 24-hex-digit id, the shape of Apollo's (Mongo ObjectId) ids.
    pub(crate) fn hex_id(&mut self) -> String {
        format!("{:016x}{:08x}", self.next_u64(), self.next_u64() >> 32)
    }

    /// A timestamp in Apollo's format, in one of the given years.
    fn timestamp(&mut self, first_year: u64, last_year: u64) -> String {
        format!(
            "{}-{:02}-{:02}T{:02}:{:02}:{:02}.000+00:00",
            self.range(first_year, last_year),
            self.range(1, 12),
            self.range(1, 28),
            self.range(0, 23),
            self.range(0, 59),
            self.range(0, 59)
        )
    }

    fn date(&mut self, first_year: u64, last_year: u64) -> String {
        format!(
            "{}-{:02}-{:02}",
            self.range(first_year, last_year),
            self.range(1, 12),
            self.range(1, 28)
        )
    }
}

/// The identity fields a caller sent to a match endpoint. A matched person echoes them, the way
/// Apollo returns the person the caller asked for; everything else is generated from the id.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PersonHints<'a> {
    pub(crate) email: Option<&'a str>,
    pub(crate) first_name: Option<&'a str>,
    pub(crate) last_name: Option<&'a str>,
    pub(crate) linkedin_url: Option<&'a str>,
    pub(crate) domain: Option<&'a str>,
    pub(crate) organization_name: Option<&'a str>,
}

/// The id Apollo would give the organization at `domain`.
pub(crate) fn org_id_for_domain(seed: u64, domain: &str) -> String {
    Rng::new(seed, &["org-id", domain]).hex_id()
}

/// A full organization object, as `organizations/enrich` and the searches return it.
pub(crate) fn organization(seed: u64, id: &str) -> Value {
    Org::generated(seed, id).full(seed)
}

/// The full organization object for `domain` (already normalized).
pub(crate) fn organization_for_domain(seed: u64, domain: &str) -> Value {
    Org::for_domain(seed, domain, None).full(seed)
}

/// A person object, as `people/match`, `people/bulk_match` and `people/{id}` return it.
pub(crate) fn person(seed: u64, id: &str, hints: &PersonHints<'_>) -> Value {
    let mut rng = Rng::new(seed, &["person", id]);
    let first_name = hints
        .first_name
        .map_or_else(|| rng.pick(&FIRST_NAMES).to_owned(), str::to_owned);
    let last_name = hints
        .last_name
        .map_or_else(|| rng.pick(&LAST_NAMES).to_owned(), str::to_owned);
    let role = rng.pick(&ROLES);
    let place = rng.pick(&PLACES);
    let org = match (hints.domain, hints.organization_name) {
        (Some(domain), name) => Org::for_domain(seed, domain, name),
        (None, Some(name)) => Org::for_domain(seed, &domain_for_name(name), Some(name)),
        (None, None) => Org::generated(seed, &rng.hex_id()),
    };
    let slug = format!("{}-{}", slugify(&first_name), slugify(&last_name));
    let email = hints.email.map_or_else(
        || format!("{}@{}", slug.replace('-', "."), org.domain),
        str::to_owned,
    );
    let linkedin_url = hints.linkedin_url.map_or_else(
        || {
            format!(
                "http://www.linkedin.com/in/{slug}-{:06x}",
                rng.next_u64() >> 40
            )
        },
        str::to_owned,
    );
    // The current job, then two earlier ones of three years each.
    let started = rng.range(2012, 2024);
    let previous = [
        Org::generated(seed, &rng.hex_id()),
        Org::generated(seed, &rng.hex_id()),
    ];
    let mut history = vec![employment(&mut rng, &org, role.title, started, None)];
    for (org, start) in previous.iter().zip([started - 3, started - 6]) {
        let title = rng.pick(&ROLES).title;
        history.push(employment(&mut rng, org, title, start, Some(start + 3)));
    }
    let photo_url = format!(
        "https://media.licdn.com/dms/image/v2/{:016x}/profile-displayphoto-shrink_200_200/0/{}",
        rng.next_u64(),
        rng.range(1_500_000_000_000, 1_750_000_000_000)
    );
    json!({
        "id": id,
        "first_name": first_name,
        "last_name": last_name,
        "name": format!("{first_name} {last_name}"),
        "linkedin_url": linkedin_url,
        "title": role.title,
        "email_status": if rng.percent(85) { "verified" } else { "extrapolated" },
        "photo_url": photo_url,
        "twitter_url": null,
        "github_url": null,
        "facebook_url": null,
        "extrapolated_email_confidence": null,
        "headline": format!("{} at {} | {}", role.title, org.name, org.industry.name),
        "email": email,
        "organization_id": org.id,
        "employment_history": history,
        "state": place.state,
        "city": place.city,
        "country": place.country,
        "time_zone": place.time_zone,
        "postal_code": place.postal_code,
        "formatted_address": format!("{}, {}, {}", place.city, place.state, place.country),
        "organization": org.summary(),
        "departments": [role.department],
        "subdepartments": [role.subdepartment],
        "seniority": role.seniority,
        "functions": [role.function],
        "intent_strength": null,
        "show_intent": rng.percent(30),
        "email_domain_catchall": rng.percent(10),
        "revealed_for_current_team": true,
        "is_likely_to_engage": rng.percent(40),
    })
}

/// A person as `mixed_people/api_search` returns it: last name and contact details hidden.
pub(crate) fn obfuscated_person(seed: u64, id: &str) -> Value {
    let mut rng = Rng::new(seed, &["person", id]);
    let first_name = rng.pick(&FIRST_NAMES);
    let last_name = rng.pick(&LAST_NAMES);
    let role = rng.pick(&ROLES);
    let org = Org::generated(seed, &rng.hex_id());
    let head: String = last_name.chars().take(2).collect();
    let tail = last_name
        .chars()
        .last()
        .map(String::from)
        .unwrap_or_default();
    let direct_phone = if rng.percent(50) {
        "Yes"
    } else {
        "Maybe: please request direct dial via people/bulk_match"
    };
    json!({
        "id": id,
        "first_name": first_name,
        "last_name_obfuscated": format!("{head}***{tail}"),
        "title": role.title,
        "last_refreshed_at": rng.timestamp(2025, 2025),
        "has_email": rng.percent(80),
        "has_city": true,
        "has_state": true,
        "has_country": true,
        "has_direct_phone": direct_phone,
        "organization": {
            "name": org.name,
            "has_industry": true,
            "has_phone": rng.percent(70),
            "has_city": true,
            "has_state": true,
            "has_country": true,
            "has_zip_code": rng.percent(60),
            "has_revenue": rng.percent(50),
            "has_employee_count": true,
        },
    })
}

/// A news article about the organization `org_id`.
pub(crate) fn news_article(seed: u64, id: &str, org_id: &str) -> Value {
    let mut rng = Rng::new(seed, &["news", id]);
    let org = Org::generated(seed, org_id);
    let (category, headline) = rng.pick(&NEWS);
    let publisher = rng.pick(&PUBLISHERS);
    let url = format!(
        "https://www.{publisher}/news/{}-{:08x}",
        slugify(&org.name),
        rng.next_u64() >> 32
    );
    let snippet = format!(
        "{} ({}) {headline}, the company said in a statement. The {} company, founded in {}, \
         employs about {} people.",
        org.name, org.domain, org.industry.name, org.founded_year, org.employees
    );
    json!({
        "id": id,
        "url": url,
        "domain": publisher,
        "title": format!("{} {headline}", org.name),
        "snippet": snippet,
        "published_at": rng.timestamp(2024, 2025),
        "event_categories": [category],
        "organization_id": org.id,
    })
}

/// A job posting of the organization `org_id`.
pub(crate) fn job_posting(seed: u64, id: &str, org_id: &str) -> Value {
    let mut rng = Rng::new(seed, &["job", id]);
    let role = rng.pick(&ROLES);
    let place = rng.pick(&PLACES);
    json!({
        "id": id,
        "title": role.title,
        "url": format!("https://jobs.example-ats.com/{org_id}/{id}"),
        "city": place.city,
        "state": place.state,
        "country": place.country,
        "last_seen_at": rng.timestamp(2025, 2025),
        "posted_at": rng.timestamp(2024, 2025),
    })
}

/// The fields of an organization that its summary and full forms share.
struct Org {
    id: String,
    name: String,
    domain: String,
    industry: Industry,
    place: Place,
    employees: u64,
    founded_year: u64,
    phone: String,
    linkedin_uid: u64,
}

impl Org {
    /// The organization with Apollo id `id`; its name and domain are generated.
    fn generated(seed: u64, id: &str) -> Self {
        let mut rng = Rng::new(seed, &["org", id]);
        let stem = format!("{}{}", rng.pick(&ORG_STEMS), rng.pick(&ORG_ROOTS));
        let name = format!("{stem} {}", rng.pick(&ORG_KINDS));
        let domain = format!("{}.{}", stem.to_ascii_lowercase(), rng.pick(&TLDS));
        Self::build(rng, id.to_owned(), name, domain)
    }

    /// The organization at `domain`, named `name` or after the domain.
    fn for_domain(seed: u64, domain: &str, name: Option<&str>) -> Self {
        let id = org_id_for_domain(seed, domain);
        let rng = Rng::new(seed, &["org", &id]);
        let name = name.map_or_else(|| name_for_domain(domain), str::to_owned);
        Self::build(rng, id, name, domain.to_owned())
    }

    fn build(mut rng: Rng, id: String, name: String, domain: String) -> Self {
        Self {
            industry: rng.pick(&INDUSTRIES),
            place: rng.pick(&PLACES),
            employees: rng.pick(&[12, 45, 120, 380, 1_200, 5_400, 23_000]) + rng.range(0, 9),
            founded_year: rng.range(1975, 2021),
            phone: format!(
                "+1 {}-{}-{}",
                rng.range(201, 989),
                rng.range(200, 999),
                rng.range(1000, 9999)
            ),
            linkedin_uid: rng.range(10_000, 99_999_999),
            id,
            name,
            domain,
        }
    }

    /// The organization as embedded in a person.
    fn summary(&self) -> Value {
        let slug = slugify(&self.name);
        json!({
            "id": self.id,
            "name": self.name,
            "website_url": format!("http://www.{}", self.domain),
            "blog_url": null,
            "angellist_url": null,
            "linkedin_url": format!("http://www.linkedin.com/company/{slug}"),
            "twitter_url": format!("https://twitter.com/{}", slug.replace('-', "")),
            "facebook_url": null,
            "primary_phone": {
                "number": self.phone,
                "source": "Account",
                "sanitized_number": sanitize_phone(&self.phone),
            },
            "languages": ["English"],
            "alexa_ranking": null,
            "phone": self.phone,
            "linkedin_uid": self.linkedin_uid.to_string(),
            "founded_year": self.founded_year,
            "logo_url": format!("https://logos.apollo.example/{}/picture", self.id),
            "primary_domain": self.domain,
            "industry": self.industry.name,
            "estimated_num_employees": self.employees,
        })
    }

    /// The organization as the enrich and search endpoints return it.
    fn full(&self, seed: u64) -> Value {
        let mut rng = Rng::new(seed, &["org-detail", &self.id]);
        let revenue = self.employees * rng.range(80_000, 250_000);
        let stages = &FUNDING_STAGES[..rng.range(0, 2) as usize];
        let mut funding_events = Vec::new();
        for (round, stage) in (0..).zip(stages) {
            let investors = format!(
                "{} Ventures, {} Capital",
                rng.pick(&ORG_STEMS),
                rng.pick(&ORG_STEMS)
            );
            funding_events.push(json!({
                "id": rng.hex_id(),
                "date": rng.timestamp(2015 + round * 3, 2017 + round * 3),
                "news_url": null,
                "type": stage,
                "investors": investors,
                "amount": format!("{}M", rng.range(2, 60)),
                "currency": "$",
            }));
        }
        let technologies: Vec<_> = (0..4).map(|_| rng.pick(&TECHNOLOGIES)).collect();
        let street = format!("{} {}", rng.range(1, 999), rng.pick(&STREETS));
        let Place {
            city,
            state,
            country,
            postal_code,
            ..
        } = self.place;
        let [first, second, third, _] = self.industry.keywords;
        let description = format!(
            "{} is a {} company headquartered in {city}, {country}. Founded in {}, it serves \
             customers across {} markets with a focus on {first}, {second} and {third}. The team \
             of about {} people works with partners worldwide.",
            self.name,
            self.industry.name,
            self.founded_year,
            rng.range(3, 40),
            self.employees
        );
        let mut organization = self.summary();
        let details = json!({
            "crunchbase_url": null,
            "publicly_traded_symbol": null,
            "publicly_traded_exchange": null,
            "sanitized_phone": sanitize_phone(&self.phone),
            "keywords": self.industry.keywords,
            "industries": [self.industry.name],
            "secondary_industries": [],
            "snippets_loaded": true,
            "industry_tag_id": Rng::new(seed, &["industry", self.industry.name]).hex_id(),
            "retail_location_count": rng.range(0, 4),
            "raw_address": format!("{street}, {city}, {state} {postal_code}, {country}"),
            "street_address": street,
            "city": city,
            "state": state,
            "postal_code": postal_code,
            "country": country,
            "owned_by_organization_id": null,
            "short_description": description,
            "suborganizations": [],
            "num_suborganizations": 0,
            "annual_revenue_printed": format!("{:.1}M", revenue as f64 / 1e6),
            "annual_revenue": revenue,
            "total_funding": stages.len() * 12_000_000,
            "total_funding_printed": format!("{}M", stages.len() * 12),
            "latest_funding_round_date": funding_events.last().map(|event| event["date"].clone()),
            "latest_funding_stage": stages.last(),
            "funding_events": funding_events,
            "technology_names": technologies.iter().map(|(name, _, _)| name).collect::<Vec<_>>(),
            "current_technologies": technologies
                .iter()
                .map(|(name, uid, category)| json!({"uid": uid, "name": name, "category": category}))
                .collect::<Vec<_>>(),
            "org_chart_root_people_ids": [],
            "org_chart_sector": "OrgChart::SectorHierarchy::Rules::Default",
            "departmental_head_count": {
                "engineering": self.employees * 3 / 10,
                "sales": self.employees / 5,
                "marketing": self.employees / 10,
                "operations": self.employees / 10,
                "finance": self.employees / 20,
                "human_resources": self.employees / 25,
                "support": self.employees / 10,
            },
        });
        if let (Value::Object(organization), Value::Object(details)) = (&mut organization, details)
        {
            organization.extend(details);
        }
        organization
    }
}

fn employment(
    rng: &mut Rng,
    org: &Org,
    title: &str,
    start_year: u64,
    end_year: Option<u64>,
) -> Value {
    json!({
        "_id": rng.hex_id(),
        "current": end_year.is_none(),
        "start_date": rng.date(start_year, start_year),
        "end_date": end_year.map(|year| format!("{year}-{:02}-01", rng.range(1, 12))),
        "organization_id": org.id,
        "organization_name": org.name,
        "title": title,
    })
}

/// `"brightwave.io"` → `"Brightwave"`, `"north-point.com"` → `"North Point"`.
fn name_for_domain(domain: &str) -> String {
    let label = domain.split('.').next().unwrap_or(domain);
    label
        .split(['-', '_'])
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `"Acme Labs, Inc."` → `"acmelabsinc.com"`.
fn domain_for_name(name: &str) -> String {
    let label: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("{}.com", if label.is_empty() { "company" } else { &label })
}

/// Lower-case ASCII words joined by `-`.
fn slugify(text: &str) -> String {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join("-")
}

fn sanitize_phone(phone: &str) -> String {
    phone
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '+')
        .collect()
}

#[derive(Clone, Copy)]
struct Role {
    title: &'static str,
    seniority: &'static str,
    department: &'static str,
    subdepartment: &'static str,
    function: &'static str,
}

#[derive(Clone, Copy)]
struct Place {
    city: &'static str,
    state: &'static str,
    country: &'static str,
    time_zone: &'static str,
    postal_code: &'static str,
}

#[derive(Clone, Copy)]
struct Industry {
    name: &'static str,
    keywords: [&'static str; 4],
}

const FIRST_NAMES: [&str; 30] = [
    "James", "Maria", "Wei", "Aisha", "Lukas", "Sofia", "Daniel", "Priya", "Mateo", "Emma",
    "Kenji", "Olivia", "Ahmed", "Chloe", "Noah", "Fatima", "Liam", "Ingrid", "Diego", "Hannah",
    "Omar", "Yuki", "Ethan", "Amara", "Lucas", "Zoe", "Ravi", "Elena", "Samuel", "Nadia",
];

const LAST_NAMES: [&str; 30] = [
    "Smith",
    "Garcia",
    "Chen",
    "Patel",
    "Muller",
    "Rossi",
    "Kim",
    "Okafor",
    "Johansson",
    "Nguyen",
    "Silva",
    "Cohen",
    "Novak",
    "Tanaka",
    "Brown",
    "Dubois",
    "Kowalski",
    "Haddad",
    "Larsen",
    "Singh",
    "Moreau",
    "Walsh",
    "Ibrahim",
    "Costa",
    "Fischer",
    "Reyes",
    "Andersen",
    "Murphy",
    "Sato",
    "Huston",
];

const fn role(
    title: &'static str,
    seniority: &'static str,
    department: &'static str,
    subdepartment: &'static str,
    function: &'static str,
) -> Role {
    Role {
        title,
        seniority,
        department,
        subdepartment,
        function,
    }
}

#[rustfmt::skip]
const ROLES: [Role; 14] = [
    role("Chief Executive Officer", "c_suite", "c_suite", "executive", "entrepreneurship"),
    role("Chief Technology Officer", "c_suite", "master_engineering_technical", "technology", "engineering"),
    role("VP of Sales", "vp", "master_sales", "sales", "sales"),
    role("Head of Marketing", "head", "master_marketing", "marketing", "marketing"),
    role("Director of Engineering", "director", "master_engineering_technical", "software_development", "engineering"),
    role("Senior Software Engineer", "senior", "master_engineering_technical", "software_development", "engineering"),
    role("Account Executive", "senior", "master_sales", "sales", "sales"),
    role("Sales Development Representative", "entry", "master_sales", "sales_development", "sales"),
    role("Marketing Manager", "manager", "master_marketing", "marketing", "marketing"),
    role("Product Manager", "manager", "master_product_management", "product_management", "product_management"),
    role("Head of People", "head", "master_human_resources", "human_resources", "human_resources"),
    role("Finance Director", "director", "master_finance", "finance", "finance"),
    role("Customer Success Manager", "manager", "master_support", "customer_success", "support"),
    role("Founder", "founder", "c_suite", "founder", "entrepreneurship"),
];

const fn place(
    city: &'static str,
    state: &'static str,
    country: &'static str,
    time_zone: &'static str,
    postal_code: &'static str,
) -> Place {
    Place {
        city,
        state,
        country,
        time_zone,
        postal_code,
    }
}

#[rustfmt::skip]
const PLACES: [Place; 14] = [
    place("San Francisco", "California", "United States", "America/Los_Angeles", "94105"),
    place("New York", "New York", "United States", "America/New_York", "10001"),
    place("Austin", "Texas", "United States", "America/Chicago", "78701"),
    place("Boston", "Massachusetts", "United States", "America/New_York", "02110"),
    place("Seattle", "Washington", "United States", "America/Los_Angeles", "98101"),
    place("Chicago", "Illinois", "United States", "America/Chicago", "60601"),
    place("London", "England", "United Kingdom", "Europe/London", "EC2A 4NE"),
    place("Berlin", "Berlin", "Germany", "Europe/Berlin", "10115"),
    place("Paris", "Ile-de-France", "France", "Europe/Paris", "75002"),
    place("Amsterdam", "North Holland", "Netherlands", "Europe/Amsterdam", "1012 AB"),
    place("Toronto", "Ontario", "Canada", "America/Toronto", "M5H 2N2"),
    place("Sydney", "New South Wales", "Australia", "Australia/Sydney", "2000"),
    place("Bengaluru", "Karnataka", "India", "Asia/Kolkata", "560001"),
    place("Singapore", "Singapore", "Singapore", "Asia/Singapore", "018956"),
];

#[rustfmt::skip]
const INDUSTRIES: [Industry; 10] = [
    Industry { name: "computer software", keywords: ["saas", "b2b", "cloud", "developer tools"] },
    Industry { name: "information technology & services", keywords: ["it services", "consulting", "managed services", "cloud migration"] },
    Industry { name: "marketing & advertising", keywords: ["digital marketing", "seo", "demand generation", "content"] },
    Industry { name: "financial services", keywords: ["fintech", "payments", "lending", "compliance"] },
    Industry { name: "hospital & health care", keywords: ["healthtech", "telemedicine", "patient engagement", "ehr"] },
    Industry { name: "logistics & supply chain", keywords: ["freight", "warehousing", "last mile", "fleet management"] },
    Industry { name: "retail", keywords: ["ecommerce", "omnichannel", "direct to consumer", "merchandising"] },
    Industry { name: "staffing & recruiting", keywords: ["recruiting", "talent acquisition", "hr tech", "contract staffing"] },
    Industry { name: "real estate", keywords: ["proptech", "leasing", "property management", "commercial real estate"] },
    Industry { name: "education management", keywords: ["edtech", "e-learning", "lms", "higher education"] },
];

const TECHNOLOGIES: [(&str, &str, &str); 12] = [
    ("Salesforce", "salesforce", "CRM"),
    ("HubSpot", "hubspot", "Marketing Automation"),
    (
        "Google Analytics",
        "google_analytics",
        "Analytics and Tracking",
    ),
    ("Amazon AWS", "amazon_aws", "Hosting"),
    ("Slack", "slack", "Other"),
    ("Zendesk", "zendesk", "Customer Support"),
    ("Stripe", "stripe", "Payments"),
    ("Cloudflare DNS", "cloudflare_dns", "Domain Name Services"),
    ("Google Tag Manager", "google_tag_manager", "Tag Management"),
    ("Intercom", "intercom", "Support and Feedback"),
    ("Segment", "segment", "Analytics and Tracking"),
    ("React", "react", "Javascript Libraries"),
];

const ORG_STEMS: [&str; 16] = [
    "Bright", "North", "Blue", "Iron", "Silver", "Clear", "Swift", "Summit", "Harbor", "Cedar",
    "Atlas", "Nova", "Vertex", "Lumen", "Orbit", "Granite",
];

const ORG_ROOTS: [&str; 12] = [
    "wave", "stone", "field", "path", "point", "bridge", "forge", "leaf", "works", "gate", "line",
    "peak",
];

const ORG_KINDS: [&str; 12] = [
    "Analytics",
    "Labs",
    "Systems",
    "Logistics",
    "Health",
    "Software",
    "Partners",
    "Robotics",
    "Media",
    "Capital",
    "Networks",
    "Foods",
];

const TLDS: [&str; 5] = ["com", "io", "co", "ai", "net"];

const STREETS: [&str; 8] = [
    "Market Street",
    "Main Street",
    "Broadway",
    "King Street",
    "Harbour Road",
    "Mission Street",
    "Elm Avenue",
    "High Street",
];

const FUNDING_STAGES: [&str; 2] = ["Seed", "Series A"];

const NEWS: [(&str, &str); 7] = [
    ("hires", "appoints a new Chief Revenue Officer"),
    (
        "receives_financing",
        "raises a new funding round to accelerate growth",
    ),
    ("launches", "launches an AI assistant for its platform"),
    ("partners_with", "announces a strategic partnership"),
    ("expands_facilities", "opens a new regional office"),
    ("acquires", "acquires a smaller competitor"),
    ("leaves", "announces the departure of its CFO"),
];

const PUBLISHERS: [&str; 5] = [
    "businesswire.com",
    "prnewswire.com",
    "techcrunch.com",
    "reuters.com",
    "globenewswire.com",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_separates_parts() {
        assert_eq!(hash(42, &["a", "bc"]), hash(42, &["a", "bc"]));
        assert_ne!(hash(42, &["a", "bc"]), hash(42, &["ab", "c"]));
        assert_ne!(hash(42, &["a"]), hash(43, &["a"]));
    }

    #[test]
    fn chance_tracks_the_percentage() {
        let hits = (0..10_000)
            .filter(|i| chance(42, 70, &["match", &i.to_string()]))
            .count();
        assert!((6_700..7_300).contains(&hits), "{hits} of 10000");
        assert!(!chance(42, 0, &["x"]));
        assert!(chance(42, 100, &["x"]));
    }

    #[test]
    fn records_have_apollo_sizes_and_ids() {
        let person = person(42, "5f2a0c1e9b3d4a0012345678", &PersonHints::default());
        let size = person.to_string().len();
        assert!((1_700..2_800).contains(&size), "person is {size} bytes");
        let org = organization(42, "5f2a0c1e9b3d4a0012345678");
        let size = org.to_string().len();
        assert!(
            (2_000..3_000).contains(&size),
            "organization is {size} bytes"
        );
        let id = Rng::new(1, &["x"]).hex_id();
        assert_eq!(id.len(), 24);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn person_echoes_identity_hints() {
        let hints = PersonHints {
            email: Some("ada@acme.com"),
            first_name: Some("Ada"),
            domain: Some("acme.com"),
            ..PersonHints::default()
        };
        let person = person(42, "p1", &hints);
        assert_eq!(person["email"], "ada@acme.com");
        assert_eq!(person["first_name"], "Ada");
        assert_eq!(person["organization"]["primary_domain"], "acme.com");
        assert_eq!(person["organization"]["name"], "Acme");
        assert_eq!(person["organization_id"], org_id_for_domain(42, "acme.com"));
        assert_eq!(
            organization_for_domain(42, "acme.com")["id"],
            person["organization_id"]
        );
    }

    #[test]
    fn obfuscates_last_names() {
        let person = obfuscated_person(42, "p1");
        let hidden = person["last_name_obfuscated"].as_str().unwrap();
        assert!(hidden.contains("***"), "{hidden}");
        assert!(person.get("last_name").is_none());
        assert!(person.get("email").is_none());
    }

    #[test]
    fn names_and_domains_round_trip_plausibly() {
        assert_eq!(name_for_domain("north-point.com"), "North Point");
        assert_eq!(domain_for_name("Acme Labs, Inc."), "acmelabsinc.com");
        assert_eq!(domain_for_name("!!!"), "company.com");
        assert_eq!(slugify("Ada Lovelace-King"), "ada-lovelace-king");
    }
}
