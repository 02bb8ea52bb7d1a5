//! Configuration: one serde tree read from TOML, with a documented default for every key.
//!
//! Unknown keys are rejected (`deny_unknown_fields`), and the error names the key and the line,
//! because toml's span-carrying errors flow through unchanged. Durations and sizes are written
//! the way people write them (`"30s"`, `"16MiB"`). Cross-field rules live in [`Config::validate`],
//! whose messages say how to fix the problem.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod budgets;
pub mod scope;

pub use budgets::{Action, BudgetConfig, GuardConfig, WindowSpec};
pub use scope::{CallFacts, Glob, Scope};

/// Default proxy listener: loopback, so a fresh install is not reachable from the network.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listener (`/metrics`, `/healthz`, `/readyz`): loopback.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Default upstream: Apollo's API host.
pub const DEFAULT_UPSTREAM: &str = "https://api.apollo.io";
/// Default ledger file, relative to the working directory.
pub const DEFAULT_LEDGER_PATH: &str = "creditmeter.db";
/// Largest request body accepted from a caller. Apollo requests are small JSON documents.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 10 * 1024 * 1024;
/// Time a caller has to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to establish a TCP (and TLS) connection to the upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole upstream exchange: request sent to last response byte.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long idle pooled upstream connections are kept.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle pooled upstream connections kept per host.
pub const DEFAULT_POOL_MAX_IDLE: usize = 256;
/// When a caller disconnects mid-response, how much more of the upstream body is read to price it.
pub const DEFAULT_CANCELLED_DRAIN_MAX: u64 = 64 * 1024 * 1024;
/// The copy of a response body kept for pricing (encoded bytes).
pub const DEFAULT_MAX_INSPECT: u64 = 16 * 1024 * 1024;
/// The decoded size a response may reach while being priced (decompression-bomb guard).
pub const DEFAULT_MAX_DECODED: u64 = 64 * 1024 * 1024;
/// Rows committed in one ledger transaction at most.
pub const DEFAULT_BATCH_MAX: usize = 1024;
/// The shortest `ledger.retention`: rollups are hourly, and the current and previous hour
/// always keep their detail rows.
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);
/// Distinct `table` / `workflow` metric label values before new ones become `_other`.
pub const DEFAULT_MAX_LABEL_VALUES: usize = 500;
/// How long shutdown waits for in-flight calls.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the reconciliation poller reads Apollo's credit balance.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(300);
/// The environment variable holding the Apollo master key the poller uses.
pub const DEFAULT_RECONCILE_API_KEY_ENV: &str = "APOLLO_MASTER_API_KEY";
/// How long Apollo's balance may take to show a call it billed ("within seconds").
pub const DEFAULT_RECONCILE_BALANCE_LAG: Duration = Duration::from_secs(10);
/// The shortest poll interval accepted (tests use 200ms; Apollo would rate-limit far sooner).
pub const MIN_RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message already carries the line, column and key.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// A `[[budget]]` entry is wrong; `budget` is its position and name.
    #[error("invalid config: [[budget]] {budget}: `{key}`: {message}")]
    Budget {
        budget: String,
        key: &'static str,
        message: String,
    },
}

/// The whole configuration. Every section and key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub ledger: LedgerConfig,
    pub catalog: CatalogConfig,
    pub attribution: AttributionConfig,
    pub metrics: MetricsConfig,
    pub shutdown: ShutdownConfig,
    pub reconcile: ReconcileConfig,
    /// `[settle]`: learning what Apollo bills later (phone reveals, waterfalls).
    pub settle: SettleConfig,
    /// `[guard]`: settings shared by budgets and holds.
    pub guard: GuardConfig,
    /// `[[budget]]`: spend limits, none by default.
    pub budget: Vec<BudgetConfig>,
}

