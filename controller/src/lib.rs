//! Ferry's controller: reconciles Velero DataUpload / DataDownload resources whose `spec.datamover` is one
//! of its mover names into one short-lived mover pod per volume. Design: `design/0002-controller.md`.
//!
//! * [`config`]: the configuration document.
//! * [`cr`]: DataUpload and DataDownload behind one trait.
//! * [`reconcile`]: the phase machine; [`upload`] and [`download`] hold what differs.
//! * [`pod`]: the mover pod (build and read); [`objects`]: names, labels, snapshots, BSL, placement.
//! * [`deletion`]: a deleted Velero Backup → forget and prune in the repositories (Backup finalizer).
//! * [`leader`]: Lease leader election; [`metrics`]: the `/metrics` endpoint; [`context`]: shared state.

pub mod config;
pub mod context;
pub mod cr;
pub mod deletion;
pub mod download;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod pod;
pub mod reconcile;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::velero::{Backup, DataDownload, DataUpload};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

pub use context::{Context, Identity};
pub use error::{Error, Result};

fn error_policy<K>(cr: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action
where
    K: kube::Resource,
{
    if err.is_conflict() {
        tracing::debug!(name = ?cr.meta().name, "conflict; reconciling again with fresh data");
        return Action::requeue(Duration::from_millis(300));
    }
    tracing::warn!(name = ?cr.meta().name, error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(3))
}

fn api<K>(ctx: &Context) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match &ctx.config.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
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
    let pods_cfg = watcher::Config::default().labels(&format!(
        "{}={}",
        ferry_proto::labels::MANAGED_BY,
        ferry_proto::labels::MANAGED_BY_VALUE
    ));
    let events_cfg = watcher::Config::default().labels(ferry_proto::labels::OWNER_UID);
    let uploads = Controller::new(api::<DataUpload>(&ctx), watcher::Config::default())
        .owns(api::<Pod>(&ctx), pods_cfg.clone())
        .watches(
            api::<Event>(&ctx),
            events_cfg.clone(),
            event_target::<DataUpload>,
        )
        .shutdown_on_signal()
        .run(
            reconcile::reconcile::<DataUpload>,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let downloads = Controller::new(api::<DataDownload>(&ctx), watcher::Config::default())
        .owns(api::<Pod>(&ctx), pods_cfg)
        .watches(api::<Event>(&ctx), events_cfg, event_target::<DataDownload>)
        .shutdown_on_signal()
        .run(
            reconcile::reconcile::<DataDownload>,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let deletions = Controller::new(api::<Backup>(&ctx), watcher::Config::default())
        .shutdown_on_signal()
        .run(deletion::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    futures::join!(uploads, downloads, deletions);
}
