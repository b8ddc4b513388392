//! The pod agent (`ferry agent`) against data paths that work, are missing, lack a capability, stay
//! unavailable, break the stream protocol, or are canceled: it always ends with the exit code and the
//! termination message the controller reads — a result document, or a message naming the cause.
#![allow(clippy::unwrap_used)]

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use ferry_engine::testdata::pseudo_random;
use ferry_proto::datapath as api;
use ferry_proto::datapath::agent::{AgentJob, CrRef, agent_job::Call};
use support::Fake;

fn backup_job(volume: &Path, mode: api::VolumeMode, repo: api::Repository) -> AgentJob {
    AgentJob {
        cr: Some(CrRef {
            kind: "DataUpload".into(),
            name: "du1".into(),
            namespace: "velero".into(),
            uid: "u1".into(),
        }),
        report_interval_seconds: 1,
        call: Some(Call::Backup(api::BackupRequest {
            operation_id: "du1".into(),
            repository: Some(repo),
            volume: Some(api::Volume {
                mode: mode as i32,
                path: volume.display().to_string(),
            }),
            source: Some(api::Source {
                namespace: "app".into(),
                pvc: "data".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// `ferry agent` for `job` on `socket`; its termination message lands in `dir/termination-log`.
fn agent(job: &AgentJob, socket: &Path, dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.arg("agent")
        .arg("--no-events")
        .arg("--connect-timeout=2")
        .arg("--socket")
        .arg(socket)
        .arg("--termination-log")
        .arg(dir.join("termination-log"))
        .env("FERRY_AGENT_JOB", ferry_mover::agent::encode_job(job))
        .env_remove("FERRY_S3_CA_PEM");
    c
}

/// Runs the agent off the async runtime (the fakes serve on it) and returns (exit code, message).
async fn finish(mut cmd: Command, dir: &Path) -> (i32, String) {
    let out: Output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let message = std::fs::read_to_string(dir.join("termination-log")).unwrap_or_default();
    (out.status.code().unwrap_or(-1), message)
}

fn repo() -> api::Repository {
    api::Repository {
        bucket: "b".into(),
        password_file: "/nonexistent".into(),
        ..Default::default()
    }
}

async fn against_fake(fake: Fake, mode: api::VolumeMode) -> (i32, String) {
    let dir = tempdir();
    let socket = dir.path().join("dp.sock");
    support::serve_fake(fake, &socket);
    let job = backup_job(dir.path(), mode, repo());
    finish(agent(&job, &socket, dir.path()), dir.path()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_data_path_fails_with_the_socket_named() {
    let dir = tempdir();
    let socket = dir.path().join("nobody.sock");
    let job = backup_job(dir.path(), api::VolumeMode::Filesystem, repo());
    let started = Instant::now();
    let (code, message) = finish(agent(&job, &socket, dir.path()), dir.path()).await;
    assert_eq!(code, 1, "{message}");
    assert!(
        message.contains("did not answer on") && message.contains("nobody.sock"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_breaches_fail_the_call_by_name() {
    for (fake, want) in [
        (
            Fake::TwoResults,
            "broke the data-path protocol: a second result",
        ),
        (
            Fake::NoResult,
            "broke the data-path protocol: the call ended without a result",
        ),
        (
            Fake::NoSnapshotId,
            "broke the data-path protocol: the result names no snapshot_id",
        ),
    ] {
        let (code, message) = against_fake(fake, api::VolumeMode::Filesystem).await;
        assert_eq!(code, 1, "{fake:?}: {message}");
        assert!(message.contains(want), "{fake:?}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_paths_result_map_reaches_the_result_within_its_bound() {
    let (code, message) = against_fake(Fake::ResultMap(20), api::VolumeMode::Filesystem).await;
    assert_eq!(code, 0, "{message}");
    let doc: serde_json::Value = serde_json::from_str(&message).unwrap();
    assert_eq!(doc["result"]["object"], "o".repeat(20), "{message}");

    // Too big for the termination message: refused by name rather than cut into unreadable JSON.
    let (code, message) = against_fake(Fake::ResultMap(4000), api::VolumeMode::Filesystem).await;
    assert_eq!(code, 1, "{message}");
    assert!(
        message.contains("broke the data-path protocol: the result map is 4013 bytes as JSON"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unavailable_data_path_is_retried_then_fails() {
    let started = Instant::now();
    let (code, message) = against_fake(Fake::Unavailable, api::VolumeMode::Filesystem).await;
    assert_eq!(code, 1, "{message}");
    assert!(message.contains("became unavailable"), "{message}");
    // Two retries, after 2 s and 4 s.
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_block_volume_for_a_filesystem_only_data_path_fails_with_the_reason() {
    let (code, message) = against_fake(Fake::NoBlock, api::VolumeMode::Block).await;
    assert_eq!(code, 1, "{message}");
    assert!(
        message.contains("does not support block volumes"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ferrys_data_path_backs_up_and_restores_through_the_agent() {
    let s3 = S3Server::start().await;
    let dir = tempdir();
    let repo = support::s3_repository(&s3, dir.path(), "agent", "plugins/ferry/app").await;
    let socket = dir.path().join("dp.sock");
    let _dp = support::ferry_datapath(&socket, None);
    let src = dir.path().join("src");
    rich_tree(&src);
    let job = backup_job(&src, api::VolumeMode::Filesystem, repo.clone());
    let (code, message) = finish(agent(&job, &socket, dir.path()), dir.path()).await;
    assert_eq!(code, 0, "{message}");
    let doc: ferry_proto::result::BackupResult = serde_json::from_str(&message).unwrap();
    assert_eq!(doc.snapshot_id.len(), 64, "{message}");
    assert!(doc.files > 0 && doc.read_bytes > 0, "{message}");

    let dst = dir.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let mut job = job;
    job.call = Some(Call::Restore(api::RestoreRequest {
        operation_id: "dd1".into(),
        repository: Some(repo),
        volume: Some(api::Volume {
            mode: api::VolumeMode::Filesystem as i32,
            path: dst.display().to_string(),
        }),
        snapshot_id: doc.snapshot_id.clone(),
        ..Default::default()
    }));
    let (code, message) = finish(agent(&job, &socket, dir.path()), dir.path()).await;
    assert_eq!(code, 0, "{message}");
    let restored: ferry_proto::result::RestoreResult = serde_json::from_str(&message).unwrap();
    assert_eq!(restored.snapshot_id, doc.snapshot_id);
    for f in files_under(&src) {
        let rel = f.strip_prefix(&src).unwrap();
        let (a, b) = (std::fs::symlink_metadata(&f).unwrap(), dst.join(rel));
        if a.is_file() {
            assert_eq!(
                std::fs::read(&f).unwrap(),
                std::fs::read(&b).unwrap(),
                "{rel:?}"
            );
        }
    }
}

/// A data path that hangs holds nothing: the controller's no-progress watchdog deletes the pod
/// (`controller/src/survival.rs`), and the agent ends on that SIGTERM at once, whatever the data path does.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_data_path_does_not_hold_the_agent_past_sigterm() {
    let dir = tempdir();
    let socket = dir.path().join("dp.sock");
    support::serve_fake(Fake::Hang, &socket);
    let job = backup_job(dir.path(), api::VolumeMode::Filesystem, repo());
    let mut child = agent(&job, &socket, dir.path()).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent waits for the hung call"
    );
    let sent = Instant::now();
    sigterm_ends_canceled(child, dir.path()).await;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cancels_the_call_and_exits_canceled() {
    let s3 = S3Server::start().await;
    let dir = tempdir();
    let repo = support::s3_repository(&s3, dir.path(), "agent", "plugins/ferry/app").await;
    let socket = dir.path().join("dp.sock");
    let _dp = support::ferry_datapath(&socket, None);
    let src: PathBuf = dir.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..8 {
        std::fs::write(src.join(format!("f{i}")), pseudo_random(24 << 20, i + 1)).unwrap();
    }
    let job = backup_job(&src, api::VolumeMode::Filesystem, repo);
    let child = agent(&job, &socket, dir.path()).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm_ends_canceled(child, dir.path()).await;
}

/// Sends the agent SIGTERM and checks it ends canceled (exit 2, "data path canceled").
async fn sigterm_ends_canceled(mut child: std::process::Child, dir: &Path) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let message = std::fs::read_to_string(dir.join("termination-log")).unwrap();
    assert_eq!(status.code(), Some(2), "{message}");
    assert_eq!(message, "data path canceled");
}
