//! The mover's result: one JSON document, written by the mover as the container termination message
//! and printed by `ferry backup --json`. Field names are part of the contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the [`MoverResult`] document.
pub const RESULT_VERSION: u32 = 1;

/// What a finished backup reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupResult {
    /// Document version, [`RESULT_VERSION`].
    pub version: u32,
    /// Id of the snapshot written.
    pub snapshot_id: String,
    /// Logical bytes in the snapshot (sum of file sizes, or the block device size).
    pub total_bytes: u64,
    /// Bytes read from the source (files unchanged since the parent snapshot are not read).
    pub read_bytes: u64,
    /// Logical bytes of data new to the repository: what this backup added after deduplication. This is
    /// what Velero shows as `incrementalBytes`.
    pub incremental_bytes: u64,
    /// Bytes written to storage (compressed and encrypted, including metadata).
    pub stored_bytes: u64,
    /// Number of files (regular files, symlinks, other non-directories) in the snapshot.
    pub files: u64,
    /// Number of directories in the snapshot.
    pub dirs: u64,
    /// The data path's own result map (`BackupResult.result` of `ferry.datapath.v1`), shown in the
    /// DataUpload's `status.dataMoverResult`; at most [`RESULT_MAP_MAX`] bytes as JSON. Empty when the data
    /// path sent none, and absent from the document then.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub result: BTreeMap<String, String>,
}

/// Largest data-path result map a backup result document carries, in bytes of JSON: the whole document
/// must fit the termination message (`crate::pod::TERMINATION_MESSAGE_MAX`) with room for the fixed fields.
pub const RESULT_MAP_MAX: usize = 2048;

/// What a finished restore reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreResult {
    /// Document version, [`RESULT_VERSION`].
    pub version: u32,
    /// Id of the snapshot restored.
    pub snapshot_id: String,
    /// Logical bytes restored.
    pub total_bytes: u64,
    /// Number of files restored.
    pub files: u64,
    /// Number of directories restored.
    pub dirs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_result_field_names_are_stable() {
        let r = BackupResult {
            version: RESULT_VERSION,
            snapshot_id: "ab".into(),
            total_bytes: 1,
            read_bytes: 6,
            incremental_bytes: 2,
            stored_bytes: 3,
            files: 4,
            dirs: 5,
            result: BTreeMap::new(),
        };
        let v = serde_json::to_value(&r).expect("serialize");
        assert_eq!(v["snapshotId"], "ab");
        assert_eq!(v["incrementalBytes"], 2);
        assert!(v.get("result").is_none(), "an empty map is left out: {v}");
        assert_eq!(serde_json::from_value::<BackupResult>(v).expect("parse"), r);
        let with_map = BackupResult {
            result: BTreeMap::from([("object".into(), "k".into())]),
            ..r
        };
        let v = serde_json::to_value(&with_map).expect("serialize");
        assert_eq!(v["result"]["object"], "k");
        assert_eq!(
            serde_json::from_value::<BackupResult>(v).expect("parse"),
            with_map
        );
    }
}
