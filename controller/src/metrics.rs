//! The controller's Prometheus metrics (`prometheus-client`) and the small axum server for `/metrics` and
//! `/healthz`. Counters and the duration histogram are updated by the flows as CRs change phase; the gauges
//! (CRs per phase, active mover pods) are read at scrape time from the controllers' watch caches, so a
//! scrape costs no API request however many CRs there are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use ferry_proto::velero::Phase;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::caches::Caches;
use crate::config::Config;
use crate::cr::MoverCr;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindPhase {
    kind: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindOutcome {
    kind: String,
    outcome: String,
}

/// Every metric of the controller, in one registry.
pub struct Metrics {
    registry: Registry,
    transitions: Family<KindPhase, Counter>,
    bytes: Family<KindLabel, Counter>,
    durations: Family<KindOutcome, Histogram>,
    caches: Arc<OnceLock<Caches>>,
    leading: Arc<AtomicBool>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Fresh metrics; the gauges count only CRs whose `spec.datamover` is one of `config`'s movers.
    pub fn new(config: &Config) -> Self {
        let mut registry = Registry::default();
        let transitions = Family::<KindPhase, Counter>::default();
        registry.register(
            "ferry_phase_transitions",
            "DataUploads/DataDownloads that entered a phase",
            transitions.clone(),
        );
        let bytes = Family::<KindLabel, Counter>::default();
        registry.register(
            "ferry_bytes_moved",
            "Logical bytes moved by completed DataUploads/DataDownloads",
            bytes.clone(),
        );
        // 1 s … ~9 h.
        let durations = Family::<KindOutcome, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 16))
        });
        registry.register(
            "ferry_duration_seconds",
            "Acceptance to terminal phase of a DataUpload/DataDownload",
            durations.clone(),
        );
        let caches = Arc::new(OnceLock::new());
        let leading = Arc::new(AtomicBool::new(false));
        registry.register_collector(Box::new(CacheGauges {
            caches: caches.clone(),
            leading: leading.clone(),
            config: config.clone(),
        }));
        Metrics {
            registry,
            transitions,
            bytes,
            durations,
            caches,
            leading,
        }
    }

    /// A CR of `kind` entered `phase`.
    pub fn transition(&self, kind: &str, phase: Phase) {
        self.transitions
            .get_or_create(&KindPhase {
                kind: kind.into(),
                phase: format!("{phase:?}"),
            })
            .inc();
    }

    /// A CR of `kind` moved `n` bytes.
    pub fn moved(&self, kind: &str, n: u64) {
        self.bytes
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(n);
    }

    /// A CR of `kind` ended in `phase` `secs` seconds after it was accepted.
    pub fn duration(&self, kind: &str, phase: Phase, secs: f64) {
        self.durations
            .get_or_create(&KindOutcome {
                kind: kind.into(),
                outcome: format!("{phase:?}").to_lowercase(),
            })
            .observe(secs);
    }

    /// This replica leads and its controllers run on `caches`.
    pub fn leading(&self, caches: Caches) {
        let _ = self.caches.set(caches);
        self.leading.store(true, Ordering::Relaxed);
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `ferry_crs`, `ferry_active_mover_pods` and `ferry_leader`, computed from the watch caches per scrape.
struct CacheGauges {
    caches: Arc<OnceLock<Caches>>,
    leading: Arc<AtomicBool>,
    config: Config,
}

impl std::fmt::Debug for CacheGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheGauges").finish_non_exhaustive()
    }
}

impl CacheGauges {
    fn count<K: MoverCr>(&self, store: &Store<K>, family: &Family<KindPhase, Gauge>) {
        for cr in store.state() {
            if self.config.mover(cr.datamover()).is_some() {
                family
                    .get_or_create(&KindPhase {
                        kind: K::kind(&()).into_owned(),
                        phase: format!("{:?}", cr.phase()),
                    })
                    .inc();
            }
        }
    }
}

