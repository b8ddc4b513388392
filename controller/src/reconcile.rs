//! The phase machine, written once for DataUpload and DataDownload:
//! New → Accepted → Prepared → InProgress → Completed | Failed | Canceled (via Canceling).
//!
//! `reconcile` is thin: it drops CRs that are not ours, then dispatches on the phase to idempotent steps.
//! Every status change is a conflict-checked replace of the whole CR (DU/DD have no status subresource); a
//! 409 means someone else wrote first, and the next reconcile decides again from fresh data. The outcome is
//! read from the mover pod, never from events. What differs between backup and restore lives behind
//! [`Flow`] (`upload.rs`, `download.rs`).
//!
//! Before any step the spec is validated ([`crate::validate`]); a step that fails with an error retrying
//! cannot fix, or keeps failing past the prepare timeout, ends the CR `Failed` with the error (see
//! [`after_error`]). Every wait is bounded: the prepare timeout, the operation timeout, and in InProgress
//! the no-progress timeout.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::labels::FINALIZER;
use ferry_proto::velero::Phase;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::controller::Action;

use crate::context::{Context, FIELD_MANAGER};
use crate::cr::MoverCr;
use crate::error::{Error, Result};
use crate::objects::{self, child_name};
use crate::pod::{self, PodPlan, PodState};
use crate::validate::Spec;

/// Annotation on a CR: when the controller last saw its progress move (RFC 3339).
pub const PROGRESS_AT_ANNOTATION: &str = "ferry.dev/progress-at";

/// Whether a CR may be accepted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Accept it now.
    Admit,
    /// Not yet; the reason goes to `status.message` while waiting.
    Wait(String),
    /// Never: fail it with this message.
    Refuse(String),
}

/// What expose found.
#[derive(Debug)]
pub enum Exposed {
    /// Not ready; the reason goes to `status.message` while waiting.
    Waiting(String),
    /// Ready: mount this PVC (block or filesystem), on one of `nodes` (any when empty).
    Ready {
        /// PVC to mount.
        pvc: String,
        /// Block mode.
        block: bool,
        /// Allowed nodes.
        nodes: Vec<String>,
        /// Mover arguments after `pod backup|restore` (the pod adds `--block` itself).
        args: Vec<String>,
    },
    /// Cannot work; fail with this message.
    Failed(String),
}

/// What differs between backup and restore.
pub trait Flow: MoverCr + Spec {
    /// Whether the CR may be accepted yet (restore waits for its target PVC).
    fn admissible(&self, ctx: &Context) -> impl Future<Output = Result<Admission>> + Send;
    /// Creates (idempotently) what the mover pod needs.
    fn expose(&self, ctx: &Context) -> impl Future<Output = Result<Exposed>> + Send;
    /// The pod succeeded with `message` (the result JSON): finish the CR (restore rebinds first).
    fn complete(
        &self,
        ctx: &Context,
        node: &str,
        message: &str,
    ) -> impl Future<Output = Result<Action>> + Send;
    /// Deletes what expose made. Returns true once nothing is left.
    fn cleanup(&self, ctx: &Context) -> impl Future<Output = Result<bool>> + Send;
}

/// Now, RFC 3339 as Velero writes it.
pub fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn age(ts: Option<&str>) -> Option<Duration> {
    let t: Timestamp = ts?.parse().ok()?;
    let secs = Timestamp::now().duration_since(t).as_secs();
    Some(Duration::from_secs(secs.max(0) as u64))
}

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
    let waited = age(cr.accepted_timestamp()).unwrap_or_default();
    if cr.phase() == Phase::Accepted && !e.is_conflict() && waited >= ctx.config.prepare_timeout() {
        return AfterError::Fail(prepare_timed_out(ctx, &e.describe()));
    }
    AfterError::Retry
}

fn prepare_timed_out(ctx: &Context, why: &str) -> String {
    format!(
        "timed out after {}s preparing the data path: {why}",
        ctx.config.prepare_timeout().as_secs()
    )
}

