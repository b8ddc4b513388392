//! The cases, in the order they run. Each expects what design/0004-datapath-api.md promises the agent;
//! a capability the data path does not advertise turns a case into a check of the refusal.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use ferry_proto::datapath::{self as api, Capability, VolumeMode};
use tonic::Code;

use crate::tree::{pseudo_random, same_tree, write_big, write_tree};
use crate::{Kit, can, expect_code};

type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;
type Case = for<'a> fn(&'a Kit) -> CaseFuture<'a>;

/// Every case, by name.
pub const ALL: [(&str, Case); 9] = [
    ("get_info", |k| Box::pin(get_info(k))),
    ("backup_restore_round_trip", |k| Box::pin(round_trip(k))),
    ("block_volume", |k| Box::pin(block_volume(k))),
    ("bad_requests", |k| Box::pin(bad_requests(k))),
    ("unknown_snapshot", |k| Box::pin(unknown_snapshot(k))),
    ("deadline_already_passed", |k| Box::pin(deadline_passed(k))),
    ("deadline_mid_backup", |k| Box::pin(deadline_mid_backup(k))),
    ("cancel_mid_backup", |k| Box::pin(cancel_mid_backup(k))),
    ("forget_by_tags", |k| Box::pin(forget_by_tags(k))),
];

