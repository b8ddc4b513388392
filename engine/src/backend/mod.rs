//! Storage behind a small trait. Keys are `/`-separated relative names (`data/ab/ab…`, `index/…`).
//! Writes are atomic and objects are immutable once written: the engine never overwrites a key with other
//! content, which is what makes concurrent writers safe without locks. The exceptions are the few mutable
//! bookkeeping objects, each with a single writer at a time: a lease (`locks/`, rewritten only by its
//! holder) and `prune/state` (written only under the maintenance lease).

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};

pub mod conformance;
mod insecure_http;
pub mod local;
pub mod memory;
pub mod s3;

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the repository root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When it was last written, by the storage's clock (S3 `LastModified`, a file's mtime), where the
    /// storage tells. Leases compare these to each other, so holders on other machines need no synced
    /// clocks (`crate::lease`).
    pub modified: Option<std::time::SystemTime>,
}

/// What a repository needs from storage.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Where this backend points, for messages.
    fn location(&self) -> String;
    /// Stores `data` under `key` atomically (readers see all of it or nothing). Keeps no reference to `data`
    /// once it returns (a backend that stores in memory copies it): a backup's pack buffer goes back to its
    /// pool only when every reference is dropped, and the backup waits for it.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Stores `data` under `key` only if no object has that key; returns whether it was stored. Atomic
    /// against concurrent writers (S3 `If-None-Match: *`, a hard link locally): exactly one of several
    /// racing callers wins. Used for the repository `config`, the one object two writers could disagree on.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool>;
    /// How long a writer should wait before trusting that its `put_if_absent` was not overtaken. Zero
    /// where the condition is atomic (local files); S3-compatible servers differ (versitygw checks, then
    /// writes), so callers read the object back after this delay.
    fn settle_delay(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    /// Reads a whole object. A missing key is [`Error::NotFound`].
    async fn get(&self, key: &str) -> Result<Bytes>;
    /// Reads `len` bytes at `offset`. A short object is an error.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes>;
    /// Lists every object whose key starts with `prefix` (a directory such as `index/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Deletes an object; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Where a repository lives, parsed from `--repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(std::path::PathBuf),
    /// An S3 bucket and key prefix (without trailing slash; may be empty).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix.
        prefix: String,
    },
}

impl Location {
    /// Parses `PATH`, `file://PATH` or `s3://bucket/prefix`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::Invalid(format!("no bucket in {s:?}")));
            }
            Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            })
        } else if let Some(rest) = s.strip_prefix("file://") {
            Ok(Location::Local(rest.into()))
        } else if s.contains("://") {
            Err(Error::Invalid(format!(
                "unsupported repository scheme in {s:?} (use a path, file:// or s3://)"
            )))
        } else if s.is_empty() {
            Err(Error::Invalid("empty repository location".into()))
        } else {
            Ok(Location::Local(s.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("/tmp/r").expect("p"),
            Location::Local("/tmp/r".into())
        );
        assert_eq!(
            Location::parse("file:///tmp/r").expect("p"),
            Location::Local("/tmp/r".into())
        );
        assert_eq!(
            Location::parse("s3://b/x/y/").expect("p"),
            Location::S3 {
                bucket: "b".into(),
                prefix: "x/y".into()
            }
        );
        assert_eq!(
            Location::parse("s3://b").expect("p"),
            Location::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        assert!(Location::parse("gs://b").is_err());
        assert!(Location::parse("s3:///x").is_err());
    }
}
