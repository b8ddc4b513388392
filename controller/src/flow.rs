//! The state machine both flows share: the [`Flow`] trait (what differs between backup and restore) and
//! the writes every step makes to the CR: conflict-checked replaces, waiting notes, terminal phases, and
//! [`settle`], which turns a step's [`Step`] outcome into them.

use std::time::Duration;

use ferry_proto::datapath::agent::agent_job::Call;
use ferry_proto::datapath::{Repository, Volume};
use ferry_proto::velero::Phase;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use serde::de::DeserializeOwned;

use crate::admission::holds_place;
use crate::clock;
use crate::context::{Context, FIELD_MANAGER};
use crate::cr::MoverCr;
use crate::error::Result;
use crate::expose::Exposure;
use crate::objects;
use crate::step::Step;
use crate::validate::Spec;
use crate::wake::Slot;

/// Annotation on a CR: when the controller last saw its progress move (RFC 3339).
pub const PROGRESS_AT_ANNOTATION: &str = "ferry.dev/progress-at";

/// What differs between backup and restore.
pub trait Flow: MoverCr + Spec {
    /// The result document the mover writes to its termination message on success.
    type Outcome: DeserializeOwned + Send;
    /// Whether the CR may be accepted yet (restore waits for its target PVC).
    fn admissible(&self, ctx: &Context) -> impl Future<Output = Result<Step>> + Send;
    /// Creates (idempotently) what the mover pod needs: the volume it mounts.
    fn expose(&self, ctx: &Context) -> impl Future<Output = Result<Step<Exposure>>> + Send;
    /// The data-path call of the mover pod (a Backup or Restore request) on `repository` and `volume`.
    fn call(&self, repository: Repository, volume: Volume) -> Call;
    /// The mover succeeded on `node` with `outcome` (`message`, as it wrote it): Done with the CR as it is
    /// to be Completed; Wait while something remains (restore: handing the volume over); Fail.
    fn complete(
        &self,
        ctx: &Context,
        node: &str,
        message: &str,
        outcome: Self::Outcome,
    ) -> impl Future<Output = Result<Step<Self>>> + Send;
    /// The mover's result stored on the CR while the pod is gone on purpose (restore rebinding), if any.
    fn stored_result(&self) -> Option<String> {
        None
    }
    /// Deletes what expose and the mover made; returns how many objects were still there.
    fn cleanup(&self, ctx: &Context) -> impl Future<Output = Result<usize>> + Send;
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
        ctx.admission
            .wrote(&out.uid().unwrap_or_default(), next.phase());
        if holds_place(cr.phase()) && !holds_place(next.phase()) {
            ctx.wake.freed(Slot::Prepare);
        }
        ctx.metrics.transition(&K::kind(&()), next.phase());
        tracing::info!(kind = %K::kind(&()), name = %cr.name_any(), from = ?cr.phase(), to = ?next.phase(),
            status_message = next.message().unwrap_or(""), "phase");
    }
    Ok(out)
}

/// Moves the CR to a terminal phase with `message`; cleanup and finalizer removal follow in
/// `phases::finish`.
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
        let now = clock::now();
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
    // Its mover pod's slot, if it had one, frees when the pod has ended: the mover-pod watch wakes the next
    // CR then (`placement::SlotWatch`).
    if let Some(d) = clock::since_text(started.as_deref()) {
        ctx.metrics.duration(&K::kind(&()), phase, d.as_secs_f64());
    }
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// Deletes the pods and PVCs made for a CR in its namespace; returns how many were still there.
pub async fn delete_pods_and_pvcs<K: MoverCr>(ctx: &Context, cr: &K) -> Result<usize> {
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

/// Where a step leads: Done → `next`; Wait → the reason noted in `status.message` (once the prepare
/// timeout has passed in Accepted, Failed instead); Fail → Failed.
pub async fn settle<K: MoverCr>(ctx: &Context, cr: &K, step: Step, next: Action) -> Result<Action> {
    match step {
        Step::Done(()) => Ok(next),
        Step::Wait { reason, requeue } => {
            let waited = clock::since_text(cr.accepted_timestamp()).unwrap_or_default();
            if cr.phase() == Phase::Accepted && waited >= ctx.config.prepare_timeout() {
                return fail(ctx, cr, prepare_timed_out(ctx, &reason)).await;
            }
            note(ctx, cr, &reason).await?;
            Ok(Action::requeue(requeue))
        }
        Step::Fail(message) => fail(ctx, cr, message).await,
    }
}

/// The Failed message of a CR still preparing after the prepare timeout.
pub fn prepare_timed_out(ctx: &Context, why: &str) -> String {
    format!(
        "timed out after {}s preparing the data path: {why}",
        ctx.config.prepare_timeout().as_secs()
    )
}

/// Sets a waiting message (not a transition).
pub async fn note<K: MoverCr>(ctx: &Context, cr: &K, why: &str) -> Result<()> {
    if cr.message() != Some(why) {
        update(ctx, cr, |c| *c.common().message = Some(why.to_string())).await?;
    }
    Ok(())
}

/// After two minutes of waiting for deletions, stop holding the finalizer (they were all requested).
pub fn cleanup_overdue<K: MoverCr>(cr: &K) -> bool {
    let done = cr.clone().common().completion_timestamp.clone();
    let overdue = clock::since_text(done.as_deref()).is_some_and(|d| d.as_secs() > 120);
    if overdue {
        tracing::warn!(name = %cr.name_any(), "objects still terminating after 2 minutes; releasing the CR");
    }
    overdue
}

#[cfg(test)]
mod tests {
    //! What the flow's writes log.
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};

    use super::*;
    use crate::testing::{ctx, du, echo_or, serve};

    /// Where a JSON log layer writes, for the test to read.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("logs").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;
        fn make_writer(&'a self) -> Logs {
            self.clone()
        }
    }

    /// The controller logs JSON (one object per line); a phase change's line must keep its own message
    /// ("phase") and the CR's status message under another key: a field named `message` made two
    /// "message" keys, and a JSON reader kept the status message and lost which event it was.
    #[tokio::test]
    async fn a_phase_change_logs_one_json_object_a_reader_reads_whole() {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(logs.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let (ctx, handle) = ctx();
        let server = serve(handle, echo_or(|_| None));
        let cr = du(json!({"phase": "InProgress"}), |_| {});
        update(&ctx, &cr, |c| {
            let s = c.common();
            *s.phase = Phase::Completed;
            *s.message = Some("volume was empty so no data was upload".into());
        })
        .await
        .expect("update");
        drop(ctx);
        server.await.expect("server");
        let out = String::from_utf8(logs.0.lock().expect("logs").clone()).expect("utf-8");
        let line = out
            .lines()
            .find(|l| l.contains("\"to\""))
            .unwrap_or_else(|| panic!("no phase line in {out}"));
        let v: Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["fields"]["message"], "phase", "{line}");
        assert_eq!(v["fields"]["to"], "Completed", "{line}");
        assert_eq!(
            v["fields"]["status_message"], "volume was empty so no data was upload",
            "{line}"
        );
        assert_eq!(line.matches("\"message\"").count(), 1, "{line}");
    }
}
