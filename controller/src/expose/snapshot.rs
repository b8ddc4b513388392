//! Backup exposer: take over the CSI snapshot Velero hands over (a retained clone of its VolumeSnapshot and
//! content in the CR's namespace), expose the clone as a PVC, and delete both when the CR is done.

use std::collections::BTreeMap;

use ferry_proto::snapshot::{
    VolumeSnapshot, VolumeSnapshotContent, VolumeSnapshotContentSource, VolumeSnapshotContentSpec,
    VolumeSnapshotRef, VolumeSnapshotSource, VolumeSnapshotSpec,
};
use ferry_proto::velero::DataUpload;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{EXPOSE_REQUEUE, Exposure, bound_pv_nodes};
use crate::clock;
use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::objects::{self, child_name, owner_labels};
use crate::proceed;
use crate::step::Step;

/// Annotation on our VolumeSnapshot: the source PVC's volume mode.
pub const VOLUME_MODE: &str = "ferry.dev/volume-mode";
/// Annotation on our VolumeSnapshot: the source PVC's size.
pub const SOURCE_SIZE: &str = "ferry.dev/source-size";

/// The external-provisioner's finalizer on a VolumeSnapshot that a PVC is being provisioned from. The
/// provisioner removes it once, on success, and gives up if that write conflicts with another one
/// (kubernetes-csi/external-provisioner#1507), which leaves the snapshot terminating for ever.
pub const PROVISIONER_SOURCE_FINALIZER: &str =
    "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection";

fn vsc_name(du: &DataUpload) -> String {
    format!("ferry-{}", du.uid().unwrap_or_default())
}

/// The source VolumeSnapshot Velero made, in the source namespace.
fn source_snapshot(du: &DataUpload) -> String {
    du.spec
        .csi_snapshot
        .as_ref()
        .map(|c| c.volume_snapshot.clone())
        .unwrap_or_default()
}

/// Exposes the DataUpload's snapshot as a PVC: takes the snapshot over on the first call, then creates the
/// PVC from our clone once it is ready.
pub async fn expose(du: &DataUpload, ctx: &Context) -> Result<Step<Exposure>> {
    let ns = du.namespace().unwrap_or_default();
    let name = child_name(du);
    let vss: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(vs) = objects::get_opt(&vss, &name).await? else {
        proceed!(take_over(du, ctx).await?);
        return Ok(Step::wait("snapshot taken over", EXPOSE_REQUEUE));
    };
    if !vs.ready() {
        return Ok(Step::wait(
            format!("cloned VolumeSnapshot {ns}/{name} not ready yet"),
            EXPOSE_REQUEUE,
        ));
    }
    let block = vs.annotations().get(VOLUME_MODE).map(String::as_str) == Some("Block");
    let class = du
        .spec
        .csi_snapshot
        .as_ref()
        .map(|c| c.storage_class.clone())
        .unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    objects::create_idempotent(&pvcs, &clone_pvc(du, &vs, &class, block)).await?;
    let nodes = proceed!(bound_pv_nodes(ctx, &pvcs, &name, &class).await?);
    Ok(Step::Done(Exposure {
        pvc: name,
        block,
        nodes,
    }))
}

/// The PVC provisioned from our cloned snapshot `vs`, as large as the snapshot restores to.
fn clone_pvc(
    du: &DataUpload,
    vs: &VolumeSnapshot,
    class: &str,
    block: bool,
) -> PersistentVolumeClaim {
    let size = vs
        .status
        .as_ref()
        .and_then(|s| s.restore_size.clone())
        .or_else(|| {
            vs.annotations()
                .get(SOURCE_SIZE)
                .cloned()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "1Gi".into());
    let name = child_name(du);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: du.namespace(),
            labels: Some(owner_labels(du)),
            owner_references: Some(vec![objects::owner_ref(du)]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class.to_string()),
            volume_mode: Some(if block { "Block" } else { "Filesystem" }.into()),
            data_source: Some(TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name,
            }),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(size))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The source snapshot once it is ready: its content's name. Waits for it within the operation timeout.