impl Collector for CacheGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let leader = Gauge::<i64>::default();
        leader.set(i64::from(self.leading.load(Ordering::Relaxed)));
        leader.encode(encoder.encode_descriptor(
            "ferry_leader",
            "1 when this replica holds the Lease and reconciles",
            None,
            leader.metric_type(),
        )?)?;
        let Some(caches) = self.caches.get() else {
            return Ok(());
        };
        let crs = Family::<KindPhase, Gauge>::default();
        self.count(&caches.uploads, &crs);
        self.count(&caches.downloads, &crs);
        crs.encode(encoder.encode_descriptor(
            "ferry_crs",
            "DataUploads/DataDownloads of Ferry's movers per phase",
            None,
            crs.metric_type(),
        )?)?;
        let active = caches
            .pods
            .state()
            .iter()
            .filter(|p| crate::caches::holds_slot(p))
            .count();
        let pods = Gauge::<i64>::default();
        pods.set(i64::try_from(active).unwrap_or(i64::MAX));
        pods.encode(encoder.encode_descriptor(
            "ferry_active_mover_pods",
            "Mover pods not yet Succeeded or Failed",
            None,
            pods.metric_type(),
        )?)
    }
}

/// The HTTP routes: `/metrics` (OpenMetrics text) and `/healthz`.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
                    .into_response()
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
}

/// Serves [`router`] on `addr` until the listener fails.
pub async fn serve(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint");
    axum::serve(listener, router(metrics)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::du;
    use ferry_proto::velero::{DataDownload, DataUpload};
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{reflector, watcher};
    use serde_json::json;
    use tower::ServiceExt;

    fn pod(name: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "velero"},
            "status": {"phase": phase}}))
        .expect("pod")
    }

    async fn scrape(metrics: Arc<Metrics>) -> String {
        let req = axum::http::Request::get("/metrics")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = router(metrics).oneshot(req).await.expect("response");
        assert!(resp.status().is_success());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        String::from_utf8(body.to_vec()).expect("utf-8")
    }

    /// The gauges come from the watch caches (no API request per scrape), count only Ferry's movers, and
    /// a replica that does not lead reports only `ferry_leader 0`.
    #[tokio::test]
    async fn gauges_are_read_from_the_caches_and_counters_from_the_flows() {
        let metrics = Arc::new(Metrics::new(&Config::default()));
        let text = scrape(metrics.clone()).await;
        assert!(text.contains("ferry_leader 0"), "{text}");
        assert!(!text.contains("ferry_crs"), "{text}");

        let (uploads, mut w) = reflector::store::<DataUpload>();
        for (name, phase, mover) in [
            ("a", "Completed", "ferry"),
            ("b", "Completed", "ferry"),
            ("c", "InProgress", "ferry"),
            ("d", "Completed", "velero"),
        ] {
            w.apply_watcher_event(&watcher::Event::Apply(du(json!({"phase": phase}), |v| {
                v["metadata"]["name"] = json!(name);
                v["metadata"]["uid"] = json!(name);
                v["spec"]["datamover"] = json!(mover);
            })));
        }
        let (pods, mut w) = reflector::store::<Pod>();
        for (name, phase) in [("m1", "Running"), ("m2", "Pending"), ("m3", "Succeeded")] {
            w.apply_watcher_event(&watcher::Event::Apply(pod(name, phase)));
        }
        metrics.leading(Caches {
            uploads,
            downloads: reflector::store::<DataDownload>().0,
            pods,
            nodes: reflector::store().0,
        });
        metrics.transition("DataUpload", Phase::Completed);
        metrics.moved("DataUpload", 4096);
        metrics.duration("DataUpload", Phase::Completed, 3.0);

        let text = scrape(metrics).await;
        for want in [
            "ferry_leader 1",
            "ferry_crs{kind=\"DataUpload\",phase=\"Completed\"} 2",
            "ferry_crs{kind=\"DataUpload\",phase=\"InProgress\"} 1",
            "ferry_active_mover_pods 2",
            "ferry_phase_transitions_total{kind=\"DataUpload\",phase=\"Completed\"} 1",
            "ferry_bytes_moved_total{kind=\"DataUpload\"} 4096",
            "ferry_duration_seconds_count{kind=\"DataUpload\",outcome=\"completed\"} 1",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
        assert!(!text.contains("velero"), "{text}");
    }
}
