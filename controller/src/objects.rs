//! The objects made for a CR: their names, owner labels and references, and the idempotent reads, creates
//! and deletes every step uses.

use std::collections::BTreeMap;

use ferry_proto::datapath::agent::CrRef;
use ferry_proto::labels;
use k8s_openapi::api::core::v1::NodeSelectorTerm;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Resource, ResourceExt};

use crate::context::FIELD_MANAGER;
use crate::cr::MoverCr;
use crate::error::{Result, is_conflict, is_not_found};

/// Name of the pod, PVC and VolumeSnapshot made for a CR.
pub fn child_name<K: MoverCr>(cr: &K) -> String {
    format!("ferry-{}", cr.name_any())
}

/// Labels on everything made for a CR.
pub fn owner_labels<K: MoverCr>(cr: &K) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::OWNER_KIND.into(), K::kind(&()).into_owned()),
        (
            labels::OWNER_NAME.into(),
            labels::label_value(&cr.name_any()),
        ),
        (labels::OWNER_UID.into(), cr.uid().unwrap_or_default()),
        (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
    ])
}

/// Label selector for everything made for a CR.
pub fn owner_selector<K: MoverCr>(cr: &K) -> String {
    format!("{}={}", labels::OWNER_UID, cr.uid().unwrap_or_default())
}

/// The label selector of every mover pod Ferry made.
pub fn mover_selector() -> String {
    format!(
        "{}={},{}=mover",
        labels::MANAGED_BY,
        labels::MANAGED_BY_VALUE,
        labels::COMPONENT
    )
}

/// Controller owner reference to the CR (namespaced children only).
pub fn owner_ref<K: MoverCr>(cr: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: cr.name_any(),
        uid: cr.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    }
}

/// Get that maps 404 to `None`.
pub async fn get_opt<T>(api: &Api<T>, name: &str) -> Result<Option<T>>
where
    T: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?)
}

/// Create that treats "already exists" as success (idempotent steps).
pub async fn create_idempotent<T>(api: &Api<T>, obj: &T) -> Result<()>
where
    T: Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, obj).await {
        Ok(_) => Ok(()),
        Err(e) if is_conflict(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Delete that treats "not found" as success.
pub async fn delete_idempotent<T>(api: &Api<T>, name: &str, grace: Option<u32>) -> Result<()>
where
    T: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        grace_period_seconds: grace,
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Merge-patches `metadata` into `o`, only if `o` is still the version read (its resourceVersion); returns
/// whether it applied. A conflict or a vanished object means someone else changed it: the next pass
/// re-reads and decides again.
pub async fn patch_metadata_if_unchanged<T>(
    api: &Api<T>,
    o: &T,
    mut metadata: serde_json::Value,
) -> Result<bool>
where
    T: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Resource,
{
    metadata["resourceVersion"] = serde_json::json!(o.meta().resource_version);
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let patch = serde_json::json!({ "metadata": metadata });
    match api.patch(&o.name_any(), &pp, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every object matching `selector`; returns how many were still present.
pub async fn delete_selected<T>(api: &Api<T>, selector: &str) -> Result<usize>
where
    T: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Resource,
{
    let list = api.list(&ListParams::default().labels(selector)).await?;
    let n = list.items.len();
    for o in list.items {
        if o.meta().deletion_timestamp.is_none() {
            delete_idempotent(api, &o.name_any(), None).await?;
        }
    }
    Ok(n)
}

/// The object a mover pod's agent reports on (its Events go to it).
pub fn cr_ref<K: Resource<DynamicType = ()>>(o: &K) -> CrRef {
    CrRef {
        kind: K::kind(&()).into_owned(),
        name: o.name_any(),
        namespace: o.namespace().unwrap_or_default(),
        uid: o.uid().unwrap_or_default(),
    }
}

/// The values of the `In` expressions in `terms` whose key `key_matches` (the hostnames a node affinity
/// names), if any.
pub fn hostnames(
    terms: &[NodeSelectorTerm],
    key_matches: impl Fn(&str) -> bool,
) -> Option<Vec<String>> {
    let out: Vec<String> = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.operator == "In" && key_matches(&e.key))
        .flat_map(|e| e.values.iter().flatten().cloned())
        .collect();
    (!out.is_empty()).then_some(out)
}
