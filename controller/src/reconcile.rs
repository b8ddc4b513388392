//! The phase machine, written once for DataUpload and DataDownload:
//! New → Accepted → Prepared → InProgress → Completed | Failed | Canceled (via Canceling).
//!
//! `reconcile` is thin: it drops CRs that are not ours, then dispatches on the phase to idempotent steps.
//! Every status change is a conflict-checked replace of the whole CR (DU/DD have no status subresource); a
//! 409 means someone else wrote first, and the next reconcile decides again from fresh data. The outcome is
//! read from the mover pod, never from events. The steps live in [`crate::phases`]; what differs between
//! backup and restore lives behind [`Flow`] (`upload.rs`, `download.rs`).
//!
//! Before any step the spec is validated ([`crate::validate`]); a step that fails with an error retrying
//! cannot fix, or keeps failing past the prepare timeout, ends the CR `Failed` with the error (see
//! [`after_error`]). Every wait is bounded: the prepare timeout, the operation timeout, and in InProgress
//! the no-progress timeout.

use std::sync::Arc;

use ferry_proto::labels::FINALIZER;
use ferry_proto::velero::Phase;
use kube::ResourceExt;
use kube::runtime::controller::Action;

use crate::clock;
use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::{Error, Result};
use crate::flow::{Flow, fail, prepare_timed_out};
use crate::phases::{accept, cancel, finish, prepare, start, watch};

/// Reconciles one CR.
pub async fn reconcile<K: Flow>(cr: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    if ctx.config.mover(cr.datamover()).is_none() {
        return Ok(Action::await_change());
    }
    let phase = cr.phase();
    if phase.is_terminal() {
        return finish(&*cr, &ctx).await;
    }
    let deleting = cr.meta().deletion_timestamp.is_some();
    if phase == Phase::New && deleting && !cr.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    if cr.cancel_requested() || deleting || phase == Phase::Canceling {
        return cancel(&*cr, &ctx, deleting).await;
    }
    if let Err(invalid) = cr.validate() {
        return fail(&ctx, &*cr, invalid.to_string()).await;
    }
    let out = match phase {
        Phase::New => accept(&*cr, &ctx).await,
        Phase::Accepted => prepare(&*cr, &ctx).await,
        Phase::Prepared => start(&*cr, &ctx).await,
        Phase::InProgress => watch(&*cr, &ctx).await,
        _ => Ok(Action::await_change()),
    };
    match out {
        Err(e) => match after_error(&*cr, &ctx, &e) {
            AfterError::Fail(message) => fail(&ctx, &*cr, message).await,
            AfterError::Retry => Err(e),
        },
        ok => ok,
    }
}

/// What a failed step means for a non-terminal CR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterError {
    /// Try again later (with backoff): the error may go away.
    Retry,
    /// End the CR `Failed` with this message.
    Fail(String),
}

/// Decides [`AfterError`]: errors retrying cannot fix fail the CR at once; in Accepted, any other error
/// (but a conflict) fails it once the prepare timeout has passed, so no CR holds a prepare slot for ever.
pub fn after_error<K: MoverCr>(cr: &K, ctx: &Context, e: &Error) -> AfterError {
    let doing = match cr.phase() {
        Phase::New => "accepting",
        Phase::Accepted => "preparing the data path",
        _ => "running the data path",
    };
    if e.is_permanent() {
        return AfterError::Fail(format!("{doing} failed: {}", e.describe()));
    }
    let waited = clock::since_text(cr.accepted_timestamp()).unwrap_or_default();
    if cr.phase() == Phase::Accepted && !e.is_conflict() && waited >= ctx.config.prepare_timeout() {
        return AfterError::Fail(prepare_timed_out(ctx, &e.describe()));
    }
    AfterError::Retry
}

#[cfg(test)]
mod tests {
    //! The phase machine against kube's mock service: every request the controller makes is checked.
    use super::*;
    use crate::clock::now;
    use crate::testing::{ctx, failure, ok};
    use ferry_proto::velero::DataUpload;
    use serde_json::json;
    use std::time::Duration;

    fn du(datamover: &str, status: serde_json::Value) -> DataUpload {
        serde_json::from_value(json!({
            "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
            "metadata": {"name": "b1-x", "namespace": "velero", "uid": "u1", "resourceVersion": "7"},
            "spec": {"snapshotType": "CSI", "csiSnapshot": {"volumeSnapshot": "vs", "storageClass": "sc"},
                "sourcePVC": "p", "datamover": datamover, "backupStorageLocation": "default",
                "sourceNamespace": "app", "operationTimeout": "10m0s"},
            "status": status,
        }))
        .expect("du")
    }

    #[tokio::test]
    async fn foreign_mover_is_never_touched() {
        let (ctx, mut handle) = ctx();
        let action = reconcile(Arc::new(du("acme", json!(null))), ctx)
            .await
            .expect("reconcile");
        assert_eq!(action, Action::await_change());
        // No request was made (the client is gone, or nothing arrives).
        assert!(!matches!(
            tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await,
            Ok(Some(_))
        ));
    }

