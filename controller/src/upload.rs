//! DataUpload: take over the CSI snapshot Velero hands over (a retained clone of its VolumeSnapshot and
//! content in the CR's namespace), expose it as a PVC, and record the mover's snapshot on success.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::result::BackupResult;
use ferry_proto::velero::{DataUpload, DataUploadStatus, Phase};
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use serde_json::json;

use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::objects::{self, child_name, owner_labels, vs_api, vsc_api};
use crate::reconcile::{Admission, Exposed, Flow, delete_pods_and_pvcs, parse_result, terminal};

/// Annotation on our VolumeSnapshot: the source PVC's volume mode and size.
const VOLUME_MODE: &str = "ferry.dev/volume-mode";
const SOURCE_SIZE: &str = "ferry.dev/source-size";

fn vsc_name(du: &DataUpload) -> String {
    format!("ferry-{}", du.uid().unwrap_or_default())
}

fn ready(vs: &DynamicObject) -> bool {
    vs.data["status"]["readyToUse"].as_bool() == Some(true)
}

fn since_accepted(du: &DataUpload) -> Duration {
    du.accepted_timestamp()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| {
            let s = k8s_openapi::jiff::Timestamp::now()
                .duration_since(t)
                .as_secs();
            Duration::from_secs(s.max(0) as u64)
        })
        .unwrap_or_default()
}

/// What taking over the source snapshot came to.
enum Handover {
    /// Our clone exists and the source is released.
    Done,
    /// The source snapshot is not ready yet (why).
    Waiting(String),
    /// It cannot be taken over (why).
    Failed(String),
}

/// Upload-only steps.
trait TakeOver {
    async fn take_snapshot(&self, ctx: &Context) -> Result<Handover>;
}

impl TakeOver for DataUpload {
    /// Clones the source VolumeSnapshot/Content into ours (idempotent), then releases the source.
    async fn take_snapshot(&self, ctx: &Context) -> Result<Handover> {
        let ns = self.namespace().unwrap_or_default();
        let name = child_name(self);
        let csi = self.spec.csi_snapshot.clone().unwrap_or_default();
        let src_ns = &self.spec.source_namespace;
        let src_vs_api = vs_api(&ctx.client, src_ns);
        let Some(src) = objects::get_opt(&src_vs_api, &csi.volume_snapshot).await? else {
            return Ok(Handover::Failed(format!(
                "VolumeSnapshot {src_ns}/{} not found",
                csi.volume_snapshot
            )));
        };
        let bound = src.data["status"]["boundVolumeSnapshotContentName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !ready(&src) || bound.is_empty() {
            let err = src.data["status"]["error"]["message"]
                .as_str()
                .unwrap_or("not ready yet");
            let waited = since_accepted(self);
            if waited > self.operation_timeout() {
                return Ok(Handover::Failed(format!(
                    "VolumeSnapshot {src_ns}/{} not ready after {}s: {err}",
                    csi.volume_snapshot,
                    waited.as_secs()
                )));
            }
            return Ok(Handover::Waiting(format!(
                "VolumeSnapshot {src_ns}/{} {err}",
                csi.volume_snapshot
            )));
        }
        let vscs = vsc_api(&ctx.client);
        let Some(src_vsc) = objects::get_opt(&vscs, &bound).await? else {
            return Ok(Handover::Failed(format!(
                "VolumeSnapshotContent {bound} not found"
            )));
        };
        let Some(handle) = src_vsc.data["status"]["snapshotHandle"].as_str() else {
            return Ok(Handover::Failed(format!(
                "VolumeSnapshotContent {bound} has no snapshot handle"
            )));
        };
        let driver = src_vsc.data["spec"]["driver"].clone();
        let class = src_vsc.data["spec"]["volumeSnapshotClassName"].clone();
        // The source PVC's volume mode and size, kept on our snapshot (the PVC may go away).
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), src_ns);
        let src_pvc = objects::get_opt(&pvcs, &self.spec.source_pvc).await?;
        let mode = src_vsc.data["spec"]["sourceVolumeMode"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                src_pvc
                    .as_ref()
                    .and_then(|p| p.spec.as_ref()?.volume_mode.clone())
            })
            .unwrap_or_else(|| "Filesystem".into());
        let size = src_pvc
            .as_ref()
            .and_then(|p| {
                p.spec
                    .as_ref()?
                    .resources
                    .as_ref()?
                    .requests
                    .as_ref()?
                    .get("storage")
                    .cloned()
            })
            .map(|q| q.0)
            .unwrap_or_default();
        let labels = owner_labels(self);
        let vsc: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": vsc_name(self), "labels": labels},
            "spec": {
                "deletionPolicy": "Delete",
                "driver": driver,
                "source": {"snapshotHandle": handle},
                "volumeSnapshotClassName": class,
                "volumeSnapshotRef": {"name": name, "namespace": ns},
            }
        }))
        .map_err(|e| crate::error::Error::Invalid(e.to_string()))?;
        objects::create_idempotent(&vscs, &vsc).await?;
        let vs: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                "annotations": {VOLUME_MODE: mode, SOURCE_SIZE: size}},
            "spec": {"source": {"volumeSnapshotContentName": vsc_name(self)},
                "volumeSnapshotClassName": class},
        }))
        .map_err(|e| crate::error::Error::Invalid(e.to_string()))?;
        objects::create_idempotent(&vs_api(&ctx.client, &ns), &vs).await?;
        // Our clone owns the physical snapshot now; release the source without destroying it.
        vscs.patch(
            &bound,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": "Retain"}})),
        )
        .await?;
        objects::delete_idempotent(&src_vs_api, &csi.volume_snapshot, None).await?;
        objects::delete_idempotent(&vscs, &bound, None).await?;
        Ok(Handover::Done)
    }
}

