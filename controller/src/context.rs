//! Shared state of the reconcilers: client, configuration, identity, metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kube::{Api, Client};

use crate::backoff::Backoff;
use crate::config::Config;

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

/// Counters exported as Prometheus text.
#[derive(Debug, Default)]
pub struct Metrics {
    transitions: Mutex<BTreeMap<(String, String), u64>>,
    bytes: Mutex<BTreeMap<String, u64>>,
    durations: Mutex<BTreeMap<(String, String), (f64, u64)>>,
}

impl Metrics {
    /// A CR of `kind` entered `phase`.
    pub fn transition(&self, kind: &str, phase: &str) {
        *self
            .transitions
            .lock()
            .expect("metrics lock")
            .entry((kind.into(), phase.into()))
            .or_default() += 1;
    }

    /// A CR of `kind` moved `n` bytes.
    pub fn moved(&self, kind: &str, n: u64) {
        *self
            .bytes
            .lock()
            .expect("metrics lock")
            .entry(kind.into())
            .or_default() += n;
    }

    /// A CR of `kind` ended as `outcome` after `secs` seconds.
    pub fn duration(&self, kind: &str, outcome: &str, secs: f64) {
        let mut d = self.durations.lock().expect("metrics lock");
        let e = d.entry((kind.into(), outcome.into())).or_default();
        e.0 += secs;
        e.1 += 1;
    }

    /// Prometheus text exposition; `gauges` are (name, labels, value) computed at scrape time.
    pub fn render(&self, gauges: &[(String, String, f64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP ferry_phase_transitions_total CRs that entered a phase.\n# TYPE ferry_phase_transitions_total counter\n");
        for ((k, p), n) in self.transitions.lock().expect("metrics lock").iter() {
            out.push_str(&format!(
                "ferry_phase_transitions_total{{kind=\"{k}\",phase=\"{p}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP ferry_bytes_moved_total Logical bytes moved by completed CRs.\n# TYPE ferry_bytes_moved_total counter\n");
        for (k, n) in self.bytes.lock().expect("metrics lock").iter() {
            out.push_str(&format!("ferry_bytes_moved_total{{kind=\"{k}\"}} {n}\n"));
        }
        out.push_str("# HELP ferry_duration_seconds Acceptance to terminal phase.\n# TYPE ferry_duration_seconds summary\n");
        for ((k, o), (sum, count)) in self.durations.lock().expect("metrics lock").iter() {
            out.push_str(&format!(
                "ferry_duration_seconds_sum{{kind=\"{k}\",outcome=\"{o}\"}} {sum}\nferry_duration_seconds_count{{kind=\"{k}\",outcome=\"{o}\"}} {count}\n"
            ));
        }
        let mut last = String::new();
        for (name, labels, v) in gauges {
            if *name != last {
                out.push_str(&format!("# TYPE {name} gauge\n"));
                last = name.clone();
            }
            out.push_str(&format!("{name}{{{labels}}} {v}\n"));
        }
        out
    }
}

/// What every reconcile gets.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Configuration.
    pub config: Config,
    /// This replica.
    pub identity: Identity,
    /// Metrics.
    pub metrics: Metrics,
    /// Serialises mover-pod placement so per-node limits hold under concurrent reconciles.
    pub placement: tokio::sync::Mutex<()>,
    /// Requeue delays after failed reconciles.
    pub backoff: Backoff,
}

impl Context {
    /// A context with fresh metrics, placement lock and backoff.
    pub fn new(client: Client, config: Config, identity: Identity) -> Self {
        Context {
            client,
            config,
            identity,
            metrics: Metrics::default(),
            placement: Default::default(),
            backoff: Backoff::default(),
        }
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
