//! DataDownload: wait for the target PVC (honouring WaitForFirstConsumer), restore into a PVC of our own,
//! then hand its PV to the target PVC as Velero expects (claimRef, selector labels, reclaim policy).

use std::collections::BTreeMap;

use ferry_proto::labels;
use ferry_proto::result::RestoreResult;
use ferry_proto::velero::{DataDownload, Phase};
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;

use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::objects::{self, child_name, owner_labels};
use crate::reconcile::{
    Admission, Exposed, Flow, delete_pods_and_pvcs, parse_result, terminal, update,
};
use crate::upload::{bound_pv_nodes, cleanup_overdue};

/// Annotation on a DataDownload: the mover's result, kept while the volume is rebound (the pod is gone
/// by then, so a restarted controller must not read its absence as a failure).
pub const RESULT_ANNOTATION: &str = "ferry.dev/result";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// Download-only steps.
trait Rebind {
    async fn target_pvc(&self, ctx: &Context) -> Result<Option<PersistentVolumeClaim>>;
    async fn rebind(&self, ctx: &Context) -> Result<Option<String>>;
}

impl Rebind for DataDownload {
    async fn target_pvc(&self, ctx: &Context) -> Result<Option<PersistentVolumeClaim>> {
        let t = &self.spec.target_volume;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &t.namespace);
        objects::get_opt(&pvcs, &t.pvc).await
    }

    /// Hands the restored PV to the target PVC, one idempotent step per call. `Ok(None)` when done.
    async fn rebind(&self, ctx: &Context) -> Result<Option<String>> {
        let ns = self.namespace().unwrap_or_default();
        let name = child_name(self);
        let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let uid = self.uid().unwrap_or_default();
        let sel = objects::owner_selector(self);
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
        let Some(target) = self.target_pvc(ctx).await? else {
            return Err(crate::error::Error::Invalid(format!(
                "target PVC {}/{} disappeared",
                self.spec.target_volume.namespace, self.spec.target_volume.pvc
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
                        "namespace": self.spec.target_volume.namespace,
                        "name": self.spec.target_volume.pvc,
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
                    Api::namespaced(ctx.client.clone(), &self.spec.target_volume.namespace);
                tp.patch(
                    &self.spec.target_volume.pvc,
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
}

impl Flow for DataDownload {
    async fn admissible(&self, ctx: &Context) -> Result<Admission> {
        let t = &self.spec.target_volume;
        let limit = self.operation_timeout().as_secs();
        match self.target_pvc(ctx).await? {
            None => {
                let age = self
                    .creation_timestamp()
                    .map(|c| {
                        k8s_openapi::jiff::Timestamp::now()
                            .duration_since(c.0)
                            .as_secs()
                    })
                    .unwrap_or(0);
                if age > limit as i64 {
                    return Ok(Admission::Refuse(format!(
                        "target PVC {}/{} did not appear within {limit}s",
                        t.namespace, t.pvc
                    )));
                }
                Ok(Admission::Wait(format!(
                    "waiting for the target PVC {}/{} to be created (fails after {limit}s, spec.operationTimeout)",
                    t.namespace, t.pvc
                )))
            }
            Some(p) => match p.spec.as_ref().and_then(|s| s.volume_name.clone()) {
                Some(v) if !v.is_empty() => Ok(Admission::Refuse(format!(
                    "target PVC {}/{} is already bound to {v}",
                    t.namespace, t.pvc
                ))),
                _ => Ok(Admission::Admit),
            },
        }
    }

    async fn expose(&self, ctx: &Context) -> Result<Exposed> {
        let ns = self.namespace().unwrap_or_default();
        let name = child_name(self);
        let t = &self.spec.target_volume;
        let Some(target) = self.target_pvc(ctx).await? else {
            return Ok(Exposed::Failed(format!(
                "target PVC {}/{} disappeared",
                t.namespace, t.pvc
            )));
        };
        let tspec = target.spec.clone().unwrap_or_default();
        let class = tspec.storage_class_name.clone().unwrap_or_default();
        let scs: Api<StorageClass> = Api::all(ctx.client.clone());
        let wffc = objects::get_opt(&scs, &class)
            .await?
            .and_then(|s| s.volume_binding_mode)
            .as_deref()
            == Some("WaitForFirstConsumer");
        let selected = target.annotations().get(SELECTED_NODE).cloned();
        if wffc && selected.is_none() {
            return Ok(Exposed::Waiting(format!(
                "waiting for a workload using {}/{} to be scheduled (WaitForFirstConsumer)",
                t.namespace, t.pvc
            )));
        }
        let block = tspec.volume_mode.as_deref() == Some("Block");
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let pvc = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(owner_labels(self)),
                annotations: selected
                    .clone()
                    .map(|n| BTreeMap::from([(SELECTED_NODE.to_string(), n)])),
                owner_references: Some(vec![objects::owner_ref(self)]),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: tspec.access_modes.clone(),
                storage_class_name: tspec.storage_class_name.clone(),
                volume_mode: tspec.volume_mode.clone(),
                resources: tspec.resources.clone(),
                ..Default::default()
            }),
            status: None,
        };
        objects::create_idempotent(&pvcs, &pvc).await?;
        let nodes = match &selected {
            Some(n) => vec![n.clone()],
            None => match bound_pv_nodes(ctx, &pvcs, &name, &class).await? {
                Ok(n) => n,
                Err(w) => return Ok(Exposed::Waiting(w)),
            },
        };
        let mut args = objects::owner_args(self);
        args.push(format!("--snapshot={}", self.spec.snapshot_id));
        if self.mover_config("WriteSparseFiles") == Some("true") {
            args.push("--sparse".into());
        }
        Ok(Exposed::Ready {
            pvc: name,
            block,
            nodes,
            args,
        })
    }

    async fn complete(&self, ctx: &Context, node: &str, message: &str) -> Result<Action> {
        let r: RestoreResult = match parse_result(ctx, self, message).await? {
            Ok(r) => r,
            Err(action) => return Ok(action),
        };
        if !self.annotations().contains_key(RESULT_ANNOTATION) {
            let (m, n) = (message.to_string(), node.to_string());
            update(ctx, self, move |c| {
                c.annotations_mut().insert(RESULT_ANNOTATION.into(), m);
                *c.common().node = Some(n);
            })
            .await?;
            return Ok(Action::requeue(std::time::Duration::from_millis(50)));
        }
        match self.rebind(ctx).await {
            Ok(Some(waiting)) => {
                tracing::debug!(name = %self.name_any(), waiting, "rebinding");
                Ok(Action::requeue(std::time::Duration::from_millis(500)))
            }
            Ok(None) => {
                ctx.metrics.moved("DataDownload", r.total_bytes);
                terminal(
                    ctx,
                    self,
                    Phase::Completed,
                    None,
                    move |c: &mut DataDownload| {
                        *c.common().progress = Some(ferry_proto::velero::DataMoveProgress {
                            total_bytes: r.total_bytes as i64,
                            bytes_done: r.total_bytes as i64,
                        });
                    },
                )
                .await
            }
            Err(crate::error::Error::Invalid(m)) => {
                terminal(
                    ctx,
                    self,
                    Phase::Failed,
                    Some(format!(
                        "restored the data but could not hand the volume over: {m}"
                    )),
                    |_| {},
                )
                .await
            }
            Err(e) => Err(e),
        }
    }

    async fn cleanup(&self, ctx: &Context) -> Result<bool> {
        let sel = objects::owner_selector(self);
        let mut left = delete_pods_and_pvcs(ctx, self).await?;
        // A PV still marked ours was never handed over: it holds nothing anyone claims.
        left += objects::delete_selected(&Api::<PersistentVolume>::all(ctx.client.clone()), &sel)
            .await?;
        Ok(left == 0 || cleanup_overdue(self))
    }
}
