//! The steps of the phase machine, one per phase, each idempotent: New → Accepted ([`accept`]), Accepted →
//! Prepared ([`prepare`]), Prepared → InProgress ([`start`]), InProgress → terminal ([`watch`]), cancel in
//! any of them ([`cancel`]), and cleanup once terminal ([`finish`]). Each returns the [`Action`] for the
//! controller; what a step found on the way is a typed [`Step`], settled by [`settle`].

use std::time::Duration;

use ferry_proto::labels::FINALIZER;
use ferry_proto::velero::Phase;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;

use crate::clock;
use crate::config::Mover;
use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::{Error, Result};
use crate::expose::Exposure;
use crate::flow::{
    Flow, PROGRESS_AT_ANNOTATION, cleanup_overdue, fail, note, settle, terminal, update,
};
use crate::objects::{self, child_name};
use crate::pod::{self, PodPlan, PodState};
use crate::proceed;
use crate::repo::RepoTarget;
use crate::step::Step;
use crate::wake::Slot;
use crate::{placement, repo};

/// How soon the next step runs after a transition.
const NEXT: Duration = Duration::from_millis(50);
/// How soon to look again at a CR waiting for a mover slot (if no slot frees before: [`crate::wake`]) or for
/// its pod to start (its pod's changes wake it before).
const SLOT_REQUEUE: Duration = Duration::from_secs(5);
/// How often an InProgress CR is looked at without news.
const WATCH_REQUEUE: Duration = Duration::from_secs(10);

/// Terminal: clean up, then drop the finalizer. Never changes the phase again.
pub async fn finish<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    ctx.memo.forget(&cr.uid().unwrap_or_default());
    if !cr.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let left = cr.cleanup(ctx).await?;
    if left > 0 && !cleanup_overdue(cr) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    update(ctx, cr, |c| c.finalizers_mut().retain(|f| f != FINALIZER)).await?;
    Ok(Action::await_change())
}

/// New → Accepted (claim), within the prepare queue ([`crate::admission`]).
pub async fn accept<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    if let Err(other) = cr.admissible(ctx).await?.done::<()>() {
        return settle(ctx, cr, other, Action::await_change()).await;
    }
    let place = match ctx.admission.place(ctx.caches(), &ctx.config).await.done() {
        Ok(place) => place,
        Err(waiting) => {
            ctx.wake.wait(Slot::Prepare, cr);
            return settle(ctx, cr, waiting, Action::await_change()).await;
        }
    };
    let node = ctx.identity.node.clone();
    update(ctx, cr, |c| {
        if !c.finalizers().iter().any(|f| f == FINALIZER) {
            c.finalizers_mut().push(FINALIZER.into());
        }
        let s = c.common();
        *s.phase = Phase::Accepted;
        *s.accepted_by_node = Some(node);
        *s.accepted_timestamp = Some(clock::now());
        *s.message = None;
    })
    .await?;
    drop(place);
    Ok(Action::requeue(NEXT))
}

async fn get_pod<K: MoverCr>(ctx: &Context, cr: &K) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let p = objects::get_opt(&pods, &child_name(cr)).await?;
    // A pod of the same name left by an earlier CR of the same name is not ours.
    Ok(p.filter(|p| p.labels().get(ferry_proto::labels::OWNER_UID) == cr.uid().as_ref()))
}

/// What an Accepted CR needs for its mover pod, found once ahead of a free slot ([`crate::memo`]).
#[derive(Debug, Clone)]
struct Ready {
    exposure: Exposure,
    repo: RepoTarget,
}