async fn ready_source(du: &DataUpload, ctx: &Context) -> Result<Step<String>> {
    let src_ns = &du.spec.source_namespace;
    let src_name = source_snapshot(du);
    let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), src_ns);
    let Some(src) = objects::get_opt(&api, &src_name).await? else {
        return Ok(Step::fail(format!(
            "VolumeSnapshot {src_ns}/{src_name} not found"
        )));
    };
    let status = src.status.clone().unwrap_or_default();
    let bound = status
        .bound_volume_snapshot_content_name
        .unwrap_or_default();
    if src.ready() && !bound.is_empty() {
        return Ok(Step::Done(bound));
    }
    let err = status
        .error
        .and_then(|e| e.message)
        .unwrap_or_else(|| "not ready yet".into());
    let waited = clock::since_text(du.accepted_timestamp()).unwrap_or_default();
    if waited > du.operation_timeout() {
        return Ok(Step::fail(format!(
            "VolumeSnapshot {src_ns}/{src_name} not ready after {}s: {err}",
            waited.as_secs()
        )));
    }
    Ok(Step::wait(
        format!("VolumeSnapshot {src_ns}/{src_name} {err}"),
        EXPOSE_REQUEUE,
    ))
}

/// Clones the source VolumeSnapshot/Content into ours (idempotent), then releases the source.
pub async fn take_over(du: &DataUpload, ctx: &Context) -> Result<Step> {
    let bound = proceed!(ready_source(du, ctx).await?);
    let vscs: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let Some(src_vsc) = objects::get_opt(&vscs, &bound).await? else {
        return Ok(Step::fail(format!(
            "VolumeSnapshotContent {bound} not found"
        )));
    };
    let Some(handle) = src_vsc
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
    else {
        return Ok(Step::fail(format!(
            "VolumeSnapshotContent {bound} has no snapshot handle"
        )));
    };
    let (mode, size) = source_volume(du, ctx, &src_vsc).await?;
    let class = src_vsc.spec.volume_snapshot_class_name.clone();
    objects::create_idempotent(&vscs, &clone_content(du, &src_vsc, handle)).await?;
    let ns = du.namespace().unwrap_or_default();
    let vs = VolumeSnapshot {
        metadata: ObjectMeta {
            name: Some(child_name(du)),
            namespace: Some(ns.clone()),
            labels: Some(owner_labels(du)),
            annotations: Some(BTreeMap::from([
                (VOLUME_MODE.to_string(), mode),
                (SOURCE_SIZE.to_string(), size),
            ])),
            ..Default::default()
        },
        spec: VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                volume_snapshot_content_name: Some(vsc_name(du)),
                ..Default::default()
            },
            volume_snapshot_class_name: class,
        },
        status: None,
    };
    objects::create_idempotent(&Api::namespaced(ctx.client.clone(), &ns), &vs).await?;
    // Our clone owns the physical snapshot now; release the source without destroying it.
    vscs.patch(
        &bound,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"deletionPolicy": "Retain"}})),
    )
    .await?;
    let src: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &du.spec.source_namespace);
    objects::delete_idempotent(&src, &source_snapshot(du), None).await?;
    objects::delete_idempotent(&vscs, &bound, None).await?;
    Ok(Step::Done(()))
}

/// Our content: the source's storage snapshot, pre-bound to our VolumeSnapshot, deleted with it.
fn clone_content(
    du: &DataUpload,
    src: &VolumeSnapshotContent,
    handle: String,
) -> VolumeSnapshotContent {
    VolumeSnapshotContent {
        metadata: ObjectMeta {
            name: Some(vsc_name(du)),
            labels: Some(owner_labels(du)),
            ..Default::default()
        },
        spec: VolumeSnapshotContentSpec {
            deletion_policy: Some("Delete".into()),
            driver: src.spec.driver.clone(),
            source: VolumeSnapshotContentSource {
                snapshot_handle: Some(handle),
                ..Default::default()
            },
            volume_snapshot_class_name: src.spec.volume_snapshot_class_name.clone(),
            volume_snapshot_ref: VolumeSnapshotRef {
                name: Some(child_name(du)),
                namespace: du.namespace(),
                ..Default::default()
            },
            ..Default::default()
        },
        status: None,
    }
}

