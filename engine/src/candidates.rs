//! `prune/state`: the packs prune found unreferenced (*candidates*), each with the generation and time it
//! was first marked, and the state's own generation (one more on every write).
//!
//! A backup reads it before loading the index and never reuses data from a candidate; prune deletes a
//! candidate only once every running backup has seen it marked (`crate::lease`, `crate::prune`). Only the
//! holder of the maintenance lease writes it. Format: `design/0001-repository-format.md`.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::crypto::Kind;
use crate::error::{Error, Result};
use crate::id::PackId;
use crate::pack;
use crate::repo::Repository;

const STATE_KEY: &str = "prune/state";
/// Version written; version 1 (candidates with a first-seen time only) is still read.
const STATE_VERSION: u32 = 2;

/// When a pack became a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The generation of the first state that listed it (its candidacy has been unbroken since).
    pub generation: u64,
    /// Unix time (storage clock) it was first listed.
    pub since: u64,
}

/// The prune state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneState {
    /// Generation of this state; 0 when none was ever written.
    pub generation: u64,
    /// Candidate packs.
    pub candidates: BTreeMap<PackId, Mark>,
}

impl PruneState {
    /// The candidate packs.
    pub fn packs(&self) -> HashSet<PackId> {
        self.candidates.keys().copied().collect()
    }
}

/// A candidate as stored: a v1 first-seen time, or a v2 mark.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    V2(Mark),
    V1(u64),
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    #[serde(default)]
    generation: u64,
    candidates: BTreeMap<String, Stored>,
}

/// Reads the state; a repository without one has the empty state of generation 0.
pub async fn load(repo: &Repository) -> Result<PruneState> {
    let raw = match repo.backend().get(STATE_KEY).await {
        Ok(raw) => raw,
        Err(Error::NotFound(_)) => return Ok(PruneState::default()),
        Err(e) => return Err(e),
    };
    let plain = pack::decode(repo.keys(), Kind::PruneState, &raw)
        .map_err(|e| Error::Integrity(format!("{STATE_KEY}: {e}")))?;
    let f: StateFile =
        serde_json::from_slice(&plain).map_err(|e| Error::Format(format!("{STATE_KEY}: {e}")))?;
    if f.version != 1 && f.version != STATE_VERSION {
        return Err(Error::Format(format!(
            "{STATE_KEY} version {} is not supported",
            f.version
        )));
    }
    let mut candidates = BTreeMap::new();
    for (hex, s) in f.candidates {
        let id = PackId::from_hex(&hex).map_err(|e| Error::Format(format!("{STATE_KEY}: {e}")))?;
        let mark = match s {
            Stored::V2(m) => m,
            // Marked by a version without leases: as old as possible, so only the grace period protects it.
            Stored::V1(since) => Mark {
                generation: 0,
                since,
            },
        };
        candidates.insert(id, mark);
    }
    Ok(PruneState {
        generation: f.generation,
        candidates,
    })
}

/// Writes the state (the caller holds the maintenance lease).
pub async fn save(repo: &Repository, state: &PruneState) -> Result<()> {
    let f = StateFile {
        version: STATE_VERSION,
        generation: state.generation,
        candidates: state
            .candidates
            .iter()
            .map(|(p, m)| (p.to_hex(), Stored::V2(*m)))
            .collect(),
    };
    let plain = serde_json::to_vec(&f).map_err(|e| Error::Format(e.to_string()))?;
    let sealed = pack::encode(repo.keys(), Kind::PruneState, &plain, false)?;
    repo.backend().put(STATE_KEY, Bytes::from(sealed)).await
}
