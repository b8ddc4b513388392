//! Restore exposer: wait for the target PVC Velero restores into, restore into a PVC of our own (honouring
//! WaitForFirstConsumer), then hand its PersistentVolume to the target PVC as Velero expects (claimRef,
//! selector labels, reclaim policy).

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::labels;
use ferry_proto::velero::DataDownload;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use super::{EXPOSE_REQUEUE, Exposure, bound_pv_nodes, waits_for_first_consumer};
use crate::clock;
use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::objects::{self, child_name, owner_labels};
use crate::proceed;
use crate::step::Step;

/// Annotation the scheduler puts on a WaitForFirstConsumer PVC: the node its first consumer went to.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// How soon to look again for a target PVC that is not there yet.
const ADMIT_REQUEUE: Duration = Duration::from_secs(2);
/// The same while the DataDownload is younger than [`FRESH`]: Velero creates the target PVC right after it.
const FRESH_REQUEUE: Duration = Duration::from_millis(200);
/// How long a DataDownload counts as just created.
const FRESH: Duration = Duration::from_secs(5);

/// The target PVC, if it exists.
pub async fn target_pvc(dd: &DataDownload, ctx: &Context) -> Result<Option<PersistentVolumeClaim>> {
    let t = &dd.spec.target_volume;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &t.namespace);
    objects::get_opt(&pvcs, &t.pvc).await
}

/// Whether the restore can start: the target PVC exists (waited for up to the operation timeout since the
/// CR was created) and is not bound yet.
pub async fn admissible(dd: &DataDownload, ctx: &Context) -> Result<Step> {
    let t = &dd.spec.target_volume;
    let limit = dd.operation_timeout().as_secs();
    let Some(target) = target_pvc(dd, ctx).await? else {
        let age = dd
            .creation_timestamp()
            .map(|c| clock::since(c.0))
            .unwrap_or_default();
        if age.as_secs() > limit {
            return Ok(Step::fail(format!(
                "target PVC {}/{} did not appear within {limit}s",
                t.namespace, t.pvc
            )));
        }
        return Ok(Step::wait(
            format!(
                "waiting for the target PVC {}/{} to be created (fails after {limit}s, spec.operationTimeout)",
                t.namespace, t.pvc
            ),
            if age < FRESH {
                FRESH_REQUEUE
            } else {
                ADMIT_REQUEUE
            },
        ));
    };
    match target.spec.and_then(|s| s.volume_name) {
        Some(v) if !v.is_empty() => Ok(Step::fail(format!(
            "target PVC {}/{} is already bound to {v}",
            t.namespace, t.pvc
        ))),
        _ => Ok(Step::Done(())),
    }
}

/// Creates the restore PVC, shaped as the target PVC and on the node its first consumer went to.
pub async fn expose(dd: &DataDownload, ctx: &Context) -> Result<Step<Exposure>> {
    let t = &dd.spec.target_volume;
    let Some(target) = target_pvc(dd, ctx).await? else {
        return Ok(Step::fail(format!(
            "target PVC {}/{} disappeared",
            t.namespace, t.pvc
        )));
    };
    let tspec = target.spec.clone().unwrap_or_default();
    let class = tspec.storage_class_name.clone().unwrap_or_default();
    let selected = target.annotations().get(SELECTED_NODE).cloned();
    if selected.is_none() && waits_for_first_consumer(ctx, &class).await? {
        return Ok(Step::wait(
            format!(
                "waiting for a workload using {}/{} to be scheduled (WaitForFirstConsumer)",
                t.namespace, t.pvc
            ),
            EXPOSE_REQUEUE,
        ));
    }
    let name = child_name(dd);
    let pvcs: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &dd.namespace().unwrap_or_default());
    objects::create_idempotent(&pvcs, &restore_pvc(dd, &tspec, selected.as_deref())).await?;
    let nodes = match selected {
        Some(n) => vec![n],
        None => proceed!(bound_pv_nodes(ctx, &pvcs, &name, &class).await?),
    };
    Ok(Step::Done(Exposure {
        pvc: name,
        block: tspec.volume_mode.as_deref() == Some("Block"),
        nodes,
    }))
}

