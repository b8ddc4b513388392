//! `check`: verify that the repository is complete and authentic.
//!
//! Always: every index segment authenticates, every pack the index names exists with the right size, every
//! snapshot's trees load and verify, every chunk they name is indexed. With `read_data`: every pack is
//! downloaded, its name checked against its content, its header and every blob decrypted and verified, and
//! its header compared with the index. Packs that no index names (left by an interrupted backup) are
//! reported but are not errors.

use std::collections::HashSet;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::error::Result;
use crate::id::PackId;
use crate::pack::{self, BlobKind};
use crate::progress::{Phase, Progress};
use crate::repo::Repository;
use crate::tree::NodeKind;

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// Pack files in storage.
    pub packs: usize,
    /// Blobs in the index.
    pub blobs: usize,
    /// Snapshots.
    pub snapshots: usize,
    /// Distinct trees walked.
    pub trees: usize,
    /// Whether pack contents were read.
    pub read_data: bool,
    /// Problems that make data unrecoverable or untrustworthy.
    pub errors: Vec<String>,
    /// Harmless findings (e.g. unreferenced packs).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// True when no error was found.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks `repo`.
pub async fn check(
    repo: Arc<Repository>,
    read_data: bool,
    progress: Arc<Progress>,
) -> Result<CheckReport> {
    let mut r = CheckReport {
        read_data,
        ..Default::default()
    };
    progress.set_phase(Phase::Running);
    let (listed, unexpected) = repo.list_packs().await?;
    r.warnings.extend(
        unexpected
            .into_iter()
            .map(|k| format!("unexpected object {k}")),
    );
    r.packs = listed.len();

    let index = match repo.load_index().await {
        Ok(i) => i,
        Err(e) => {
            r.errors.push(format!("index: {e}"));
            return Ok(r);
        }
    };
    r.blobs = index.len();
    let mut indexed = HashSet::new();
    for (id, _, size) in index.packs() {
        indexed.insert(*id);
        match listed.get(id) {
            None => r
                .errors
                .push(format!("pack {id} is named by the index but missing")),
            Some(s) if s != size => r
                .errors
                .push(format!("pack {id} has {s} bytes, the index says {size}")),
            Some(_) => {}
        }
    }
    let orphans = listed.keys().filter(|p| !indexed.contains(*p)).count();
    if orphans > 0 {
        r.warnings.push(format!(
            "{orphans} pack(s) not named by any index (left by an interrupted backup; harmless)"
        ));
    }

    // Walk every snapshot's trees.
    // A snapshot that does not read is reported, and every other one is still checked.
    let snaps = match repo.each_snapshot().await {
        Ok((snaps, failed)) => {
            r.errors.extend(
                failed
                    .into_iter()
                    .map(|(name, e)| format!("snapshot {name}: {e}")),
            );
            snaps
        }
        Err(e) => {
            r.errors.push(format!("snapshots: {e}"));
            return Ok(r);
        }
    };
    r.snapshots = snaps.len();
    let errors = &mut r.errors;
    let seen = repo
        .walk_trees(&snaps, &progress, |sid, t, tree| {
            let tree = match tree {
                Ok(tree) => tree,
                Err(e) => {
                    errors.push(format!("snapshot {}: tree {}: {e}", sid.short(), t.short()));
                    return Ok(());
                }
            };
            for n in &tree.nodes {
                if let NodeKind::File { content } = &n.kind {
                    for c in content {
                        if index.get(c).map(|l| l.kind) != Some(BlobKind::Data) {
                            errors.push(format!(
                                "snapshot {}: file {:?}: chunk {} is not in the index",
                                sid.short(),
                                n.display_name(),
                                c.short()
                            ));
                        }
                    }
                }
            }
            Ok(())
        })
        .await?;
    r.trees = seen.len();

    if read_data {
        let index = Arc::new(index);
        let results: Vec<Vec<String>> = stream::iter(listed.keys().copied().collect::<Vec<_>>())
            .map(|id| {
                let (repo, index, progress) = (repo.clone(), index.clone(), progress.clone());
                async move {
                    let bytes = match repo.backend().get(&id.key()).await {
                        Ok(b) => b,
                        Err(e) => return vec![format!("pack {id}: {e}")],
                    };
                    Progress::add(&progress.bytes_transferred, bytes.len() as u64);
                    tokio::task::spawn_blocking(move || verify_pack(&repo, &index, &id, &bytes))
                        .await
                        .unwrap_or_else(|e| vec![format!("pack {id}: {e}")])
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        r.errors.extend(results.into_iter().flatten());
    }
    progress.set_phase(Phase::Done);
    Ok(r)
}

fn verify_pack(
    repo: &Repository,
    index: &crate::index::Index,
    id: &PackId,
    bytes: &[u8],
) -> Vec<String> {
    let header = match pack::read_header(repo.keys(), id, bytes) {
        Ok(h) => h,
        Err(e) => return vec![e.to_string()],
    };
    let mut errs = Vec::new();
    for b in &header.blobs {
        let s = &bytes[b.offset as usize..(b.offset + b.length) as usize];
        match pack::decode_blob(repo.keys(), header.kind, &b.id, s) {
            Ok(p) if p.len() == b.raw_length as usize => {}
            Ok(_) => errs.push(format!(
                "pack {}: blob {} has the wrong length",
                id.short(),
                b.id.short()
            )),
            Err(e) => errs.push(format!("pack {}: {e}", id.short())),
        }
        if let Some(l) = index.get(&b.id)
            && l.pack == *id
            && (l.offset != b.offset || l.length != b.length)
        {
            errs.push(format!(
                "pack {}: blob {} disagrees with the index",
                id.short(),
                b.id.short()
            ));
        }
    }
    errs
}
