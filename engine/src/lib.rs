//! Ferry's storage engine: a deduplicating, compressing, encrypting backup repository. No Kubernetes here:
//! the mover pod's side (Events, termination message) is `ferry-mover`'s `pod` module on top of this crate.
//!
//! One module per storage concept, in the style of rustic_core:
//! [`backend`] (where bytes live), [`crypto`] (keys and envelopes), [`chunker`] (content-defined
//! chunking), [`pack`] (blob encoding and pack files), [`index`] (blob → pack), [`tree`] (directories),
//! [`snapshot`] (manifests), [`cache`] (local metadata cache), [`lease`] and [`candidates`] (what concurrent
//! backups and prunes may touch), [`repo`] (all of it together), and the operations [`backup`],
//! [`restore`], [`check`], [`prune`] and [`forget`] (which snapshots go).
//!
//! Around them, what every front end needs: [`open`] (a repository target from flags or environment,
//! opened or created), [`cancel`] (SIGTERM / Ctrl-C → cancel at the next safe point), [`demo`] (the
//! generated-tree round trip of `ferry demo`). Progress goes through [`progress::Progress`]; results are the
//! documents of `ferry_proto::result` ([`snapshot::Summary::result`], [`restore::RestoreSummary::result`]).
//! Every on-disk format is described in `design/0001-repository-format.md`.

pub mod backend;
pub mod backup;
pub mod cache;
pub mod cancel;
pub mod candidates;
pub mod check;
pub mod chunker;
pub mod clock;
pub mod crypto;
pub mod demo;
pub mod error;
pub mod forget;
pub mod fsmeta;
pub mod holes;
pub mod id;
mod idtable;
pub mod index;
pub mod lease;
pub mod listing;
pub mod open;
pub mod pack;
pub mod pagecache;
mod pool;
pub mod progress;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod testdata;
pub mod tree;

pub use error::{Error, Result};

/// The CPUs this process may use (its affinity and CPU quota), 2 when that cannot be read: what the backup's
/// thread counts and the key derivation's threads are sized by.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