/// Our restore PVC: the target's class, size, access and volume modes, on `selected` node if any.
fn restore_pvc(
    dd: &DataDownload,
    target: &PersistentVolumeClaimSpec,
    selected: Option<&str>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(child_name(dd)),
            namespace: dd.namespace(),
            labels: Some(owner_labels(dd)),
            annotations: selected
                .map(|n| BTreeMap::from([(SELECTED_NODE.to_string(), n.to_string())])),
            owner_references: Some(vec![objects::owner_ref(dd)]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: target.access_modes.clone(),
            storage_class_name: target.storage_class_name.clone(),
            volume_mode: target.volume_mode.clone(),
            resources: target.resources.clone(),
            ..Default::default()
        }),
        status: None,
    }
}

/// Hands the restored PV to the target PVC, one idempotent step per call: Done once it is bound there.
pub async fn rebind(dd: &DataDownload, ctx: &Context) -> Result<Step> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    proceed!(release_restore_pvc(dd, ctx, &pvs).await?);
    let sel = objects::owner_selector(dd);
    let list = pvs.list(&ListParams::default().labels(&sel)).await?;
    let Some(pv) = list.items.into_iter().next() else {
        return Ok(Step::fail("the restored PersistentVolume is gone"));
    };
    let Some(target) = target_pvc(dd, ctx).await? else {
        let t = &dd.spec.target_volume;
        return Ok(Step::fail(format!(
            "target PVC {}/{} disappeared",
            t.namespace, t.pvc
        )));
    };
    point_volume_at(dd, &pvs, &pv, &target).await?;
    proceed!(point_claim_at(dd, ctx, &target, &pv.name_any()).await?);
    settle_binding(&pvs, &pv.name_any()).await
}

/// Steps 1 and 2: marks the restored PV ours and Retain (so deleting the restore PVC keeps it), then
/// deletes the mover pod and the restore PVC. Done once the PVC is gone.
async fn release_restore_pvc(
    dd: &DataDownload,
    ctx: &Context,
    pvs: &Api<PersistentVolume>,
) -> Result<Step> {
    let name = child_name(dd);
    let pvcs: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &dd.namespace().unwrap_or_default());
    let restore_pvc = objects::get_opt(&pvcs, &name).await?;
    let bound = restore_pvc
        .as_ref()
        .and_then(|p| p.spec.as_ref()?.volume_name.clone());
    if let Some(pv_name) = bound {
        let uid = dd.uid().unwrap_or_default();
        let pv = pvs.get(&pv_name).await?;
        if pv.labels().get(labels::OWNER_UID) != Some(&uid) {
            let policy = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone())
                .unwrap_or_else(|| "Delete".into());
            let mark = json!({
                "metadata": {"labels": {labels::OWNER_UID: uid},
                    "annotations": {labels::ORIGINAL_RECLAIM_POLICY: policy}},
                "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            });
            pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(mark))
                .await?;
        }
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &dd.namespace().unwrap_or_default());
    objects::delete_selected(&pods, &objects::owner_selector(dd)).await?;
    if restore_pvc.is_some() {
        objects::delete_idempotent(&pvcs, &name, None).await?;
        return Ok(Step::wait(
            "waiting for the restore PVC to be deleted",
            EXPOSE_REQUEUE,
        ));
    }
    Ok(Step::Done(()))
}

/// Step 3: points the PV at the target PVC, with the labels its selector wants.
async fn point_volume_at(
    dd: &DataDownload,
    pvs: &Api<PersistentVolume>,
    pv: &PersistentVolume,
    target: &PersistentVolumeClaim,
) -> Result<()> {
    let target_uid = target.uid().unwrap_or_default();
    let claim_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.uid.clone());
    if claim_uid.as_deref() == Some(target_uid.as_str()) {
        return Ok(());
    }
    let match_labels = target
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    let t = &dd.spec.target_volume;
    let claim = json!({
        "metadata": {"labels": match_labels,
            "annotations": {"pv.kubernetes.io/bound-by-controller": null}},
        "spec": {"claimRef": {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "namespace": t.namespace, "name": t.pvc, "uid": target_uid,
            "resourceVersion": null,
        }},
    });
    pvs.patch(
        &pv.name_any(),
        &PatchParams::default(),
        &Patch::Merge(claim),
    )
    .await?;
    Ok(())
}