/// Replaces the CR with `f` applied, checked against the resourceVersion read. No-op if nothing changed.
pub async fn update<K: MoverCr>(ctx: &Context, cr: &K, f: impl FnOnce(&mut K)) -> Result<K> {
    let mut next = cr.clone();
    f(&mut next);
    let same = serde_json::to_value(&next).ok() == serde_json::to_value(cr).ok();
    if same {
        return Ok(next);
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let out = api.replace(&cr.name_any(), &pp, &next).await?;
    if next.phase() != cr.phase() {
        ctx.metrics
            .transition(&K::kind(&()), &format!("{:?}", next.phase()));
        tracing::info!(kind = %K::kind(&()), name = %cr.name_any(), from = ?cr.phase(), to = ?next.phase(),
            message = next.message().unwrap_or(""), "phase");
    }
    Ok(out)
}

/// Moves the CR to a terminal phase with `message`; cleanup and finalizer removal follow in [`finish`].
pub async fn terminal<K: MoverCr>(
    ctx: &Context,
    cr: &K,
    phase: Phase,
    message: Option<String>,
    extra: impl FnOnce(&mut K),
) -> Result<Action> {
    debug_assert!(phase.is_terminal());
    let started = cr.accepted_timestamp().map(str::to_string);
    update(ctx, cr, |c| {
        extra(c);
        let now = now();
        let s = c.common();
        *s.phase = phase;
        if message.is_some() {
            *s.message = message;
        }
        if s.start_timestamp.is_none() {
            *s.start_timestamp = Some(now.clone());
        }
        *s.completion_timestamp = Some(now);
    })
    .await?;
    if let Some(d) = age(started.as_deref()) {
        ctx.metrics.duration(
            &K::kind(&()),
            &format!("{phase:?}").to_lowercase(),
            d.as_secs_f64(),
        );
    }
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// The mover's result JSON, or the Failed transition for an unreadable one.
pub async fn parse_result<K: MoverCr, R: serde::de::DeserializeOwned>(
    ctx: &Context,
    cr: &K,
    message: &str,
) -> Result<std::result::Result<R, Action>> {
    match serde_json::from_str(message) {
        Ok(r) => Ok(Ok(r)),
        Err(e) => Ok(Err(fail(
            ctx,
            cr,
            format!("the mover exited 0 but its result is unreadable ({e}): {message:?}"),
        )
        .await?)),
    }
}

/// Deletes the pods and PVCs made for a CR in its namespace; returns how many were still there.
pub async fn delete_pods_and_pvcs<K: MoverCr>(ctx: &Context, cr: &K) -> Result<usize> {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let ns = cr.namespace().unwrap_or_default();
    let sel = objects::owner_selector(cr);
    Ok(
        objects::delete_selected(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &sel).await?
            + objects::delete_selected(
                &Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns),
                &sel,
            )
            .await?,
    )
}

async fn fail<K: MoverCr>(ctx: &Context, cr: &K, message: String) -> Result<Action> {
    terminal(ctx, cr, Phase::Failed, Some(message), |_| {}).await
}

/// Terminal: clean up, then drop the finalizer. Never changes the phase again.
async fn finish<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    if !cr.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    if !cr.cleanup(ctx).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    update(ctx, cr, |c| c.finalizers_mut().retain(|f| f != FINALIZER)).await?;
    Ok(Action::await_change())
}