/// `[proxy]`: the listener callers point their Apollo base URL at.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// `proxy.listen`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// `proxy.tls_cert`: PEM certificate chain; with `tls_key`, the listener speaks HTTPS (h2 + HTTP/1.1).
    pub tls_cert: Option<PathBuf>,
    /// `proxy.tls_key`: PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// `proxy.max_request_body`, default 10MiB; larger bodies get a 413 and nothing goes upstream.
    pub max_request_body: ByteSize,
    /// `proxy.header_read_timeout`, default 30s.
    pub header_read_timeout: HumanDuration,
    /// `proxy.cancelled_drain_max`, default 64MiB: upstream bytes read after a caller leaves.
    pub cancelled_drain_max: ByteSize,
    /// `proxy.require_token`, default false: callers must send `X-Meter-Token: <token>`, the
    /// token being the value of the environment variable named by `proxy.token_env`. Without
    /// it, anyone who can reach the listener can spend the credits of the keys they hold.
    pub require_token: bool,
    /// `proxy.token_env`, default `CREDITMETER_PROXY_TOKEN`.
    pub token_env: String,
    /// `proxy.metering`, default true. When false, calls are forwarded (still behind the
    /// not-an-open-proxy guards, `require_token`, attribution checks and the body cap) but
    /// nothing is recorded, priced or checked against budgets and holds: for benchmarks that
    /// isolate metering's own cost, and as an emergency bypass.
    pub metering: bool,
}

/// Default environment variable holding the proxy access token.
pub const DEFAULT_PROXY_TOKEN_ENV: &str = "CREDITMETER_PROXY_TOKEN";

impl ProxyConfig {
    /// The proxy access token when `require_token` is on; an error if it is on but unset.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if !self.require_token {
            return Ok(None);
        }
        match std::env::var(&self.token_env).map(|t| t.trim().to_owned()) {
            Ok(t) if !t.is_empty() => Ok(Some(t)),
            _ => Err(invalid(
                "proxy.require_token",
                format!(
                    "is true but the environment variable {} (proxy.token_env) is empty or unset",
                    self.token_env
                ),
            )),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: parse_default_addr(DEFAULT_PROXY_LISTEN),
            tls_cert: None,
            tls_key: None,
            max_request_body: ByteSize(DEFAULT_MAX_REQUEST_BODY),
            header_read_timeout: HumanDuration(DEFAULT_HEADER_READ_TIMEOUT),
            cancelled_drain_max: ByteSize(DEFAULT_CANCELLED_DRAIN_MAX),
            require_token: false,
            token_env: DEFAULT_PROXY_TOKEN_ENV.to_owned(),
            metering: true,
        }
    }
}

/// Default environment variable holding the admin API's bearer token.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "CREDITMETER_ADMIN_TOKEN";

/// `[admin]`: metrics, health and the admin API, on a listener of their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `admin.listen`, default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// `admin.token_env`, default `CREDITMETER_ADMIN_TOKEN`: the environment variable holding a
    /// bearer token. When it is set and non-empty, `/api/*` requires `Authorization: Bearer <token>`.
    /// The token is read from the environment so it never sits in a config file.
    pub token_env: String,
    /// `admin.protect_metrics`, default false: also require the token on `/metrics`.
    pub protect_metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: parse_default_addr(DEFAULT_ADMIN_LISTEN),
            token_env: DEFAULT_ADMIN_TOKEN_ENV.to_owned(),
            protect_metrics: false,
        }
    }
}

impl AdminConfig {
    /// The admin token from the environment, if one is set.
    pub fn token(&self) -> Option<String> {
        std::env::var(&self.token_env)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    }
}

/// `[upstream]`: where calls are forwarded. Only this host is ever contacted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `upstream.base_url`, default `https://api.apollo.io`. Request paths are appended to it.
    pub base_url: String,
    /// `upstream.ca_file`: an extra trusted CA (PEM), on top of the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// `upstream.connect_timeout`, default 10s.
    pub connect_timeout: HumanDuration,
    /// `upstream.timeout`, default 120s: the whole exchange, from sending to the last body byte.
    pub timeout: HumanDuration,
    /// `upstream.pool_idle_timeout`, default 90s.
    pub pool_idle_timeout: HumanDuration,
    /// `upstream.pool_max_idle_per_host`, default 256.
    pub pool_max_idle_per_host: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_UPSTREAM.to_owned(),
            ca_file: None,
            connect_timeout: HumanDuration(DEFAULT_CONNECT_TIMEOUT),
            timeout: HumanDuration(DEFAULT_UPSTREAM_TIMEOUT),
            pool_idle_timeout: HumanDuration(DEFAULT_POOL_IDLE_TIMEOUT),
            pool_max_idle_per_host: DEFAULT_POOL_MAX_IDLE,
        }
    }
}

