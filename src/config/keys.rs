//! `[keys]`: virtual keys. `mode` says whether callers may (`optional`) or must (`required`)
//! use creditmeter's own keys (`cmk_…`) instead of the Apollo key; the real Apollo keys stay
//! on creditmeter, in environment variables named here, never in a file.
//!
//! ```toml
//! [keys]
//! mode = "required"                 # "off" (default) | "optional" | "required"
//! upstream_key_env = "APOLLO_API_KEY"
//! [keys.upstreams.enrichment]       # more Apollo keys; `keys create --upstream enrichment`
//! key_env = "APOLLO_ENRICHMENT_KEY"
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ConfigError;

/// The variable holding the Apollo key virtual keys are swapped for, by default.
pub const DEFAULT_UPSTREAM_KEY_ENV: &str = "APOLLO_API_KEY";

/// `keys.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeysMode {
    /// Virtual keys are not accepted (a `cmk_` key is refused with 401, never forwarded);
    /// callers send Apollo keys as before.
    #[default]
    Off,
    /// Virtual keys are swapped for the real key; Apollo keys still pass as before.
    Optional,
    /// Only virtual keys: any call without a valid one is a 401 and nothing goes upstream.
    Required,
}

impl KeysMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KeysMode::Off => "off",
            KeysMode::Optional => "optional",
            KeysMode::Required => "required",
        }
    }
}

/// `[keys.upstreams.NAME]`: another Apollo key a virtual key may name.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamedUpstream {
    /// The environment variable holding this Apollo key.
    pub key_env: String,
}

/// `[keys]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// `keys.mode`, default `"off"`.
    pub mode: KeysMode,
    /// `keys.upstream_key_env`, default `APOLLO_API_KEY`: the variable holding the Apollo key
    /// that virtual keys without `--upstream` are swapped for.
    pub upstream_key_env: String,
    /// `[keys.upstreams.NAME]`: named Apollo keys, none by default.
    pub upstreams: BTreeMap<String, NamedUpstream>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            mode: KeysMode::Off,
            upstream_key_env: DEFAULT_UPSTREAM_KEY_ENV.to_owned(),
            upstreams: BTreeMap::new(),
        }
    }
}

/// The real Apollo keys, read from the environment. `Debug` never shows them.
#[derive(Clone, Default)]
pub struct UpstreamKeys {
    default: Option<String>,
    named: BTreeMap<String, String>,
}

impl std::fmt::Debug for UpstreamKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamKeys")
            .field("default", &self.default.as_ref().map(|_| "<hidden>"))
            .field("named", &self.named.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl UpstreamKeys {
    /// The Apollo key for a virtual key naming `upstream` (`None`: the default one).
    pub fn get(&self, upstream: Option<&str>) -> Option<&str> {
        match upstream {
            None => self.default.as_deref(),
            Some(n) => self.named.get(n).map(String::as_str),
        }
    }

    /// Every real key, for tests that search for them.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.default
            .iter()
            .chain(self.named.values())
            .map(String::as_str)
    }
}

