//! Calls in flight, by start time: what reconciliation needs to settle a window as soon as no
//! call that started before its closing snapshot can still add a row.
//!
//! [`CallMeter::new`](crate::meter::CallMeter::new) registers every call; the returned guard
//! is dropped once the call's row has been handed to the ledger writer (or the call is dropped
//! without one, which also records it). One short mutex hold per call and per release: the map
//! holds only the calls in flight, so it stays small.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The calls in flight: `(started_at, sequence)` → (). Cheap to share.
#[derive(Debug, Default)]
pub struct InFlight {
    calls: Mutex<BTreeMap<(i64, u64), ()>>,
    seq: AtomicU64,
}

/// One registered call; dropping it releases the call.
#[derive(Debug)]
pub struct InFlightGuard {
    tracker: Arc<InFlight>,
    key: (i64, u64),
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a call that started at `started_at` (unix ms).
    pub fn register(self: &Arc<Self>, started_at: i64) -> InFlightGuard {
        let key = (started_at, self.seq.fetch_add(1, Ordering::Relaxed));
        self.lock().insert(key, ());
        InFlightGuard {
            tracker: self.clone(),
            key,
        }
    }

    /// The start (unix ms) of the oldest call still in flight; `None` when there is none.
    pub fn oldest_start(&self) -> Option<i64> {
        self.lock().keys().next().map(|&(start, _)| start)
    }

    /// How many calls are in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(i64, u64), ()>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_call_in_flight_is_known_until_released() {
        let t = InFlight::new();
        assert_eq!(t.oldest_start(), None);
        let a = t.register(2000);
        let b = t.register(1000);
        let c = t.register(1000);
        assert_eq!((t.oldest_start(), t.len()), (Some(1000), 3));
        drop(b);
        assert_eq!(t.oldest_start(), Some(1000), "another call started then");
        drop(c);
        assert_eq!(t.oldest_start(), Some(2000));
        drop(a);
        assert!(t.is_empty());
        assert_eq!(t.oldest_start(), None);
    }
}