/// When a call's ledger row must be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The row is committed before the caller sees the end of the response body (default).
    Commit,
    /// The row is queued; the response does not wait for the disk. A crash can lose the queue.
    Background,
}

pub use crate::ledger::{OnLedgerError, Synchronous};

/// Default wait for a lock held by another writer before a batch is spooled instead.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_millis(250);
/// Default longest wait for a row's commit before the row is spooled and the response ends.
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default ballast kept beside the spool for a full disk.
pub const DEFAULT_SPOOL_RESERVE: u64 = 16 * 1024 * 1024;

/// `[ledger]`: the SQLite file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// `ledger.path`, default `creditmeter.db`.
    pub path: PathBuf,
    /// `ledger.durability`, `"commit"` (default) or `"background"`.
    pub durability: Durability,
    /// `ledger.synchronous`, `"normal"` (default) or `"full"`.
    pub synchronous: Synchronous,
    /// `ledger.batch_max`, default 1024 rows per transaction.
    pub batch_max: usize,
    /// `ledger.on_error`, `"spool"` (default) or `"fail_closed"`.
    pub on_error: OnLedgerError,
    /// `ledger.busy_timeout`, default 250ms: how long a commit waits on another writer's lock
    /// before its rows are spooled (this bounds the latency a locked ledger adds to a call).
    pub busy_timeout: HumanDuration,
    /// `ledger.spool_reserve`, default 16MiB of ballast beside the spool, released on a full disk.
    pub spool_reserve: ByteSize,
    /// `ledger.commit_timeout`, default 2s: the longest a response's end waits for its row's
    /// commit (`durability = "commit"`). Past it (a hung fsync, a stalled disk) the row is
    /// written to the spool instead and the body completes; the row the writer still holds is
    /// committed later, once (`INSERT OR IGNORE` on `request_id`).
    pub commit_timeout: HumanDuration,
    /// `ledger.retention`, default unset (keep every detail row forever): detail rows in
    /// `calls` older than this (e.g. `"90d"`) are deleted in small batches by a background
    /// thread. The hourly rollups are kept, so totals by table, workflow, endpoint, status and
    /// outcome keep their whole history.
    pub retention: Option<HumanDuration>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_LEDGER_PATH),
            durability: Durability::Commit,
            synchronous: Synchronous::Normal,
            batch_max: DEFAULT_BATCH_MAX,
            on_error: OnLedgerError::Spool,
            busy_timeout: HumanDuration(DEFAULT_BUSY_TIMEOUT),
            spool_reserve: ByteSize(DEFAULT_SPOOL_RESERVE),
            commit_timeout: HumanDuration(DEFAULT_COMMIT_TIMEOUT),
            retention: None,
        }
    }
}

/// `[catalog]`: the pricing rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// `catalog.path`: a catalog TOML file; default the built-in Apollo catalog.
    pub path: Option<PathBuf>,
    /// `catalog.max_inspect`, default 16MiB of encoded response kept for pricing.
    pub max_inspect: ByteSize,
    /// `catalog.max_decoded`, default 64MiB: decoded size cap (decompression bombs).
    pub max_decoded: ByteSize,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_inspect: ByteSize(DEFAULT_MAX_INSPECT),
            max_decoded: ByteSize(DEFAULT_MAX_DECODED),
        }
    }
}

/// `[attribution]`: how calls are tied to tables and workflows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    /// `attribution.require_table`, default false: when true, a call without a table gets a 400.
    pub require_table: bool,
}

/// `[metrics]`: label cardinality.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `metrics.max_label_values`, default 500 per label (`table`, `workflow`).
    pub max_label_values: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_label_values: DEFAULT_MAX_LABEL_VALUES,
        }
    }
}

/// `[shutdown]`: draining on SIGTERM/SIGINT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// `shutdown.grace`, default 30s for in-flight calls to finish.
    pub grace: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: HumanDuration(DEFAULT_SHUTDOWN_GRACE),
        }
    }
}

