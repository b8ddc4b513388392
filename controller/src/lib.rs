//! Ferry's controller: reconciles Velero DataUpload / DataDownload resources whose `spec.datamover` is one
//! of its mover names into one short-lived mover pod per volume. Design: `design/0002-controller.md`.
//!
//! The modules form layers; each imports only from its own layer or the ones below (checked by a test in
//! `layers.rs`), so a reader can follow them downwards:
//!
//! 1. configuration and CR access: [`config`], [`error`], [`validate`] (user-written fields),
//!    [`clock`] (every age), [`step`] (the typed outcome of a step), [`backoff`], [`cr`] (DataUpload and
//!    DataDownload behind one trait), [`caches`] (the controllers' watch caches), [`admission`] (the
//!    prepare queue, counted in them), [`wake`] (waiting CRs woken when a slot frees), [`memo`] (what a
//!    waiting CR's steps already found), [`metrics`] (Prometheus), [`context`], [`objects`] (names, owner
//!    labels, idempotent writes);
//! 2. the exposers, [`expose`]: [`expose::snapshot`] (CSI snapshot clone, backup) and [`expose::rebind`]
//!    (PV rebinding, restore);
//! 3. the mover pod: [`repo`] (the repository a BSL points to), [`pod`] (build and read), [`placement`]
//!    (per-node limit);
//! 4. the two flows on one state machine: [`flow`] (the `Flow` trait and the CR writes), [`phases`] (one
//!    step per phase), [`upload`] and [`download`];
//! 5. the top: [`reconcile`] (dispatch), [`deletion`] (a deleted Backup → forget and prune),
//!    [`leader`] (Lease election), and [`run`] here.

pub mod admission;
pub mod backoff;
pub mod caches;
pub mod clock;
pub mod config;
pub mod context;
pub mod cr;
pub mod deletion;
pub mod download;
pub mod error;
pub mod expose;
pub mod flow;
pub mod leader;
pub mod memo;
pub mod metrics;
pub mod objects;
pub mod phases;
pub mod placement;
pub mod pod;
pub mod reconcile;
pub mod repo;
pub mod step;
pub mod upload;
pub mod validate;
pub mod wake;

#[cfg(test)]
mod layers;
#[cfg(test)]
mod survival;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::velero::{Backup, DataDownload, DataUpload};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolumeClaim, Pod};
use kube::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};

pub use context::{Context, Identity};
pub use error::{Error, Result};

/// After a failed reconcile: a conflict is retried at once with fresh data, anything else after an
/// exponentially growing delay per object ([`backoff`]).
fn error_policy<K>(cr: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: kube::Resource<DynamicType = ()>,
{
    if err.is_conflict() {
        tracing::debug!(name = ?cr.meta().name, "conflict; reconciling again with fresh data");
        return Action::requeue(Duration::from_millis(300));
    }
    let delay = ctx.backoff.failed(&backoff::key(&*cr));
    tracing::warn!(name = ?cr.meta().name, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Runs `reconcile` and resets the object's backoff when it succeeds.
async fn tracked<K, R, F>(cr: Arc<K>, ctx: Arc<Context>, reconcile: R) -> Result<Action>
where
    K: kube::Resource<DynamicType = ()>,
    R: FnOnce(Arc<K>, Arc<Context>) -> F,
    F: Future<Output = Result<Action>>,
{
    let key = backoff::key(&*cr);
    let out = reconcile(cr, ctx.clone()).await;
    if out.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    out
}

fn event_target<K>(e: Event) -> Option<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()>,
{
    let o = e.involved_object;
    if o.kind.as_deref() != Some(&*K::kind(&())) {
        return None;
    }
    Some(ObjectRef::new(o.name.as_deref()?).within(o.namespace.as_deref()?))
}

/// Runs both reconcilers until shutdown.
pub async fn run(ctx: Arc<Context>) {
    // Pods and PVCs carry these labels; a change of one (a PVC bound or deleted, a pod's phase) wakes its
    // owner at once rather than at its next poll.
    let children_cfg = watcher::Config::default().labels(&format!(
        "{}={}",
        ferry_proto::labels::MANAGED_BY,
        ferry_proto::labels::MANAGED_BY_VALUE
    ));
    let events_cfg = watcher::Config::default().labels(ferry_proto::labels::OWNER_UID);
    let Some(triggers) = ctx.wake.triggers() else {
        tracing::error!("the controllers already ran in this process");
        return;
    };
    let (wake_uploads, wake_downloads) = triggers.into_streams();
    let uploads = Controller::new(ctx.watched::<DataUpload>(), watcher::Config::default())
        .reconcile_on(wake_uploads)
        .owns(ctx.watched::<Pod>(), children_cfg.clone())
        .owns(ctx.watched::<PersistentVolumeClaim>(), children_cfg.clone())
        .watches(
            ctx.watched::<Event>(),
            events_cfg.clone(),
            event_target::<DataUpload>,
        )
        .shutdown_on_signal();
    let downloads = Controller::new(ctx.watched::<DataDownload>(), watcher::Config::default())
        .reconcile_on(wake_downloads)
        .owns(ctx.watched::<Pod>(), children_cfg.clone())
        .owns(ctx.watched::<PersistentVolumeClaim>(), children_cfg)
        .watches(
            ctx.watched::<Event>(),
            events_cfg,
            event_target::<DataDownload>,
        )
        .shutdown_on_signal();
    // The mover pods, cached for the metrics gauge and placement; a pod that ends frees a slot.
    let (pods, writer) = reflector::store::<Pod>();
    let mover_pods = reflector::reflector(
        writer,
        watcher(
            ctx.watched::<Pod>(),
            watcher::Config::default().labels(&objects::mover_selector()),
        )
        .default_backoff(),
    )
    .for_each({
        let ctx = ctx.clone();
        let mut slots = placement::SlotWatch::default();
        move |event| {
            if let Ok(e) = event {
                let freed = slots.frees(&e);
                if freed > 0 {
                    // The moment a slot is free as far as this controller can know (bench/cluster-scale
                    // measures its own latency from here to the next mover pod created).
                    tracing::info!(slots = freed, "mover slot freed");
                }
                for _ in 0..freed {
                    ctx.wake.freed(wake::Slot::Mover);
                }
            }
            futures::future::ready(())
        }
    });
    // The nodes, cached for placement, stripped to what it reads.
    let (nodes, writer) = reflector::store::<Node>();
    let node_cache = reflector::reflector(
        writer,
        watcher(
            Api::<Node>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .modify(placement::keep_placement_fields)
        .default_backoff(),
    )
    .for_each(|_| futures::future::ready(()));
    ctx.lead(caches::Caches {
        uploads: uploads.store(),
        downloads: downloads.store(),
        pods,
        nodes,
    });
    let uploads = uploads
        .run(
            |cr, ctx| tracked(cr, ctx, reconcile::reconcile::<DataUpload>),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let downloads = downloads
        .run(
            |cr, ctx| tracked(cr, ctx, reconcile::reconcile::<DataDownload>),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let deletions = Controller::new(ctx.watched::<Backup>(), watcher::Config::default())
        .shutdown_on_signal()
        .run(
            |b, ctx| tracked(b, ctx, deletion::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    tokio::select! {
        _ = futures::future::join3(uploads, downloads, deletions) => {}
        _ = mover_pods => {}
        _ = node_cache => {}
    }
}
