//! "The controller survives any CR and never waits forever": whole reconciles of odd DataUploads,
//! DataDownloads and Backups against a fake API server.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::velero::Backup;
use http::Method;
use serde_json::{Value, json};

use crate::testing::*;

fn failed_with(seen: &[Seen], needles: &[&str]) {
    let status =
        last_status(seen).unwrap_or_else(|| panic!("no status written; requests: {seen:#?}"));
    assert_eq!(status["phase"], "Failed", "{status}");
    let msg = status["message"].as_str().unwrap_or_default();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
}

/// One reconcile of `cr` against the fake API answering with `route`; the requests it made.
async fn run<K: crate::flow::Flow>(
    cr: K,
    route: impl Fn(&Seen) -> http::Response<kube::client::Body> + Send + 'static,
) -> Vec<Seen> {
    run_with(crate::config::Config::default(), cr, route).await
}

async fn run_with<K: crate::flow::Flow>(
    config: crate::config::Config,
    cr: K,
    route: impl Fn(&Seen) -> http::Response<kube::client::Body> + Send + 'static,
) -> Vec<Seen> {
    let (ctx, handle) = ctx_with(config);
    let server = serve(handle, route);
    let out = crate::reconcile::reconcile(Arc::new(cr), ctx).await;
    eprintln!("reconcile: {out:?}");
    server.await.expect("server")
}

/// One reconcile of a DataUpload accepted a minute ago, against a fake API server that has it current,
/// answers the request `failing` picks with `code` and `message`, and the rest with `more`.
async fn accepted_du_where(
    failing: impl Fn(&Seen) -> bool + Send + 'static,
    code: u16,
    message: &'static str,
    more: fn(&Seen) -> Option<http::Response<kube::client::Body>>,
) -> Vec<Seen> {
    let cr = du(
        json!({"phase": "Accepted", "acceptedTimestamp": ago(1)}),
        |_| {},
    );
    let current = serde_json::to_value(&cr).expect("json");
    run(
        cr,
        echo_or(move |s| {
            if s.is(&Method::GET, "/datauploads/b1-x") {
                return Some(ok(current.clone()));
            }
            if failing(s) {
                return Some(failure(code, message));
            }
            more(s)
        }),
    )
    .await
}

fn lists(s: &Seen) -> Option<http::Response<kube::client::Body>> {
    (s.method == Method::GET
        && (s.path.ends_with("/datauploads") || s.path.ends_with("/datadownloads")))
    .then(|| ok(empty_list("List")))
}

#[tokio::test]
async fn an_absurd_operation_timeout_fails_the_cr_instead_of_panicking() {
    let cr = dd(json!(null), |v| {
        v["spec"]["operationTimeout"] = json!("99999999999999999999h")
    });
    let seen = run(cr, echo_or(lists)).await;
    failed_with(&seen, &["spec.operationTimeout", "99999999999999999999h"]);
}

#[tokio::test]
async fn an_absurd_operation_timeout_in_accepted_fails_the_cr() {
    let cr = du(
        json!({"phase": "Accepted", "acceptedTimestamp": ago(1)}),
        |v| v["spec"]["operationTimeout"] = json!("99999999999999999999h"),
    );
    let current = serde_json::to_value(&cr).expect("json");
    let seen = run(
        cr,
        echo_or(move |s| {
            if s.is(&Method::GET, "/datauploads/b1-x") {
                return Some(ok(current.clone()));
            }
            if s.is(&Method::GET, "/namespaces/app/volumesnapshots/vs") {
                return Some(ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
                    "kind": "VolumeSnapshot", "metadata": {"name": "vs", "namespace": "app"},
                    "status": {"readyToUse": false}})));
            }
            None
        }),
    )
    .await;
    failed_with(&seen, &["spec.operationTimeout"]);
}

#[tokio::test]
async fn an_invalid_source_namespace_fails_before_anything_is_touched() {
    let cr = du(json!({"phase": "New"}), |v| {
        v["spec"]["sourceNamespace"] = json!("Bad_NS")
    });
    let seen = run(cr, echo_or(lists)).await;
    failed_with(&seen, &["spec.sourceNamespace", "Bad_NS"]);
    assert!(
        seen.iter().all(|s| s.method == Method::PUT),
        "only the status write is allowed: {seen:#?}"
    );
}

