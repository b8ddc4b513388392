//! Snapshot manifests: JSON documents (compressed and encrypted under `snapshots/`) naming the root tree
//! of one backup, what it was taken of, and its summary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{BlobId, SnapshotId};

/// Snapshot format version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// What a snapshot was taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A directory tree (or a single file).
    Filesystem,
    /// The content of a block device or image file, stored as one file node in the root tree.
    Block,
}

/// Totals of one backup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Regular files and other non-directories.
    pub files: u64,
    /// Directories (including the root).
    pub dirs: u64,
    /// Logical bytes (sum of file sizes).
    pub total_bytes: u64,
    /// Bytes read from the source (unchanged files are skipped).
    pub read_bytes: u64,
    /// Logical bytes of chunks new to the repository.
    pub new_bytes: u64,
    /// Bytes added to storage (compressed, encrypted, including trees).
    pub stored_bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl Summary {
    /// The result document (`ferry_proto::result`) of the backup that wrote snapshot `id`.
    pub fn result(&self, id: &SnapshotId) -> ferry_proto::result::BackupResult {
        ferry_proto::result::BackupResult {
            version: ferry_proto::result::RESULT_VERSION,
            snapshot_id: id.to_hex(),
            total_bytes: self.total_bytes,
            read_bytes: self.read_bytes,
            incremental_bytes: self.new_bytes,
            stored_bytes: self.stored_bytes,
            files: self.files,
            dirs: self.dirs,
            result: Default::default(),
        }
    }
}

/// One backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// Start time, RFC 3339 UTC.
    pub time: String,
    /// Host that made it.
    pub hostname: String,
    /// The source path, as given.
    pub path: String,
    /// Filesystem or block device.
    pub source: SourceKind,
    /// Root tree.
    pub tree: BlobId,
    /// The snapshot used to skip unchanged files, if any.
    pub parent: Option<SnapshotId>,
    /// User tags (`--tag K=V`).
    pub tags: BTreeMap<String, String>,
    /// Totals.
    pub summary: Summary,
}

impl Snapshot {
    /// Parses a decrypted manifest.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let s: Snapshot =
            serde_json::from_slice(b).map_err(|e| Error::Format(format!("snapshot: {e}")))?;
        if s.version != SNAPSHOT_VERSION {
            return Err(Error::Format(format!(
                "snapshot version {} is not supported",
                s.version
            )));
        }
        Ok(s)
    }
}

/// Formats a system time as RFC 3339 UTC with nanoseconds (fixed width, so strings sort by time).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos());
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_time() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.000000000Z");
        assert_eq!(
            rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
    }
}
