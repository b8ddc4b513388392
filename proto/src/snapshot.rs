//! The CSI snapshot resources (`snapshot.storage.k8s.io/v1`): `VolumeSnapshot` and
//! `VolumeSnapshotContent`, the fields Ferry reads and writes, with JSON names exactly as in the CRDs of
//! kubernetes-csi/external-snapshotter (`client/config/crd/`). Every field is optional when read, so an
//! object with more or fewer fields than these still parses; unknown fields are dropped, so Ferry only ever
//! creates these objects and patches single fields, never replaces them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `VolumeSnapshot.spec.source`: exactly one of the two is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// Take a new snapshot of this PVC (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// Bind to this existing content (a pre-provisioned snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// `VolumeSnapshot.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// Where the snapshot comes from.
    #[serde(default)]
    pub source: VolumeSnapshotSource,
    /// VolumeSnapshotClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// A snapshot error reported by the snapshot controller (`status.error`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotError {
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// `VolumeSnapshot.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// The content it is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the storage system cut the snapshot (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// Whether a volume can be provisioned from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Smallest size of a volume restored from it (a quantity, `1Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    /// The group snapshot it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

/// `VolumeSnapshotContent.spec.source`: exactly one of the two is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSource {
    /// An existing snapshot in the storage system (pre-provisioned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// The volume to snapshot (dynamic provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
}

/// The VolumeSnapshot a content is bound to (`spec.volumeSnapshotRef`, an ObjectReference).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotRef {
    /// API version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Field path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
    /// Kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Resource version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// `VolumeSnapshotContent.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// `Delete` (the storage snapshot goes with the content) or `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<String>,
    /// CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Where the content comes from.
    #[serde(default)]
    pub source: VolumeSnapshotContentSource,
    /// `Filesystem` or `Block`: the mode of the volume snapshotted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
    /// VolumeSnapshotClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// The VolumeSnapshot it is bound to.
    #[serde(default)]
    pub volume_snapshot_ref: VolumeSnapshotRef,
}

/// `VolumeSnapshotContent.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// When the storage system cut the snapshot (Unix nanoseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
    /// Whether a volume can be provisioned from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Smallest size of a volume restored from it, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// The snapshot's id in the storage system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// The group snapshot's id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
}

