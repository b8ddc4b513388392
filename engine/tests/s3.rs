//! The S3 backend against a real S3 server (versitygw), started by the test itself.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_engine::backend::Backend;
use ferry_engine::backend::s3::{S3Backend, S3Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_conformance_and_round_trip() {
    let s3 = S3Server::start().await;
    s3.create_bucket("conformance").await;
    s3.create_bucket("repos").await;

    // The shared backend suite, at the bucket root and under a prefix.
    let b = S3Backend::new(s3.options("conformance", "")).await.unwrap();
    ferry_engine::backend::conformance::run(&b).await;
    let b = S3Backend::new(s3.options("repos", "team/ferry/ns1"))
        .await
        .unwrap();
    ferry_engine::backend::conformance::run(&b).await;

    // A whole backup / incremental / restore / check cycle on S3.
    let backend: Arc<dyn Backend> = Arc::new(
        S3Backend::new(s3.options("repos", "velero/ferry/app"))
            .await
            .unwrap(),
    );
    let repo = new_repo(backend.clone()).await;
    let src = tempdir();
    rich_tree(src.path());
    let b1 = backup(&repo, src.path()).await;
    std::fs::write(src.path().join("a/new.txt"), b"new").unwrap();
    let repo = reopen(&backend).await;
    let b2 = backup(&repo, src.path()).await;
    assert_eq!(b2.snapshot.parent, Some(b1.id));
    assert!(
        b2.snapshot.summary.read_bytes < 1024,
        "incremental backup read {}",
        b2.snapshot.summary.read_bytes
    );
    let out = tempdir();
    restore_latest(&repo, out.path()).await.unwrap();
    ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();
    let report = ferry_engine::check::check(repo.clone(), true, Default::default())
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.errors);

    // Tamper with a pack on the server's disk: check --read-data and restore must both refuse.
    let data_dir = s3.bucket_dir("repos").join("velero/ferry/app/data");
    let pack = files_under(&data_dir)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();
    let report = ferry_engine::check::check(repo.clone(), true, Default::default())
        .await
        .unwrap();
    assert!(!report.ok(), "tampered pack not detected");
    let out2 = tempdir();
    let err = restore_latest(&repo, out2.path()).await.unwrap_err();
    assert!(matches!(err, ferry_engine::Error::Integrity(_)), "{err}");

    // Mover pods of one namespace racing to create its repository: one wins, all agree afterwards,
    // even on a server whose conditional PUT is not atomic.
    let racing: Arc<dyn Backend> = Arc::new(
        S3Backend::new(s3.options("repos", "velero/ferry/race"))
            .await
            .unwrap(),
    );
    let inits =
        (0..4).map(|_| ferry_engine::repo::Repository::init(racing.clone(), PASSWORD, FAST_KDF));
    let results = futures::future::join_all(inits).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let repo = reopen(&racing).await;
    assert_eq!(repo.config().id, winners[0].id);
    assert_eq!(racing.list("keys/").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_are_clear() {
    let s3 = S3Server::start().await;
    // A bucket that does not exist.
    let b = S3Backend::new(s3.options("no-such-bucket", ""))
        .await
        .unwrap();
    let err = b.list("index/").await.unwrap_err().to_string();
    assert!(err.contains("NoSuchBucket") || err.contains("404"), "{err}");
    // Wrong credentials.
    let mut o = s3.options("no-such-bucket", "");
    o.credentials = Some(("wrong".into(), "wrongwrongwrong".into(), None));
    let err = S3Backend::new(o)
        .await
        .unwrap()
        .list("")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("403") || err.to_lowercase().contains("access") || err.contains("Signature"),
        "{err}"
    );
    // Nothing listening.
    let mut o = s3.options("x", "");
    o.endpoint = Some("http://127.0.0.1:1".into());
    let err = S3Backend::new(o)
        .await
        .unwrap()
        .get("config")
        .await
        .unwrap_err();
    assert!(matches!(err, ferry_engine::Error::Backend { .. }), "{err}");
}

/// An endpoint that never completes a TCP handshake (a listener whose accept queue is full, so the kernel
/// drops new SYNs, as a firewall that drops packets would): every attempt ends at the connect timeout and
/// the call fails clearly within the operation bound instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_connect_timeout_is_bounded() {
    let s3 = S3Server::start().await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connect no longer completes.
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(c)) => held.push(c),
            _ => break,
        }
        assert!(held.len() < 64, "the listener accepts every handshake");
    }
    let mut o = s3.options("x", "");
    o.endpoint = Some(format!("http://{addr}"));
    o.connect_timeout = Duration::from_secs(1);
    o.attempt_timeout = Duration::from_secs(3);
    o.operation_timeout = Duration::from_secs(8);
    o.max_attempts = 2;
    let started = std::time::Instant::now();
    let err = S3Backend::new(o)
        .await
        .unwrap()
        .get("config")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    let text = format!("{err}");
    assert!(matches!(err, ferry_engine::Error::Backend { .. }), "{text}");
    assert!(text.contains("config"), "the error names no key: {text}");
    eprintln!("connect timeout after {took:?}: {text}");
    drop(held);
}

/// An S3 endpoint behind HTTPS with a private CA: refused with a clear error when the CA is not given,
/// works with the CA (`caCert`) and with verification turned off (`insecureSkipTLSVerify`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_tls_with_private_ca() {
    let s3 = S3Server::start_tls().await;
    s3.create_bucket("tls").await;

    let untrusted = S3Options {
        ca_pem: None,
        ..s3.options("tls", "untrusted")
    };
    let b = S3Backend::new(untrusted).await.unwrap();
    let err = b.list("").await.unwrap_err().to_string();
    assert!(
        err.contains("certificate") && err.contains("caCert"),
        "unclear TLS error: {err}"
    );

    let b = S3Backend::new(s3.options("tls", "ca")).await.unwrap();
    ferry_engine::backend::conformance::run(&b).await;
    let backend: Arc<dyn Backend> =
        Arc::new(S3Backend::new(s3.options("tls", "repo")).await.unwrap());
    let repo = new_repo(backend.clone()).await;
    let src = tempdir();
    rich_tree(src.path());
    backup(&repo, src.path()).await;
    let out = tempdir();
    restore_latest(&repo, out.path()).await.unwrap();
    ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();

    let insecure = S3Options {
        ca_pem: None,
        insecure_skip_tls_verify: true,
        ..s3.options("tls", "insecure")
    };
    let b = S3Backend::new(insecure).await.unwrap();
    ferry_engine::backend::conformance::run(&b).await;

    let bad = S3Options {
        ca_pem: Some(b"not a certificate".to_vec()),
        ..s3.options("tls", "bad")
    };
    let err = S3Backend::new(bad).await.unwrap_err().to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
}
