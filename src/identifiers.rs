//! Identifier fingerprints for the waste finder: the identifiers a call carried (normalised by
//! the catalog, [`crate::catalog::RequestParams::identifiers`]) become keyed fingerprints on
//! its ledger row, never values.
//!
//! The key is derived from the install secret (HMAC-SHA256(secret, a fixed label)), so an
//! identifier fingerprint never equals an API key fingerprint (`key_fp`) of the same text.
//! A fingerprint is the first 8 bytes of HMAC-SHA256(key, kind, 0, value): one-way, and the
//! same person spelled the same way (after normalisation) always gives the same number within
//! one install. `attribution.identifier_fingerprints = false` turns it off, also on reload.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::catalog::{Identifier, RequestParams};
use crate::ledger::identifiers::{shares, IdentifierFp};

/// The label the fingerprint key is derived with.
const KEY_LABEL: &[u8] = b"creditmeter identifier fingerprints v1";

/// Turns a call's identifiers into [`IdentifierFp`]s.
pub struct IdFingerprinter {
    key: ring::hmac::Key,
    enabled: AtomicBool,
}

impl IdFingerprinter {
    /// Keyed from the ledger's install secret; `enabled` is
    /// `attribution.identifier_fingerprints`.
    pub fn new(secret: &[u8], enabled: bool) -> Self {
        let outer = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let derived = ring::hmac::sign(&outer, KEY_LABEL);
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            enabled: AtomicBool::new(enabled),
        }
    }

    /// Turns fingerprinting on or off for calls recorded from now on (a config reload).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The fingerprint of one normalised identifier.
    pub fn fingerprint(&self, kind: &str, value: &str) -> i64 {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(kind.as_bytes());
        ctx.update(&[0]);
        ctx.update(value.as_bytes());
        let tag = ctx.sign();
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        i64::from_be_bytes(b)
    }

    /// The fingerprints of a call that billed `credits_milli` (nothing when it billed none,
    /// or fingerprinting is off): one per identifier, each item's share of the credits split
    /// evenly over the items.
    pub fn of_call(&self, params: &RequestParams, credits_milli: i64) -> Vec<IdentifierFp> {
        if credits_milli <= 0 || !self.enabled() {
            return Vec::new();
        }
        let ids: Vec<Identifier> = params.identifiers();
        let items = ids
            .iter()
            .map(|i| usize::from(i.item) + 1)
            .max()
            .unwrap_or(0);
        let shares = shares(credits_milli, items);
        ids.iter()
            .map(|i| IdentifierFp {
                item: i.item,
                kind: Cow::Borrowed(i.kind),
                fp: self.fingerprint(i.kind, &i.value),
                credits_milli: shares.get(usize::from(i.item)).copied().unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_identifier_same_fingerprint_other_install_other_fingerprint() {
        let a = IdFingerprinter::new(b"secret-one-0123456789", true);
        let b = IdFingerprinter::new(b"secret-two-0123456789", true);
        let p = RequestParams::parse(None, br#"{"email":" Jane@Example.com"}"#);
        let q = RequestParams::parse(Some("email=jane%40example.com"), b"");
        assert_eq!(a.of_call(&p, 1000), a.of_call(&q, 1000));
        assert_ne!(a.of_call(&p, 1000)[0].fp, b.of_call(&p, 1000)[0].fp);
        // The kind is part of the fingerprint: a domain is not an email.
        assert_ne!(a.fingerprint("email", "x"), a.fingerprint("domain", "x"));
    }

    #[test]
    fn only_billed_calls_and_only_when_enabled() {
        let f = IdFingerprinter::new(b"secret-one-0123456789", true);
        let p = RequestParams::parse(None, br#"{"email":"a@b.com"}"#);
        assert!(f.of_call(&p, 0).is_empty());
        assert_eq!(f.of_call(&p, 1000).len(), 1);
        f.set_enabled(false);
        assert!(f.of_call(&p, 1000).is_empty());
    }

    #[test]
    fn bulk_credits_split_over_items() {
        let f = IdFingerprinter::new(b"secret-one-0123456789", true);
        let p = RequestParams::parse(
            None,
            br#"{"details":[{"email":"a@b.com","linkedin_url":"linkedin.com/in/a"},{"email":"c@d.com"}]}"#,
        );
        let fps = f.of_call(&p, 2000);
        assert_eq!(fps.len(), 3);
        assert_eq!(
            fps.iter()
                .map(|i| (i.item, i.credits_milli))
                .collect::<Vec<_>>(),
            [(0, 1000), (0, 1000), (1, 1000)]
        );
    }
}
