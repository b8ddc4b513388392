//! Helpers for the Kubernetes objects the controller reads and creates: names, owner labels, snapshot
//! APIs, the repository a BSL points to, and placement under the per-node limit.

use std::collections::{BTreeMap, BTreeSet};

use ferry_proto::labels;
use ferry_proto::velero::BackupStorageLocation;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, Resource, ResourceExt};

use crate::context::{Context, FIELD_MANAGER};
use crate::cr::MoverCr;
use crate::error::{Result, is_conflict, is_not_found};
use crate::pod::{CaSource, RepoTarget};

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

/// The snapshot-controller's annotation on a VolumeSnapshotContent whose VolumeSnapshot is being deleted;
/// the CSI snapshotter deletes the storage snapshot (policy `Delete`) and the content only once it is set.
pub const SNAPSHOT_BEING_DELETED: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";

/// Sets [`SNAPSHOT_BEING_DELETED`] on the terminating contents matching `selector` whose VolumeSnapshot is
/// gone. The snapshot-controller sets it only while the snapshot still exists: a snapshot deleted while it
/// was binding to its content (a DU canceled right after the handover) leaves the content terminating for
/// ever and its storage snapshot leaked (external-snapshotter v8.6 logs "deletion of snapshot … was
/// already processed"). With the snapshot gone, deleting the content is what would have happened anyway.
pub async fn release_orphaned_contents(client: &Client, selector: &str) -> Result<()> {
    let vscs = vsc_api(client);
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
        let r = &c.data["spec"]["volumeSnapshotRef"];
        let (Some(ns), Some(name), Some(uid)) = (
            r["namespace"].as_str(),
            r["name"].as_str(),
            r["uid"].as_str().filter(|u| !u.is_empty()),
        ) else {
            // Never bound: the snapshotter deletes unbound pre-provisioned contents by itself.
            continue;
        };
        let bound = get_opt(&vs_api(client, ns), name).await?;
        if bound.is_some_and(|vs| vs.uid().as_deref() == Some(uid)) {
            continue;
        }
        let patch = serde_json::json!({"metadata": {
            "annotations": {SNAPSHOT_BEING_DELETED: "yes"},
            "resourceVersion": c.metadata.resource_version,
        }});
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match vscs.patch(&c.name_any(), &pp, &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(content = %c.name_any(), "marked an orphaned snapshot content for deletion")
            }
            Err(e) if is_conflict(&e) || is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Why a CR cannot run, for `status.message`.
pub type Refusal = String;

/// The repository for a CR: from its BackupStorageLocation, checked along with the Secrets the pod needs.
pub async fn repo_target<K: MoverCr>(
    ctx: &Context,
    cr: &K,
) -> Result<std::result::Result<RepoTarget, Refusal>> {
    repo_target_in(
        ctx,
        &cr.namespace().unwrap_or_default(),
        cr.bsl(),
        Some(cr.source_namespace()),
    )
    .await
}

/// The repository of `source_ns` under BSL `ns/bsl_name`, or with `None` the root holding every
/// namespace's repository.
pub async fn repo_target_in(
    ctx: &Context,
    ns: &str,
    bsl_name: &str,
    source_ns: Option<&str>,
) -> Result<std::result::Result<RepoTarget, Refusal>> {
    let ns = ns.to_string();
    let bsls: Api<BackupStorageLocation> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(bsl) = get_opt(&bsls, bsl_name).await? else {
        return Ok(Err(format!(
            "BackupStorageLocation {ns}/{bsl_name} not found"
        )));
    };
    let provider = bsl.spec.provider.trim_start_matches("velero.io/");
    if provider != "aws" {
        return Ok(Err(format!(
            "BackupStorageLocation {}: provider {:?} is not supported (Ferry speaks S3: use provider aws)",
            bsl_name, bsl.spec.provider
        )));
    }
    let config = match crate::validate::bsl_config(&bsl.spec.config.clone().unwrap_or_default()) {
        Ok(c) => c,
        Err(invalid) => return Ok(Err(format!("BackupStorageLocation {bsl_name}: {invalid}"))),
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // The CA bundle: caCertRef (a Secret key) wins over the inline, base64-encoded caCert.
    let ca = match (
        &bsl.spec.object_storage.ca_cert_ref,
        &bsl.spec.object_storage.ca_cert,
    ) {
        (Some(sel), _) => {
            let pem = get_opt(&secrets, &sel.name)
                .await?
                .and_then(|s| s.data.and_then(|mut d| d.remove(&sel.key)));
            match pem {
                Some(pem) if ferry_proto::pod::holds_pem_certificate(&pem.0) => {
                    Some(CaSource::Secret(sel.name.clone(), sel.key.clone()))
                }
                Some(_) => {
                    return Ok(Err(format!(
                        "BackupStorageLocation {bsl_name}: caCertRef {}/{}: key {:?} holds no PEM certificate",
                        ns, sel.name, sel.key
                    )));
                }
                None => {
                    return Ok(Err(format!(
                        "BackupStorageLocation {bsl_name}: caCertRef Secret {ns}/{} or its key {:?} not found",
                        sel.name, sel.key
                    )));
                }
            }
        }
        (None, Some(b64)) if !b64.trim().is_empty() => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(pem) if ferry_proto::pod::holds_pem_certificate(&pem) => {
                    Some(CaSource::Pem(String::from_utf8_lossy(&pem).into_owned()))
                }
                _ => {
                    return Ok(Err(format!(
                        "BackupStorageLocation {bsl_name}: caCert is not a base64-encoded PEM certificate"
                    )));
                }
            }
        }
        _ => None,
    };
    let credentials = match &bsl.spec.credential {
        Some(sel) => Some((sel.name.clone(), sel.key.clone())),
        // Velero's default: the cloud-credentials Secret its server uses, if present.
        None => get_opt(&secrets, "cloud-credentials")
            .await?
            .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("cloud")))
            .map(|_| ("cloud-credentials".to_string(), "cloud".to_string())),
    };
    if let Some((name, key)) = &credentials {
        match get_opt(&secrets, name).await? {
            None => {
                return Ok(Err(format!(
                    "credentials Secret {ns}/{name} of BackupStorageLocation {} not found",
                    bsl_name
                )));
            }
            Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key(key)) => {
                return Ok(Err(format!(
                    "credentials Secret {ns}/{name} has no key {key:?}"
                )));
            }
            Some(_) => {}
        }
    }
    let pw = &ctx.config.repository_password_secret;
    match get_opt(&secrets, pw).await? {
        None => {
            return Ok(Err(format!(
                "repository password Secret {ns}/{pw} not found (create it with a key \"password\")"
            )));
        }
        Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key("password")) => {
            return Ok(Err(format!(
                "repository password Secret {ns}/{pw} has no key \"password\""
            )));
        }
        Some(_) => {}
    }
    let prefix = bsl
        .spec
        .object_storage
        .prefix
        .as_deref()
        .unwrap_or("")
        .trim_matches('/');
    let mut url = format!("s3://{}/", bsl.spec.object_storage.bucket);
    if !prefix.is_empty() {
        url.push_str(prefix);
        url.push('/');
    }
    // Under `plugins/`: Velero marks a BSL Unavailable when its prefix holds any top-level directory
    // other than backups, restores, restic, kopia, metadata and plugins.
    url.push_str("plugins/ferry");
    if let Some(sns) = source_ns {
        url.push('/');
        url.push_str(sns);
    }
    Ok(Ok(RepoTarget {
        url,
        endpoint: config.endpoint,
        region: config.region,
        path_style: config.path_style,
        insecure_skip_tls_verify: config.insecure_skip_tls_verify,
        ca,
        profile: config.profile,
        credentials,
    }))
}

