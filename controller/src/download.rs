//! DataDownload: wait for the target PVC (honouring WaitForFirstConsumer), restore into a PVC of our own,
//! then hand its PV to the target PVC as Velero expects (claimRef, selector labels, reclaim policy).

use std::collections::BTreeMap;

use ferry_proto::result::RestoreResult;
use ferry_proto::velero::{DataDownload, Phase};
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;

use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::expose::rebind::{self, SELECTED_NODE};
use crate::expose::{Exposed, bound_pv_nodes};
use crate::flow::{
    Admission, Flow, cleanup_overdue, delete_pods_and_pvcs, parse_result, terminal, update,
};
use crate::objects::{self, child_name, owner_labels};

/// Annotation on a DataDownload: the mover's result, kept while the volume is rebound (the pod is gone
/// by then, so a restarted controller must not read its absence as a failure).
pub const RESULT_ANNOTATION: &str = "ferry.dev/result";

impl Flow for DataDownload {
    async fn admissible(&self, ctx: &Context) -> Result<Admission> {
        let t = &self.spec.target_volume;
        let limit = self.operation_timeout().as_secs();
        match rebind::target_pvc(self, ctx).await? {
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
        let Some(target) = rebind::target_pvc(self, ctx).await? else {
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
        match rebind::rebind(self, ctx).await {
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

    fn stored_result(&self) -> Option<String> {
        self.annotations().get(RESULT_ANNOTATION).cloned()
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
