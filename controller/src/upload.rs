//! DataUpload: take over the CSI snapshot Velero hands over (a retained clone of its VolumeSnapshot and
//! content in the CR's namespace), expose it as a PVC, and record the mover's snapshot on success.

use std::collections::BTreeMap;

use ferry_proto::result::BackupResult;
use ferry_proto::velero::{DataUpload, DataUploadStatus, Phase};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;

use crate::context::Context;
use crate::error::Result;
use crate::expose::snapshot::{self, Handover, SOURCE_SIZE, VOLUME_MODE, ready, vs_api, vsc_api};
use crate::expose::{Exposed, bound_pv_nodes};
use crate::flow::{Admission, Flow, cleanup_overdue, delete_pods_and_pvcs, parse_result, terminal};
use crate::objects::{self, child_name, owner_labels};
use crate::repo;

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
                return Ok(match snapshot::take_over(self, ctx).await? {
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
        let repo = repo::repo_target(ctx, self)
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
            snapshot::release_source_protection(&vss, &sel).await?;
        }
        left += objects::delete_selected(&vsc_api(&ctx.client), &sel).await?;
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
