//! Backups and restores through a fault-injecting S3 proxy (`common::faulty_s3`) in front of a real S3
//! server. Every run either completes correctly (restored tree identical) or fails with a clear reason —
//! naming the operation, the key and the cause — within a bounded time; the repository always checks
//! clean afterwards (read through a clean connection, with `--read-data`), and a following backup without
//! faults completes. Each test prints one summary line with its counts.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faulty_s3::{Fault, FaultyS3, Rule};
use common::*;
use ferry_engine::backend::Backend;
use ferry_engine::backend::s3::{S3Backend, S3Options};

/// No single backup or restore in these tests may take longer than this.
const BOUND: Duration = Duration::from_secs(120);

/// Limits tightened so stalls are detected in seconds rather than a minute.
fn test_limits(o: S3Options) -> S3Options {
    S3Options {
        connect_timeout: Duration::from_secs(2),
        attempt_timeout: Duration::from_secs(6),
        read_timeout: Duration::from_secs(3),
        operation_timeout: Duration::from_secs(30),
        max_attempts: 4,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..o
    }
}

/// The S3 server, a proxy in front of it, and counters for the summary line.
struct Bench {
    s3: S3Server,
    proxy: FaultyS3,
    name: &'static str,
    runs: u32,
    ok: u32,
    clear_failures: u32,
    started: Instant,
    /// Reach the proxy through the client for `insecureSkipTLSVerify` (it speaks plain HTTP too).
    insecure: bool,
}

/// What a run through the proxy is expected to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Complete correctly.
    Success,
    /// Fail with a clear error naming this operation.
    Failure(&'static str),
}

impl Bench {
    async fn new(name: &'static str) -> Bench {
        let s3 = S3Server::start().await;
        s3.create_bucket("faults").await;
        let proxy = FaultyS3::start(&s3.endpoint).await;
        Bench {
            s3,
            proxy,
            name,
            runs: 0,
            ok: 0,
            clear_failures: 0,
            started: Instant::now(),
            insecure: false,
        }
    }

    /// A backend reaching `prefix` through the proxy.
    async fn faulty(&self, prefix: &str) -> Arc<dyn Backend> {
        let o = S3Options {
            endpoint: Some(self.proxy.endpoint.clone()),
            insecure_skip_tls_verify: self.insecure,
            ..test_limits(self.s3.options("faults", prefix))
        };
        Arc::new(S3Backend::new(o).await.unwrap())
    }

    /// A backend reaching `prefix` directly.
    async fn clean(&self, prefix: &str) -> Arc<dyn Backend> {
        Arc::new(
            S3Backend::new(self.s3.options("faults", prefix))
                .await
                .unwrap(),
        )
    }

    /// Checks an outcome against the expectation; counts it.
    fn judge<T>(&mut self, what: &str, expect: Expect, took: Duration, r: ferry_engine::Result<T>) {
        self.runs += 1;
        assert!(took < BOUND, "{what} took {took:?}");
        match (r, expect) {
            (Ok(_), Expect::Success) => self.ok += 1,
            (Err(e), Expect::Failure(op)) => {
                let text = e.to_string();
                match &e {
                    ferry_engine::Error::Backend { op: got, key, .. } => {
                        assert_eq!(*got, op, "{what}: {text}");
                        assert!(
                            !key.is_empty() && text.contains(key.as_str()),
                            "{what}: {text}"
                        );
                    }
                    other => panic!("{what}: not a storage error: {other}"),
                }
                assert!(
                    std::error::Error::source(&e).is_some(),
                    "{what}: no cause in {text}"
                );
                eprintln!(
                    "{}: {what}: failed as expected in {took:?}: {text}",
                    self.name
                );
                self.clear_failures += 1;
            }
            (Ok(_), Expect::Failure(op)) => panic!("{what}: expected a {op} failure, it succeeded"),
            (Err(e), Expect::Success) => panic!(
                "{what}: failed: {e} ({:?}); faults injected: {:#?}",
                std::error::Error::source(&e).map(|s| s.to_string()),
                self.proxy.log()
            ),
        }
    }