fn scratch(kit: &Kit, name: &str) -> Result<std::path::PathBuf> {
    let p = kit.work.join(name);
    if p.exists() {
        std::fs::remove_dir_all(&p)?;
    }
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

async fn get_info(kit: &Kit) -> Result<()> {
    let info = kit.info().await?;
    ensure!(!info.name.is_empty(), "GetInfo: empty name");
    ensure!(
        info.api_version == api::API_VERSION,
        "GetInfo: api_version {:?}, expected {:?}",
        info.api_version,
        api::API_VERSION
    );
    for c in [Capability::Backup, Capability::Restore] {
        ensure!(can(&info, c), "GetInfo: {c:?} is not advertised");
    }
    ensure!(
        can(&info, Capability::Filesystem) || can(&info, Capability::Block),
        "GetInfo: neither FILESYSTEM nor BLOCK is advertised"
    );
    Ok(())
}

async fn round_trip(kit: &Kit) -> Result<()> {
    let info = kit.info().await?;
    let (src, dst) = (scratch(kit, "tree")?, scratch(kit, "tree-restored")?);
    write_tree(&src)?;
    let req = kit.backup_request(&src, VolumeMode::Filesystem);
    if !can(&info, Capability::Filesystem) {
        return expect_code(
            "a filesystem backup without FILESYSTEM",
            kit.backup(req).await,
            &[
                Code::FailedPrecondition,
                Code::InvalidArgument,
                Code::Unimplemented,
            ],
        );
    }
    let b = kit.backup(req).await.context("Backup")?;
    ensure!(!b.snapshot_id.is_empty(), "BackupResult: empty snapshot_id");
    ensure!(
        b.files >= 6,
        "BackupResult: files = {}, the tree has 7",
        b.files
    );
    let r = kit
        .restore(kit.restore_request(&dst, VolumeMode::Filesystem, &b))
        .await
        .context("Restore")?;
    ensure!(
        r.total_bytes >= 3 << 20,
        "RestoreResult: total_bytes = {}",
        r.total_bytes
    );
    same_tree(&src, &dst)
}

async fn block_volume(kit: &Kit) -> Result<()> {
    let info = kit.info().await?;
    let dir = scratch(kit, "block")?;
    let (dev, out) = (dir.join("device"), dir.join("restored"));
    let mut data = pseudo_random(4 << 20, 3);
    data.extend(std::iter::repeat_n(0u8, 4 << 20));
    std::fs::write(&dev, &data)?;
    std::fs::write(&out, vec![0xffu8; data.len()])?;
    let req = kit.backup_request(&dev, VolumeMode::Block);
    if !can(&info, Capability::Block) {
        return expect_code(
            "a block backup without BLOCK",
            kit.backup(req).await,
            &[
                Code::FailedPrecondition,
                Code::InvalidArgument,
                Code::Unimplemented,
            ],
        );
    }
    let b = kit.backup(req).await.context("Backup of a block volume")?;
    kit.restore(kit.restore_request(&out, VolumeMode::Block, &b))
        .await
        .context("Restore of a block volume")?;
    ensure!(
        std::fs::read(&out)? == data,
        "the restored device differs from the source"
    );
    Ok(())
}

async fn bad_requests(kit: &Kit) -> Result<()> {
    let src = scratch(kit, "bad")?;
    let good = kit.backup_request(&src, VolumeMode::Filesystem);
    let invalid = [Code::InvalidArgument];
    let mut r = good.clone();
    r.repository = None;
    expect_code("Backup without a repository", kit.backup(r).await, &invalid)?;
    let mut r = good.clone();
    if let Some(repo) = r.repository.as_mut() {
        repo.bucket.clear();
    }
    expect_code("Backup without a bucket", kit.backup(r).await, &invalid)?;
    let mut r = good.clone();
    r.volume = None;
    expect_code("Backup without a volume", kit.backup(r).await, &invalid)?;
    let mut r = good.clone();
    r.volume = Some(api::Volume {
        mode: VolumeMode::Filesystem as i32,
        path: src.join("does-not-exist").display().to_string(),
    });
    expect_code(
        "Backup of a missing path",
        kit.backup(r).await,
        &[Code::FailedPrecondition, Code::NotFound],
    )?;
    let mut r = kit.restore_request(&src, VolumeMode::Filesystem, &Default::default());
    r.snapshot_id.clear();
    expect_code(
        "Restore without a snapshot_id",
        kit.restore(r).await,
        &invalid,
    )
}

async fn unknown_snapshot(kit: &Kit) -> Result<()> {
    let dst = scratch(kit, "unknown")?;
    // 32 random-looking bytes in hex: the shape of an id, naming nothing.
    let id: String = pseudo_random(32, 99)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let result = api::BackupResult {
        snapshot_id: id,
        ..Default::default()
    };
    expect_code(
        "Restore of a snapshot that does not exist",
        kit.restore(kit.restore_request(&dst, VolumeMode::Filesystem, &result))
            .await,
        &[Code::NotFound, Code::InvalidArgument],
    )
}

async fn deadline_passed(kit: &Kit) -> Result<()> {
    let src = scratch(kit, "deadline-passed")?;
    write_tree(&src)?;
    let mut r = kit.backup_request(&src, VolumeMode::Filesystem);
    r.deadline_unix_ms = 1_000;
    expect_code(
        "Backup whose deadline_unix_ms has passed",
        kit.backup(r).await,
        &[Code::DeadlineExceeded],
    )
}

async fn deadline_mid_backup(kit: &Kit) -> Result<()> {
    let src = scratch(kit, "deadline-big")?;
    write_big(&src, kit.big_volume_mib)?;
    let mut req = tonic::Request::new(kit.backup_request(&src, VolumeMode::Filesystem));
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let out = async {
        let mut s = kit.client().backup(req).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    expect_code(
        "Backup with a 300 ms gRPC deadline",
        out,
        &[Code::DeadlineExceeded, Code::Cancelled],
    )?;
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "the deadline was honoured only after {:?}",
        started.elapsed()
    );
    still_serves(kit).await
}

async fn cancel_mid_backup(kit: &Kit) -> Result<()> {
    let src = scratch(kit, "cancel-big")?;
    write_big(&src, kit.big_volume_mib)?;
    let mut stream = kit
        .client()
        .backup(kit.backup_request(&src, VolumeMode::Filesystem))
        .await
        .context("Backup")?
        .into_inner();
    // Cancel once the data path is at work (its first message, or 500 ms).
    let first = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    if let Ok(Ok(Some(api::BackupEvent {
        event: Some(api::backup_event::Event::Result(_)),
    }))) = first
    {
        anyhow::bail!(
            "the backup finished before it could be canceled: raise --big-volume-mib above {}",
            kit.big_volume_mib
        );
    }
    drop(stream);
    // Give a data path advertising CANCEL time to stop, then it must serve as before.
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_serves(kit).await
}

/// GetInfo answers and a small backup works: nothing an interrupted call left behind is in the way.
async fn still_serves(kit: &Kit) -> Result<()> {
    kit.info()
        .await
        .context("GetInfo after an interrupted call")?;
    let src = scratch(kit, "after")?;
    write_tree(&src)?;
    kit.backup(kit.backup_request(&src, VolumeMode::Filesystem))
        .await
        .context("a backup after an interrupted call")?;
    Ok(())
}

async fn forget_by_tags(kit: &Kit) -> Result<()> {
    let info = kit.info().await?;
    let src = scratch(kit, "forget")?;
    write_tree(&src)?;
    let run = format!("forget-{}", std::process::id());
    let mut req = kit.backup_request(&src, VolumeMode::Filesystem);
    req.tags
        .insert("ferry.dev/conformance-run".into(), run.clone());
    let forget = api::ForgetRequest {
        operation_id: run.clone(),
        repository: Some(forget_root(&kit.repository)),
        tags: [("ferry.dev/conformance-run".to_string(), run.clone())].into(),
        grace_seconds: 0,
        ..Default::default()
    };
    if !can(&info, Capability::Forget) {
        let r = async {
            let mut s = kit.client().forget(forget).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await;
        return expect_code("Forget without FORGET", r, &[Code::Unimplemented]);
    }
    let b = kit.backup(req).await.context("Backup")?;
    let forgotten = collect_forget(kit, forget.clone()).await?;
    ensure!(
        forgotten.forgotten >= 1,
        "Forget removed {} snapshots, expected the one tagged {run}",
        forgotten.forgotten
    );
    let again = collect_forget(kit, forget)
        .await
        .context("a second Forget")?;
    ensure!(
        again.forgotten == 0,
        "a second Forget removed {} snapshots",
        again.forgotten
    );
    let dst = scratch(kit, "forget-restored")?;
    expect_code(
        "Restore of a forgotten snapshot",
        kit.restore(kit.restore_request(&dst, VolumeMode::Filesystem, &b))
            .await,
        &[Code::NotFound, Code::FailedPrecondition, Code::DataLoss],
    )
}

/// Forget names the data path's root: the repository prefix without its last (namespace) segment.
fn forget_root(r: &api::Repository) -> api::Repository {
    let prefix = r.prefix.trim_end_matches('/');
    let root = prefix.rsplit_once('/').map_or("", |(root, _)| root);
    api::Repository {
        prefix: root.to_string(),
        ..r.clone()
    }
}

async fn collect_forget(kit: &Kit, req: api::ForgetRequest) -> Result<api::ForgetResult> {
    Ok(crate::collect(kit.client().forget(req).await?.into_inner()).await?)
}