/// The mover arguments naming the object it reports on: `--kind --name --namespace --uid`.
pub fn owner_args<K: Resource<DynamicType = ()>>(o: &K) -> Vec<String> {
    vec![
        format!("--kind={}", K::kind(&())),
        format!("--name={}", o.name_any()),
        format!("--namespace={}", o.namespace().unwrap_or_default()),
        format!("--uid={}", o.uid().unwrap_or_default()),
    ]
}

/// Nodes where a new mover pod may go under the per-node limit, restricted to `allowed` when given.
/// Pods not yet scheduled count against every node they may land on. Call under `ctx.placement`.
pub async fn free_nodes(ctx: &Context, allowed: Option<&[String]>) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut candidates: BTreeSet<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
            ready && !cordoned
        })
        .map(|n| n.name_any())
        .collect();
    if let Some(a) = allowed {
        candidates.retain(|n| a.contains(n));
    }
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let selector = format!(
        "{}={},{}=mover",
        labels::MANAGED_BY,
        labels::MANAGED_BY_VALUE,
        labels::COMPONENT
    );
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        match p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            Some(n) => *load.entry(n).or_default() += 1,
            None => {
                for n in pod_nodes(&p).unwrap_or_else(|| candidates.iter().cloned().collect()) {
                    *load.entry(n).or_default() += 1;
                }
            }
        }
    }
    Ok(candidates
        .into_iter()
        .filter(|n| load.get(n).copied().unwrap_or(0) < ctx.config.per_node_limit)
        .collect())
}

/// The hostnames a pod's required node affinity allows, if it names any.
fn pod_nodes(p: &Pod) -> Option<Vec<String>> {
    let terms = &p
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    let mut out = Vec::new();
    for t in terms {
        for e in t.match_expressions.iter().flatten() {
            if e.key == "kubernetes.io/hostname" && e.operator == "In" {
                out.extend(e.values.iter().flatten().cloned());
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The hostnames a PV's node affinity pins it to, if any (node-local storage).
pub fn pv_nodes(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> Option<Vec<String>> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let mut out = Vec::new();
    for t in terms {
        for e in t.match_expressions.iter().flatten() {
            if (e.key == "kubernetes.io/hostname"
                || e.key.ends_with("/hostname")
                || e.key.ends_with("topology.hostpath.csi/node"))
                && e.operator == "In"
            {
                out.extend(e.values.iter().flatten().cloned());
            }
        }
    }
    (!out.is_empty()).then_some(out)
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