/// The source PVC's volume mode and size, kept on our snapshot (the PVC may go away).
async fn source_volume(
    du: &DataUpload,
    ctx: &Context,
    src_vsc: &VolumeSnapshotContent,
) -> Result<(String, String)> {
    let pvcs: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &du.spec.source_namespace);
    let spec = objects::get_opt(&pvcs, &du.spec.source_pvc)
        .await?
        .and_then(|p| p.spec);
    let mode = src_vsc
        .spec
        .source_volume_mode
        .clone()
        .or_else(|| spec.as_ref()?.volume_mode.clone())
        .unwrap_or_else(|| "Filesystem".into());
    let size = spec
        .and_then(|s| s.resources?.requests?.remove("storage"))
        .map(|q| q.0)
        .unwrap_or_default();
    Ok((mode, size))
}

/// Deletes our snapshot and content (once the PVCs made from them are gone, also the provisioner's stale
/// protection), and a source snapshot never taken over. Returns how many of ours were still there.
pub async fn cleanup(du: &DataUpload, ctx: &Context) -> Result<usize> {
    let ns = du.namespace().unwrap_or_default();
    let sel = objects::owner_selector(du);
    let vss: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut left = objects::delete_selected(&vss, &sel).await?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if pvcs
        .list(&ListParams::default().labels(&sel))
        .await?
        .items
        .is_empty()
    {
        release_source_protection(&vss, &sel).await?;
    }
    let vscs: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let contents = objects::delete_selected(&vscs, &sel).await?;
    if contents > 0 {
        release_orphaned_contents(&ctx.client, &sel).await?;
    }
    left += contents;
    // A source snapshot never taken over (failure before the clone) is ours to release too.
    let source = source_snapshot(du);
    if !source.is_empty() {
        let src: Api<VolumeSnapshot> =
            Api::namespaced(ctx.client.clone(), &du.spec.source_namespace);
        if objects::get_opt(&src, &source).await?.is_some() {
            objects::delete_idempotent(&src, &source, None).await?;
        }
    }
    Ok(left)
}

/// The snapshot-controller's annotation on a VolumeSnapshotContent whose VolumeSnapshot is being deleted;
/// the CSI snapshotter deletes the storage snapshot (policy `Delete`) and the content only once it is set.
pub const SNAPSHOT_BEING_DELETED: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";

/// Sets [`SNAPSHOT_BEING_DELETED`] on the terminating contents matching `selector` whose VolumeSnapshot is
/// gone. The snapshot-controller sets it only while the snapshot still exists: a snapshot deleted while it
/// was binding to its content (a DU canceled right after the hand-over) leaves the content terminating for
/// ever and its storage snapshot leaked (external-snapshotter v8.6 logs "deletion of snapshot … was
/// already processed"). With the snapshot gone, deleting the content is what would have happened anyway.
pub async fn release_orphaned_contents(client: &Client, selector: &str) -> Result<()> {
    let vscs: Api<VolumeSnapshotContent> = Api::all(client.clone());
    for c in vscs
        .list(&ListParams::default().labels(selector))
        .await?
        .items
    {
        if c.metadata.deletion_timestamp.is_none()
            || c.annotations().contains_key(SNAPSHOT_BEING_DELETED)
        {
            continue;
        }
        let r = &c.spec.volume_snapshot_ref;
        let (Some(ns), Some(name), Some(uid)) = (
            r.namespace.as_deref(),
            r.name.as_deref(),
            r.uid.as_deref().filter(|u| !u.is_empty()),
        ) else {
            // Never bound: the snapshotter deletes unbound pre-provisioned contents by itself.
            continue;
        };
        let vss: Api<VolumeSnapshot> = Api::namespaced(client.clone(), ns);
        let bound = objects::get_opt(&vss, name).await?;
        if bound.is_some_and(|vs| vs.metadata.uid.as_deref() == Some(uid)) {
            continue;
        }
        let mark = json!({"annotations": {SNAPSHOT_BEING_DELETED: "yes"}});
        if objects::patch_metadata_if_unchanged(&vscs, &c, mark).await? {
            tracing::info!(content = %c.name_any(), "marked an orphaned snapshot content for deletion");
        }
    }
    Ok(())
}