/// `[reconcile]`: poll Apollo's credit balance and set it against the ledger, to catch credits
/// spent outside creditmeter (see `reconcile`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// `reconcile.enabled`, default false. It needs a master key (`api_key_env`).
    pub enabled: bool,
    /// `reconcile.interval`, default 5m: time between two balance snapshots, i.e. the width of a
    /// reconciliation window.
    pub interval: HumanDuration,
    /// `reconcile.api_key_env`, default `APOLLO_MASTER_API_KEY`: the environment variable holding
    /// an Apollo master key (`usage_stats` refuses other keys). Read from the environment so it
    /// never sits in a config file; it is never logged or stored (the ledger keeps its `key_fp`).
    pub api_key_env: String,
    /// `reconcile.balance_lag`, default 10s: how long after a billed call Apollo's balance may
    /// still not show it. Calls that finished within this time before a snapshot are "at the
    /// edge": either side of it may hold them. Must be shorter than `interval`.
    pub balance_lag: HumanDuration,
    /// `reconcile.pool`, default `"typed"`: how the Apollo plan keeps credits. `"typed"` sets
    /// each of `lead_credit`, `direct_dial_credit` and `export_credit` against the ledger's
    /// credits of that type; `"unified"` (unified-credit plans, where `lead_credit` is one
    /// shared pool that already includes mobile reveals and exports) sets `lead_credit`
    /// against the ledger's total.
    pub pool: Pool,
}

/// `reconcile.pool`: how Apollo's plan keeps credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// One balance per credit type (`lead_credit`, `direct_dial_credit`, `export_credit`),
    /// each set against the ledger's credits of that type. The default.
    #[default]
    Typed,
    /// Unified-credit plans: `lead_credit` is one shared pool that already includes mobile
    /// reveals and exports, so it is set against the ledger's total.
    Unified,
}

impl Pool {
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Typed => "typed",
            Pool::Unified => "unified",
        }
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: HumanDuration(DEFAULT_RECONCILE_INTERVAL),
            api_key_env: DEFAULT_RECONCILE_API_KEY_ENV.to_owned(),
            balance_lag: HumanDuration(DEFAULT_RECONCILE_BALANCE_LAG),
            pool: Pool::Typed,
        }
    }
}

impl ReconcileConfig {
    /// The master key from the environment, if set and non-empty.
    pub fn api_key(&self) -> Option<String> {
        std::env::var(&self.api_key_env)
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.0 < MIN_RECONCILE_INTERVAL {
            return Err(invalid(
                "reconcile.interval",
                format!(
                    "{} is too short: poll at most every 100ms (the default, \"5m\", suits Apollo)",
                    self.interval
                ),
            ));
        }
        if self.balance_lag.0 >= self.interval.0 {
            return Err(invalid(
                "reconcile.balance_lag",
                format!(
                    "{} must be shorter than reconcile.interval ({}): otherwise every call is at a window's edge and no window can be settled",
                    self.balance_lag, self.interval
                ),
            ));
        }
        let env = self.api_key_env.trim();
        if self.enabled && (env.is_empty() || env.contains(|c: char| c == '=' || c.is_whitespace()))
        {
            return Err(invalid(
                "reconcile.api_key_env",
                "must name the environment variable holding an Apollo master key, e.g. \"APOLLO_MASTER_API_KEY\"",
            ));
        }
        Ok(())
    }
}

