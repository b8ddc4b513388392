//! `forget` and `prune`: deleting snapshots, then the packs no snapshot needs any more.
//!
//! Backups take no lock against prune; instead (full argument in `design/0003-backup-deletion.md`):
//! 1. prune holds the maintenance lease (one prune per repository at a time, `crate::lease`);
//! 2. it marks every pack holding unreferenced data as a *candidate* in `prune/state`, with the state
//!    generation that first listed it, and writes that state before looking at running backups;
//! 3. a backup writes its lease (with the generation it had seen) before reading the state, and never reuses
//!    data from a candidate;
//! 4. a candidate is deleted (or, partly used, repacked) only when every live backup lease has seen its
//!    mark, it has been a candidate for the grace period, and no snapshot written meanwhile uses it.
//!
//! A candidate a running backup may depend on therefore always waits for that backup to end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::candidates::{self, Mark, PruneState};
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId, SnapshotId};
use crate::index::{IndexPack, IndexSegment};
use crate::lease::{self, Lease};
use crate::pack::{self, BlobKind, PackWriter};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::tree::NodeKind;

/// A prune with nothing to delete still merges the index segments into one once there are more than this
/// many: every backup reads them all (a mover pod with an empty cache fetches each), and each backup
/// writes at least one.
pub const MERGE_SEGMENTS: usize = 32;

/// Default grace period of a prune, in seconds: far longer than any backup runs.
pub const DEFAULT_GRACE_SECONDS: u64 = 6 * 3600;

/// How a prune runs.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// A pack is deleted only after it has been unreferenced this long (a second line of defence behind
    /// the leases, and time to notice a mistaken forget).
    pub grace: Duration,
    /// How long to wait for another maintenance run to finish before failing.
    pub lock_wait: Duration,
}

impl PruneOptions {
    /// A grace period and a lock wait, in whole seconds (as flags give them).
    pub fn from_secs(grace_seconds: u64, lock_wait_seconds: u64) -> Self {
        PruneOptions {
            grace: Duration::from_secs(grace_seconds),
            lock_wait: Duration::from_secs(lock_wait_seconds),
        }
    }
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    /// Snapshots kept.
    pub snapshots: usize,
    /// Packs deleted.
    pub packs_deleted: usize,
    /// Bytes deleted.
    pub bytes_deleted: u64,
    /// Unreferenced packs kept until their grace period ends.
    pub packs_pending: usize,
    /// Packs still in use and left as they are.
    pub packs_kept: usize,
    /// Partly used packs whose used blobs were copied into new packs.
    pub packs_repacked: usize,
    /// Backups running meanwhile (their data waits for them to finish).
    pub backups_running: usize,
    /// Index segments replaced by one of everything that stays.
    pub index_segments_merged: usize,
}

async fn write_pack(repo: &Repository, kind: BlobKind, w: &mut PackWriter) -> Result<IndexPack> {
    let p = w.finish(repo.keys())?;
    repo.backend().put(&p.id.key(), p.bytes.clone()).await?;
    Ok(IndexPack {
        id: p.id,
        kind,
        size: p.bytes.len() as u64,
        blobs: p.header.blobs,
    })
}

/// Deletes the snapshots `select` picks; returns their ids.
pub async fn forget(
    repo: &Repository,
    select: impl Fn(&SnapshotId, &Snapshot) -> bool,
) -> Result<Vec<SnapshotId>> {
    let mut gone = Vec::new();
    for (id, snap) in repo.snapshots().await? {
        if select(&id, &snap) {
            repo.backend()
                .delete(&format!("snapshots/{}", id.to_hex()))
                .await?;
            gone.push(id);
        }
    }
    Ok(gone)
}

/// Every blob (data and tree) the given snapshots reference.
async fn referenced(
    repo: &Repository,
    snaps: &[(SnapshotId, Snapshot)],
    progress: &Progress,
) -> Result<HashSet<BlobId>> {
    let mut data: HashSet<BlobId> = HashSet::new();
    let mut seen = repo
        .walk_trees(snaps, progress, |_, _, tree| {
            for n in &tree?.nodes {
                if let NodeKind::File { content } = &n.kind {
                    data.extend(content.iter().copied());
                }
            }
            Ok(())
        })
        .await?;
    seen.extend(data);
    Ok(seen)
}