/// Step 4: points the target PVC at the PV (allowed once, while its volumeName is empty).
async fn point_claim_at(
    dd: &DataDownload,
    ctx: &Context,
    target: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<Step> {
    let target_volume = target.spec.as_ref().and_then(|s| s.volume_name.clone());
    match target_volume.as_deref() {
        None | Some("") => {
            let t = &dd.spec.target_volume;
            let tp: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &t.namespace);
            tp.patch(
                &t.pvc,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"volumeName": pv_name}})),
            )
            .await?;
            Ok(Step::Done(()))
        }
        Some(v) if v == pv_name => Ok(Step::Done(())),
        Some(v) => Ok(Step::fail(format!(
            "target PVC is bound to another volume {v}"
        ))),
    }
}

/// Step 5: waits until the PV is Bound, then restores its reclaim policy and drops our marks.
async fn settle_binding(pvs: &Api<PersistentVolume>, pv_name: &str) -> Result<Step> {
    let pv = pvs.get(pv_name).await?;
    let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
    if phase.as_deref() != Some("Bound") {
        return Ok(Step::wait(
            format!("waiting for PV {pv_name} to bind to the target PVC"),
            EXPOSE_REQUEUE,
        ));
    }
    let policy = pv
        .annotations()
        .get(labels::ORIGINAL_RECLAIM_POLICY)
        .cloned()
        .unwrap_or_else(|| "Delete".into());
    let unmark = json!({
        "metadata": {"labels": {labels::OWNER_UID: null},
            "annotations": {labels::ORIGINAL_RECLAIM_POLICY: null}},
        "spec": {"persistentVolumeReclaimPolicy": policy},
    });
    pvs.patch(pv_name, &PatchParams::default(), &Patch::Merge(unmark))
        .await?;
    Ok(Step::Done(()))
}

/// Deletes a PV still marked ours: it was never handed over and holds nothing anyone claims. Returns how
/// many were still there.
pub async fn cleanup(dd: &DataDownload, ctx: &Context) -> Result<usize> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    objects::delete_selected(&pvs, &objects::owner_selector(dd)).await
}

#[cfg(test)]
mod tests {
    //! Each step of the restore exposer against kube's mock service: the requests it makes and its outcome.
    use super::*;
    use crate::testing::{Seen, ago, ctx, dd, echo_or, empty_list, ok, serve};
    use http::Method;

