//! Exponential backoff per object for failed reconciles: 1 s, 2 s, 4 s, ... capped at 5 minutes, reset by
//! the next successful reconcile of that object. Keeps a failing object from hammering the API server.
//! An object not seen failing for twice the cap is forgotten (it was deleted, or has recovered unseen).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// First delay after a failure.
pub const BASE: Duration = Duration::from_secs(1);
/// Longest delay.
pub const CAP: Duration = Duration::from_secs(300);

/// Consecutive failures per object key.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

/// The key of an object: kind, namespace and name.
pub fn key<K: kube::Resource<DynamicType = ()>>(o: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

impl Backoff {
    /// Records one more failure of `key`; returns how long to wait before trying again.
    pub fn failed(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().expect("backoff lock");
        f.retain(|_, (_, at)| at.elapsed() < CAP * 2);
        let (n, at) = f.entry(key.to_string()).or_insert((0, Instant::now()));
        (*n, *at) = (n.saturating_add(1), Instant::now());
        delay(*n)
    }

    /// `key` reconciled fine: the next failure starts from [`BASE`] again.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("backoff lock").remove(key);
    }
}

/// The delay after `n` consecutive failures (n ≥ 1).
pub fn delay(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(20);
    BASE.saturating_mul(1 << doublings).min(CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let b = Backoff::default();
        let d: Vec<u64> = (0..12).map(|_| b.failed("k").as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.failed("other"), BASE);
        b.succeeded("k");
        assert_eq!(b.failed("k"), BASE);
        assert_eq!(delay(u32::MAX), CAP);
    }

    #[test]
    fn objects_not_failing_for_long_are_forgotten() {
        let b = Backoff::default();
        b.failed("gone");
        b.failures
            .lock()
            .expect("lock")
            .get_mut("gone")
            .expect("entry")
            .1 = Instant::now() - CAP * 3;
        b.failed("other");
        assert!(!b.failures.lock().expect("lock").contains_key("gone"));
    }
}