/// Accepted: expose the volume and read the repository (once, while waiting in the prepare queue), create
/// the mover pod when a node has a free slot, wait until it runs (→ Prepared), within the prepare timeout.
pub async fn prepare<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    let uid = cr.uid().unwrap_or_default();
    if let Some(p) = get_pod(ctx, cr).await? {
        ctx.memo.forget(&uid);
        return pod_started(cr, ctx, &p).await;
    }
    // Exposed ahead, so a freed slot waits only for the pod (the clone of a snapshot takes seconds). A
    // CR then waits for a slot at no request but its pod's: it looks in the watch caches and the memo
    // (bench/CLUSTER.md: every waiting CR re-exposing at each look was most of the API traffic).
    // Exposing and the pod create objects: only for the CR as the API server has it now, never for a
    // cache entry that may trail a completion and cleanup that already happened.
    let (ready, checked) = match ctx.memo.get::<Ready>(&uid) {
        Some(ready) => (ready, false),
        None => {
            if !is_current(ctx, cr).await? {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            match get_ready(cr, ctx).await?.done::<()>() {
                Ok(ready) => {
                    ctx.memo.put(&uid, ready.clone());
                    (ready, true)
                }
                Err(waiting) => return settle(ctx, cr, waiting, Action::await_change()).await,
            }
        }
    };
    if !placement::any_free_cached(ctx).await? {
        return settle(
            ctx,
            cr,
            wait_for_mover_slot(cr, ctx),
            Action::await_change(),
        )
        .await;
    }
    if !checked && !is_current(ctx, cr).await? {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    match create_pod(cr, ctx, ready).await? {
        Step::Done(()) => {
            ctx.memo.forget(&uid);
            note(ctx, cr, "mover pod created").await?;
            Ok(Action::requeue(Duration::from_millis(500)))
        }
        other => settle(ctx, cr, other, Action::await_change()).await,
    }
}

/// Exposes the volume and resolves the repository.
async fn get_ready<K: Flow>(cr: &K, ctx: &Context) -> Result<Step<Ready>> {
    let exposure = proceed!(cr.expose(ctx).await?);
    let repo = proceed!(repo::repo_target(ctx, cr).await?);
    Ok(Step::Done(Ready { exposure, repo }))
}

/// The mover pod exists: Prepared once it runs, the CR's end if it ended or cannot start.
async fn pod_started<K: Flow>(cr: &K, ctx: &Context, p: &Pod) -> Result<Action> {
    match pod::state(p) {
        PodState::Running { node } | PodState::Succeeded { node, .. } => {
            update(ctx, cr, |c| {
                let s = c.common();
                *s.phase = Phase::Prepared;
                *s.node = Some(node);
                *s.message = None;
            })
            .await?;
            Ok(Action::requeue(NEXT))
        }
        PodState::Failed {
            message,
            canceled: true,
        } => terminal(ctx, cr, Phase::Canceled, Some(message), |_| {}).await,
        PodState::Failed { message, .. } => fail(ctx, cr, message).await,
        PodState::Pending { fatal: Some(f), .. } => fail(ctx, cr, f).await,
        PodState::Pending { waiting, .. } => {
            let why = waiting.unwrap_or_else(|| "mover pod pending".into());
            settle(
                ctx,
                cr,
                Step::wait(why, SLOT_REQUEUE),
                Action::await_change(),
            )
            .await
        }
    }
}

/// Creates the mover pod on a node with a free slot.
async fn create_pod<K: Flow>(cr: &K, ctx: &Context, ready: Ready) -> Result<Step> {
    let Ready { exposure, repo } = ready;
    let mover = ctx
        .config
        .mover(cr.datamover())
        .cloned()
        .ok_or_else(|| Error::Invalid("mover vanished from the configuration".into()))?;
    let _slot = ctx.placement.lock().await;
    let allowed = (!exposure.nodes.is_empty()).then_some(exposure.nodes.as_slice());
    let free = placement::free_nodes(ctx, allowed).await?;
    if free.is_empty() {
        return Ok(wait_for_mover_slot(cr, ctx));
    }
    let plan = mover_plan(cr, ctx, exposure, repo, mover, free);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    objects::create_idempotent(&pods, &pod::build(&plan, &ctx.config)).await?;
    tracing::info!(kind = %K::kind(&()), name = %cr.name_any(), nodes = ?plan.nodes, "mover pod created");
    Ok(Step::Done(()))
}

/// `cr` waits in line for a node below `perNodeLimit`.
fn wait_for_mover_slot<K: Flow>(cr: &K, ctx: &Context) -> Step {
    ctx.wake.wait(Slot::Mover, cr);
    Step::wait(
        format!(
            "waiting for a free mover slot (perNodeLimit {})",
            ctx.config.per_node_limit
        ),
        SLOT_REQUEUE,
    )
}

/// The mover pod of `cr`: its exposed volume, its repository, its data-path call, on one of `nodes`.
fn mover_plan<K: Flow>(
    cr: &K,
    ctx: &Context,
    exposure: Exposure,
    repo: RepoTarget,
    mover: Mover,
    nodes: Vec<String>,
) -> PodPlan {
    PodPlan {
        name: child_name(cr),
        namespace: cr.namespace().unwrap_or_default(),
        labels: objects::owner_labels(cr),
        owner: objects::owner_ref(cr),
        direction: K::DIRECTION,
        mover,
        cr: objects::cr_ref(cr),
        call: cr.call(repo.repository(), pod::request_volume(exposure.block)),
        pvc: Some(exposure.pvc),
        block: exposure.block,
        nodes,
        repo,
        password_secret: ctx.config.repository_password_secret.clone(),
    }
}

/// Whether `cr` is the API server's current version of the object (a quorum read).
async fn is_current<K: MoverCr>(ctx: &Context, cr: &K) -> Result<bool> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    Ok(match api.get_opt(&cr.name_any()).await? {
        Some(now) => now.resource_version() == cr.resource_version(),
        None => false,
    })
}