/// What prune knows about the repository: snapshots walked, blobs they use, packs by index.
struct View {
    snapshots: HashSet<SnapshotId>,
    used: HashSet<BlobId>,
    segments: Vec<String>,
    packs: HashMap<PackId, IndexPack>,
}

impl View {
    async fn load(repo: &Repository, progress: &Progress) -> Result<View> {
        let snaps = repo.snapshots().await?;
        let used = referenced(repo, &snaps, progress).await?;
        let mut v = View {
            snapshots: snaps.into_iter().map(|(id, _)| id).collect(),
            used,
            segments: Vec::new(),
            packs: HashMap::new(),
        };
        v.add_segments(repo).await?;
        Ok(v)
    }

    /// Adds index segments not seen yet.
    async fn add_segments(&mut self, repo: &Repository) -> Result<()> {
        for (id, seg) in repo.index_segments().await? {
            if self.segments.contains(&id) {
                continue;
            }
            for p in seg.packs {
                self.packs.entry(p.id).or_insert(p);
            }
            self.segments.push(id);
        }
        Ok(())
    }

    /// Takes in what was written since the view was loaded: index segments (a backup that ended
    /// meanwhile, even one whose snapshot is already forgotten, named its packs there; they are merged into
    /// the new index, so no surviving segment names a pack this prune deletes) and snapshots (whose blobs
    /// are then kept).
    async fn catch_up(&mut self, repo: &Repository, progress: &Progress) -> Result<()> {
        self.add_segments(repo).await?;
        let new: Vec<_> = repo
            .snapshots()
            .await?
            .into_iter()
            .filter(|(id, _)| !self.snapshots.contains(id))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.add_segments(repo).await?;
        self.used.extend(referenced(repo, &new, progress).await?);
        self.snapshots.extend(new.iter().map(|(id, _)| *id));
        Ok(())
    }

    fn used_blobs(&self, p: &PackId) -> usize {
        self.packs.get(p).map_or(0, |ip| {
            ip.blobs
                .iter()
                .filter(|b| self.used.contains(&b.id))
                .count()
        })
    }

    /// Packs holding unreferenced data: fully unused, partly used, or named by no index.
    fn candidates(&self, listed: &HashMap<PackId, u64>) -> Vec<PackId> {
        listed
            .keys()
            .filter(|p| match self.packs.get(p) {
                None => true,
                Some(ip) => self.used_blobs(p) < ip.blobs.len(),
            })
            .copied()
            .collect()
    }
}

/// Deletes packs no snapshot references, after `grace`, waiting for no other maintenance run.
pub async fn prune(
    repo: Arc<Repository>,
    grace: Duration,
    progress: Arc<Progress>,
) -> Result<PruneReport> {
    prune_with(
        repo,
        &PruneOptions {
            grace,
            ..Default::default()
        },
        progress,
    )
    .await
}

/// Deletes packs no snapshot references (see the module docs).
pub async fn prune_with(
    repo: Arc<Repository>,
    opts: &PruneOptions,
    progress: Arc<Progress>,
) -> Result<PruneReport> {
    let lease = Lease::acquire_maintenance(repo.clone(), opts.lock_wait).await?;
    let r = run(&repo, &lease, opts, &progress).await;
    lease.release().await;
    r
}