/// New → Accepted (claim), within the prepare queue.
async fn accept<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    match cr.admissible(ctx).await? {
        Admission::Refuse(msg) => return fail(ctx, cr, msg).await,
        Admission::Wait(why) => {
            note(ctx, cr, &why).await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        Admission::Admit => {}
    }
    let preparing = count_preparing(ctx).await?;
    if preparing >= ctx.config.prepare_queue_length {
        let why = format!(
            "waiting for a prepare slot (prepareQueueLength {})",
            ctx.config.prepare_queue_length
        );
        note(ctx, cr, &why).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let node = ctx.identity.node.clone();
    update(ctx, cr, |c| {
        if !c.finalizers().iter().any(|f| f == FINALIZER) {
            c.finalizers_mut().push(FINALIZER.into());
        }
        let s = c.common();
        *s.phase = Phase::Accepted;
        *s.accepted_by_node = Some(node);
        *s.accepted_timestamp = Some(now());
        *s.message = None;
    })
    .await?;
    Ok(Action::requeue(Duration::from_millis(50)))
}

/// CRs of ours in Accepted or Prepared, cluster-wide (the prepare queue).
async fn count_preparing(ctx: &Context) -> Result<usize> {
    use ferry_proto::velero::{DataDownload, DataUpload};
    let lp = ListParams::default();
    let (du, dd): (Api<DataUpload>, Api<DataDownload>) = match &ctx.config.watch_namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let busy = |p: Phase| matches!(p, Phase::Accepted | Phase::Prepared);
    let mut n = 0;
    for d in du.list(&lp).await?.items {
        n += usize::from(ctx.config.mover(d.datamover()).is_some() && busy(d.phase()));
    }
    for d in dd.list(&lp).await?.items {
        n += usize::from(ctx.config.mover(d.datamover()).is_some() && busy(d.phase()));
    }
    Ok(n)
}

async fn get_pod<K: MoverCr>(ctx: &Context, cr: &K) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let p = objects::get_opt(&pods, &child_name(cr)).await?;
    // A pod of the same name left by an earlier CR of the same name is not ours.
    Ok(p.filter(|p| p.labels().get(ferry_proto::labels::OWNER_UID) == cr.uid().as_ref()))
}

