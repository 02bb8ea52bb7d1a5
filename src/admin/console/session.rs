//! Console sessions and CSRF tokens, stateless: the cookie carries a random session id, its
//! expiry and an HMAC over both, keyed by a secret made when the process starts (so a restart
//! signs everyone out). The admin token is never put in the cookie or a page: the cookie only
//! proves that its holder once presented the token (or that no token is configured).
//!
//! Every mutation the console makes carries a CSRF token, `HMAC(key, "csrf" | session id)`,
//! in a hidden form field. A page on another site can make a browser send a form to the admin
//! listener, but it cannot read the token, and with `SameSite=Strict` the cookie does not even
//! travel with such a request.

use std::collections::HashSet;
use std::sync::Mutex;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The cookie's name.
pub const COOKIE: &str = "creditmeter_session";
/// How long a session lasts from login, in ms (12 hours).
pub const SESSION_MS: i64 = 12 * 3_600_000;

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the system random source failed while making the console's session key")]
    Random,
}

/// A verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// Unix ms.
    pub expires_at: i64,
}

/// The signing key and the sessions signed out before they expired.
pub struct Sessions {
    key: hmac::Key,
    rng: SystemRandom,
    signed_out: Mutex<HashSet<String>>,
}

impl Sessions {
    /// Makes a fresh key from the system random source.
    pub fn new() -> Result<Sessions, ConsoleError> {
        let rng = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| ConsoleError::Random)?;
        Ok(Sessions {
            key,
            rng,
            signed_out: Mutex::new(HashSet::new()),
        })
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        for p in parts {
            ctx.update(p.as_bytes());
            ctx.update(b"|");
        }
        hex(ctx.sign().as_ref())
    }

    /// A new session starting at `now`, and its cookie value.
    pub fn create(&self, now: i64) -> Result<(Session, String), ConsoleError> {
        let mut id = [0u8; 16];
        self.rng.fill(&mut id).map_err(|_| ConsoleError::Random)?;
        let s = Session {
            id: hex(&id),
            expires_at: now + SESSION_MS,
        };
        let exp = s.expires_at.to_string();
        let value = format!("{}.{exp}.{}", s.id, self.mac(&["session", &s.id, &exp]));
        Ok((s, value))
    }

    /// Checks a cookie value: signature, expiry, not signed out.
    pub fn verify(&self, value: &str, now: i64) -> Option<Session> {
        let mut it = value.splitn(3, '.');
        let (id, exp, mac) = (it.next()?, it.next()?, it.next()?);
        let want = self.mac(&["session", id, exp]);
        if !creditmeter_base::constant_time_eq(want.as_bytes(), mac.as_bytes()) {
            return None;
        }
        let expires_at: i64 = exp.parse().ok()?;
        if expires_at <= now {
            return None;
        }
        if lock(&self.signed_out).contains(id) {
            return None;
        }
        Some(Session {
            id: id.to_owned(),
            expires_at,
        })
    }

    /// The CSRF token of a session.
    pub fn csrf(&self, s: &Session) -> String {
        self.mac(&["csrf", &s.id])
    }

    /// True when `token` is the session's CSRF token (constant time).
    pub fn csrf_ok(&self, s: &Session, token: &str) -> bool {
        creditmeter_base::constant_time_eq(self.csrf(s).as_bytes(), token.as_bytes())
    }

    /// Signs a session out before it expires.
    pub fn sign_out(&self, s: &Session) {
        let mut set = lock(&self.signed_out);
        // Sessions last 12 hours; a process that sees more than this many sign-outs in that
        // time forgets the oldest, which only matters for cookies someone copied.
        if set.len() > 100_000 {
            set.clear();
        }
        set.insert(s.id.clone());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `Set-Cookie` value for a session: `HttpOnly`, `SameSite=Strict`, `Path=/`, and `Secure`
/// when the console was reached over TLS.
pub fn set_cookie(value: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_MS / 1000,
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The session cookie's value from a `Cookie` header.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_verifies_until_it_expires_or_signs_out() {
        let s = Sessions::new().unwrap();
        let (session, cookie) = s.create(1_000).unwrap();
        assert_eq!(s.verify(&cookie, 2_000), Some(session.clone()));
        assert_eq!(s.verify(&cookie, 1_000 + SESSION_MS), None, "expired");
        let mut forged = cookie.clone();
        forged.replace_range(0..1, if cookie.starts_with('0') { "1" } else { "0" });
        assert_eq!(s.verify(&forged, 2_000), None, "another id, same signature");
        let other = Sessions::new().unwrap();
        assert_eq!(other.verify(&cookie, 2_000), None, "another process's key");
        s.sign_out(&session);
        assert_eq!(s.verify(&cookie, 2_000), None, "signed out");
    }

    #[test]
    fn csrf_tokens_belong_to_one_session() {
        let s = Sessions::new().unwrap();
        let (a, _) = s.create(0).unwrap();
        let (b, _) = s.create(0).unwrap();
        assert!(s.csrf_ok(&a, &s.csrf(&a)));
        assert!(!s.csrf_ok(&a, &s.csrf(&b)));
        assert!(!s.csrf_ok(&a, ""));
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let c = set_cookie("v", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(set_cookie("v", true).ends_with("; Secure"));
        assert_eq!(
            cookie_value("a=1; creditmeter_session=xyz; b=2"),
            Some("xyz")
        );
        assert_eq!(cookie_value("a=1"), None);
    }
}
