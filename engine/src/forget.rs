//! Which snapshots a forget removes: the named ones (ids or id prefixes) and every one carrying all of the
//! given tags. One [`Selection`] serves `ferry forget` (one repository) and the mover's maintenance run
//! ([`maintain`]: every namespace repository under a root, each pruned after it lost snapshots).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::open::Target;
use crate::progress::Progress;
use crate::prune::{PruneOptions, PruneReport};
use crate::repo::Repository;
use crate::snapshot::Snapshot;

/// Snapshots to forget.
#[derive(Debug, Clone)]
pub struct Selection {
    ids: Vec<String>,
    tags: Vec<(String, String)>,
}

impl Selection {
    /// The snapshots named by `ids` (ids or id prefixes) and those carrying all of `tags` (K, V). Refuses an
    /// empty selection: it must never mean "every snapshot".
    pub fn new(ids: Vec<String>, tags: Vec<(String, String)>) -> Result<Self> {
        if ids.is_empty() && tags.is_empty() {
            return Err(Error::Invalid(
                "forget needs snapshot ids or --tag (refusing to forget every snapshot)".into(),
            ));
        }
        Ok(Selection { ids, tags })
    }

    /// Whether snapshot `id` is chosen, given the ids the selection's names resolved to.
    fn matches(&self, named: &HashSet<SnapshotId>, id: &SnapshotId, s: &Snapshot) -> bool {
        named.contains(id)
            || (!self.tags.is_empty() && self.tags.iter().all(|(k, v)| s.tags.get(k) == Some(v)))
    }
}

/// Deletes the selected snapshots of `repo` (their data stays until a prune); returns their ids. A name that
/// matches no snapshot (or several) fails before anything is deleted.
pub async fn forget(repo: &Repository, selection: &Selection) -> Result<Vec<SnapshotId>> {
    let mut named = HashSet::new();
    for i in &selection.ids {
        named.insert(repo.find_snapshot(i).await?.0);
    }
    crate::prune::forget(repo, |id, s| selection.matches(&named, id, s)).await
}

/// What a maintenance run did in one namespace repository.
#[derive(Debug, Clone, Serialize)]
pub struct RepositoryMaintenance {
    /// Ids of the snapshots forgotten.
    pub forgotten: Vec<String>,
    /// The source namespace (the repository's directory under the root).
    pub namespace: String,
    /// The prune that followed.
    pub prune: PruneReport,
}

/// The result document of a maintenance run (the maintenance pod's termination message).
#[derive(Debug, Clone, Serialize)]
pub struct MaintenanceResult {
    /// The repositories that lost snapshots.
    pub repositories: Vec<RepositoryMaintenance>,
    /// Document version, `ferry_proto::result::RESULT_VERSION`.
    pub version: u32,
}

/// Forgets the selection in every namespace repository under `root` (each a directory with a `config`),
/// then prunes the repositories that lost snapshots.
pub async fn maintain(
    root: &Target,
    selection: &Selection,
    prune: &PruneOptions,
    progress: Arc<Progress>,
) -> Result<MaintenanceResult> {
    if root.repo.is_none() {
        return Err(Error::Invalid("no repository root given".into()));
    }
    let namespaces: BTreeSet<String> = root
        .backend()
        .await?
        .list("")
        .await?
        .into_iter()
        .filter_map(|o| {
            o.key
                .strip_suffix("/config")
                .filter(|ns| !ns.contains('/'))
                .map(str::to_string)
        })
        .collect();
    let mut repositories = Vec::new();
    for ns in namespaces {
        let repo = root
            .sub(&ns)?
            .open()
            .await
            .map_err(|e| e.context(format!("repository of namespace {ns}")))?;
        let gone = forget(&repo, selection).await?;
        if gone.is_empty() {
            continue;
        }
        let report = crate::prune::prune_with(repo, prune, progress.clone()).await?;
        tracing::info!(namespace = %ns, forgotten = gone.len(), ?report, "pruned");
        repositories.push(RepositoryMaintenance {
            forgotten: gone.iter().map(|i| i.to_hex()).collect(),
            namespace: ns,
            prune: report,
        });
    }
    Ok(MaintenanceResult {
        repositories,
        version: ferry_proto::result::RESULT_VERSION,
    })
}
