//! The settings a SIGHUP reload swaps (the catalog in force, `attribution.require_table`),
//! shared by the proxy and by everything else that meters calls: the settle and balance
//! pollers. Below all of them, so none has to import the proxy for it.

use std::sync::{Arc, RwLock};

use crate::catalog::Catalog;

/// The settings a SIGHUP reload may change. Each call takes one snapshot when it starts.
#[derive(Clone)]
pub struct ProxySettings {
    pub catalog: Arc<Catalog>,
    pub require_table: bool,
}

/// The settings in force, swapped whole by a reload; shared by the proxy and anything else
/// that meters calls (the balance poller).
pub struct SettingsCell(RwLock<Arc<ProxySettings>>);

impl SettingsCell {
    pub fn new(settings: ProxySettings) -> Self {
        Self(RwLock::new(Arc::new(settings)))
    }

    /// The settings in force now.
    pub fn get(&self) -> Arc<ProxySettings> {
        match self.0.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in new settings; calls already running keep the ones they started with.
    pub fn set(&self, new: ProxySettings) {
        match self.0.write() {
            Ok(mut s) => *s = Arc::new(new),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(new),
        }
    }
}