/// Default `settle.first_poll`: Apollo's phone and waterfall jobs take seconds to minutes.
pub const DEFAULT_SETTLE_FIRST_POLL: Duration = Duration::from_secs(20);
/// Default `settle.max_wait`: after it, the catalog's estimate is recorded.
pub const DEFAULT_SETTLE_MAX_WAIT: Duration = Duration::from_secs(2 * 3600);
/// The longest `settle.max_wait`: Apollo keeps results for 30 days.
pub const MAX_SETTLE_MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// `[settle]`: deferred charges (see `settle`). Apollo bills phone reveals and waterfalls when
/// their job ends; creditmeter polls `webhook_result` (free) with the key from `api_key_env`
/// and records what the job billed as a settlement row.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettleConfig {
    /// `settle.enabled`: default on when `api_key_env` names a set variable. Off, each deferred
    /// charge is recorded at once at the catalog's estimate (`credit_source = 'estimated'`).
    pub enabled: Option<bool>,
    /// `settle.api_key_env`, default `APOLLO_MASTER_API_KEY`: the environment variable holding
    /// the Apollo key used to poll results (never logged or stored; the ledger keeps `key_fp`).
    pub api_key_env: String,
    /// `settle.first_poll`, default 20s: how long after a call its result is first polled.
    pub first_poll: HumanDuration,
    /// `settle.max_wait`, default 2h: after it, the estimate is recorded as the settlement.
    pub max_wait: HumanDuration,
    /// A key handed over by a program that embeds creditmeter (`creditmeter demo`), used
    /// instead of the environment variable. Never read from a config file (a key does not
    /// belong in one) and never printed.
    #[serde(skip)]
    pub embedded_key: Option<EmbeddedKey>,
}

/// An Apollo key given in code rather than through the environment; `Debug` hides it.
#[derive(Clone)]
pub struct EmbeddedKey(pub String);

impl std::fmt::Debug for EmbeddedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedKey(<hidden>)")
    }
}

impl Default for SettleConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            api_key_env: DEFAULT_RECONCILE_API_KEY_ENV.to_owned(),
            first_poll: HumanDuration(DEFAULT_SETTLE_FIRST_POLL),
            max_wait: HumanDuration(DEFAULT_SETTLE_MAX_WAIT),
            embedded_key: None,
        }
    }
}

impl SettleConfig {
    /// The polling key: the embedded one if a program set it, else the environment
    /// variable's, if set and non-empty.
    pub fn api_key(&self) -> Option<String> {
        if let Some(k) = self
            .embedded_key
            .as_ref()
            .filter(|k| !k.0.trim().is_empty())
        {
            return Some(k.0.trim().to_owned());
        }
        std::env::var(self.api_key_env.trim())
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
    }