    /// One run under `prefix`: a new repository (directly), a backup through the proxy with `backup`
    /// faults, a restore through the proxy with `restore` faults, then a check with data through a clean
    /// connection and a backup without faults.
    async fn run(
        &mut self,
        prefix: &str,
        src: &Path,
        backup_faults: Vec<Rule>,
        expect_backup: Expect,
        restore_faults: Vec<Rule>,
        expect_restore: Expect,
    ) {
        let clean = self.clean(prefix).await;
        new_repo(clean.clone()).await;
        let faulty = self.faulty(prefix).await;

        self.proxy.set(backup_faults);
        let t = Instant::now();
        let r = tokio::time::timeout(BOUND, async {
            let repo = Arc::new(
                ferry_engine::repo::Repository::open(faulty.clone(), PASSWORD, &no_cache()).await?,
            );
            ferry_engine::backup::backup(
                repo,
                ferry_engine::backup::BackupOptions::new(src),
                Arc::new(ferry_engine::progress::Progress::default()),
            )
            .await
        })
        .await
        .unwrap_or_else(|_| panic!("{prefix}: backup hung; faults: {:#?}", self.proxy.log()));
        let backed_up = r.is_ok();
        self.judge(&format!("{prefix}: backup"), expect_backup, t.elapsed(), r);
        self.proxy.clear();
        self.check_clean(&clean, prefix).await;
        if !backed_up {
            // Something to restore.
            backup(&reopen(&clean).await, src).await;
        }

        self.proxy.set(restore_faults);
        let out = tempdir();
        let t = Instant::now();
        let r = tokio::time::timeout(BOUND, async {
            let repo = Arc::new(
                ferry_engine::repo::Repository::open(faulty.clone(), PASSWORD, &no_cache()).await?,
            );
            restore_latest(&repo, out.path()).await
        })
        .await
        .unwrap_or_else(|_| panic!("{prefix}: restore hung; faults: {:#?}", self.proxy.log()));
        let restored = r.is_ok();
        self.judge(
            &format!("{prefix}: restore"),
            expect_restore,
            t.elapsed(),
            r,
        );
        self.proxy.clear();
        if restored {
            ferry_engine::fsmeta::compare_trees(src, out.path()).unwrap();
        }
        self.check_clean(&clean, prefix).await;

        // A following backup without faults, through the proxy.
        let repo = reopen(&faulty).await;
        backup(&repo, src).await;
        self.check_clean(&clean, prefix).await;
    }

    async fn check_clean(&self, clean: &Arc<dyn Backend>, prefix: &str) {
        let report = ferry_engine::check::check(reopen(clean).await, true, Default::default())
            .await
            .unwrap();
        assert!(report.ok(), "{prefix}: check: {:?}", report.errors);
    }