async fn run(
    repo: &Repository,
    lease: &Lease,
    opts: &PruneOptions,
    progress: &Progress,
) -> Result<PruneReport> {
    let old = candidates::load(repo).await?;
    let mut view = View::load(repo, progress).await?;
    let (listed, _) = repo.list_packs().await?;

    // Mark, and publish the marks before looking at backups (module docs, step 2).
    let now = lease.leases().await?.now;
    let generation = old.generation + 1;
    let mut marked = PruneState {
        generation,
        candidates: BTreeMap::new(),
    };
    for p in view.candidates(&listed) {
        let mark = old
            .candidates
            .get(&p)
            .copied()
            .unwrap_or_else(|| Mark::new(generation, now));
        marked.candidates.insert(p, mark);
    }
    lease.ensure_held().await?;
    candidates::save(repo, &marked).await?;

    // What every live backup has seen; stale leases belong to dead holders.
    let leases = lease.leases().await?;
    lease::remove_stale(repo, &leases.others).await?;
    let live: Vec<u64> = leases
        .others
        .iter()
        .filter(|f| !f.stale)
        .filter_map(|f| f.backup_generation())
        .collect();
    let seen_by_all = live.iter().copied().min().unwrap_or(u64::MAX);
    view.catch_up(repo, progress).await?;
    let due: HashSet<PackId> = marked
        .candidates
        .iter()
        .filter(|(_, m)| m.is_due(seen_by_all, leases.now, opts.grace))
        .map(|(p, _)| *p)
        .collect();

    let mut report = PruneReport {
        snapshots: view.snapshots.len(),
        backups_running: live.len(),
        packs_kept: view
            .packs
            .keys()
            .filter(|p| listed.contains_key(p) && !due.contains(p) && view.used_blobs(p) > 0)
            .count(),
        ..Default::default()
    };
    if !due.is_empty() || view.segments.len() > MERGE_SEGMENTS {
        delete_due(repo, lease, &view, &listed, &due, progress, &mut report).await?;
        report.index_segments_merged = view.segments.len();
    }
    // Keep marks of what is still there; drop those of deleted packs.
    marked.generation += 1;
    marked.candidates.retain(|p, _| !due.contains(p));
    report.packs_pending = marked.candidates.len();
    lease.ensure_held().await?;
    candidates::save(repo, &marked).await?;
    repo.invalidate_index().await;
    Ok(report)
}

/// Repacks the used blobs of due, partly used packs, writes one index of everything that stays, then deletes
/// the index segments it replaces and the due packs — in that order, so no index ever names a missing
/// pack that holds used data. With nothing due, this merges the index segments into one.
async fn delete_due(
    repo: &Repository,
    lease: &Lease,
    view: &View,
    listed: &HashMap<PackId, u64>,
    due: &HashSet<PackId>,
    progress: &Progress,
    report: &mut PruneReport,
) -> Result<()> {
    let mut fresh: Vec<IndexPack> = Vec::new();
    let mut writers: HashMap<BlobKind, PackWriter> = HashMap::new();
    let target = repo.config().pack_size as usize;
    for p in due.iter().filter(|p| view.used_blobs(p) > 0) {
        progress.check()?;
        let bytes = repo.backend().get(&p.key()).await?;
        let header = pack::read_header(repo.keys(), p, &bytes)?;
        for b in header.blobs.iter().filter(|b| view.used.contains(&b.id)) {
            let stored = bytes
                .get(b.offset as usize..(b.offset + b.length) as usize)
                .ok_or_else(|| {
                    Error::Integrity(format!("pack {}: blob out of range", p.short()))
                })?;
            pack::decode_blob(repo.keys(), header.kind, &b.id, stored)?;
            let w = writers
                .entry(header.kind)
                .or_insert_with(|| PackWriter::new(header.kind, target));
            if !w.is_empty() && !w.fits(stored.len()) {
                fresh.push(write_pack(repo, header.kind, w).await?);
            }
            w.add(b.id, b.raw_length as usize, stored);
        }
        report.packs_repacked += 1;
    }
    for (kind, w) in writers.iter_mut() {
        if !w.is_empty() {
            fresh.push(write_pack(repo, *kind, w).await?);
        }
    }
    let mut keep = IndexSegment {
        version: crate::index::INDEX_VERSION,
        packs: view
            .packs
            .values()
            .filter(|p| !due.contains(&p.id))
            .cloned()
            .collect(),
    };
    keep.packs.extend(fresh);
    lease.ensure_held().await?;
    if !keep.packs.is_empty() {
        repo.write_index(&keep).await?;
    }
    for id in &view.segments {
        repo.backend().delete(&format!("index/{id}")).await?;
    }
    for (i, p) in due.iter().enumerate() {
        progress.check()?;
        if i % 64 == 0 {
            lease.ensure_held().await?;
        }
        repo.backend().delete(&p.key()).await?;
        report.packs_deleted += 1;
        report.bytes_deleted += listed.get(p).copied().unwrap_or(0);
    }
    Ok(())
}
