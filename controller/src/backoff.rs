//! Exponential backoff per object for failed reconciles: 1 s, 2 s, 4 s, ... capped at 5 minutes, reset by
//! the next successful reconcile of that object. Keeps a failing object from hammering the API server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First delay after a failure.
pub const BASE: Duration = Duration::from_secs(1);
/// Longest delay.
pub const CAP: Duration = Duration::from_secs(300);

/// Consecutive failures per object key.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
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
        let n = f.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
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
}