    #[tokio::test]
    async fn new_is_claimed_with_a_conflict_checked_replace() {
        let (ctx, mut handle) = ctx();
        // The prepare queue is counted in the watch caches: the claim is the only request.
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("replace request");
            assert_eq!(req.method(), http::Method::PUT);
            assert!(
                req.uri()
                    .path()
                    .ends_with("/namespaces/velero/datauploads/b1-x")
            );
            assert!(
                req.uri()
                    .query()
                    .unwrap_or("")
                    .contains("fieldManager=ferry-controller")
            );
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .expect("body")
                .to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&body).expect("json body");
            assert_eq!(
                sent["metadata"]["resourceVersion"], "7",
                "replace must carry the read version"
            );
            assert_eq!(sent["status"]["phase"], "Accepted");
            assert_eq!(sent["status"]["acceptedByNode"], "node-a");
            assert_eq!(sent["metadata"]["finalizers"][0], FINALIZER);
            send.send_response(ok(sent));
        });
        reconcile(Arc::new(du("ferry", json!({"phase": ""}))), ctx)
            .await
            .expect("reconcile");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn cancel_in_new_goes_straight_to_canceled() {
        let (ctx, mut handle) = ctx();
        let mut cr = du("ferry", json!(null));
        cr.spec.cancel = Some(true);
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("replace request");
            assert_eq!(req.method(), http::Method::PUT);
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .expect("body")
                .to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&body).expect("json body");
            assert_eq!(sent["status"]["phase"], "Canceled");
            assert!(sent["status"]["completionTimestamp"].is_string());
            assert!(sent["status"]["startTimestamp"].is_string());
            send.send_response(ok(sent));
        });
        reconcile(Arc::new(cr), ctx).await.expect("reconcile");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_conflict_is_reported_for_a_fresh_retry() {
        let (ctx, mut handle) = ctx();
        let mut cr = du("ferry", json!(null));
        cr.spec.cancel = Some(true);
        let server = tokio::spawn(async move {
            let (_req, send) = handle.next_request().await.expect("replace request");
            send.send_response(failure(409, "Conflict"));
        });
        let err = reconcile(Arc::new(cr), ctx).await.expect_err("conflict");
        assert!(err.is_conflict(), "{err}");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_stale_cache_entry_creates_nothing() {
        let (ctx, mut handle) = ctx();
        let cr = du(
            "ferry",
            json!({"phase": "Accepted", "acceptedTimestamp": now()}),
        );
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("pod lookup");
            assert!(
                req.uri().path().ends_with("/pods/ferry-b1-x"),
                "{}",
                req.uri()
            );
            send.send_response(failure(404, "NotFound"));
            let (req, send) = handle.next_request().await.expect("quorum read");
            assert_eq!(req.method(), http::Method::GET);
            assert!(req.uri().path().ends_with("/datauploads/b1-x"));
            let mut newer =
                serde_json::to_value(du("ferry", json!({"phase": "Completed"}))).expect("json");
            newer["metadata"]["resourceVersion"] = json!("9");
            send.send_response(ok(newer));
            // Nothing else: no snapshot clone, PVC or pod from the stale entry.
            assert!(!matches!(
                tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await,
                Ok(Some(_))
            ));
        });
        let action = reconcile(Arc::new(cr), ctx).await.expect("reconcile");
        assert_eq!(action, Action::requeue(Duration::from_millis(200)));
        server.await.expect("server");
    }

    /// Behind a full queue a CR waits in line at no API cost but its waiting note (the queue is counted in
    /// the watch caches); when the CR holding the place moves on, the waiting one is woken at once and
    /// accepted, although the caches still show the other CR Prepared.
    #[tokio::test]
    async fn a_cr_behind_a_full_queue_is_woken_and_accepted_when_a_place_frees() {
        use crate::testing::{caches, ctx_leading, du as du_of, echo_or, serve};
        use futures::StreamExt;
        use kube::runtime::reflector::ObjectRef;
        let config = crate::config::Config {
            prepare_queue_length: 1,
            ..Default::default()
        };
        let holder = du_of(
            json!({"phase": "Prepared", "acceptedTimestamp": now()}),
            |v| {
                v["metadata"]["name"] = json!("holder");
                v["metadata"]["uid"] = json!("holder");
            },
        );
        let (ctx, handle) = ctx_leading(config, caches(vec![holder.clone()]));
        let (mut woken, _) = ctx.wake.triggers().expect("triggers").into_streams();
        let server = serve(handle, echo_or(|_| None));
        let waiting = Arc::new(du("ferry", json!(null)));

        let action = reconcile(waiting.clone(), ctx.clone()).await.expect("wait");
        assert_eq!(action, Action::requeue(crate::admission::REQUEUE));
        // Prepared → InProgress frees the place; the cache still shows the holder Prepared.
        start(&holder, &ctx).await.expect("start");
        assert_eq!(
            woken.next().await,
            Some(ObjectRef::new("b1-x").within("velero"))
        );
        let action = reconcile(waiting, ctx.clone()).await.expect("accept");
        assert_eq!(action, Action::requeue(Duration::from_millis(50)));
        drop(ctx);

        let seen = server.await.expect("server");
        let writes: Vec<_> = seen
            .iter()
            .map(|s| {
                let phase = s.body["status"]["phase"].as_str().unwrap_or("New");
                (
                    s.method.as_str(),
                    if phase.is_empty() { "New" } else { phase },
                )
            })
            .collect();
        // the waiting note, the holder's start, the acceptance: no list, no other request
        assert_eq!(
            writes,
            [("PUT", "New"), ("PUT", "InProgress"), ("PUT", "Accepted")]
        );
        assert!(
            seen[0].body["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("prepareQueueLength 1"))
        );
    }
}
