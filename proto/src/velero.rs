//! Velero's `DataUpload` / `DataDownload` (`velero.io/v2alpha1`) and `BackupStorageLocation` (`velero.io/v1`)
//! resources, with JSON field names exactly as in the CRDs Velero ships (`shared/crds/velero/`). Ferry never
//! installs its own version of these CRDs; a test checks these types against Velero's schema.
//!
//! The DU/DD CRDs have no status subresource: status is written by updating the whole object with its
//! `resourceVersion` (and retrying on conflict).

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Phase of a DataUpload or DataDownload. An absent or empty phase means [`Phase::New`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Phase {
    /// Created, not yet claimed (also the empty string).
    #[default]
    #[serde(rename = "New", alias = "")]
    New,
    /// Claimed by a data mover.
    Accepted,
    /// The volume is exposed; the data path can start.
    Prepared,
    /// Data is moving.
    InProgress,
    /// Cancellation requested and under way.
    Canceling,
    /// Terminal: canceled.
    Canceled,
    /// Terminal: done.
    Completed,
    /// Terminal: failed; `status.message` says why.
    Failed,
}

impl Phase {
    /// Whether no further transition happens.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Canceled | Phase::Completed | Phase::Failed)
    }
}

/// Progress in bytes (`status.progress`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataMoveProgress {
    /// Bytes to move.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub total_bytes: i64,
    /// Bytes moved.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_done: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The CSI snapshot a DataUpload moves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CsiSnapshotSpec {
    /// VolumeSnapshot name, in `sourceNamespace`.
    pub volume_snapshot: String,
    /// StorageClass of the source PVC.
    pub storage_class: String,
    /// VolumeSnapshotClass, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_class: Option<String>,
    /// CSI driver name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

/// `DataUpload.spec`.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "velero.io",
    version = "v2alpha1",
    kind = "DataUpload",
    plural = "datauploads",
    namespaced
)]
#[kube(status = "DataUploadStatus", schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct DataUploadSpec {
    /// Only `CSI`.
    pub snapshot_type: String,
    /// The CSI snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi_snapshot: Option<CsiSnapshotSpec>,
    /// Source PVC name.
    #[serde(rename = "sourcePVC")]
    pub source_pvc: String,
    /// Routing key: which data mover owns this CR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datamover: Option<String>,
    /// BackupStorageLocation name (in the CR's namespace).
    pub backup_storage_location: String,
    /// Namespace of the PVC and VolumeSnapshot.
    pub source_namespace: String,
    /// Mover-specific options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_mover_config: Option<BTreeMap<String, String>>,
    /// Cancellation request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<bool>,
    /// Timeout for waiting on resources, a Go duration such as `10m0s`.
    pub operation_timeout: String,
}

/// `DataUpload.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataUploadStatus {
    /// Phase.
    #[serde(default)]
    pub phase: Phase,
    /// Path of the exposed volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Id of the snapshot in the mover's repository; what restore gets back.
    #[serde(
        rename = "snapshotID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub snapshot_id: Option<String>,
    /// Mover-private results, copied to the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_mover_result: Option<BTreeMap<String, String>>,
    /// Human-readable message; the error on `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When data movement started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    /// When a terminal phase was reached (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timestamp: Option<String>,
    /// Progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<DataMoveProgress>,
    /// Bytes new relative to the parent snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_bytes: Option<i64>,
    /// Node where the data path runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// OS of that node (`linux`).
    #[serde(rename = "nodeOS", default, skip_serializing_if = "Option::is_none")]
    pub node_os: Option<String>,
    /// Node that accepted the CR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by_node: Option<String>,
    /// When it was accepted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_timestamp: Option<String>,
}

/// Where a DataDownload writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetVolumeSpec {
    /// Target PVC name.
    pub pvc: String,
    /// Target PV name (Velero leaves it empty).
    #[serde(default)]
    pub pv: String,
    /// Target namespace.
    pub namespace: String,
}

/// `DataDownload.spec`.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "velero.io",
    version = "v2alpha1",
    kind = "DataDownload",
    plural = "datadownloads",
    namespaced
)]
#[kube(status = "DataDownloadStatus", schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct DataDownloadSpec {
    /// Where to write.
    pub target_volume: TargetVolumeSpec,
    /// BackupStorageLocation name.
    pub backup_storage_location: String,
    /// Routing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datamover: Option<String>,
    /// Snapshot id in the mover's repository (from the DataUpload).
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Original namespace of the backed-up PVC (selects the repository).
    pub source_namespace: String,
    /// Mover-specific options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_mover_config: Option<BTreeMap<String, String>>,
    /// Cancellation request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<bool>,
    /// Timeout for waiting on resources.
    pub operation_timeout: String,
    /// OS of the node that made the backup.
    #[serde(rename = "nodeOS", default, skip_serializing_if = "Option::is_none")]
    pub node_os: Option<String>,
    /// Logical size of the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_size: Option<i64>,
}