/// Accepted: expose, create the mover pod, wait until it runs (→ Prepared), within the prepare timeout.
async fn prepare<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    let waited = age(cr.accepted_timestamp()).unwrap_or_default();
    let timeout = ctx.config.prepare_timeout();
    let timed_out = |why: &str| prepare_timed_out(ctx, why);
    if let Some(p) = get_pod(ctx, cr).await? {
        return match pod::state(&p) {
            PodState::Running { node } | PodState::Succeeded { node, .. } => {
                update(ctx, cr, |c| {
                    let s = c.common();
                    *s.phase = Phase::Prepared;
                    *s.node = Some(node);
                    *s.message = None;
                })
                .await?;
                Ok(Action::requeue(Duration::from_millis(50)))
            }
            PodState::Failed { message, canceled } => {
                if canceled {
                    terminal(ctx, cr, Phase::Canceled, Some(message), |_| {}).await
                } else {
                    fail(ctx, cr, message).await
                }
            }
            PodState::Pending { fatal: Some(f), .. } => fail(ctx, cr, f).await,
            PodState::Pending { waiting, .. } => {
                let why = waiting.unwrap_or_else(|| "mover pod pending".into());
                if waited >= timeout {
                    return fail(ctx, cr, timed_out(&why)).await;
                }
                note(ctx, cr, &why).await?;
                Ok(Action::requeue(Duration::from_secs(2)))
            }
        };
    }
    // Expose and the pod create objects: act only on the CR as the API server has it now, never on a
    // cache entry that may trail a completion and cleanup that already happened.
    if !is_current(ctx, cr).await? {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let exposed = cr.expose(ctx).await?;
    let (pvc, block, nodes, args) = match exposed {
        Exposed::Failed(m) => return fail(ctx, cr, m).await,
        Exposed::Waiting(why) => {
            if waited >= timeout {
                return fail(ctx, cr, timed_out(&why)).await;
            }
            note(ctx, cr, &why).await?;
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        Exposed::Ready {
            pvc,
            block,
            nodes,
            args,
        } => (pvc, block, nodes, args),
    };
    let repo = match objects::repo_target(ctx, cr).await? {
        Ok(r) => r,
        Err(m) => return fail(ctx, cr, m).await,
    };
    let mover = ctx
        .config
        .mover(cr.datamover())
        .cloned()
        .ok_or_else(|| Error::Invalid("mover vanished from the configuration".into()))?;
    let _slot = ctx.placement.lock().await;
    let allowed = (!nodes.is_empty()).then_some(nodes.as_slice());
    let free = objects::free_nodes(ctx, allowed).await?;
    if free.is_empty() {
        let why = format!(
            "waiting for a free mover slot (perNodeLimit {})",
            ctx.config.per_node_limit
        );
        if waited >= timeout {
            return fail(ctx, cr, timed_out(&why)).await;
        }
        note(ctx, cr, &why).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let plan = PodPlan {
        name: child_name(cr),
        namespace: cr.namespace().unwrap_or_default(),
        labels: objects::owner_labels(cr),
        owner: objects::owner_ref(cr),
        direction: K::DIRECTION,
        op: match K::DIRECTION {
            crate::cr::Direction::Backup => "backup".into(),
            crate::cr::Direction::Restore => "restore".into(),
        },
        mover,
        pvc: Some(pvc),
        block,
        nodes: free,
        repo,
        password_secret: ctx.config.repository_password_secret.clone(),
        args,
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    objects::create_idempotent(&pods, &pod::build(&plan, &ctx.config)).await?;
    note(ctx, cr, "mover pod created").await?;
    Ok(Action::requeue(Duration::from_millis(500)))
}

/// Whether `cr` is the API server's current version of the object (a quorum read).
async fn is_current<K: MoverCr>(ctx: &Context, cr: &K) -> Result<bool> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    Ok(match api.get_opt(&cr.name_any()).await? {
        Some(now) => now.resource_version() == cr.resource_version(),
        None => false,
    })
}

/// Sets a waiting message (not a transition).
async fn note<K: MoverCr>(ctx: &Context, cr: &K, why: &str) -> Result<()> {
    if cr.message() != Some(why) {
        update(ctx, cr, |c| *c.common().message = Some(why.to_string())).await?;
    }
    Ok(())
}

/// Prepared → InProgress.
async fn start<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    let direction = K::DIRECTION;
    update(ctx, cr, |c| {
        let s = c.common();
        *s.phase = Phase::InProgress;
        if s.start_timestamp.is_none() {
            *s.start_timestamp = Some(now());
        }
        let _ = direction;
    })
    .await?;
    Ok(Action::requeue(Duration::from_millis(50)))
}

/// InProgress: follow progress events; decide the outcome from the pod.
async fn watch<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    let Some(p) = get_pod(ctx, cr).await? else {
        // A restore that already has its result stored is rebinding; the pod is gone on purpose.
        if let Some(result) = cr
            .annotations()
            .get(crate::download::RESULT_ANNOTATION)
            .cloned()
        {
            let node = cr.clone().common().node.clone().unwrap_or_default();
            return cr.complete(ctx, &node, &result).await;
        }
        return fail(
            ctx,
            cr,
            format!(
                "mover pod {} disappeared while the data path was running (deleted or its node was lost)",
                child_name(cr)
            ),
        )
        .await;
    };
    let state = pod::state(&p);
    if p.metadata.deletion_timestamp.is_some() && !matches!(state, PodState::Succeeded { .. }) {
        return fail(
            ctx,
            cr,
            format!(
                "mover pod {} was deleted while the data path was running",
                child_name(cr)
            ),
        )
        .await;
    }
    match state {
        PodState::Succeeded { node, message } => cr.complete(ctx, &node, &message).await,
        PodState::Failed { message, canceled } => {
            let phase = if canceled {
                Phase::Canceled
            } else {
                Phase::Failed
            };
            let message = if canceled {
                message
            } else {
                format!("data path failed: {message}")
            };
            terminal(ctx, cr, phase, Some(message), |_| {}).await
        }
        _ => {
            if follow_progress(cr, ctx).await? {
                return Ok(Action::requeue(Duration::from_secs(10)));
            }
            match ctx.config.no_progress_timeout() {
                Some(limit) if stalled_for(cr, &p) >= limit => {
                    fail(ctx, cr, no_progress_message(limit)).await
                }
                _ => Ok(Action::requeue(Duration::from_secs(10))),
            }
        }
    }
}

/// How long since the data path last moved: since the last progress seen, else since the mover pod
/// started, else since the CR started.
fn stalled_for<K: MoverCr>(cr: &K, pod: &Pod) -> Duration {
    let stamp = |s: Option<&str>| s.and_then(|s| s.parse::<Timestamp>().ok());
    let last = stamp(
        cr.annotations()
            .get(PROGRESS_AT_ANNOTATION)
            .map(String::as_str),
    )
    .or_else(|| pod.status.as_ref()?.start_time.as_ref().map(|t| t.0))
    .or_else(|| stamp(cr.clone().common().start_timestamp.as_deref()));
    last.map(|t| {
        let secs = Timestamp::now().duration_since(t).as_secs();
        Duration::from_secs(secs.max(0) as u64)
    })
    .unwrap_or_default()
}