    fn target(volume: Option<&str>) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "app", "uid": "t1"},
            "spec": {"volumeName": volume, "storageClassName": "sc",
                "selector": {"matchLabels": {"app": "db"}}}})
    }

    fn pv(phase: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pv-1", "labels": {labels::OWNER_UID: "d1"},
                "annotations": {labels::ORIGINAL_RECLAIM_POLICY: "Delete"}},
            "spec": {"persistentVolumeReclaimPolicy": "Retain"},
            "status": {"phase": phase}})
    }

    #[tokio::test]
    async fn admission_waits_for_the_target_pvc_and_refuses_a_bound_one() {
        let (ctx, handle) = ctx();
        let answers = std::sync::Mutex::new(vec![target(Some("pv-x")), target(None)]);
        let server = serve(handle, move |s: &Seen| {
            assert!(s.is(&Method::GET, "/namespaces/app/persistentvolumeclaims/data"));
            match answers.lock().expect("answers").pop() {
                Some(v) => ok(v),
                None => crate::testing::failure(404, "NotFound"),
            }
        });
        let cr = dd(json!(null), |_| {});
        assert_eq!(admissible(&cr, &ctx).await.expect("admit"), Step::Done(()));
        let bound = admissible(&cr, &ctx).await.expect("admit");
        assert_eq!(
            bound,
            Step::fail("target PVC app/data is already bound to pv-x")
        );
        let missing = admissible(&cr, &ctx).await.expect("admit");
        assert!(
            matches!(&missing, Step::Wait { reason, requeue }
                if reason.starts_with("waiting for the target PVC app/data") && *requeue == ADMIT_REQUEUE),
            "{missing:?}"
        );
        drop(ctx);
        assert_eq!(server.await.expect("server").len(), 3);
    }

    /// Velero creates the target PVC right after the DataDownload: a new DataDownload looks again soon,
    /// not 2 s later (which was most of a small restore's wait before its pod).
    #[tokio::test]
    async fn a_new_download_looks_for_its_target_pvc_again_soon() {
        let (ctx, handle) = ctx();
        let server = serve(handle, |_: &Seen| crate::testing::failure(404, "NotFound"));
        let new = dd(json!(null), |v| {
            v["metadata"]["creationTimestamp"] = json!(ago(0))
        });
        let old = dd(json!(null), |_| {});
        let requeue = |s: Step| match s {
            Step::Wait { requeue, .. } => requeue,
            other => panic!("not a wait: {other:?}"),
        };
        let soon = requeue(admissible(&new, &ctx).await.expect("admit"));
        assert!(soon <= Duration::from_millis(250), "{soon:?}");
        assert_eq!(
            requeue(admissible(&old, &ctx).await.expect("admit")),
            ADMIT_REQUEUE
        );
        drop(ctx);
        assert_eq!(server.await.expect("server").len(), 2);
    }

    /// One rebind of a DataDownload whose restore PVC is gone, whose restored PV `pv-1` is Available and
    /// whose target PVC is bound to `target_volume`; the outcome and the requests made.
    async fn rebind_with_target(target_volume: Option<&'static str>) -> (Step, Vec<Seen>) {
        let (ctx, handle) = ctx();
        let server = serve(
            handle,
            echo_or(move |s| {
                let get = |suffix: &str| s.is(&Method::GET, suffix);
                if get("/namespaces/velero/pods") {
                    return Some(ok(empty_list("PodList")));
                }
                if get("/api/v1/persistentvolumes") {
                    let items = json!([pv("Available")]);
                    return Some(ok(
                        json!({"apiVersion": "v1", "kind": "PersistentVolumeList",
                        "metadata": {}, "items": items}),
                    ));
                }
                if get("/namespaces/app/persistentvolumeclaims/data") {
                    return Some(ok(target(target_volume)));
                }
                if s.is(
                    &Method::PATCH,
                    "/namespaces/app/persistentvolumeclaims/data",
                ) {
                    return Some(ok(target(Some("pv-1"))));
                }
                (s.path.ends_with("/persistentvolumes/pv-1")).then(|| ok(pv("Available")))
            }),
        );
        let cr = dd(json!({"phase": "InProgress"}), |_| {});
        let step = rebind(&cr, &ctx).await.expect("rebind");
        drop(ctx);
        (step, server.await.expect("server"))
    }

    #[tokio::test]
    async fn the_restored_volume_is_pointed_at_the_target_then_waited_for() {
        let (step, seen) = rebind_with_target(None).await;
        assert_eq!(
            step,
            Step::wait(
                "waiting for PV pv-1 to bind to the target PVC",
                EXPOSE_REQUEUE
            )
        );
        let claim = seen
            .iter()
            .find(|s| s.is(&Method::PATCH, "/persistentvolumes/pv-1"))
            .unwrap_or_else(|| panic!("the PV was not pointed at the target: {seen:#?}"));
        assert_eq!(claim.body["spec"]["claimRef"]["uid"], "t1");
        assert_eq!(claim.body["spec"]["claimRef"]["name"], "data");
        assert_eq!(claim.body["metadata"]["labels"], json!({"app": "db"}));
        let volume = seen
            .iter()
            .find(|s| s.is(&Method::PATCH, "/persistentvolumeclaims/data"))
            .unwrap_or_else(|| panic!("the target was not pointed at the PV: {seen:#?}"));
        assert_eq!(volume.body, json!({"spec": {"volumeName": "pv-1"}}));
        // Not bound yet: the reclaim policy stays Retain.
        assert_eq!(
            seen.iter().filter(|s| s.method == Method::PATCH).count(),
            2,
            "{seen:#?}"
        );
    }

    #[tokio::test]
    async fn a_target_bound_elsewhere_fails_the_hand_over() {
        let (step, _) = rebind_with_target(Some("pv-other")).await;
        assert_eq!(
            step,
            Step::fail("target PVC is bound to another volume pv-other")
        );
    }
}
