//! Backup exposer: take over the CSI snapshot Velero hands over (a retained clone of its VolumeSnapshot and
//! content in the CR's namespace) and expose it as a PVC.

use std::time::Duration;

use ferry_proto::velero::DataUpload;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::context::{Context, FIELD_MANAGER};
use crate::cr::MoverCr;
use crate::error::{Result, is_conflict, is_not_found};
use crate::objects::{self, child_name, owner_labels};

/// `snapshot.storage.k8s.io/v1` resources.
pub fn snapshot_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        kind,
    ))
}

/// VolumeSnapshots in `ns`.
pub fn vs_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &snapshot_resource("VolumeSnapshot"))
}

/// VolumeSnapshotContents.
pub fn vsc_api(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &snapshot_resource("VolumeSnapshotContent"))
}

/// The external-provisioner's finalizer on a VolumeSnapshot that a PVC is being provisioned from. The
/// provisioner removes it once, on success, and gives up if that write conflicts with another one
/// (kubernetes-csi/external-provisioner#1507), which leaves the snapshot terminating for ever.
pub const PROVISIONER_SOURCE_FINALIZER: &str =
    "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection";

/// Drops [`PROVISIONER_SOURCE_FINALIZER`] from the terminating snapshots matching `selector`. Call it only
/// once no PVC provisioned from them is left: then the protection guards nothing.
pub async fn release_source_protection(api: &Api<DynamicObject>, selector: &str) -> Result<()> {
    for vs in api
        .list(&ListParams::default().labels(selector))
        .await?
        .items
    {
        let fins = vs.metadata.finalizers.clone().unwrap_or_default();
        if vs.metadata.deletion_timestamp.is_none()
            || !fins.iter().any(|f| f == PROVISIONER_SOURCE_FINALIZER)
        {
            continue;
        }
        let keep: Vec<&String> = fins
            .iter()
            .filter(|f| *f != PROVISIONER_SOURCE_FINALIZER)
            .collect();
        // With the resourceVersion the patch only applies to the version read.
        let patch = serde_json::json!({"metadata": {
            "finalizers": keep,
            "resourceVersion": vs.metadata.resource_version,
        }});
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.patch(&vs.name_any(), &pp, &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(snapshot = %vs.name_any(), "released a stale {PROVISIONER_SOURCE_FINALIZER}")
            }
            Err(e) if is_conflict(&e) || is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Annotation on our VolumeSnapshot: the source PVC's volume mode.
pub const VOLUME_MODE: &str = "ferry.dev/volume-mode";
/// Annotation on our VolumeSnapshot: the source PVC's size.
pub const SOURCE_SIZE: &str = "ferry.dev/source-size";

fn vsc_name(du: &DataUpload) -> String {
    format!("ferry-{}", du.uid().unwrap_or_default())
}

/// `status.readyToUse`.
pub fn ready(vs: &DynamicObject) -> bool {
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
pub enum Handover {
    /// Our clone exists and the source is released.
    Done,
    /// The source snapshot is not ready yet (why).
    Waiting(String),
    /// It cannot be taken over (why).
    Failed(String),
}

/// Clones the source VolumeSnapshot/Content into ours (idempotent), then releases the source.
pub async fn take_over(du: &DataUpload, ctx: &Context) -> Result<Handover> {
    let ns = du.namespace().unwrap_or_default();
    let name = child_name(du);
    let csi = du.spec.csi_snapshot.clone().unwrap_or_default();
    let src_ns = &du.spec.source_namespace;
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
        let waited = since_accepted(du);
        if waited > du.operation_timeout() {
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
    let src_pvc = objects::get_opt(&pvcs, &du.spec.source_pvc).await?;
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
    let labels = owner_labels(du);
    let vsc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": vsc_name(du), "labels": labels},
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
        "spec": {"source": {"volumeSnapshotContentName": vsc_name(du)},
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
#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    fn vs(name: &str, deleting: bool, finalizers: &[&str]) -> serde_json::Value {
        let mut m = json!({"name": name, "namespace": "velero", "resourceVersion": "42",
            "finalizers": finalizers});
        if deleting {
            m["deletionTimestamp"] = json!("2026-11-21T22:27:16Z");
        }
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": m})
    }

    #[tokio::test]
    async fn releases_only_the_orphaned_provisioner_finalizer() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "velero");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("list");
            assert_eq!(req.method(), http::Method::GET);
            let list = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotList",
            "metadata": {}, "items": [
                vs("stuck", true, &["a/b", PROVISIONER_SOURCE_FINALIZER]),
                vs("alive", false, &[PROVISIONER_SOURCE_FINALIZER]),
                vs("plain", true, &["a/b"]),
            ]});
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&list).expect("json")))
                    .expect("response"),
            );
            let (req, send) = handle.next_request().await.expect("patch");
            assert_eq!(req.method(), http::Method::PATCH);
            assert!(req.uri().path().ends_with("/volumesnapshots/stuck"));
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .expect("body")
                .to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(sent["metadata"]["finalizers"], json!(["a/b"]));
            assert_eq!(sent["metadata"]["resourceVersion"], "42");
            send.send_response(
                Response::builder()
                    .body(Body::from(
                        serde_json::to_vec(&vs("stuck", true, &["a/b"])).expect("json"),
                    ))
                    .expect("response"),
            );
            assert!(!matches!(
                tokio::time::timeout(std::time::Duration::from_millis(100), handle.next_request())
                    .await,
                Ok(Some(_))
            ));
        });
        release_source_protection(&vs_api(&client, "velero"), "x=y")
            .await
            .expect("release");
        server.await.expect("server");
    }
}