/// Prepared → InProgress.
pub async fn start<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    update(ctx, cr, |c| {
        let s = c.common();
        *s.phase = Phase::InProgress;
        if s.start_timestamp.is_none() {
            *s.start_timestamp = Some(clock::now());
        }
    })
    .await?;
    Ok(Action::requeue(NEXT))
}

/// InProgress: follow progress events; decide the outcome from the pod.
pub async fn watch<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    let Some(p) = get_pod(ctx, cr).await? else {
        // A restore that already has its result stored is rebinding; the pod is gone on purpose.
        if let Some(result) = cr.stored_result() {
            let node = cr.clone().common().node.clone().unwrap_or_default();
            return complete(cr, ctx, &node, &result).await;
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
        PodState::Succeeded { node, message } => complete(cr, ctx, &node, &message).await,
        PodState::Failed {
            message,
            canceled: true,
        } => terminal(ctx, cr, Phase::Canceled, Some(message), |_| {}).await,
        PodState::Failed { message, .. } => {
            terminal(
                ctx,
                cr,
                Phase::Failed,
                Some(format!("data path failed: {message}")),
                |_| {},
            )
            .await
        }
        _ => {
            if follow_progress(cr, ctx).await? {
                return Ok(Action::requeue(WATCH_REQUEUE));
            }
            match ctx.config.no_progress_timeout() {
                Some(limit) if stalled_for(cr, &p) >= limit => {
                    fail(ctx, cr, no_progress_message(limit)).await
                }
                _ => Ok(Action::requeue(WATCH_REQUEUE)),
            }
        }
    }
}

/// The mover succeeded on `node` with the result document `message`: Completed once the flow has done
/// what remains; Failed if the document is unreadable.
async fn complete<K: Flow>(cr: &K, ctx: &Context, node: &str, message: &str) -> Result<Action> {
    let outcome: K::Outcome = match serde_json::from_str(message) {
        Ok(r) => r,
        Err(e) => {
            let why = format!("the mover exited 0 but its result is unreadable ({e}): {message:?}");
            return fail(ctx, cr, why).await;
        }
    };
    match cr.complete(ctx, node, message, outcome).await? {
        Step::Done(completed) => {
            terminal(ctx, cr, Phase::Completed, None, move |c| *c = completed).await
        }
        // Not noted: the phase stays InProgress and its message is the mover's.
        Step::Wait { reason, requeue } => {
            tracing::debug!(name = %cr.name_any(), reason, "completing");
            Ok(Action::requeue(requeue))
        }
        Step::Fail(message) => fail(ctx, cr, message).await,
    }
}

/// How long since the data path last moved: since the last progress seen, else since the mover pod
/// started, else since the CR started.
fn stalled_for<K: MoverCr>(cr: &K, pod: &Pod) -> Duration {
    let annotations = cr.annotations();
    clock::since_text(annotations.get(PROGRESS_AT_ANNOTATION).map(String::as_str))
        .or_else(|| Some(clock::since(pod.status.as_ref()?.start_time.as_ref()?.0)))
        .or_else(|| clock::since_text(cr.clone().common().start_timestamp.as_deref()))
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
            .insert(PROGRESS_AT_ANNOTATION.into(), clock::now());
        *c.common().progress = Some(best);
    })
    .await?;
    Ok(true)
}