impl Flow for DataUpload {
    async fn admissible(&self, _ctx: &Context) -> Result<Admission> {
        // Everything a DataUpload needs before acceptance is in its spec, checked by validation.
        Ok(Admission::Admit)
    }

    async fn expose(&self, ctx: &Context) -> Result<Exposed> {
        let ns = self.namespace().unwrap_or_default();
        let name = child_name(self);
        let vss = vs_api(&ctx.client, &ns);
        let vs = match objects::get_opt(&vss, &name).await? {
            Some(vs) => vs,
            None => {
                return Ok(match self.take_snapshot(ctx).await? {
                    Handover::Done => Exposed::Waiting("snapshot taken over".into()),
                    Handover::Waiting(why) => Exposed::Waiting(why),
                    Handover::Failed(why) => Exposed::Failed(why),
                });
            }
        };
        if !ready(&vs) {
            return Ok(Exposed::Waiting(format!(
                "cloned VolumeSnapshot {ns}/{name} not ready yet"
            )));
        }
        let a = vs.annotations();
        let block = a.get(VOLUME_MODE).map(String::as_str) == Some("Block");
        let size = vs.data["status"]["restoreSize"]
            .as_str()
            .map(str::to_string)
            .or_else(|| a.get(SOURCE_SIZE).cloned().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "1Gi".into());
        let csi = self.spec.csi_snapshot.clone().unwrap_or_default();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let pvc = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(owner_labels(self)),
                owner_references: Some(vec![objects::owner_ref(self)]),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some(csi.storage_class.clone()),
                volume_mode: Some(if block { "Block" } else { "Filesystem" }.into()),
                data_source: Some(TypedLocalObjectReference {
                    api_group: Some("snapshot.storage.k8s.io".into()),
                    kind: "VolumeSnapshot".into(),
                    name: name.clone(),
                }),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity(size))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        };
        objects::create_idempotent(&pvcs, &pvc).await?;
        let nodes = match bound_pv_nodes(ctx, &pvcs, &name, &csi.storage_class).await? {
            Ok(n) => n,
            Err(w) => return Ok(Exposed::Waiting(w)),
        };
        let mut args = objects::owner_args(self);
        args.push(format!(
            "--source-pvc={}/{}",
            self.spec.source_namespace, self.spec.source_pvc
        ));
        for (label, tag) in [
            (
                "velero.io/backup-name",
                ferry_proto::labels::TAG_BACKUP_NAME,
            ),
            ("velero.io/backup-uid", ferry_proto::labels::TAG_BACKUP_UID),
        ] {
            if let Some(v) = self.labels().get(label) {
                args.push(format!("--tag={tag}={v}"));
            }
        }
        Ok(Exposed::Ready {
            pvc: name,
            block,
            nodes,
            args,
        })
    }

    async fn complete(&self, ctx: &Context, node: &str, message: &str) -> Result<Action> {
        let r: BackupResult = match parse_result(ctx, self, message).await? {
            Ok(r) => r,
            Err(action) => return Ok(action),
        };
        ctx.metrics.moved("DataUpload", r.read_bytes);
        let repo = objects::repo_target(ctx, self)
            .await?
            .map(|t| t.url)
            .unwrap_or_default();
        let node = node.to_string();
        terminal(
            ctx,
            self,
            Phase::Completed,
            None,
            move |c: &mut DataUpload| {
                let s = c.status.get_or_insert_with(DataUploadStatus::default);
                s.snapshot_id = Some(r.snapshot_id.clone());
                s.incremental_bytes = Some(r.incremental_bytes as i64);
                s.progress = Some(ferry_proto::velero::DataMoveProgress {
                    total_bytes: r.total_bytes as i64,
                    bytes_done: r.total_bytes as i64,
                });
                s.node = Some(node);
                s.node_os = Some("linux".into());
                s.path = Some(ferry_proto::pod::VOLUME_PATH.into());
                s.message =
                    (r.total_bytes == 0).then(|| "volume was empty so no data was upload".into());
                s.data_mover_result = Some(BTreeMap::from([
                    ("repository".to_string(), repo),
                    ("snapshotID".to_string(), r.snapshot_id),
                    ("files".to_string(), r.files.to_string()),
                    ("storedBytes".to_string(), r.stored_bytes.to_string()),
                    // Also here: Velero releases before 1.18 have no status.incrementalBytes in their CRD, so
                    // the API server drops that field.
                    (
                        "incrementalBytes".to_string(),
                        r.incremental_bytes.to_string(),
                    ),
                ]));
            },
        )
        .await
    }

    async fn cleanup(&self, ctx: &Context) -> Result<bool> {
        let ns = self.namespace().unwrap_or_default();
        let sel = objects::owner_selector(self);
        let mut left = delete_pods_and_pvcs(ctx, self).await?;
        let vss = vs_api(&ctx.client, &ns);
        left += objects::delete_selected(&vss, &sel).await?;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        if pvcs
            .list(&ListParams::default().labels(&sel))
            .await?
            .items
            .is_empty()
        {
            objects::release_source_protection(&vss, &sel).await?;
        }
        left += objects::delete_selected(&vsc_api(&ctx.client), &sel).await?;
        objects::release_orphaned_contents(&ctx.client, &sel).await?;
        // A source snapshot never taken over (failure before the clone) is ours to release too.
        if let Some(csi) = &self.spec.csi_snapshot
            && !csi.volume_snapshot.is_empty()
        {
            let src = vs_api(&ctx.client, &self.spec.source_namespace);
            if objects::get_opt(&src, &csi.volume_snapshot)
                .await?
                .is_some()
            {
                objects::delete_idempotent(&src, &csi.volume_snapshot, None).await?;
            }
        }
        Ok(left == 0 || cleanup_overdue(self))
    }
}

