//! Restore exposer: the target PVC Velero restores into, a PVC of our own the mover writes to, and the
//! hand-over of its PersistentVolume to the target PVC as Velero expects (claimRef, selector labels,
//! reclaim policy).

use ferry_proto::labels;
use ferry_proto::velero::DataDownload;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::context::Context;
use crate::error::Result;
use crate::objects::{self, child_name};

/// Annotation the scheduler puts on a WaitForFirstConsumer PVC: the node its first consumer went to.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The target PVC, if it exists.
pub async fn target_pvc(dd: &DataDownload, ctx: &Context) -> Result<Option<PersistentVolumeClaim>> {
    let t = &dd.spec.target_volume;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &t.namespace);
    objects::get_opt(&pvcs, &t.pvc).await
}

/// Hands the restored PV to the target PVC, one idempotent step per call. `Ok(None)` when done.
pub async fn rebind(dd: &DataDownload, ctx: &Context) -> Result<Option<String>> {
    let ns = dd.namespace().unwrap_or_default();
    let name = child_name(dd);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = dd.uid().unwrap_or_default();
    let sel = objects::owner_selector(dd);
    // 1. Mark the PV ours and Retain, so deleting the restore PVC keeps it.
    let restore_pvc = objects::get_opt(&pvcs, &name).await?;
    if let Some(pvc) = &restore_pvc
        && let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone())
    {
        let pv = pvs.get(&pv_name).await?;
        if pv.labels().get(labels::OWNER_UID) != Some(&uid) {
            let policy = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone())
                .unwrap_or_else(|| "Delete".into());
            pvs.patch(
                &pv_name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {"labels": {labels::OWNER_UID: uid},
                        "annotations": {labels::ORIGINAL_RECLAIM_POLICY: policy}},
                    "spec": {"persistentVolumeReclaimPolicy": "Retain"},
                })),
            )
            .await?;
        }
    }
    // 2. Pod and restore PVC go; wait until the PVC is gone.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    objects::delete_selected(&pods, &sel).await?;
    if restore_pvc.is_some() {
        objects::delete_idempotent(&pvcs, &name, None).await?;
        return Ok(Some("waiting for the restore PVC to be deleted".into()));
    }
    let list = pvs.list(&ListParams::default().labels(&sel)).await?;
    let Some(pv) = list.items.into_iter().next() else {
        return Err(crate::error::Error::Invalid(
            "the restored PersistentVolume is gone".into(),
        ));
    };
    let pv_name = pv.name_any();
    let Some(target) = target_pvc(dd, ctx).await? else {
        return Err(crate::error::Error::Invalid(format!(
            "target PVC {}/{} disappeared",
            dd.spec.target_volume.namespace, dd.spec.target_volume.pvc
        )));
    };
    let target_uid = target.uid().unwrap_or_default();
    let claim_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.uid.clone());
    // 3. Point the PV at the target PVC, with the labels its selector wants.
    if claim_uid.as_deref() != Some(target_uid.as_str()) {
        let match_labels = target
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default();
        let mut annotations = serde_json::Map::new();
        annotations.insert(
            "pv.kubernetes.io/bound-by-controller".into(),
            serde_json::Value::Null,
        );
        pvs.patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"labels": match_labels, "annotations": annotations},
                "spec": {"claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": dd.spec.target_volume.namespace,
                    "name": dd.spec.target_volume.pvc,
                    "uid": target_uid,
                    "resourceVersion": null,
                }},
            })),
        )
        .await?;
    }
    // 4. Point the target PVC at the PV (allowed once, while its volumeName is empty).
    let target_volume = target.spec.as_ref().and_then(|s| s.volume_name.clone());
    match target_volume.as_deref() {
        None | Some("") => {
            let tp: Api<PersistentVolumeClaim> =
                Api::namespaced(ctx.client.clone(), &dd.spec.target_volume.namespace);
            tp.patch(
                &dd.spec.target_volume.pvc,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"volumeName": pv_name}})),
            )
            .await?;
        }
        Some(v) if v == pv_name => {}
        Some(v) => {
            return Err(crate::error::Error::Invalid(format!(
                "target PVC is bound to another volume {v}"
            )));
        }
    }
    // 5. Wait until bound, then restore the reclaim policy and drop our marks.
    let pv = pvs.get(&pv_name).await?;
    let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
    if phase.as_deref() != Some("Bound") {
        return Ok(Some(format!(
            "waiting for PV {pv_name} to bind to the target PVC"
        )));
    }
    let policy = pv
        .annotations()
        .get(labels::ORIGINAL_RECLAIM_POLICY)
        .cloned()
        .unwrap_or_else(|| "Delete".into());
    pvs.patch(
        &pv_name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"labels": {labels::OWNER_UID: null},
                "annotations": {labels::ORIGINAL_RECLAIM_POLICY: null}},
            "spec": {"persistentVolumeReclaimPolicy": policy},
        })),
    )
    .await?;
    Ok(None)
}