/// Cancel (spec.cancel or deletion) in any non-terminal phase; Canceled once the pod is gone or ended.
pub async fn cancel<K: Flow>(cr: &K, ctx: &Context, deleting: bool) -> Result<Action> {
    let why = if deleting {
        "canceled because the CR is being deleted"
    } else {
        "canceled"
    };
    if cr.phase() == Phase::New {
        return terminal(ctx, cr, Phase::Canceled, Some(why.into()), |_| {}).await;
    }
    let running = get_pod(ctx, cr).await?.filter(|p| {
        !matches!(
            pod::state(p),
            PodState::Succeeded { .. } | PodState::Failed { .. }
        )
    });
    let Some(p) = running else {
        let msg = match cr.message() {
            Some(m) if !m.is_empty() && cr.phase() != Phase::Canceling => format!("{why}: {m}"),
            _ => why.to_string(),
        };
        return terminal(ctx, cr, Phase::Canceled, Some(msg), |_| {}).await;
    };
    if cr.phase() != Phase::Canceling {
        update(ctx, cr, |c| *c.common().phase = Phase::Canceling).await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    match p.metadata.deletion_timestamp.as_ref() {
        None => objects::delete_idempotent(&pods, &p.name_any(), None).await?,
        // The mover got SIGTERM at deletion; past its grace period, stop waiting for the kubelet.
        Some(t) if clock::since(t.0).as_secs() as i64 > ctx.config.cancel_grace_seconds + 5 => {
            objects::delete_idempotent(&pods, &p.name_any(), Some(0)).await?;
            let msg = format!("{why} (mover killed)");
            return terminal(ctx, cr, Phase::Canceled, Some(msg), |_| {}).await;
        }
        Some(_) => {}
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    //! The mover pod each flow asks for: its agent job, decoded as the agent decodes it.
    use super::*;
    use crate::testing::{ctx, dd, du};
    use ferry_proto::datapath::VolumeMode;
    use ferry_proto::datapath::agent::agent_job::Call;
    use ferry_proto::labels::TAG_BACKUP_NAME;
    use ferry_proto::pod as contract;
    use serde_json::json;

    fn repo() -> RepoTarget {
        RepoTarget {
            url: "s3://b/velero/plugins/ferry/app".into(),
            bucket: "b".into(),
            prefix: "velero/plugins/ferry/app".into(),
            region: Some("eu-1".into()),
            ..Default::default()
        }
    }

    /// The pod `cr` gets (inside a runtime: the mock client needs one).
    fn pod_for<K: Flow>(cr: &K, block: bool) -> Pod {
        let (ctx, _handle) = ctx();
        let exposure = Exposure {
            pvc: "ferry-x".into(),
            block,
            nodes: vec![],
        };
        let mover = ctx.config.movers["ferry"].clone();
        let plan = mover_plan(cr, &ctx, exposure, repo(), mover, vec!["n1".into()]);
        pod::build(&plan, &ctx.config)
    }

    #[tokio::test]
    async fn an_upload_pod_carries_the_backup_request() {
        let cr = du(json!(null), |v| {
            v["metadata"]["labels"] = json!({"velero.io/backup-name": "b1"})
        });
        for (block, mode, path) in [
            (false, VolumeMode::Filesystem, contract::VOLUME_PATH),
            (true, VolumeMode::Block, contract::DEVICE_PATH),
        ] {
            let job = pod::tests::job_of(&pod_for(&cr, block));
            let who = job.cr.expect("cr");
            assert_eq!(
                (
                    who.kind.as_str(),
                    who.name.as_str(),
                    who.namespace.as_str(),
                    who.uid.as_str()
                ),
                ("DataUpload", "b1-x", "velero", "u1")
            );
            let Some(Call::Backup(r)) = job.call else {
                panic!("not a backup: {:?}", job.call)
            };
            assert_eq!(r.operation_id, "b1-x");
            let volume = r.volume.expect("volume");
            assert_eq!((volume.mode(), volume.path.as_str()), (mode, path));
            let repository = r.repository.expect("repository");
            assert_eq!(
                (repository.bucket.as_str(), repository.prefix.as_str()),
                ("b", "velero/plugins/ferry/app")
            );
            assert_eq!(repository.region, "eu-1");
            assert_eq!(repository.password_file, contract::PASSWORD_FILE);
            assert_eq!(r.tags[TAG_BACKUP_NAME], "b1");
            assert_eq!(r.source.expect("source").pvc, "p");
        }
    }

    #[tokio::test]
    async fn a_download_pod_carries_the_restore_request_with_sparse_writes() {
        let cr = dd(json!(null), |v| {
            v["spec"]["dataMoverConfig"] = json!({"WriteSparseFiles": "true"})
        });
        let p = pod_for(&cr, false);
        let read_only = p.spec.as_ref().and_then(|s| {
            let mounts = s.init_containers.as_ref()?[0].volume_mounts.as_ref()?;
            mounts
                .iter()
                .find(|m| m.mount_path == contract::VOLUME_PATH)?
                .read_only
        });
        assert_eq!(read_only, Some(false), "a restore writes its volume");
        let job = pod::tests::job_of(&p);
        assert_eq!(job.cr.expect("cr").kind, "DataDownload");
        let Some(Call::Restore(r)) = job.call else {
            panic!("not a restore: {:?}", job.call)
        };
        assert_eq!(r.operation_id, "r1-x");
        assert_eq!(r.snapshot_id, "ab".repeat(32));
        assert_eq!(r.mover_config["WriteSparseFiles"], "true");
        assert_eq!(r.volume.expect("volume").mode(), VolumeMode::Filesystem);
        let target = r.source.expect("source");
        assert_eq!(
            (target.namespace.as_str(), target.pvc.as_str()),
            ("app", "data")
        );
    }
}