    fn summary(&self) {
        println!(
            "SUMMARY {}: {} runs ({} ok, {} clear failures), {} faults injected, {} requests, {:.1} s",
            self.name,
            self.runs,
            self.ok,
            self.clear_failures,
            self.proxy.injected(),
            self.proxy.requests(),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// About 40 MiB in a few files: three data packs of the default 16 MiB, plus trees and small files.
fn source() -> tempfile::TempDir {
    let dir = tempdir();
    let root = dir.path();
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::write(root.join("d/a.bin"), pseudo_random(21 << 20, 7)).unwrap();
    std::fs::write(root.join("d/e/b.bin"), pseudo_random(13 << 20, 8)).unwrap();
    std::fs::write(root.join("c.bin"), pseudo_random(6 << 20, 9)).unwrap();
    for i in 0..20 {
        std::fs::write(
            root.join(format!("d/e/small-{i}.txt")),
            format!("file {i}\n"),
        )
        .unwrap();
    }
    dir
}

fn data(method: &'static str, times: u64, fault: Fault) -> Rule {
    Rule::new(Some(method), Some("/data/"), times, fault)
}

const OK: Expect = Expect::Success;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_5xx_bursts() {
    let mut b = Bench::new("5xx_bursts").await;
    let src = source();
    for (i, skip) in [0u64, 1, 2].into_iter().enumerate() {
        let put = |code, s3code| data("PUT", 3, Fault::Status(code, s3code)).after(skip);
        let get = |code, s3code| data("GET", 3, Fault::Status(code, s3code)).after(skip);
        let list = Rule::new(
            Some("GET"),
            Some("list-type"),
            2,
            Fault::Status(500, "InternalError"),
        );
        b.run(
            &format!("500-{i}"),
            src.path(),
            vec![put(500, "InternalError"), list.clone()],
            OK,
            vec![get(500, "InternalError"), list],
            OK,
        )
        .await;
        b.run(
            &format!("503-{i}"),
            src.path(),
            vec![put(503, "SlowDown")],
            OK,
            vec![get(503, "SlowDown")],
            OK,
        )
        .await;
    }
    // A server that keeps failing: a clear error, not a hang.
    b.run(
        "500-forever",
        src.path(),
        vec![data("PUT", u64::MAX, Fault::Status(500, "InternalError"))],
        Expect::Failure("put"),
        vec![data("GET", u64::MAX, Fault::Status(503, "SlowDown"))],
        Expect::Failure("get"),
    )
    .await;
    b.summary();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_connection_resets() {
    let mut b = Bench::new("connection_resets").await;
    let src = source();
    for (i, skip) in [0u64, 1, 2].into_iter().enumerate() {
        b.run(
            &format!("reset-{i}"),
            src.path(),
            vec![
                data("PUT", 2, Fault::Reset).after(skip),
                data("PUT", 1, Fault::LoseResponse).after(skip + 3),
            ],
            OK,
            vec![
                data("GET", 2, Fault::ResetMidBody).after(skip),
                Rule::new(Some("GET"), Some("/index/"), 1, Fault::ResetMidBody),
            ],
            OK,
        )
        .await;
    }
    // The same through the client for insecureSkipTLSVerify, which has its own connector.
    b.insecure = true;
    b.run(
        "reset-insecure-client",
        src.path(),
        vec![
            data("PUT", 2, Fault::Reset),
            data("PUT", 1, Fault::LoseResponse).after(3),
        ],
        OK,
        vec![data("GET", 2, Fault::ResetMidBody)],
        OK,
    )
    .await;
    b.insecure = false;
    b.run(
        "reset-forever",
        src.path(),
        vec![data("PUT", u64::MAX, Fault::Reset)],
        Expect::Failure("put"),
        vec![data("GET", u64::MAX, Fault::ResetMidBody)],
        Expect::Failure("get"),
    )
    .await;
    b.summary();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_truncated_bodies() {
    let mut b = Bench::new("truncated_bodies").await;
    let src = source();
    for (i, skip) in [0u64, 1, 2].into_iter().enumerate() {
        let list = Rule::new(Some("GET"), Some("list-type"), 2, Fault::TruncateBody);
        b.run(
            &format!("truncate-{i}"),
            src.path(),
            vec![list.clone()],
            OK,
            vec![
                data("GET", 2, Fault::TruncateBody).after(skip),
                Rule::new(Some("GET"), Some("/snapshots/"), 1, Fault::TruncateBody),
                list,
            ],
            OK,
        )
        .await;
    }
    // A server claiming a 4 EiB body: the claim must not be believed (no such buffer), the body that
    // ends early is retried like any other cut-off download.
    b.run(
        "huge-length",
        src.path(),
        vec![],
        OK,
        vec![data("GET", 2, Fault::HugeLength)],
        OK,
    )
    .await;
    b.run(
        "truncate-forever",
        src.path(),
        vec![],
        OK,
        vec![data("GET", u64::MAX, Fault::TruncateBody)],
        Expect::Failure("get"),
    )
    .await;
    b.summary();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_slow_responses() {
    let mut b = Bench::new("slow_responses").await;
    let src = source();
    for i in 0..2 {
        b.run(
            &format!("slow-{i}"),
            src.path(),
            vec![data("PUT", 2, Fault::Delay(Duration::from_secs(2))).after(i)],
            OK,
            vec![
                data("GET", 2, Fault::Delay(Duration::from_secs(2))).after(i),
                // 1 MiB/s, pieces well inside the read timeout: slow but never idle long.
                data(
                    "GET",
                    1,
                    Fault::SlowBody {
                        chunk: 256 << 10,
                        pause: Duration::from_millis(250),
                    },
                )
                .after(i + 2),
            ],
            OK,
        )
        .await;
    }
    b.summary();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_stalls() {
    let mut b = Bench::new("stalls").await;
    let src = source();
    for (i, skip) in [0u64, 2].into_iter().enumerate() {
        b.run(
            &format!("stall-{i}"),
            src.path(),
            vec![data("PUT", 1, Fault::Stall).after(skip)],
            OK,
            vec![
                data("GET", 1, Fault::Stall).after(skip),
                data("GET", 1, Fault::StallMidBody).after(skip + 1),
            ],
            OK,
        )
        .await;
    }
    b.run(
        "stall-forever",
        src.path(),
        vec![data("PUT", u64::MAX, Fault::Stall)],
        Expect::Failure("put"),
        vec![data("GET", u64::MAX, Fault::StallMidBody)],
        Expect::Failure("get"),
    )
    .await;
    b.summary();
}

/// A request body changed on its way: the server must refuse it (upload checksum), the client must send
/// it again, and the repository must hold only good data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_corrupted_uploads() {
    let mut b = Bench::new("corrupted_uploads").await;
    let src = source();
    for (i, skip) in [0u64, 1, 2].into_iter().enumerate() {
        b.run(
            &format!("corrupt-{i}"),
            src.path(),
            vec![
                data("PUT", 1, Fault::CorruptRequest).after(skip),
                Rule::new(Some("PUT"), Some("/index/"), 1, Fault::CorruptRequest),
                Rule::new(Some("PUT"), Some("/snapshots/"), 1, Fault::CorruptRequest),
            ],
            OK,
            vec![],
            OK,
        )
        .await;
    }
    b.summary();
}

/// Creating a repository when the answer to the conditional PUT of its config is lost: the SDK sends it
/// again, the server says it exists — it is ours, and the repository must be usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_fault_lost_answer_to_init() {
    let mut b = Bench::new("lost_answer_to_init").await;
    let src = source();
    let mut runs = 0;
    for (i, fault) in [Fault::LoseResponse, Fault::Status(503, "SlowDown")]
        .into_iter()
        .enumerate()
    {
        let prefix = format!("init-{i}");
        let faulty = b.faulty(&prefix).await;
        b.proxy
            .set(vec![Rule::new(Some("PUT"), Some("/config"), 1, fault)]);
        let t = Instant::now();
        let r = ferry_engine::repo::Repository::init(faulty.clone(), PASSWORD, FAST_KDF).await;
        b.judge(&format!("{prefix}: init"), OK, t.elapsed(), r);
        b.proxy.clear();
        let repo = reopen(&faulty).await;
        backup(&repo, src.path()).await;
        b.check_clean(&b.clean(&prefix).await, &prefix).await;
        runs += 1;
    }
    assert_eq!(runs, 2);
    b.summary();
}
