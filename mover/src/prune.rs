//! `forget` and `prune`: deleting snapshots, then the packs no snapshot needs any more.
//!
//! Backups take no lock, so a backup running during a prune may reuse a blob the prune sees as unreferenced
//! (its snapshot is not written yet). Prune therefore deletes a pack only when it was already unreferenced
//! in an earlier prune at least `grace` ago and still is; the set of such candidates and when each was first
//! seen is the encrypted object `prune/state`. `grace = 0` deletes at once (no backup may run meanwhile).
//! Design: `design/0003-backup-deletion.md`; format: `design/0001-repository-format.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::crypto::Kind;
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId, SnapshotId};
use crate::index::{IndexPack, IndexSegment};
use crate::pack::{self, BlobKind, PackWriter};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::tree::NodeKind;

const STATE_KEY: &str = "prune/state";
const STATE_VERSION: u32 = 1;

/// Packs seen unreferenced, with the Unix time each was first seen so.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PruneState {
    version: u32,
    candidates: BTreeMap<String, u64>,
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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn load_state(repo: &Repository) -> Result<PruneState> {
    match repo.backend().get(STATE_KEY).await {
        Ok(raw) => {
            let plain = pack::decode(repo.keys(), Kind::PruneState, &raw)
                .map_err(|e| Error::Integrity(format!("{STATE_KEY}: {e}")))?;
            let s: PruneState = serde_json::from_slice(&plain)
                .map_err(|e| Error::Format(format!("{STATE_KEY}: {e}")))?;
            if s.version != STATE_VERSION {
                return Err(Error::Format(format!(
                    "{STATE_KEY} version {} is not supported",
                    s.version
                )));
            }
            Ok(s)
        }
        Err(Error::NotFound(_)) => Ok(PruneState {
            version: STATE_VERSION,
            ..Default::default()
        }),
        Err(e) => Err(e),
    }
}

/// Every blob (data and tree) some snapshot references.
async fn referenced(repo: &Repository, progress: &Progress) -> Result<(usize, HashSet<BlobId>)> {
    let snaps = repo.snapshots().await?;
    let mut data: HashSet<BlobId> = HashSet::new();
    let mut seen = repo
        .walk_trees(&snaps, progress, |_, _, tree| {
            for n in &tree?.nodes {
                if let NodeKind::File { content } = &n.kind {
                    data.extend(content.iter().copied());
                }
            }
            Ok(())
        })
        .await?;
    seen.extend(data);
    Ok((snaps.len(), seen))
}

/// Deletes packs no snapshot references, after `grace` (see the module docs).
pub async fn prune(
    repo: Arc<Repository>,
    grace: Duration,
    progress: Arc<Progress>,
) -> Result<PruneReport> {
    let (snapshots, used) = referenced(&repo, &progress).await?;
    let segments = repo.index_segments().await?;
    let (listed, _) = repo.list_packs().await?;
    // Per pack: does any snapshot use it, and does it hold blobs none uses?
    let mut in_use: HashSet<PackId> = HashSet::new();
    let mut wasteful: HashSet<PackId> = HashSet::new();
    let mut packs: HashMap<PackId, IndexPack> = HashMap::new();
    for (_, seg) in &segments {
        for p in &seg.packs {
            let used_here = p.blobs.iter().filter(|b| used.contains(&b.id)).count();
            if used_here > 0 {
                in_use.insert(p.id);
            }
            if used_here < p.blobs.len() {
                wasteful.insert(p.id);
            }
            packs.entry(p.id).or_insert_with(|| p.clone());
        }
    }
    // Candidates: packs holding unreferenced blobs (fully unused ones, partly used ones to repack) and
    // packs no index names (an interrupted backup's, or a running backup's not yet indexed).
    let candidates: Vec<PackId> = listed
        .keys()
        .filter(|p| !in_use.contains(p) || wasteful.contains(p))
        .copied()
        .collect();
    let mut state = load_state(&repo).await?;
    let t = now();
    let mut next = BTreeMap::new();
    let mut due = HashSet::new();
    for p in &candidates {
        let first = state.candidates.get(&p.to_hex()).copied().unwrap_or(t);
        if t.saturating_sub(first) >= grace.as_secs() {
            due.insert(*p);
        } else {
            next.insert(p.to_hex(), first);
        }
    }
    let mut report = PruneReport {
        snapshots,
        packs_pending: next.len(),
        packs_kept: in_use.iter().filter(|p| !due.contains(p)).count(),
        ..Default::default()
    };
    if !due.is_empty() {
        // Copy the still-used blobs of due, partly used packs into new packs (stored bytes are
        // independent of their pack, so they are copied as they are, after verification).
        let mut fresh: Vec<IndexPack> = Vec::new();
        let mut writers: HashMap<BlobKind, PackWriter> = HashMap::new();
        let target = repo.config().pack_size as usize;
        for p in due.iter().filter(|p| in_use.contains(p)) {
            progress.check()?;
            let bytes = repo.backend().get(&p.key()).await?;
            let header = pack::read_header(repo.keys(), p, &bytes)?;
            for b in header.blobs.iter().filter(|b| used.contains(&b.id)) {
                let stored = bytes
                    .get(b.offset as usize..(b.offset + b.length) as usize)
                    .ok_or_else(|| {
                        Error::Integrity(format!("pack {}: blob out of range", p.short()))
                    })?;
                pack::decode_blob(repo.keys(), header.kind, &b.id, stored)?;
                let w = writers
                    .entry(header.kind)
                    .or_insert_with(|| PackWriter::new(header.kind, target));
                w.add(b.id, b.raw_length as usize, stored);
                if w.is_full() {
                    fresh.push(write_pack(&repo, header.kind, w).await?);
                }
            }
            report.packs_repacked += 1;
        }
        for (kind, w) in writers.iter_mut() {
            if !w.is_empty() {
                fresh.push(write_pack(&repo, *kind, w).await?);
            }
        }
        // One new segment with everything that stays, then drop the segments it replaces, then the packs.
        let mut keep = IndexSegment {
            version: crate::index::INDEX_VERSION,
            packs: packs
                .values()
                .filter(|p| !due.contains(&p.id))
                .cloned()
                .collect(),
        };
        keep.packs.extend(fresh);
        if !keep.packs.is_empty() {
            repo.write_index(&keep).await?;
        }
        for (id, _) in &segments {
            repo.backend().delete(&format!("index/{id}")).await?;
        }
        for p in &due {
            progress.check()?;
            repo.backend().delete(&p.key()).await?;
            report.packs_deleted += 1;
            report.bytes_deleted += listed.get(p).copied().unwrap_or(0);
        }
    }
    state.candidates = next;
    state.version = STATE_VERSION;
    let plain = serde_json::to_vec(&state).map_err(|e| Error::Format(e.to_string()))?;
    repo.backend()
        .put(
            STATE_KEY,
            Bytes::from(pack::encode(repo.keys(), Kind::PruneState, &plain, false)?),
        )
        .await?;
    repo.invalidate_index().await;
    Ok(report)
}
