//! The state machine both flows share: the [`Flow`] trait (what differs between backup and restore) and
//! the writes every step makes to the CR: conflict-checked replaces, waiting notes, terminal phases.

use std::time::Duration;

use ferry_proto::velero::Phase;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::controller::Action;

use crate::context::{Context, FIELD_MANAGER};
use crate::cr::MoverCr;
use crate::error::Result;
use crate::expose::Exposed;
use crate::objects;
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
    /// The mover's result stored on the CR while the pod is gone on purpose (restore rebinding), if any.
    fn stored_result(&self) -> Option<String> {
        None
    }
    /// Deletes what expose made. Returns true once nothing is left.
    fn cleanup(&self, ctx: &Context) -> impl Future<Output = Result<bool>> + Send;
}

/// Now, RFC 3339 as Velero writes it.
pub fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// How long ago an RFC 3339 time was.
pub fn age(ts: Option<&str>) -> Option<Duration> {
    let t: Timestamp = ts?.parse().ok()?;
    let secs = Timestamp::now().duration_since(t).as_secs();
    Some(Duration::from_secs(secs.max(0) as u64))
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

/// Ends the CR `Failed` with `message`.
pub async fn fail<K: MoverCr>(ctx: &Context, cr: &K, message: String) -> Result<Action> {
    terminal(ctx, cr, Phase::Failed, Some(message), |_| {}).await
}

/// Sets a waiting message (not a transition).
pub async fn note<K: MoverCr>(ctx: &Context, cr: &K, why: &str) -> Result<()> {
    if cr.message() != Some(why) {
        update(ctx, cr, |c| *c.common().message = Some(why.to_string())).await?;
    }
    Ok(())
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
