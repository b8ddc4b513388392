//! The steps of the phase machine, one per phase, each idempotent: New → Accepted ([`accept`]), Accepted →
//! Prepared ([`prepare`]), Prepared → InProgress ([`start`]), InProgress → terminal ([`watch`]), cancel in
//! any of them ([`cancel`]), and cleanup once terminal ([`finish`]).

use std::time::Duration;

use ferry_proto::labels::FINALIZER;
use ferry_proto::velero::Phase;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;

use crate::context::Context;
use crate::cr::{Direction, MoverCr};
use crate::error::{Error, Result};
use crate::expose::Exposed;
use crate::flow::{
    Admission, Flow, PROGRESS_AT_ANNOTATION, age, fail, follow_progress, note, now, terminal,
    update,
};
use crate::objects::{self, child_name};
use crate::pod::{self, PodPlan, PodState};
use crate::{placement, repo};

/// The Failed message of a CR still preparing after the prepare timeout.
pub fn prepare_timed_out(ctx: &Context, why: &str) -> String {
    format!(
        "timed out after {}s preparing the data path: {why}",
        ctx.config.prepare_timeout().as_secs()
    )
}

/// Terminal: clean up, then drop the finalizer. Never changes the phase again.
pub async fn finish<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
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
pub async fn accept<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
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
pub async fn prepare<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
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
    let repo = match repo::repo_target(ctx, cr).await? {
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
    let free = placement::free_nodes(ctx, allowed).await?;
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
            Direction::Backup => "backup".into(),
            Direction::Restore => "restore".into(),
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

/// Prepared → InProgress.
pub async fn start<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
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
pub async fn watch<K: Flow>(cr: &K, ctx: &Context) -> Result<Action> {
    let Some(p) = get_pod(ctx, cr).await? else {
        // A restore that already has its result stored is rebinding; the pod is gone on purpose.
        if let Some(result) = cr.stored_result() {
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
