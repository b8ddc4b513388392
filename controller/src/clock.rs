//! The one clock: the time now, as Velero writes it, and how long ago a time was. Every age the controller
//! computes (since acceptance, creation, completion, deletion, the last progress, a Lease renewal) goes
//! through [`since`].

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// Now, RFC 3339 in whole seconds as Velero writes it.
pub fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// How long ago `t` was, in whole seconds; zero for a time in the future.
pub fn since(t: Timestamp) -> Duration {
    let secs = Timestamp::now().duration_since(t).as_secs();
    Duration::from_secs(secs.max(0) as u64)
}

/// [`since`] an RFC 3339 time; `None` when absent or unreadable.
pub fn since_text(t: Option<&str>) -> Option<Duration> {
    Some(since(t?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    #[test]
    fn ages_are_whole_seconds_and_never_negative() {
        let ago = Timestamp::now() - SignedDuration::from_secs(90);
        assert!((90..92).contains(&since(ago).as_secs()));
        let ahead = Timestamp::now() + SignedDuration::from_secs(90);
        assert_eq!(since(ahead), Duration::ZERO);
        assert_eq!(since_text(Some("not a time")), None);
        assert_eq!(since_text(None), None);
        assert!(since_text(Some(&now())).is_some_and(|d| d.as_secs() <= 1));
    }
}