#[tokio::test]
async fn a_forbidden_answer_in_accepted_fails_the_cr_with_the_api_message() {
    let seen = accepted_du_where(
        |s| s.path.contains("/namespaces/app/"),
        403,
        "volumesnapshots is forbidden in app",
        free_node,
    )
    .await;
    failed_with(&seen, &["forbidden in app"]);
}

fn ready_source_snapshot(s: &Seen) -> Option<http::Response<kube::client::Body>> {
    if s.is(&Method::GET, "/namespaces/app/volumesnapshots/vs") {
        return Some(ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot", "metadata": {"name": "vs", "namespace": "app"},
            "status": {"readyToUse": true, "boundVolumeSnapshotContentName": "snapcontent-1"}})));
    }
    if s.is(&Method::GET, "/volumesnapshotcontents/snapcontent-1") {
        return Some(ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent", "metadata": {"name": "snapcontent-1"},
            "spec": {"driver": "hostpath.csi.k8s.io"},
            "status": {"snapshotHandle": "h1"}})));
    }
    free_node(s)
}

#[tokio::test]
async fn a_rejected_snapshot_clone_fails_the_cr_with_the_api_message() {
    let seen = accepted_du_where(
        |s| s.is(&Method::POST, "/volumesnapshotcontents"),
        422,
        "spec.volumeSnapshotClassName: Invalid value",
        ready_source_snapshot,
    )
    .await;
    failed_with(&seen, &["spec.volumeSnapshotClassName: Invalid value"]);
}

fn secret(name: &str, key: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "velero"},
        "data": {key: "eA=="}})
}

/// Everything a DU in Accepted needs up to the pod create: the exposed snapshot and PVC, a BSL, Secrets,
/// one ready node.
fn exposed(s: &Seen) -> Option<http::Response<kube::client::Body>> {
    let get = |suffix: &str| s.is(&Method::GET, suffix);
    if get("/namespaces/velero/volumesnapshots/ferry-b1-x") {
        return Some(ok(json!({"apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot", "metadata": {"name": "ferry-b1-x", "namespace": "velero",
                "annotations": {"ferry.dev/volume-mode": "Filesystem", "ferry.dev/source-size": "1Gi"}},
            "status": {"readyToUse": true, "restoreSize": "1Gi"}})));
    }
    if s.is(&Method::POST, "/persistentvolumeclaims") {
        return Some(ok(s.body.clone()));
    }
    if get("/storageclasses/sc") {
        return Some(ok(
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "sc"}, "provisioner": "p",
            "volumeBindingMode": "WaitForFirstConsumer"}),
        ));
    }
    if get("/backupstoragelocations/default") {
        return Some(ok(
            json!({"apiVersion": "velero.io/v1", "kind": "BackupStorageLocation",
            "metadata": {"name": "default", "namespace": "velero"},
            "spec": {"provider": "aws", "objectStorage": {"bucket": "b"},
                "credential": {"name": "creds", "key": "cloud"}}}),
        ));
    }
    if get("/secrets/creds") {
        return Some(ok(secret("creds", "cloud")));
    }
    if get("/secrets/ferry-repository") {
        return Some(ok(secret("ferry-repository", "password")));
    }
    free_node(s)
}

/// One Ready node and no mover pod: a free mover slot.
fn free_node(s: &Seen) -> Option<http::Response<kube::client::Body>> {
    if s.is(&Method::GET, "/api/v1/nodes") {
        return Some(ok(one_ready_node()));
    }
    if s.is(&Method::GET, "/api/v1/namespaces/velero/pods") {
        return Some(ok(empty_list("PodList")));
    }
    None
}