/// The Failed message of a CR that made no progress for `limit`; the mover pod goes with its cleanup.
fn no_progress_message(limit: Duration) -> String {
    let secs = limit.as_secs();
    let span = if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    };
    format!("no progress for {span} (noProgressTimeoutSeconds {secs}); the mover was stopped")
}

/// Copies the newest progress report from the mover's events into `status.progress` (monotonic), and
/// stamps [`PROGRESS_AT_ANNOTATION`] when it moved. Returns whether it moved.
pub async fn follow_progress<K: MoverCr>(cr: &K, ctx: &Context) -> Result<bool> {
    let events: Api<Event> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let list = events
        .list(&ListParams::default().labels(&objects::owner_selector(cr)))
        .await?;
    let mut best = cr.progress().cloned().unwrap_or_default();
    let before = best.clone();
    for e in list.items {
        let Some(a) = e.annotations().get(ferry_proto::report::REPORT_ANNOTATION) else {
            continue;
        };
        let Ok(r) = ferry_proto::report::Report::from_annotation(a) else {
            continue;
        };
        best.total_bytes = best.total_bytes.max(r.total_bytes as i64);
        best.bytes_done = best.bytes_done.max(r.done_bytes as i64);
    }
    if best == before {
        return Ok(false);
    }
    update(ctx, cr, |c| {
        c.annotations_mut()
            .insert(PROGRESS_AT_ANNOTATION.into(), now());
        *c.common().progress = Some(best);
    })
    .await?;
    Ok(true)
}

/// Cancel (spec.cancel or deletion) in any non-terminal phase; Canceled once the pod is gone or ended.
async fn cancel<K: Flow>(cr: &K, ctx: &Context, deleting: bool) -> Result<Action> {
    let why = if deleting {
        "canceled because the CR is being deleted"
    } else {
        "canceled"
    };
    if cr.phase() == Phase::New {
        return terminal(ctx, cr, Phase::Canceled, Some(why.into()), |_| {}).await;
    }
    let pod = get_pod(ctx, cr).await?;
    let running = pod.as_ref().is_some_and(|p| {
        !matches!(
            pod::state(p),
            PodState::Succeeded { .. } | PodState::Failed { .. }
        )
    });
    if !running {
        let msg = match cr.message() {
            Some(m) if !m.is_empty() && cr.phase() != Phase::Canceling => format!("{why}: {m}"),
            _ => why.to_string(),
        };
        return terminal(ctx, cr, Phase::Canceled, Some(msg), |_| {}).await;
    }
    let p = pod.expect("running implies a pod");
    if cr.phase() != Phase::Canceling {
        update(ctx, cr, |c| {
            *c.common().phase = Phase::Canceling;
        })
        .await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    match p.metadata.deletion_timestamp.as_ref() {
        None => objects::delete_idempotent(&pods, &p.name_any(), None).await?,
        Some(t) => {
            // The mover got SIGTERM at deletion; past its grace period, stop waiting for the kubelet.
            let since = Timestamp::now().duration_since(t.0).as_secs();
            if since > ctx.config.cancel_grace_seconds + 5 {
                objects::delete_idempotent(&pods, &p.name_any(), Some(0)).await?;
                return terminal(
                    ctx,
                    cr,
                    Phase::Canceled,
                    Some(format!("{why} (mover killed)")),
                    |_| {},
                )
                .await;
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    //! The phase machine against kube's mock service: every request the controller makes is checked.
    use super::*;
    use crate::testing::{ctx, empty_list, failure, ok};
    use ferry_proto::velero::DataUpload;
    use serde_json::json;

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
        let server = tokio::spawn(async move {
            for kind in ["DataUploadList", "DataDownloadList"] {
                let (req, send) = handle.next_request().await.expect("list request");
                assert_eq!(req.method(), http::Method::GET);
                send.send_response(ok(empty_list(kind)));
            }
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
}