    /// Whether settlement runs, and with which key: `Ok(None)` when it is off. An explicit
    /// `enabled = true` without the key is an error that says which variable to set.
    pub fn resolve(&self) -> Result<Option<String>, ConfigError> {
        let key = self.api_key();
        match (self.enabled, key) {
            (Some(false), _) | (None, None) => Ok(None),
            (_, Some(k)) => Ok(Some(k)),
            (Some(true), None) => Err(invalid(
                "settle.enabled",
                format!(
                    "is true but the environment variable {} (settle.api_key_env) is empty or unset: set it to an Apollo key that may read webhook_result, or set settle.enabled = false to record deferred charges at the catalog's estimate",
                    self.api_key_env
                ),
            )),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let env = self.api_key_env.trim();
        if env.is_empty() || env.contains(|c: char| c == '=' || c.is_whitespace()) {
            return Err(invalid(
                "settle.api_key_env",
                "must name the environment variable holding an Apollo key, e.g. \"APOLLO_MASTER_API_KEY\"",
            ));
        }
        if self.max_wait.0.is_zero() || self.max_wait.0 > MAX_SETTLE_MAX_WAIT {
            return Err(invalid(
                "settle.max_wait",
                format!(
                    "{} must be above zero and at most \"30d\" (Apollo keeps results for 30 days)",
                    self.max_wait
                ),
            ));
        }
        if self.first_poll.0 >= self.max_wait.0 {
            return Err(invalid(
                "settle.first_poll",
                format!(
                    "{} must be shorter than settle.max_wait ({}): otherwise no result is ever polled",
                    self.first_poll, self.max_wait
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        config.resolve_relative_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without touching the file system.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            source,
        })
    }

    /// Paths in a config file are relative to that file, as a reader of the file expects.
    fn resolve_relative_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.ledger.path);
        for p in [
            &mut self.proxy.tls_cert,
            &mut self.proxy.tls_key,
            &mut self.upstream.ca_file,
            &mut self.catalog.path,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// Cross-field rules; messages say how to fix the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.upstream_uri()?;
        match (&self.proxy.tls_cert, &self.proxy.tls_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "proxy.tls_key",
                    "`proxy.tls_cert` is set, so `proxy.tls_key` must name its private key (PEM)",
                ))
            }
            (None, Some(_)) => return Err(invalid(
                "proxy.tls_cert",
                "`proxy.tls_key` is set, so `proxy.tls_cert` must name the certificate chain (PEM)",
            )),
            _ => {}
        }
        if self.proxy.listen == self.admin.listen && self.proxy.listen.port() != 0 {
            return Err(invalid(
                "admin.listen",
                "must differ from `proxy.listen`: admin endpoints are served on their own listener",
            ));
        }
        if self.ledger.path.as_os_str().is_empty() {
            return Err(invalid("ledger.path", "must name the SQLite ledger file"));
        }
        if self.ledger.batch_max == 0 {
            return Err(invalid("ledger.batch_max", "must be at least 1"));
        }
        if let Some(r) = self.ledger.retention {
            if r.0 < MIN_RETENTION {
                return Err(invalid(
                    "ledger.retention",
                    format!(
                        "{r} is too short: keep detail rows at least \"1h\" (e.g. \"90d\"), or leave the key out to keep them forever"
                    ),
                ));
            }
        }
        if self.metrics.max_label_values == 0 {
            return Err(invalid("metrics.max_label_values", "must be at least 1"));
        }
        for (key, d) in [
            ("proxy.header_read_timeout", self.proxy.header_read_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.timeout", self.upstream.timeout),
            ("ledger.commit_timeout", self.ledger.commit_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be longer than zero, e.g. \"30s\""));
            }
        }
        if self.proxy.max_request_body.0 == 0 {
            return Err(invalid(
                "proxy.max_request_body",
                "must be above zero, e.g. \"10MiB\"",
            ));
        }
        if !self.proxy.metering && !self.budget.is_empty() {
            return Err(invalid(
                "proxy.metering",
                format!(
                    "is false, but [[budget]] entries are configured ({}): budgets cannot be enforced without metering; remove the [[budget]] entries or set proxy.metering = true",
                    self.budget.len()
                ),
            ));
        }
        self.reconcile.validate()?;
        self.settle.validate()?;
        budgets::validate(&self.guard, &self.budget)?;
        Ok(())
    }

    /// The upstream base URL, checked: http or https, a host, no `user:password@`, no query
    /// or fragment. Error messages show the URL with any userinfo redacted.
    pub fn upstream_uri(&self) -> Result<http::Uri, ConfigError> {
        let raw = self.upstream.base_url.trim();
        let shown = redact_url(raw);
        let uri: http::Uri = raw.parse().map_err(|e| {
            invalid(
                "upstream.base_url",
                format!("{shown:?} is not a URL ({e}); e.g. \"https://api.apollo.io\""),
            )
        })?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(invalid(
                    "upstream.base_url",
                    format!("{shown:?} must start with https:// or http://"),
                ))
            }
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(invalid(
                "upstream.base_url",
                format!(
                    "{shown:?} carries a user name or password before the host; creditmeter never sends credentials in the URL and would print them in its logs: remove them (Apollo authenticates with the caller's X-Api-Key)"
                ),
            ));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid(
                "upstream.base_url",
                format!("{shown:?} has no host"),
            ));
        }
        if uri.query().is_some() || raw.contains('#') {
            return Err(invalid(
                "upstream.base_url",
                format!("{shown:?} must not carry a query string or fragment"),
            ));
        }
        Ok(uri)
    }
}

/// `url` with any `user:password@` before the host replaced by `***@`, for logs and messages.
/// Anything that does not look like `scheme://authority…` is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn parse_default_addr(s: &str) -> SocketAddr {
    // The defaults are literals above; a unit test proves they parse.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

