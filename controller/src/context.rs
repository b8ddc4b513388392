//! Shared state of the reconcilers: client, configuration, identity, metrics.

use std::sync::{Arc, OnceLock};

use kube::{Api, Client};

use crate::admission::Admission;
use crate::backoff::Backoff;
use crate::caches::Caches;
use crate::config::Config;
use crate::memo::Memo;
use crate::metrics::Metrics;
use crate::wake::Wake;

/// The one field manager of everything this controller writes.
pub const FIELD_MANAGER: &str = "ferry-controller";

/// Who this controller replica is.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Node it runs on (`acceptedByNode`).
    pub node: String,
    /// Pod name (Lease holder).
    pub pod: String,
}

/// What every reconcile gets.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Configuration.
    pub config: Config,
    /// This replica.
    pub identity: Identity,
    /// Metrics, shared with the `/metrics` server.
    pub metrics: Arc<Metrics>,
    /// Serialises mover-pod placement so per-node limits hold under concurrent reconciles.
    pub placement: tokio::sync::Mutex<()>,
    /// Requeue delays after failed reconciles.
    pub backoff: Backoff,
    /// The prepare queue.
    pub admission: Admission,
    /// The CRs waiting for a place or a mover slot, woken when one frees.
    pub wake: Wake,
    /// What the Accepted CRs' steps found: exposure and repository, ready for a free slot.
    pub memo: Memo,
    caches: OnceLock<Caches>,
}

impl Context {
    /// A context with fresh metrics, placement lock and backoff.
    pub fn new(client: Client, config: Config, identity: Identity) -> Self {
        Context {
            client,
            metrics: Arc::new(Metrics::new(&config)),
            config,
            identity,
            placement: Default::default(),
            backoff: Backoff::default(),
            admission: Admission::default(),
            wake: Wake::default(),
            memo: Memo::default(),
            caches: OnceLock::new(),
        }
    }

    /// This replica leads: its controllers run and keep `caches`.
    pub fn lead(&self, caches: Caches) {
        self.metrics.leading(caches.clone());
        let _ = self.caches.set(caches);
    }

    /// The running controllers' watch caches (none before this replica leads).
    pub fn caches(&self) -> Option<&Caches> {
        self.caches.get()
    }

    /// `K` in the watched (Velero's) namespace: the only namespace whose DU/DD, Backups, mover pods and
    /// events the controller lists or watches.
    pub fn watched<K>(&self) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), &self.config.watch_namespace)
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::velero::{Backup, DataDownload, DataUpload};
    use k8s_openapi::api::core::v1::{Event, Pod};

    /// Everything the controller lists or watches is namespaced to Velero's namespace: DU/DD elsewhere
    /// are never seen (and the RBAC in manifests/ grants no cluster-wide access to them).
    #[tokio::test]
    async fn only_the_watched_namespace_is_listed_or_watched() {
        let (ctx, _handle) = crate::testing::ctx();
        assert_eq!(
            ctx.watched::<DataUpload>().resource_url(),
            "/apis/velero.io/v2alpha1/namespaces/velero/datauploads"
        );
        assert_eq!(
            ctx.watched::<DataDownload>().resource_url(),
            "/apis/velero.io/v2alpha1/namespaces/velero/datadownloads"
        );
        assert_eq!(
            ctx.watched::<Backup>().resource_url(),
            "/apis/velero.io/v1/namespaces/velero/backups"
        );
        assert_eq!(
            ctx.watched::<Pod>().resource_url(),
            "/api/v1/namespaces/velero/pods"
        );
        assert_eq!(
            ctx.watched::<Event>().resource_url(),
            "/api/v1/namespaces/velero/events"
        );
    }
}
