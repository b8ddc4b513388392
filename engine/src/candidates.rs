//! `prune/state`: the packs prune found unreferenced (*candidates*), each with the generation and time it
//! was first marked, and the state's own generation (one more on every write).
//!
//! A backup reads it before loading the index and never reuses data from a candidate; prune deletes a
//! candidate only once every running backup has seen it marked (`crate::lease`, `crate::prune`). Only the
//! holder of the maintenance lease writes it. Format: `design/0001-repository-format.md`.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::clock::age;
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
    /// Unix time (storage clock) it was first listed, rounded up to the second.
    pub since: u64,
}

impl Mark {
    /// A pack first listed in `generation` at `now`. The time is rounded *up* to the second, so a
    /// candidate never looks older than it is: rounded down, a 1 s grace could end 0.1 s after the mark.
    pub fn new(generation: u64, now: SystemTime) -> Mark {
        let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let since = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        Mark { generation, since }
    }

    /// Whether the pack may go at `now`: every live backup has seen the mark (`seen_by_all`, the lowest
    /// generation a live backup lease names) and it has been a candidate for `grace`.
    pub fn is_due(&self, seen_by_all: u64, now: SystemTime, grace: Duration) -> bool {
        self.generation <= seen_by_all
            && age(now, UNIX_EPOCH + Duration::from_secs(self.since)) >= grace
    }
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
    let sealed = pack::encode(repo.keys(), Kind::PruneState, &plain, None)?;
    repo.backend().put(STATE_KEY, Bytes::from(sealed)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn a_mark_is_not_due_before_its_grace_has_passed() {
        // Marked at .950, looked at 100 ms later: a 1 s grace has not passed (CI saw the round-down
        // version delete such a pack in the same prune that marked it).
        let mark = Mark::new(3, at(T0, 950));
        assert!(!mark.is_due(u64::MAX, at(T0 + 1, 50), Duration::from_secs(1)));
        assert!(!mark.is_due(u64::MAX, at(T0 + 1, 949), Duration::from_secs(1)));
        assert!(mark.is_due(u64::MAX, at(T0 + 2, 0), Duration::from_secs(1)));
        // A whole second is exact.
        let whole = Mark::new(3, at(T0, 0));
        assert_eq!(whole.since, T0);
        assert!(whole.is_due(u64::MAX, at(T0 + 1, 0), Duration::from_secs(1)));
    }

    #[test]
    fn a_mark_waits_for_every_live_backup_to_have_seen_it() {
        let mark = Mark::new(5, at(T0, 0));
        let later = at(T0 + 3600, 0);
        assert!(!mark.is_due(4, later, Duration::ZERO));
        assert!(mark.is_due(5, later, Duration::ZERO));
    }
}