/// Drops [`PROVISIONER_SOURCE_FINALIZER`] from the terminating snapshots matching `selector`. Call it only
/// once no PVC provisioned from them is left: then the protection guards nothing.
pub async fn release_source_protection(api: &Api<VolumeSnapshot>, selector: &str) -> Result<()> {
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
        if objects::patch_metadata_if_unchanged(api, &vs, json!({"finalizers": keep})).await? {
            tracing::info!(snapshot = %vs.name_any(), "released a stale {PROVISIONER_SOURCE_FINALIZER}");
        }
    }
    Ok(())
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
        release_source_protection(&Api::namespaced(client, "velero"), "x=y")
            .await
            .expect("release");
        server.await.expect("server");
    }

    fn vsc(name: &str, deleting: bool, annotated: bool, snapshot_uid: &str) -> serde_json::Value {
        let mut m = json!({"name": name, "resourceVersion": "7",
            "finalizers": ["snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"]});
        if deleting {
            m["deletionTimestamp"] = json!("2026-11-25T20:00:19Z");
        }
        if annotated {
            m["annotations"] = json!({SNAPSHOT_BEING_DELETED: "yes"});
        }
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent", "metadata": m,
            "spec": {"deletionPolicy": "Delete", "driver": "d", "source": {"snapshotHandle": "h"},
                "volumeSnapshotRef": {"namespace": "velero", "name": format!("vs-{name}"), "uid": snapshot_uid}}})
    }

    /// The content a canceled DU left in the e2e kill test: terminating, its snapshot gone, never marked.
    #[tokio::test]
    async fn marks_only_terminating_contents_whose_snapshot_is_gone() {
        use crate::testing::{failure, ok, serve};
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "velero");
        let server = serve(handle, |r| {
            if r.method == http::Method::GET && r.path.ends_with("/volumesnapshotcontents") {
                return ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
                    "kind": "VolumeSnapshotContentList", "metadata": {}, "items": [
                        vsc("orphan", true, false, "u1"),
                        vsc("replaced", true, false, "u2"),
                        vsc("bound", true, false, "u3"),
                        vsc("live", false, false, "u4"),
                        vsc("marked", true, true, "u5"),
                        vsc("unbound", true, false, ""),
                ]}));
            }
            if r.method == http::Method::GET && r.path.ends_with("/volumesnapshots/vs-orphan") {
                return failure(404, "NotFound");
            }
            if r.method == http::Method::GET && r.path.contains("/volumesnapshots/vs-") {
                // vs-replaced exists under another uid; vs-bound is the snapshot the content is bound to.
                let uid = if r.path.ends_with("vs-bound") {
                    "u3"
                } else {
                    "other"
                };
                return ok(
                    json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                    "metadata": {"name": "x", "namespace": "velero", "uid": uid}}),
                );
            }
            ok(vsc("patched", true, true, "u1"))
        });
        release_orphaned_contents(&client, "x=y")
            .await
            .expect("release");
        drop(client);
        let seen = server.await.expect("server");
        let patched: Vec<&str> = seen
            .iter()
            .filter(|r| r.method == http::Method::PATCH)
            .map(|r| r.path.rsplit('/').next().unwrap_or_default())
            .collect();
        assert_eq!(patched, ["orphan", "replaced"]);
        let p = seen
            .iter()
            .find(|r| r.method == http::Method::PATCH)
            .expect("patch");
        assert_eq!(
            p.body["metadata"]["annotations"][SNAPSHOT_BEING_DELETED],
            "yes"
        );
        assert_eq!(p.body["metadata"]["resourceVersion"], "7");
    }
}

