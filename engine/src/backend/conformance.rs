//! One behaviour suite that every backend must pass. Called from each backend's tests (the S3 one runs
//! against a real S3 server the tests start themselves).

use bytes::Bytes;

use super::Backend;
use crate::error::Error;

/// Runs the suite against an empty backend location. Panics on the first violation.
pub async fn run(b: &dyn Backend) {
    // Empty listings and missing keys.
    assert!(
        b.list("").await.expect("list empty").is_empty(),
        "fresh location must be empty"
    );
    assert!(
        matches!(b.get("index/nothing").await, Err(Error::NotFound(_))),
        "missing key must be NotFound"
    );
    b.delete("index/nothing")
        .await
        .expect("deleting a missing key is fine");

    // Conditional put: a missing key is written, an existing one never replaced. (Atomicity under racing
    // writers differs between S3 servers; `Repository::init` copes, see the engine tests.)
    assert!(
        b.put_if_absent("config", Bytes::from(vec![7u8; 100]))
            .await
            .expect("put_if_absent"),
        "a missing key is written"
    );
    assert_eq!(b.get("config").await.expect("get config"), vec![7u8; 100]);
    assert!(
        !b.put_if_absent("config", Bytes::from_static(b"x"))
            .await
            .expect("second put_if_absent"),
        "an existing key is never replaced"
    );
    b.delete("config").await.expect("delete config");

    // Put / get / range. The backend lets go of what it was given soon after `put` returns (a backup's
    // pooled pack buffer comes back only then).
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (given, dropped) = Watched::new(data.clone());
    b.put("data/ab/abcd", Bytes::from_owner(given))
        .await
        .expect("put");
    let since = std::time::Instant::now();
    while !dropped.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(10),
            "the backend still holds the bytes of a put 10 s after it returned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(b.get("data/ab/abcd").await.expect("get"), data);
    assert_eq!(
        b.get_range("data/ab/abcd", 1000, 5000)
            .await
            .expect("range"),
        data[1000..6000]
    );
    assert_eq!(
        b.get_range("data/ab/abcd", 299_990, 10)
            .await
            .expect("tail range"),
        data[299_990..]
    );
    assert!(
        b.get_range("data/ab/abcd", 299_990, 100).await.is_err(),
        "range past the end must fail"
    );
    assert!(
        b.get_range("data/ab/none", 0, 1).await.is_err(),
        "range of a missing key must fail"
    );

    // Empty objects.
    b.put("keys/empty", Bytes::new()).await.expect("put empty");
    assert!(b.get("keys/empty").await.expect("get empty").is_empty());

    // Listing by prefix, with sizes, sorted.
    b.put("index/2", Bytes::from_static(b"two"))
        .await
        .expect("put");
    b.put("index/1", Bytes::from_static(b"1"))
        .await
        .expect("put");
    b.put("indexes-not/1", Bytes::from_static(b"x"))
        .await
        .expect("put");
    let l = b.list("index/").await.expect("list");
    let keys: Vec<_> = l.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(keys, vec![("index/1", 1), ("index/2", 3)]);
    let all = b.list("data/").await.expect("list data");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].size, data.len() as u64);

    // Listings tell when each object was written (leases rely on it), close to now.
    let day = std::time::Duration::from_secs(86_400);
    for o in &l {
        let t = o.modified.expect("listings carry modification times");
        let now = std::time::SystemTime::now();
        assert!(
            t > now - day && t < now + day,
            "{}: modified {t:?} is not close to now",
            o.key
        );
    }

    // A mutable object (a lease) is replaced by a later put.
    b.put("locks/l", Bytes::from_static(b"first"))
        .await
        .expect("put lease");
    b.put("locks/l", Bytes::from_static(b"second"))
        .await
        .expect("rewrite lease");
    assert_eq!(b.get("locks/l").await.expect("get lease"), "second");
    b.delete("locks/l").await.expect("delete lease");

    // Overwrite with identical content is allowed (content-addressed retries).
    b.put("index/1", Bytes::from_static(b"1"))
        .await
        .expect("re-put");

    // Many objects (exercises pagination on S3).
    for i in 0..1100 {
        b.put(&format!("snapshots/{i:05}"), Bytes::from(vec![1u8; i % 3]))
            .await
            .expect("put many");
    }
    assert_eq!(b.list("snapshots/").await.expect("list many").len(), 1100);

    // Delete.
    b.delete("index/2").await.expect("delete");
    assert!(matches!(b.get("index/2").await, Err(Error::NotFound(_))));
    assert_eq!(b.list("index/").await.expect("list").len(), 1);
}

/// Bytes whose drop is seen: the last reference to them is gone.
struct Watched(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Watched {
    fn new(data: Vec<u8>) -> (Self, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (Watched(data, dropped.clone()), dropped)
    }
}

impl AsRef<[u8]> for Watched {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