fn one_ready_node() -> Value {
    json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": [
        {"metadata": {"name": "node-a"},
         "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]})
}

/// With every mover slot taken, an Accepted CR exposes its volume and reads its repository once, then
/// waits in line asking only for its own pod: free slots are looked up in the watch caches, what it exposed
/// in the memo. Exposing ahead means a freed slot waits only for the pod to be created (the clone of a
/// snapshot takes seconds); exposing again at each look cost every waiting CR about a dozen requests
/// (with 500 DataUploads queued, most of the controller's API traffic; bench/CLUSTER.md).
#[tokio::test]
async fn with_every_mover_slot_taken_a_cr_exposes_once_then_asks_only_for_its_pod() {
    let cr = Arc::new(du(
        json!({"phase": "Accepted", "acceptedTimestamp": ago(1)}),
        |_| {},
    ));
    let current = serde_json::to_value(&*cr).expect("json");
    let running: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "ferry-other", "namespace": "velero"},
        "spec": {"nodeName": "node-a", "containers": []},
        "status": {"phase": "Running"}}))
    .expect("pod");
    let caches = crate::caches::Caches {
        pods: filled(vec![running]),
        ..caches(vec![])
    };
    let (ctx, handle) = ctx_leading(crate::config::Config::default(), caches);
    let server = serve(
        handle,
        echo_or(move |s| {
            if s.is(&Method::GET, "/datauploads/b1-x") {
                return Some(ok(current.clone()));
            }
            exposed(s)
        }),
    );
    for look in 0..3 {
        let out = crate::reconcile::reconcile(cr.clone(), ctx.clone()).await;
        eprintln!("reconcile {look}: {out:?}");
    }
    drop(ctx);
    let seen = server.await.expect("server");
    let status = last_status(&seen).expect("a waiting note");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("waiting for a free mover slot")),
        "{status}"
    );
    let asked: Vec<_> = seen
        .iter()
        .filter(|s| s.method != Method::PUT)
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    let times = |what: &str| asked.iter().filter(|a| a.as_str() == what).count();
    assert_eq!(
        times("GET /api/v1/namespaces/velero/pods/ferry-b1-x"),
        3,
        "{asked:#?}"
    );
    let exposing = [
        "GET /apis/velero.io/v2alpha1/namespaces/velero/datauploads/b1-x",
        "GET /apis/snapshot.storage.k8s.io/v1/namespaces/velero/volumesnapshots/ferry-b1-x",
        "POST /api/v1/namespaces/velero/persistentvolumeclaims",
        "GET /apis/velero.io/v1/namespaces/velero/backupstoragelocations/default",
    ];
    for e in exposing {
        assert_eq!(times(e), 1, "{e} not exactly once: {asked:#?}");
    }
    assert!(
        !asked
            .iter()
            .any(|a| a.ends_with("/pods") || a.ends_with("/nodes")),
        "a waiting CR listed pods or nodes: {asked:#?}"
    );
}

#[tokio::test]
async fn a_rejected_mover_pod_fails_the_cr_with_the_api_message() {
    let seen = accepted_du_where(
        |s| s.is(&Method::POST, "/namespaces/velero/pods"),
        403,
        "violates PodSecurity \"restricted:latest\"",
        exposed,
    )
    .await;
    assert!(
        seen.iter()
            .any(|s| s.is(&Method::POST, "/namespaces/velero/pods")),
        "the pod was never created: {seen:#?}"
    );
    failed_with(&seen, &["violates PodSecurity"]);
}

#[tokio::test]
async fn a_persistent_server_error_fails_the_cr_after_the_prepare_timeout() {
    let cr = du(
        json!({"phase": "Accepted", "acceptedTimestamp": ago(31)}),
        |_| {},
    );
    let seen = run(
        cr,
        echo_or(|s| {
            (s.method == Method::GET).then(|| failure(500, "etcdserver: request timed out"))
        }),
    )
    .await;
    failed_with(
        &seen,
        &["timed out after 1800s", "etcdserver: request timed out"],
    );
}

#[tokio::test]
async fn a_missing_target_pvc_is_explained_while_waiting() {
    let seen = run(dd(json!(null), |_| {}), echo_or(lists)).await;
    let status = last_status(&seen).unwrap_or_else(|| panic!("no status written: {seen:#?}"));
    let msg = status["message"].as_str().unwrap_or_default();
    assert!(msg.contains("target PVC app/data"), "{status}");
    assert_ne!(status["phase"], "Failed", "{status}");
}

fn running_pod(started: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ferry-b1-x", "namespace": "velero",
            "labels": {"ferry.dev/owner-uid": "u1"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "mover"}]},
        "status": {"phase": "Running", "startTime": started,
            "containerStatuses": [{"name": "mover", "ready": true, "restartCount": 0, "image": "i",
                "imageID": "", "state": {"running": {"startedAt": started}}}]}})
}

