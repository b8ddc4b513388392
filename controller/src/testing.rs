//! Test support: a controller context on kube's mock service, and a fake API server that answers by route
//! and records every request, so a test can assert on what the controller asked for and wrote.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::velero::{DataDownload, DataUpload};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use serde_json::{Value, json};

use crate::caches::Caches;
use crate::config::Config;
use crate::context::{Context, Identity};

/// The test end of the mock service.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A context on the mock service with `config`, leading with empty watch caches.
pub fn ctx_with(config: Config) -> (Arc<Context>, Handle) {
    ctx_leading(config, caches(Vec::new()))
}

/// A context on the mock service with `config`, leading with `caches`.
pub fn ctx_leading(config: Config, caches: Caches) -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "velero");
    let identity = Identity {
        node: "node-a".into(),
        pod: "ctrl-0".into(),
    };
    let ctx = Context::new(client, config, identity);
    ctx.lead(caches);
    (Arc::new(ctx), handle)
}

/// A context on the mock service with the default configuration.
pub fn ctx() -> (Arc<Context>, Handle) {
    ctx_with(Config::default())
}

/// A 200 response with `v`.
pub fn ok(v: Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(&v).expect("json")))
        .expect("response")
}

/// An API error response (`Status`) with `code` and `reason`.
pub fn failure(code: u16, reason: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&status).expect("json")))
        .expect("response")
}

/// An empty list of `kind`.
pub fn empty_list(kind: &str) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": []})
}

/// One request the controller made.
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: Method,
    /// URI path.
    pub path: String,
    /// JSON body (Null when none).
    pub body: Value,
}

impl Seen {
    /// Whether this is `method` on a path ending with `suffix`.
    pub fn is(&self, method: &Method, suffix: &str) -> bool {
        self.method == method && self.path.ends_with(suffix)
    }
}

/// Answers every request with `route` until the client is dropped; returns what was seen.
pub fn serve(
    mut handle: Handle,
    route: impl Fn(&Seen) -> Response<Body> + Send + 'static,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_secs(2), handle.next_request()).await
        {
            let (parts, body) = req.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .expect("body")
                .to_bytes();
            let s = Seen {
                method: parts.method,
                path: parts.uri.path().to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            send.send_response(route(&s));
            seen.push(s);
        }
        seen
    })
}

/// The status the controller last wrote to a DataUpload or DataDownload (by replace), if any.
pub fn last_status(seen: &[Seen]) -> Option<Value> {
    seen.iter()
        .rev()
        .find(|s| s.method == Method::PUT && s.body["status"].is_object())
        .map(|s| s.body["status"].clone())
}

/// `minutes` ago, RFC 3339.
pub fn ago(minutes: i64) -> String {
    (Timestamp::now() - SignedDuration::from_mins(minutes))
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A DataUpload of ours (`velero/b1-x`, uid `u1`) with `status`, as JSON.
pub fn du_json(status: Value) -> Value {
    json!({
        "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
        "metadata": {"name": "b1-x", "namespace": "velero", "uid": "u1", "resourceVersion": "7",
            "finalizers": ["ferry.dev/cleanup"]},
        "spec": {"snapshotType": "CSI", "csiSnapshot": {"volumeSnapshot": "vs", "storageClass": "sc"},
            "sourcePVC": "p", "datamover": "ferry", "backupStorageLocation": "default",
            "sourceNamespace": "app", "operationTimeout": "10m0s"},
        "status": status,
    })
}

/// [`du_json`] with `edit` applied.
pub fn du(status: Value, edit: impl FnOnce(&mut Value)) -> DataUpload {
    let mut v = du_json(status);
    edit(&mut v);
    serde_json::from_value(v).expect("du")
}

/// A DataDownload of ours (`velero/r1-x`, uid `d1`, target `app/data`) with `status` and `edit` applied.
pub fn dd(status: Value, edit: impl FnOnce(&mut Value)) -> DataDownload {
    let mut v = json!({
        "apiVersion": "velero.io/v2alpha1", "kind": "DataDownload",
        "metadata": {"name": "r1-x", "namespace": "velero", "uid": "d1", "resourceVersion": "7",
            "creationTimestamp": ago(1)},
        "spec": {"targetVolume": {"pvc": "data", "pv": "", "namespace": "app"},
            "backupStorageLocation": "default", "datamover": "ferry",
            "snapshotID": "ab".repeat(32), "sourceNamespace": "app", "operationTimeout": "10m0s"},
        "status": status,
    });
    edit(&mut v);
    serde_json::from_value(v).expect("dd")
}

/// Replaces echo what was sent; everything else is 404 unless `route` answers.
pub fn echo_or(
    route: impl Fn(&Seen) -> Option<http::Response<kube::client::Body>> + Send + 'static,
) -> impl Fn(&Seen) -> http::Response<kube::client::Body> + Send + 'static {
    move |s| {
        if let Some(r) = route(s) {
            return r;
        }
        match s.method {
            Method::PUT | Method::PATCH => ok(s.body.clone()),
            _ => failure(404, "NotFound"),
        }
    }
}

/// A watch cache that has listed `items` (ready, as after the first listing).
pub fn filled<K>(items: Vec<K>) -> kube::runtime::reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    use kube::runtime::watcher::Event;
    let (store, mut writer) = kube::runtime::reflector::store();
    writer.apply_watcher_event(&Event::Init);
    for i in items {
        writer.apply_watcher_event(&Event::InitApply(i));
    }
    writer.apply_watcher_event(&Event::InitDone);
    store
}

/// Filled watch caches holding `uploads`, no DataDownloads, no mover pods and one Ready node, `node-a`.
pub fn caches(uploads: Vec<DataUpload>) -> Caches {
    Caches {
        uploads: filled(uploads),
        downloads: filled(Vec::<DataDownload>::new()),
        pods: filled(Vec::new()),
        nodes: filled(vec![ready_node("node-a")]),
    }
}

/// A Ready, schedulable node.
pub fn ready_node(name: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
    .expect("node")
}