/// Defines a snapshot resource: the object (metadata, spec, optional status; a missing spec reads as
/// empty), `apiVersion` and `kind` written on serialisation, and [`kube::Resource`].
macro_rules! snapshot_resource {
    ($(#[$doc:meta])* $kind:ident, $spec:ty, $status:ty, $plural:literal, $scope:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        pub struct $kind {
            /// Standard object metadata.
            #[serde(default)]
            pub metadata: ObjectMeta,
            /// Spec.
            #[serde(default)]
            pub spec: $spec,
            /// Status, written by the snapshot controller.
            #[serde(default)]
            pub status: Option<$status>,
        }

        impl Serialize for $kind {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut obj = ser.serialize_struct(stringify!($kind), 5)?;
                obj.serialize_field("apiVersion", "snapshot.storage.k8s.io/v1")?;
                obj.serialize_field("kind", stringify!($kind))?;
                obj.serialize_field("metadata", &self.metadata)?;
                obj.serialize_field("spec", &self.spec)?;
                if let Some(status) = &self.status {
                    obj.serialize_field("status", status)?;
                } else {
                    obj.skip_field("status")?;
                }
                obj.end()
            }
        }

        impl kube::Resource for $kind {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                stringify!($kind).into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                "snapshot.storage.k8s.io".into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

snapshot_resource!(
    /// A `VolumeSnapshot` (namespaced): a user's request for a snapshot, bound to one content.
    VolumeSnapshot,
    VolumeSnapshotSpec,
    VolumeSnapshotStatus,
    "volumesnapshots",
    kube::core::NamespaceResourceScope
);
snapshot_resource!(
    /// A `VolumeSnapshotContent` (cluster-scoped): the snapshot in the storage system.
    VolumeSnapshotContent,
    VolumeSnapshotContentSpec,
    VolumeSnapshotContentStatus,
    "volumesnapshotcontents",
    kube::core::ClusterResourceScope
);

impl VolumeSnapshot {
    /// `status.readyToUse`.
    pub fn ready(&self) -> bool {
        self.status.as_ref().and_then(|s| s.ready_to_use) == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::{Value, json};

    fn crd(file: &str) -> Value {
        let path = format!(
            "{}/../../shared/crds/snapshot/{file}",
            std::env::var("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_yaml::from_str(&text).expect("CRD parses")
    }

    /// The served `v1` schema's properties.
    fn schema(crd: &Value) -> Value {
        let versions = crd["spec"]["versions"].as_array().expect("versions");
        let v1 = versions
            .iter()
            .find(|v| v["name"] == "v1")
            .expect("a v1 version");
        v1["schema"]["openAPIV3Schema"]["properties"].clone()
    }

    /// Every property of `schema` (recursively) is a key of `value`, and vice versa.
    fn same_fields(path: &str, schema: &Value, value: &Value) {
        let props = schema["properties"].as_object().expect("object schema");
        let obj = value
            .as_object()
            .unwrap_or_else(|| panic!("{path}: not an object: {value}"));
        for k in obj.keys() {
            assert!(props.contains_key(k), "{path}.{k}: not in the CRD");
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

    fn text() -> Option<String> {
        Some("x".into())
    }

    fn error() -> Option<VolumeSnapshotError> {
        Some(VolumeSnapshotError {
            message: text(),
            time: text(),
        })
    }

    #[test]
    fn volume_snapshot_matches_the_crd() {
        let vs = VolumeSnapshot {
            metadata: Default::default(),
            spec: VolumeSnapshotSpec {
                source: VolumeSnapshotSource {
                    persistent_volume_claim_name: text(),
                    volume_snapshot_content_name: text(),
                },
                volume_snapshot_class_name: text(),
            },
            status: Some(VolumeSnapshotStatus {
                bound_volume_snapshot_content_name: text(),
                creation_time: text(),
                error: error(),
                ready_to_use: Some(true),
                restore_size: Some("1Gi".into()),
                volume_group_snapshot_name: text(),
            }),
        };
        let c = crd("snapshot.storage.k8s.io_volumesnapshots.yaml");
        assert_eq!(c["spec"]["names"]["plural"], &*VolumeSnapshot::plural(&()));
        assert_eq!(c["spec"]["scope"], "Namespaced");
        let v = serde_json::to_value(&vs).expect("serialise");
        assert_eq!(v["apiVersion"], "snapshot.storage.k8s.io/v1");
        assert_eq!(v["kind"], "VolumeSnapshot");
        same_fields("spec", &schema(&c)["spec"], &v["spec"]);
        same_fields("status", &schema(&c)["status"], &v["status"]);
    }

    #[test]
    fn volume_snapshot_content_matches_the_crd() {
        let vsc = VolumeSnapshotContent {
            metadata: Default::default(),
            spec: VolumeSnapshotContentSpec {
                deletion_policy: Some("Delete".into()),
                driver: text(),
                source: VolumeSnapshotContentSource {
                    snapshot_handle: text(),
                    volume_handle: text(),
                },
                source_volume_mode: Some("Block".into()),
                volume_snapshot_class_name: text(),
                volume_snapshot_ref: VolumeSnapshotRef {
                    api_version: text(),
                    field_path: text(),
                    kind: text(),
                    name: text(),
                    namespace: text(),
                    resource_version: text(),
                    uid: text(),
                },
            },
            status: Some(VolumeSnapshotContentStatus {
                creation_time: Some(1),
                error: error(),
                ready_to_use: Some(true),
                restore_size: Some(1 << 30),
                snapshot_handle: text(),
                volume_group_snapshot_handle: text(),
            }),
        };
        let c = crd("snapshot.storage.k8s.io_volumesnapshotcontents.yaml");
        assert_eq!(
            c["spec"]["names"]["plural"],
            &*VolumeSnapshotContent::plural(&())
        );
        assert_eq!(c["spec"]["scope"], "Cluster");
        let v = serde_json::to_value(&vsc).expect("serialise");
        assert_eq!(v["kind"], "VolumeSnapshotContent");
        same_fields("spec", &schema(&c)["spec"], &v["spec"]);
        same_fields("status", &schema(&c)["status"], &v["status"]);
    }

    #[test]
    fn objects_with_missing_or_unknown_fields_parse() {
        let vs: VolumeSnapshot = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "vs"}, "status": {"readyToUse": true, "future": 1}}))
        .expect("parse");
        assert!(vs.ready());
        assert_eq!(vs.spec, VolumeSnapshotSpec::default());
        let created = serde_json::to_value(VolumeSnapshot::default()).expect("serialise");
        assert!(created.get("status").is_none(), "{created}");
    }
}