#[tokio::test]
async fn no_progress_for_the_configured_time_fails_the_cr() {
    let cr = du(
        json!({"phase": "InProgress", "acceptedTimestamp": ago(121), "startTimestamp": ago(120)}),
        |_| {},
    );
    let pod = running_pod(&ago(120));
    let seen = run(
        cr,
        echo_or(move |s| {
            if s.is(&Method::GET, "/pods/ferry-b1-x") {
                return Some(ok(pod.clone()));
            }
            if s.is(&Method::GET, "/namespaces/velero/events") {
                return Some(ok(empty_list("EventList")));
            }
            None
        }),
    )
    .await;
    failed_with(&seen, &["no progress for 30m"]);
}

#[tokio::test]
async fn recent_progress_keeps_the_cr_running() {
    let cr = du(
        json!({"phase": "InProgress", "acceptedTimestamp": ago(10), "startTimestamp": ago(9)}),
        |_| {},
    );
    let pod = running_pod(&ago(9));
    let seen = run(
        cr,
        echo_or(move |s| {
            if s.is(&Method::GET, "/pods/ferry-b1-x") {
                return Some(ok(pod.clone()));
            }
            if s.is(&Method::GET, "/namespaces/velero/events") {
                return Some(ok(empty_list("EventList")));
            }
            None
        }),
    )
    .await;
    assert!(last_status(&seen).is_none(), "{seen:#?}");
}

#[tokio::test]
async fn progress_is_stamped_and_a_recent_stamp_keeps_the_cr_running() {
    let report = ferry_proto::report::Report {
        version: ferry_proto::report::REPORT_VERSION,
        total_bytes: 100,
        done_bytes: 40,
        ..Default::default()
    };
    let event = json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "e1", "namespace": "velero",
            "annotations": {ferry_proto::report::REPORT_ANNOTATION: report.to_annotation()}},
        "involvedObject": {}});
    let pod = running_pod(&ago(120));
    let route = move |events: Value| {
        let pod = pod.clone();
        echo_or(move |s| {
            if s.is(&Method::GET, "/pods/ferry-b1-x") {
                return Some(ok(pod.clone()));
            }
            s.is(&Method::GET, "/namespaces/velero/events").then(|| {
                ok(
                    json!({"apiVersion": "v1", "kind": "EventList", "metadata": {},
                    "items": events.clone()}),
                )
            })
        })
    };
    let in_progress = json!({"phase": "InProgress", "acceptedTimestamp": ago(121),
        "startTimestamp": ago(120)});
    // Progress moved: recorded with the time it was seen, not failed although the pod started 2 h ago.
    let seen = run(du(in_progress.clone(), |_| {}), route(json!([event]))).await;
    let put = seen
        .iter()
        .find(|s| s.method == Method::PUT)
        .unwrap_or_else(|| panic!("progress not recorded: {seen:#?}"));
    assert_eq!(put.body["status"]["progress"]["bytesDone"], 40);
    assert_eq!(put.body["status"]["phase"], "InProgress");
    assert!(put.body["metadata"]["annotations"][crate::flow::PROGRESS_AT_ANNOTATION].is_string());
    // No new progress, but the last was seen 5 minutes ago: still running.
    let cr = du(in_progress, |v| {
        v["metadata"]["annotations"] = json!({crate::flow::PROGRESS_AT_ANNOTATION: ago(5)});
    });
    let seen = run(cr, route(json!([]))).await;
    assert!(last_status(&seen).is_none(), "{seen:#?}");
}

#[tokio::test]
async fn a_zero_no_progress_timeout_disables_the_watchdog() {
    let cr = du(
        json!({"phase": "InProgress", "acceptedTimestamp": ago(121), "startTimestamp": ago(120)}),
        |_| {},
    );
    let pod = running_pod(&ago(120));
    let config = crate::config::Config {
        no_progress_timeout_seconds: 0,
        ..Default::default()
    };
    let seen = run_with(
        config,
        cr,
        echo_or(move |s| {
            if s.is(&Method::GET, "/pods/ferry-b1-x") {
                return Some(ok(pod.clone()));
            }
            s.is(&Method::GET, "/namespaces/velero/events")
                .then(|| ok(empty_list("EventList")))
        }),
    )
    .await;
    assert!(last_status(&seen).is_none(), "{seen:#?}");
}