/// `DataDownload.status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataDownloadStatus {
    /// Phase.
    #[serde(default)]
    pub phase: Phase,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When data movement started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    /// When a terminal phase was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timestamp: Option<String>,
    /// Progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<DataMoveProgress>,
    /// Node where the data path runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Node that accepted the CR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by_node: Option<String>,
    /// When it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_timestamp: Option<String>,
}

/// `Backup.spec` (`velero.io/v1`), the fields Ferry reads; every other field is kept in `rest`. Ferry only
/// ever adds and removes its finalizer on Backups (a merge patch), to delete a backup's repository data
/// before the Backup object goes away.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "velero.io",
    version = "v1",
    kind = "Backup",
    plural = "backups",
    namespaced
)]
#[kube(status = "serde_json::Value", schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// The BackupStorageLocation it is stored in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_location: Option<String>,
    /// Whether CSI snapshot data is moved by a data mover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_move_data: Option<bool>,
    /// Which data mover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datamover: Option<String>,
    /// All other fields, untouched.
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

/// A Secret key reference (`credential`, `caCertRef`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Secret name.
    #[serde(default)]
    pub name: String,
    /// Key in the Secret.
    pub key: String,
    /// Whether the Secret may be missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Bucket and prefix of a BackupStorageLocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStorageLocation {
    /// Bucket.
    pub bucket: String,
    /// Prefix inside the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// PEM CA bundle (base64 in YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// CA bundle from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_ref: Option<SecretKeySelector>,
}

/// `BackupStorageLocation.spec` (read only; Ferry never writes BSLs).
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "velero.io",
    version = "v1",
    kind = "BackupStorageLocation",
    plural = "backupstoragelocations",
    namespaced
)]
#[kube(status = "BackupStorageLocationStatus", schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct BackupStorageLocationSpec {
    /// Object store plugin, e.g. `aws` (also `velero.io/aws`).
    pub provider: String,
    /// Bucket and prefix.
    pub object_storage: ObjectStorageLocation,
    /// Provider config: `region`, `s3Url`, `s3ForcePathStyle`, `insecureSkipTLSVerify`, `profile`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<BTreeMap<String, String>>,
    /// Credentials Secret (AWS profile file format for `aws`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<SecretKeySelector>,
    /// Whether this is the default location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    /// How often Velero syncs backups from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_sync_period: Option<String>,
    /// How often Velero validates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_frequency: Option<String>,
    /// `ReadWrite` or `ReadOnly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
}

