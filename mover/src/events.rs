//! Kubernetes Events on the DataUpload / DataDownload a mover pod works for: the pod side of
//! [`ferry_proto::report`]. Best-effort by design: a failure to emit is logged and never fails the data path.
//! Started / Completed / Failed / Canceled are one Event each; progress is one Event object updated in
//! place (count and timestamps, like client-go's correlator), so `kubectl describe` stays readable.

use std::collections::BTreeMap;

use ferry_proto::report::{REPORTER, Report, Stage};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// The CR a mover reports on.
#[derive(Debug, Clone)]
pub struct Target {
    /// `DataUpload` or `DataDownload`.
    pub kind: String,
    /// CR name.
    pub name: String,
    /// CR namespace (the events go there too).
    pub namespace: String,
    /// CR uid.
    pub uid: String,
}

/// Emits reports as Events.
pub struct EventReporter {
    api: Api<Event>,
    target: Target,
    host: String,
    instance: String,
    progress_event: Option<(String, i32)>,
    seq: u32,
}

impl std::fmt::Debug for EventReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReporter")
            .field("target", &self.target)
            .finish()
    }
}

impl EventReporter {
    /// A reporter using the in-cluster (or kubeconfig) client.
    pub async fn connect(target: Target) -> Result<Self, kube::Error> {
        let client = kube::Client::try_default().await?;
        Ok(Self::new(client, target))
    }

    /// A reporter using `client`.
    pub fn new(client: kube::Client, target: Target) -> Self {
        EventReporter {
            api: Api::namespaced(client, &target.namespace),
            host: std::env::var("NODE_NAME").unwrap_or_default(),
            instance: std::env::var("POD_NAME").unwrap_or_else(|_| ferry_engine::repo::hostname()),
            target,
            progress_event: None,
            seq: 0,
        }
    }

    fn event(&mut self, report: &Report) -> Event {
        self.seq += 1;
        let now = Timestamp::now();
        let mut suffix = [0u8; 4];
        let _ = ferry_engine::crypto::fill_random(&mut suffix);
        let stage = report.stage();
        Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.ferry.{}{}",
                    self.target.name,
                    hex::encode(suffix),
                    self.seq
                )),
                namespace: Some(self.target.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    ferry_proto::labels::OWNER_UID.to_string(),
                    self.target.uid.clone(),
                )])),
                annotations: Some(BTreeMap::from([(
                    ferry_proto::report::REPORT_ANNOTATION.to_string(),
                    report.to_annotation(),
                )])),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("velero.io/v2alpha1".into()),
                kind: Some(self.target.kind.clone()),
                name: Some(self.target.name.clone()),
                namespace: Some(self.target.namespace.clone()),
                uid: Some(self.target.uid.clone()),
                ..Default::default()
            },
            reason: Some(stage.reason().into()),
            message: Some(report.human()),
            type_: Some(
                if stage == Stage::Failed {
                    "Warning"
                } else {
                    "Normal"
                }
                .into(),
            ),
            source: Some(EventSource {
                component: Some(REPORTER.into()),
                host: (!self.host.is_empty()).then(|| self.host.clone()),
            }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            action: Some(
                if self.target.kind == "DataDownload" {
                    "Restore"
                } else {
                    "Backup"
                }
                .into(),
            ),
            reporting_component: Some(REPORTER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }

    /// Emits `report`. Errors are logged, not returned.
    pub async fn emit(&mut self, report: &Report) {
        if let Err(e) = self.try_emit(report).await {
            tracing::warn!(error = %e, reason = report.stage().reason(), "could not emit event");
        }
    }

    async fn try_emit(&mut self, report: &Report) -> Result<(), kube::Error> {
        if report.stage() == Stage::Progress
            && let Some((name, count)) = self.progress_event.clone()
        {
            let now = Timestamp::now();
            let patch = serde_json::json!({
                "metadata": {"annotations": {ferry_proto::report::REPORT_ANNOTATION: report.to_annotation()}},
                "message": report.human(),
                "count": count + 1,
                "lastTimestamp": Time(now),
            });
            match self
                .api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.progress_event = Some((name, count + 1));
                    return Ok(());
                }
                // Expired or deleted: start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => self.progress_event = None,
                Err(e) => return Err(e),
            }
        }
        let ev = self.event(report);
        let created = self.api.create(&PostParams::default(), &ev).await?;
        if report.stage() == Stage::Progress {
            self.progress_event = created.metadata.name.map(|n| (n, 1));
        }
        Ok(())
    }
}
