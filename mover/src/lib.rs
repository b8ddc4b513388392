//! Ferry's data path: a deduplicating, compressing, encrypting backup engine.
//!
//! One module per storage concept, in the style of rustic_core:
//! [`backend`] (where bytes live), [`crypto`] (keys and envelopes), [`chunker`] (content-defined
//! chunking), [`pack`] (blob encoding and pack files), [`index`] (blob → pack), [`tree`] (directories),
//! [`snapshot`] (manifests), [`cache`] (local metadata cache), [`repo`] (all of it together), and the
//! operations [`backup`], [`restore`], [`check`]. Progress goes through [`progress::Progress`]; in a mover
//! pod, [`events`] turns it into Kubernetes Events.
//! Every on-disk format is described in `design/0001-repository-format.md`.

pub mod backend;
pub mod backup;
pub mod cache;
pub mod candidates;
pub mod check;
pub mod chunker;
pub mod clock;
pub mod crypto;
pub mod error;
pub mod events;
pub mod fsmeta;
pub mod id;
pub mod index;
pub mod lease;
pub mod pack;
pub mod progress;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod snapshot;
pub mod testdata;
pub mod tree;

use std::sync::Arc;

pub use error::{Error, Result};

use backend::{
    Backend, Location,
    local::LocalBackend,
    s3::{S3Backend, S3Options},
};

/// Opens the backend for a location; `s3` supplies endpoint, region and credentials for `s3://` locations.
pub async fn open_backend(location: &Location, s3: S3Options) -> Result<Arc<dyn Backend>> {
    Ok(match location {
        Location::Local(p) => Arc::new(LocalBackend::new(p)),
        Location::S3 { bucket, prefix } => Arc::new(
            S3Backend::new(S3Options {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                ..s3
            })
            .await?,
        ),
    })
}