fn env_value(name: &str) -> Option<String> {
    std::env::var(name.trim())
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

fn valid_env_name(name: &str) -> bool {
    let n = name.trim();
    !n.is_empty() && !n.contains(|c: char| c == '=' || c.is_whitespace())
}

/// Whether `name` may name an upstream or a key: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with
/// a letter or digit.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

impl KeysConfig {
    /// Rules that need no environment.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_env_name(&self.upstream_key_env) {
            return Err(invalid(
                "keys.upstream_key_env",
                "must name the environment variable holding the Apollo key, e.g. \"APOLLO_API_KEY\"".into(),
            ));
        }
        for (name, u) in &self.upstreams {
            if !valid_name(name) {
                return Err(invalid(
                    "keys.upstreams",
                    format!(
                        "{name:?}: an upstream name is 1 to 64 letters, digits, '.', '_' or '-'"
                    ),
                ));
            }
            if !valid_env_name(&u.key_env) {
                return Err(invalid(
                    "keys.upstreams",
                    format!("[keys.upstreams.{name}] key_env must name the environment variable holding that Apollo key"),
                ));
            }
        }
        Ok(())
    }

    /// The real keys in force. With `mode` on, every variable named here must be set: a
    /// virtual key whose Apollo key is missing could only fail, so creditmeter refuses to
    /// start (and `check-config` fails) naming the variable.
    pub fn resolve(&self) -> Result<UpstreamKeys, ConfigError> {
        let mut keys = UpstreamKeys {
            default: env_value(&self.upstream_key_env),
            named: BTreeMap::new(),
        };
        for (name, u) in &self.upstreams {
            match env_value(&u.key_env) {
                Some(v) => {
                    keys.named.insert(name.clone(), v);
                }
                None if self.mode != KeysMode::Off => {
                    return Err(invalid(
                        "keys.upstreams",
                        format!(
                            "[keys.upstreams.{name}]: the environment variable {} (key_env) is empty or unset; set it to that Apollo key, or remove the section",
                            u.key_env.trim()
                        ),
                    ))
                }
                None => {}
            }
        }
        if self.mode != KeysMode::Off && keys.default.is_none() {
            return Err(invalid(
                "keys.upstream_key_env",
                format!(
                    "keys.mode = \"{}\" needs the real Apollo key, but the environment variable {} is empty or unset: set it (creditmeter swaps virtual keys for it), or set keys.mode = \"off\"",
                    self.mode.as_str(),
                    self.upstream_key_env.trim()
                ),
            ));
        }
        Ok(keys)
    }

    /// Whether `name` is a configured upstream (for `keys create --upstream`).
    pub fn has_upstream(&self, name: &str) -> bool {
        self.upstreams.contains_key(name)
    }

    /// What `check-config` prints.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "keys: mode {}, upstream key from {}",
            self.mode.as_str(),
            self.upstream_key_env.trim()
        );
        for (name, u) in &self.upstreams {
            s.push_str(&format!(", upstream {name:?} from {}", u.key_env.trim()));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<crate::config::Config, ConfigError> {
        let c = crate::config::Config::from_toml(text)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_off_and_need_nothing() {
        let c = parse("").unwrap();
        assert_eq!(c.keys.mode, KeysMode::Off);
        assert_eq!(c.keys.upstream_key_env, DEFAULT_UPSTREAM_KEY_ENV);
        assert!(c.keys.resolve().is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_names_are_refused() {
        let e = parse("[keys]\nmode = \"maybe\"\n").unwrap_err().to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = parse("[keys]\nmod = \"off\"\n").unwrap_err().to_string();
        assert!(e.contains("mod"), "{e}");
        let e = parse("[keys.upstreams.\"a b\"]\nkey_env = \"X\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.upstreams"), "{e}");
        let e = parse("[keys]\nupstream_key_env = \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.upstream_key_env"), "{e}");
    }

    #[test]
    fn an_enabled_mode_needs_its_variables() {
        let c =
            parse("[keys]\nmode = \"required\"\nupstream_key_env = \"CM_TEST_UNSET_KEY_VAR_1\"\n")
                .unwrap();
        let e = c.keys.resolve().unwrap_err().to_string();
        assert!(e.contains("CM_TEST_UNSET_KEY_VAR_1"), "{e}");
        let c = parse(
            "[keys]\nmode = \"optional\"\nupstream_key_env = \"PATH\"\n[keys.upstreams.b]\nkey_env = \"CM_TEST_UNSET_KEY_VAR_2\"\n",
        )
        .unwrap();
        let e = c.keys.resolve().unwrap_err().to_string();
        assert!(e.contains("CM_TEST_UNSET_KEY_VAR_2"), "{e}");
        let c = parse("[keys]\nmode = \"optional\"\nupstream_key_env = \"PATH\"\n").unwrap();
        let k = c.keys.resolve().unwrap();
        assert!(k.get(None).is_some());
        assert!(k.get(Some("b")).is_none());
        assert!(!format!("{k:?}").contains('/'), "Debug hides the keys");
    }
}