fn deleting_backup() -> Backup {
    serde_json::from_value(json!({
        "apiVersion": "velero.io/v1", "kind": "Backup",
        "metadata": {"name": "b1", "namespace": "velero", "uid": "bu1", "resourceVersion": "3",
            "deletionTimestamp": ago(1), "finalizers": ["ferry.dev/backup-data", "other/keep"]},
        "spec": {"snapshotMoveData": true, "datamover": "ferry", "storageLocation": "default"},
    }))
    .expect("backup")
}

#[tokio::test]
async fn a_rejected_maintenance_pod_releases_the_backup() {
    let (ctx, handle) = ctx();
    let server = serve(
        handle,
        echo_or(|s| {
            if s.is(&Method::POST, "/namespaces/velero/pods") {
                return Some(failure(422, "Pod \"ferry-prune-b1\" is invalid"));
            }
            if s.is(&Method::GET, "/namespaces/velero/pods") {
                return Some(ok(empty_list("PodList")));
            }
            exposed(s)
        }),
    );
    let out = crate::deletion::reconcile(Arc::new(deleting_backup()), ctx).await;
    eprintln!("reconcile: {out:?}");
    let seen = server.await.expect("server");
    let patch = seen
        .iter()
        .rev()
        .find(|s| s.is(&Method::PATCH, "/backups/b1"))
        .unwrap_or_else(|| panic!("the Backup was never released: {seen:#?}"));
    assert_eq!(patch.body["metadata"]["finalizers"], json!(["other/keep"]));
}

#[tokio::test]
async fn error_requeues_back_off_exponentially_with_a_cap() {
    let (ctx, _handle) = ctx();
    let cr = Arc::new(du(json!(null), |_| {}));
    let err = || {
        crate::Error::Kube(kube::Error::Api(Box::new(
            serde_json::from_value(json!({"status": "Failure", "message": "boom",
                "reason": "InternalError", "code": 500}))
            .expect("status"),
        )))
    };
    let delays: Vec<_> = (0..12)
        .map(|_| crate::error_policy(cr.clone(), &err(), ctx.clone()))
        .collect();
    assert!(delays[1] != delays[0], "{delays:?}");
    assert_eq!(delays[10], delays[11], "{delays:?}");
    assert!(delays[11] != kube::runtime::controller::Action::requeue(Duration::from_secs(3)));
}

mod any_value {
    //! Any value in a DataUpload field: a clear Failed naming the field, or on with the data path; never a
    //! panic.
    use super::*;
    use crate::validate::Spec;
    use proptest::prelude::*;

    fn set(v: &mut Value, field: usize, value: &str) {
        let spec = &mut v["spec"];
        match field {
            0 => spec["csiSnapshot"]["volumeSnapshot"] = json!(value),
            1 => spec["csiSnapshot"]["storageClass"] = json!(value),
            2 => spec["sourcePVC"] = json!(value),
            3 => spec["sourceNamespace"] = json!(value),
            4 => spec["backupStorageLocation"] = json!(value),
            5 => spec["operationTimeout"] = json!(value),
            _ => spec["snapshotType"] = json!(value),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_field_value_fails_clearly_or_goes_on(
            field in 0usize..7,
            value in prop_oneof![any::<String>(), "[0-9]{1,30}(h|m|s)", "[a-z0-9-]{1,70}"],
            accepted in any::<bool>(),
        ) {
            let status = if accepted {
                json!({"phase": "Accepted", "acceptedTimestamp": ago(1)})
            } else {
                json!(null)
            };
            let cr = du(status, |v| set(v, field, &value));
            let verdict = cr.validate();
            let current = serde_json::to_value(&cr).expect("json");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let seen = rt.block_on(run(cr, echo_or(move |s| {
                if s.is(&Method::GET, "/datauploads/b1-x") {
                    return Some(ok(current.clone()));
                }
                lists(s)
            })));
            match verdict {
                Err(invalid) => {
                    let status = last_status(&seen).expect("a status");
                    prop_assert_eq!(&status["phase"], "Failed");
                    let expected = invalid.to_string();
                    prop_assert_eq!(status["message"].as_str(), Some(expected.as_str()));
                }
                Ok(()) => {
                    if let Some(status) = last_status(&seen) {
                        prop_assert!(status["message"].as_str().is_some_and(|m| !m.is_empty())
                            || status["phase"] == "Accepted", "{}", status);
                    }
                }
            }
        }
    }
}