pub use creditmeter_base::{ByteSize, HumanDuration};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
        assert_eq!(c.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.upstream.base_url, "https://api.apollo.io");
        assert_eq!(c.ledger.durability, Durability::Commit);
        assert_eq!(c.proxy.max_request_body.0, 10 << 20);
        assert!(c.proxy.metering, "metering is on unless switched off");
    }

    #[test]
    fn example_config_file_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/creditmeter.toml");
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.upstream.timeout.0, DEFAULT_UPSTREAM_TIMEOUT);
    }

    #[test]
    fn example_budgets_validate_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/creditmeter.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# BEGIN budget examples").unwrap();
        let end = text.find("# END budget examples").unwrap();
        let budgets: String = text[start..end]
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml(&budgets).unwrap();
        c.validate().unwrap();
        assert_eq!(c.budget.len(), 3);
    }

    #[test]
    fn human_units() {
        let c = Config::from_toml(
            "[proxy]\nmax_request_body = \"16MiB\"\nheader_read_timeout = \"250ms\"\n[upstream]\ntimeout = 5\nconnect_timeout = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(c.proxy.max_request_body.0, 16 << 20);
        assert_eq!(c.proxy.header_read_timeout.0, Duration::from_millis(250));
        assert_eq!(c.upstream.timeout.0, Duration::from_secs(5));
        assert_eq!(c.upstream.connect_timeout.0, Duration::from_secs(120));
        assert_eq!(ByteSize::parse("10MB").unwrap(), 10_000_000);
        assert!(ByteSize::parse("10 parsecs").is_err());
        assert!(HumanDuration::parse("soon").is_err());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::from_toml("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_unit_names_line() {
        let err = Config::from_toml("\n[upstream]\ntimeout = \"30 fortnights\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("fortnights"), "{err}");
    }

    #[test]
    fn cross_field_rules() {
        let c = Config::from_toml("[proxy]\ntls_cert = \"a.pem\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("proxy.tls_key"));
        let c = Config::from_toml("[upstream]\nbase_url = \"ftp://x\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("upstream.base_url"));
        let c =
            Config::from_toml("[upstream]\nbase_url = \"https://apollo:s3cret@x/api\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("upstream.base_url") && err.contains("user name or password"),
            "{err}"
        );
        assert!(
            !err.contains("s3cret") && err.contains("***@x/api"),
            "{err}"
        );
        assert_eq!(
            redact_url("https://u:p@h:1/p?q=a@b"),
            "https://***@h:1/p?q=a@b"
        );
        assert_eq!(redact_url("https://h/p?email=a@b"), "https://h/p?email=a@b");
        assert_eq!(redact_url("not a url"), "not a url");
        let c = Config::from_toml("[upstream]\nbase_url = \"https://x/?a=1\"\n").unwrap();
        assert!(c.validate().is_err());
        let c = Config::from_toml(
            "[proxy]\nlisten = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin.listen"));
        let c = Config::from_toml("[ledger]\ndurability = \"sometimes\"\n");
        assert!(c.unwrap_err().to_string().contains("sometimes"));
    }

    #[test]
    fn metering_off_parses_alone_and_refuses_budgets() {
        let c = Config::from_toml("[proxy]\nmetering = false\n").unwrap();
        c.validate().unwrap();
        assert!(!c.proxy.metering);
        let c = Config::from_toml(
            "[proxy]\nmetering = false\n[[budget]]\nname = \"b\"\nscope = \"global\"\nlimit = 10\nwindow = \"day\"\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("proxy.metering") && err.contains("budgets cannot be enforced"),
            "{err}"
        );
        // The same budget with metering on is fine: the budget itself is not the problem.
        let c = Config::from_toml(
            "[[budget]]\nname = \"b\"\nscope = \"global\"\nlimit = 10\nwindow = \"day\"\n",
        )
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn settle_defaults_and_rejections() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.settle.enabled, None);
        assert_eq!(c.settle.api_key_env, "APOLLO_MASTER_API_KEY");
        assert_eq!(c.settle.first_poll.0, DEFAULT_SETTLE_FIRST_POLL);
        assert_eq!(c.settle.max_wait.0, DEFAULT_SETTLE_MAX_WAIT);
        let err = |t: &str| {
            Config::from_toml(t)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let e = err("[settle]\nfirst_poll = \"3h\"\n");
        assert!(
            e.contains("settle.first_poll") && e.contains("shorter"),
            "{e}"
        );
        let e = err("[settle]\nmax_wait = \"40d\"\n");
        assert!(e.contains("settle.max_wait") && e.contains("30d"), "{e}");
        let e = err("[settle]\napi_key_env = \"a key\"\n");
        assert!(e.contains("settle.api_key_env"), "{e}");
        let e = Config::from_toml("[settle]\nenable = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enable"), "{e}");
        // Explicitly on without the key: an error naming the variable; off: no key needed.
        let on = Config::from_toml(
            "[settle]\nenabled = true\napi_key_env = \"CREDITMETER_TEST_UNSET_SETTLE_KEY\"\n",
        )
        .unwrap();
        let e = on.settle.resolve().unwrap_err().to_string();
        assert!(e.contains("CREDITMETER_TEST_UNSET_SETTLE_KEY"), "{e}");
        let off =
            Config::from_toml("[settle]\napi_key_env = \"CREDITMETER_TEST_UNSET_SETTLE_KEY\"\n")
                .unwrap();
        assert_eq!(off.settle.resolve().unwrap(), None);
    }

    #[test]
    fn reconcile_defaults_and_short_intervals() {
        let c = Config::load(None).unwrap();
        assert!(!c.reconcile.enabled);
        assert_eq!(c.reconcile.interval.0, DEFAULT_RECONCILE_INTERVAL);
        assert_eq!(c.reconcile.api_key_env, "APOLLO_MASTER_API_KEY");
        assert_eq!(c.reconcile.balance_lag.0, DEFAULT_RECONCILE_BALANCE_LAG);
        assert_eq!(c.reconcile.pool, Pool::Typed);
        let u = Config::from_toml("[reconcile]\npool = \"unified\"\n").unwrap();
        assert_eq!(u.reconcile.pool, Pool::Unified);
        let e = Config::from_toml("[reconcile]\npool = \"shared\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool") && e.contains("unified"), "{e}");
        let c = Config::from_toml(
            "[reconcile]\nenabled = true\ninterval = \"200ms\"\nbalance_lag = \"0s\"\napi_key_env = \"K\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.reconcile.interval.0, Duration::from_millis(200));
        assert!(c.reconcile.balance_lag.0.is_zero());
    }

    #[test]
    fn reconcile_rejections_say_how_to_fix() {
        let err = |toml: &str| {
            Config::from_toml(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let e = err("[reconcile]\ninterval = \"10ms\"\nbalance_lag = \"0s\"\n");
        assert!(
            e.contains("reconcile.interval") && e.contains("100ms"),
            "{e}"
        );
        // The default lag (10s) is not shorter than a 5s interval.
        let e = err("[reconcile]\ninterval = \"5s\"\n");
        assert!(
            e.contains("reconcile.balance_lag") && e.contains("shorter"),
            "{e}"
        );
        let e = err("[reconcile]\nenabled = true\napi_key_env = \"\"\n");
        assert!(e.contains("reconcile.api_key_env"), "{e}");
        let e = err("[reconcile]\nenabled = true\napi_key_env = \"sk-live-abc=def\"\n");
        assert!(e.contains("reconcile.api_key_env"), "{e}");
        // Disabled, an empty variable name is harmless.
        Config::from_toml("[reconcile]\napi_key_env = \"\"\n")
            .unwrap()
            .validate()
            .unwrap();
        let e = Config::from_toml("[reconcile]\nenable = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enable") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn retention_is_optional_human_and_at_least_an_hour() {
        assert_eq!(Config::load(None).unwrap().ledger.retention, None);
        let c = Config::from_toml("[ledger]\nretention = \"90d\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.ledger.retention.unwrap().0,
            Duration::from_secs(90 * 86_400)
        );
        let c = Config::from_toml("[ledger]\nretention = \"1h\"\n").unwrap();
        c.validate().unwrap();
        for short in ["59m", "0s", "30"] {
            let c = Config::from_toml(&format!("[ledger]\nretention = \"{short}\"\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("ledger.retention") && err.contains("1h"),
                "{err}"
            );
        }
        let err = Config::from_toml("\n[ledger]\nretention = \"forever-ish\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[ledger]\npath = \"data/l.db\"\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.ledger.path, dir.path().join("data/l.db"));
    }
}