/// `BackupStorageLocation.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStorageLocationStatus {
    /// `Available` or `Unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why it is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_time: Option<String>,
    /// Last synced revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_revision: Option<String>,
    /// Last validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_validation_time: Option<String>,
    /// Access mode seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn crd(file: &str) -> Value {
        let path = format!(
            "{}/../../shared/crds/velero/{file}",
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_yaml::from_str(&text).expect("CRD parses")
    }

    /// Every property of `schema` (recursively) is a key of `value`, and vice versa.
    fn same_fields(path: &str, schema: &Value, value: &Value) {
        let props = schema["properties"].as_object().expect("object schema");
        let obj = value
            .as_object()
            .unwrap_or_else(|| panic!("{path}: not an object: {value}"));
        for k in obj.keys() {
            assert!(props.contains_key(k), "{path}.{k}: not in Velero's schema");
        }
        for (k, sub) in props {
            let v = obj
                .get(k)
                .unwrap_or_else(|| panic!("{path}.{k}: missing from our type"));
            if sub.get("properties").is_some() {
                same_fields(&format!("{path}.{k}"), sub, v);
            }
        }
    }

    fn schema(crd: &Value) -> &Value {
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    }

    #[test]
    fn data_upload_matches_velero_schema() {
        let c = crd("velero.io_datauploads.yaml");
        assert_eq!(c["spec"]["versions"][0]["name"], "v2alpha1");
        let du = DataUpload {
            metadata: Default::default(),
            spec: DataUploadSpec {
                snapshot_type: "CSI".into(),
                csi_snapshot: Some(CsiSnapshotSpec {
                    volume_snapshot: "vs".into(),
                    storage_class: "sc".into(),
                    snapshot_class: Some("vsc".into()),
                    driver: Some("d".into()),
                }),
                source_pvc: "pvc".into(),
                datamover: Some("ferry".into()),
                backup_storage_location: "default".into(),
                source_namespace: "app".into(),
                data_mover_config: Some(Default::default()),
                cancel: Some(false),
                operation_timeout: "10m0s".into(),
            },
            status: Some(DataUploadStatus {
                phase: Phase::Completed,
                path: Some("/p".into()),
                snapshot_id: Some("s".into()),
                data_mover_result: Some(Default::default()),
                message: Some("m".into()),
                start_timestamp: Some("t".into()),
                completion_timestamp: Some("t".into()),
                progress: Some(DataMoveProgress {
                    total_bytes: 2,
                    bytes_done: 1,
                }),
                incremental_bytes: Some(1),
                node: Some("n".into()),
                node_os: Some("linux".into()),
                accepted_by_node: Some("n".into()),
                accepted_timestamp: Some("t".into()),
            }),
        };
        let v = serde_json::to_value(&du).expect("serialise");
        same_fields("spec", &schema(&c)["spec"], &v["spec"]);
        same_fields("status", &schema(&c)["status"], &v["status"]);
    }

    #[test]
    fn data_download_matches_velero_schema() {
        let c = crd("velero.io_datadownloads.yaml");
        let dd = DataDownload {
            metadata: Default::default(),
            spec: DataDownloadSpec {
                target_volume: TargetVolumeSpec {
                    pvc: "p".into(),
                    pv: "".into(),
                    namespace: "n".into(),
                },
                backup_storage_location: "b".into(),
                datamover: Some("ferry".into()),
                snapshot_id: "s".into(),
                source_namespace: "n".into(),
                data_mover_config: Some(Default::default()),
                cancel: Some(true),
                operation_timeout: "1m".into(),
                node_os: Some("linux".into()),
                snapshot_size: Some(1),
            },
            status: Some(DataDownloadStatus {
                phase: Phase::InProgress,
                message: Some("m".into()),
                start_timestamp: Some("t".into()),
                completion_timestamp: Some("t".into()),
                progress: Some(DataMoveProgress {
                    total_bytes: 2,
                    bytes_done: 1,
                }),
                node: Some("n".into()),
                accepted_by_node: Some("n".into()),
                accepted_timestamp: Some("t".into()),
            }),
        };
        let v = serde_json::to_value(&dd).expect("serialise");
        same_fields("spec", &schema(&c)["spec"], &v["spec"]);
        same_fields("status", &schema(&c)["status"], &v["status"]);
    }

    #[test]
    fn backup_storage_location_matches_velero_schema() {
        let c = crd("velero.io_backupstoragelocations.yaml");
        let sel = || SecretKeySelector {
            name: "s".into(),
            key: "k".into(),
            optional: Some(false),
        };
        let spec = BackupStorageLocationSpec {
            provider: "aws".into(),
            object_storage: ObjectStorageLocation {
                bucket: "b".into(),
                prefix: Some("p".into()),
                ca_cert: Some("c".into()),
                ca_cert_ref: Some(sel()),
            },
            config: Some(Default::default()),
            credential: Some(sel()),
            default: Some(true),
            backup_sync_period: Some("1m".into()),
            validation_frequency: Some("1m".into()),
            access_mode: Some("ReadWrite".into()),
        };
        let status = BackupStorageLocationStatus {
            phase: Some("Available".into()),
            message: Some("m".into()),
            last_synced_time: Some("t".into()),
            last_synced_revision: Some("r".into()),
            last_validation_time: Some("t".into()),
            access_mode: Some("ReadWrite".into()),
        };
        same_fields(
            "spec",
            &schema(&c)["spec"],
            &serde_json::to_value(&spec).expect("ser"),
        );
        same_fields(
            "status",
            &schema(&c)["status"],
            &serde_json::to_value(&status).expect("ser"),
        );
    }

    #[test]
    fn a_du_as_velero_creates_it_parses() {
        // Velero's CSI plugin creates DUs with no status at all.
        let du: DataUpload = serde_json::from_value(json!({
            "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
            "metadata": {"generateName": "b1-", "namespace": "velero",
                         "labels": {"velero.io/backup-name": "b1", "velero.io/async-operation-id": "du-x.y"}},
            "spec": {"snapshotType": "CSI", "csiSnapshot": {"volumeSnapshot": "velero-data-abc", "storageClass": "csi-hostpath-sc",
                     "snapshotClass": "csi-hostpath-snapclass", "driver": "hostpath.csi.k8s.io"},
                     "sourcePVC": "data", "datamover": "ferry", "backupStorageLocation": "default",
                     "sourceNamespace": "app", "operationTimeout": "10m0s"}
        }))
        .expect("parse");
        assert_eq!(du.status, None);
        assert_eq!(du.spec.datamover.as_deref(), Some("ferry"));
        // An empty phase is New.
        let s: DataUploadStatus = serde_json::from_value(json!({"phase": ""})).expect("parse");
        assert_eq!(s.phase, Phase::New);
        assert!(!Phase::InProgress.is_terminal() && Phase::Canceled.is_terminal());
    }

    /// `manifests/crds/` ships Velero's CRDs unchanged: byte-identical to the reference copies.
    #[test]
    fn manifests_carry_velero_crds_unchanged() {
        let root = format!(
            "{}/..",
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
        );
        for f in [
            "velero.io_datauploads.yaml",
            "velero.io_datadownloads.yaml",
            "velero.io_backupstoragelocations.yaml",
        ] {
            let ours = std::fs::read(format!("{root}/manifests/crds/{f}")).expect("manifest CRD");
            let reference =
                std::fs::read(format!("{root}/../shared/crds/velero/{f}")).expect("reference CRD");
            assert!(
                ours == reference,
                "manifests/crds/{f} differs from Velero's"
            );
        }
    }
}