/// After two minutes of waiting for deletions, stop holding the finalizer (they were all requested).
pub fn cleanup_overdue<K: MoverCr>(cr: &K) -> bool {
    let done = cr
        .clone()
        .common()
        .completion_timestamp
        .clone()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
    done.is_some_and(|t| {
        let s = k8s_openapi::jiff::Timestamp::now().duration_since(t).as_secs();
        if s > 120 {
            tracing::warn!(name = %cr.name_any(), "objects still terminating after 2 minutes; releasing the CR");
            true
        } else {
            false
        }
    })
}

/// For an Immediate-binding class: wait until the PVC is bound and return the nodes its PV is pinned to.
/// For WaitForFirstConsumer: the pod's placement decides, no restriction.
pub async fn bound_pv_nodes(
    ctx: &Context,
    pvcs: &Api<PersistentVolumeClaim>,
    name: &str,
    class: &str,
) -> Result<std::result::Result<Vec<String>, String>> {
    let scs: Api<StorageClass> = Api::all(ctx.client.clone());
    let wffc = objects::get_opt(&scs, class)
        .await?
        .and_then(|s| s.volume_binding_mode)
        .as_deref()
        == Some("WaitForFirstConsumer");
    if wffc {
        return Ok(Ok(Vec::new()));
    }
    let Some(pvc) = objects::get_opt(pvcs, name).await? else {
        return Ok(Err(format!("PVC {name} not created yet")));
    };
    let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Err(format!("PVC {name} is not bound yet")));
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = objects::get_opt(&pvs, &pv_name).await?;
    Ok(Ok(pv
        .as_ref()
        .and_then(objects::pv_nodes)
        .unwrap_or_default()))
}
