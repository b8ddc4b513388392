//! Prune running while a backup runs: whatever the order, a snapshot a backup commits restores exactly
//! (`design/0003-backup-deletion.md`, "Backups and prune at the same time"). Each test stops a backup just
//! before it writes its snapshot (a [`Gate`] on `snapshots/`), runs forget and prune meanwhile, lets the
//! backup finish, then checks the repository and restores.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_engine::backup::BackupOptions;
use ferry_engine::progress::Progress;
use ferry_engine::prune::{forget, prune};
use ferry_engine::repo::Repository;

const GRACE: Duration = Duration::from_secs(1);

/// Waits out the grace period as prune measures it (whole seconds).
async fn after_grace() {
    tokio::time::sleep(GRACE + Duration::from_millis(1100)).await;
}

/// A tree `a/` of incompressible files, and a source tree that holds a copy of it plus new data.
fn trees(root: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for i in 0..4u64 {
        std::fs::write(a.join(format!("f{i}")), pseudo_random(3 << 20, 100 + i)).unwrap();
    }
    copy_tree(&a, &b);
    std::fs::write(b.join("new"), pseudo_random(5 << 20, 7)).unwrap();
    (a, b)
}

async fn prune_now(repo: &Arc<Repository>) -> ferry_engine::prune::PruneReport {
    prune(repo.clone(), GRACE, Arc::new(Progress::default()))
        .await
        .unwrap()
}

type Running = tokio::task::JoinHandle<ferry_engine::Result<ferry_engine::backup::BackupOutcome>>;

/// Starts a backup of `src` and returns once it is about to write its snapshot; `Gate::release` lets it on.
async fn backup_until_commit(
    plain: &Arc<dyn ferry_engine::backend::Backend>,
    src: &std::path::Path,
) -> (Arc<Gate>, Running) {
    let gate = Gate::new(plain.clone(), "snapshots/");
    let gated: Arc<dyn ferry_engine::backend::Backend> = gate.clone();
    let repo = reopen(&gated).await;
    let running = tokio::spawn(ferry_engine::backup::backup(
        repo,
        BackupOptions::new(src),
        Arc::new(Progress::default()),
    ));
    gate.entered().await;
    (gate, running)
}

/// The committed snapshot (if the backup succeeded) must check clean and restore exactly.
async fn assert_restorable(
    backend: &Arc<dyn ferry_engine::backend::Backend>,
    src: &std::path::Path,
) {
    let repo = reopen(backend).await;
    let report = ferry_engine::check::check(repo.clone(), true, Default::default())
        .await
        .unwrap();
    assert!(report.ok(), "check after the race: {:?}", report.errors);
    let out = tempdir();
    restore_latest(&repo, out.path()).await.unwrap();
    ferry_engine::fsmeta::compare_trees(src, out.path()).unwrap();
}

/// The reproduction: A's packs are prune candidates (A forgotten, one prune ran), a backup of a
/// copy of A starts after that, and a second prune runs while it is still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_started_after_candidates_were_marked_commits_a_restorable_snapshot() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let (a, b) = trees(dir.path());
    let plain = local(repo_dir.path());
    let repo = new_repo(plain.clone()).await;
    let first = backup(&repo, &a).await;
    forget(&repo, |id, _| *id == first.id).await.unwrap();
    let r = prune_now(&repo).await;
    assert!(r.packs_pending > 0, "{r:?}");
    after_grace().await;

    let (gate, running) = backup_until_commit(&plain, &b).await;
    prune_now(&reopen(&plain).await).await;
    gate.release();
    running.await.unwrap().expect("the backup commits");
    assert_restorable(&plain, &b).await;
}

/// A backup that reused A's data while A was still kept; A is forgotten and pruned twice (past the grace)
/// before the backup commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_never_deletes_what_a_running_backup_reuses() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let (a, b) = trees(dir.path());
    let plain = local(repo_dir.path());
    let repo = new_repo(plain.clone()).await;
    let first = backup(&repo, &a).await;

    let (gate, running) = backup_until_commit(&plain, &b).await;
    let repo = reopen(&plain).await;
    forget(&repo, |id, _| *id == first.id).await.unwrap();
    prune_now(&repo).await;
    after_grace().await;
    prune_now(&repo).await;
    gate.release();
    running.await.unwrap().expect("the backup commits");
    assert_restorable(&plain, &b).await;
}