#[cfg(test)]
mod step_tests {
    //! Each step of the backup exposer against kube's mock service: the requests it makes and its outcome.
    use super::*;
    use crate::testing::{Seen, ago, ctx, du, echo_or, ok, serve};
    use http::Method;

    fn source_snapshot_json(status: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "vs", "namespace": "app"}, "spec": {"source": {"persistentVolumeClaimName": "p"}},
            "status": status})
    }

    /// Exposes a DataUpload accepted a minute ago; the outcome and the requests `server` saw.
    async fn expose_accepted_du(
        ctx: std::sync::Arc<Context>,
        server: tokio::task::JoinHandle<Vec<Seen>>,
    ) -> (Step<Exposure>, Vec<Seen>) {
        let cr = du(
            json!({"phase": "Accepted", "acceptedTimestamp": ago(1)}),
            |_| {},
        );
        let step = expose(&cr, &ctx).await.expect("expose");
        drop(ctx);
        (step, server.await.expect("server"))
    }

    fn position(seen: &[Seen], method: &Method, suffix: &str) -> usize {
        seen.iter()
            .position(|s| s.is(method, suffix))
            .unwrap_or_else(|| panic!("no {method} {suffix}: {seen:#?}"))
    }

    #[tokio::test]
    async fn the_source_snapshot_is_cloned_then_released() {
        let (ctx, handle) = ctx();
        let server = serve(
            handle,
            echo_or(|s| {
                if s.is(&Method::GET, "/namespaces/app/volumesnapshots/vs") {
                    return Some(ok(source_snapshot_json(json!({"readyToUse": true,
                        "boundVolumeSnapshotContentName": "snapcontent-1"}))));
                }
                if s.is(&Method::GET, "/volumesnapshotcontents/snapcontent-1") {
                    return Some(ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
                        "kind": "VolumeSnapshotContent", "metadata": {"name": "snapcontent-1"},
                        "spec": {"driver": "hostpath.csi.k8s.io", "volumeSnapshotClassName": "vsc",
                            "sourceVolumeMode": "Block", "deletionPolicy": "Delete",
                            "source": {"volumeHandle": "v1"}, "volumeSnapshotRef": {"name": "vs"}},
                        "status": {"snapshotHandle": "h1", "readyToUse": true}})));
                }
                (s.method == Method::POST).then(|| ok(s.body.clone()))
            }),
        );
        let (step, seen) = expose_accepted_du(ctx, server).await;
        assert_eq!(step, Step::wait("snapshot taken over", EXPOSE_REQUEUE));
        let vsc = &seen[position(&seen, &Method::POST, "/volumesnapshotcontents")].body;
        assert_eq!(vsc["metadata"]["name"], "ferry-u1");
        assert_eq!(vsc["spec"]["deletionPolicy"], "Delete");
        assert_eq!(vsc["spec"]["driver"], "hostpath.csi.k8s.io");
        assert_eq!(vsc["spec"]["source"], json!({"snapshotHandle": "h1"}));
        assert_eq!(
            vsc["spec"]["volumeSnapshotRef"],
            json!({"name": "ferry-b1-x", "namespace": "velero"})
        );
        let vs = &seen[position(&seen, &Method::POST, "/namespaces/velero/volumesnapshots")].body;
        assert_eq!(
            vs["spec"]["source"],
            json!({"volumeSnapshotContentName": "ferry-u1"})
        );
        assert_eq!(vs["spec"]["volumeSnapshotClassName"], "vsc");
        assert_eq!(vs["metadata"]["annotations"][VOLUME_MODE], "Block");
        assert_eq!(vs["metadata"]["labels"]["ferry.dev/owner-uid"], "u1");
        // The source is released only after our clone exists, and never destroyed: Retain first.
        let retain = position(
            &seen,
            &Method::PATCH,
            "/volumesnapshotcontents/snapcontent-1",
        );
        assert_eq!(
            seen[retain].body,
            json!({"spec": {"deletionPolicy": "Retain"}})
        );
        assert!(position(&seen, &Method::POST, "/namespaces/velero/volumesnapshots") < retain);
        assert!(retain < position(&seen, &Method::DELETE, "/namespaces/app/volumesnapshots/vs"));
        assert!(
            retain
                < position(
                    &seen,
                    &Method::DELETE,
                    "/volumesnapshotcontents/snapcontent-1"
                )
        );
    }

    #[tokio::test]
    async fn a_source_snapshot_not_ready_is_waited_for_within_the_operation_timeout() {
        let not_ready = || {
            echo_or(|s| {
                s.is(&Method::GET, "/namespaces/app/volumesnapshots/vs")
                    .then(|| {
                        ok(source_snapshot_json(
                            json!({"readyToUse": false, "error": {"message": "driver busy"}}),
                        ))
                    })
            })
        };
        let (ctx, handle) = ctx();
        let server = serve(handle, not_ready());
        let recent = du(
            json!({"phase": "Accepted", "acceptedTimestamp": ago(1)}),
            |_| {},
        );
        let step = take_over(&recent, &ctx).await.expect("take over");
        assert_eq!(
            step,
            Step::wait("VolumeSnapshot app/vs driver busy", EXPOSE_REQUEUE)
        );
        let late = du(
            json!({"phase": "Accepted", "acceptedTimestamp": ago(11)}),
            |_| {},
        );
        let step = take_over(&late, &ctx).await.expect("take over");
        assert!(
            matches!(&step, Step::Fail(m) if m.contains("not ready after 6") && m.contains("driver busy")),
            "{step:?}"
        );
        drop(ctx);
        let seen = server.await.expect("server");
        assert!(seen.iter().all(|s| s.method == Method::GET), "{seen:#?}");
    }

    #[tokio::test]
    async fn a_ready_clone_is_exposed_as_a_pvc_of_its_restore_size() {
        let (ctx, handle) = ctx();
        let server = serve(
            handle,
            echo_or(|s| {
                if s.is(
                    &Method::GET,
                    "/namespaces/velero/volumesnapshots/ferry-b1-x",
                ) {
                    return Some(ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
                        "kind": "VolumeSnapshot", "metadata": {"name": "ferry-b1-x",
                            "namespace": "velero", "annotations": {VOLUME_MODE: "Filesystem"}},
                        "status": {"readyToUse": true, "restoreSize": "5Gi"}})));
                }
                if s.is(&Method::GET, "/storageclasses/sc") {
                    return Some(ok(json!({"apiVersion": "storage.k8s.io/v1",
                        "kind": "StorageClass", "metadata": {"name": "sc"}, "provisioner": "p",
                        "volumeBindingMode": "WaitForFirstConsumer"})));
                }
                (s.method == Method::POST).then(|| ok(s.body.clone()))
            }),
        );
        let (step, seen) = expose_accepted_du(ctx, server).await;
        let exposure = Exposure {
            pvc: "ferry-b1-x".into(),
            block: false,
            nodes: vec![],
        };
        assert_eq!(step, Step::Done(exposure));
        let pvc = &seen[position(
            &seen,
            &Method::POST,
            "/namespaces/velero/persistentvolumeclaims",
        )]
        .body;
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
        assert_eq!(pvc["spec"]["dataSource"]["name"], "ferry-b1-x");
        assert_eq!(pvc["spec"]["storageClassName"], "sc");
        assert_eq!(pvc["metadata"]["ownerReferences"][0]["uid"], "u1");
    }
}
