//! DataDownload: the restore flow. The volume is a PVC of our own shaped as the target PVC, made and
//! afterwards handed to the target by [`crate::expose::rebind`].

use std::time::Duration;

use ferry_proto::datapath::agent::agent_job::Call;
use ferry_proto::datapath::{Repository, RestoreRequest, Source, Volume};
use ferry_proto::result::RestoreResult;
use ferry_proto::velero::{DataDownload, DataMoveProgress};
use kube::ResourceExt;

use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::expose::{Exposure, rebind};
use crate::flow::{Flow, delete_pods_and_pvcs, update};
use crate::step::Step;

/// Annotation on a DataDownload: the mover's result, kept while the volume is rebound (the pod is gone
/// by then, so a restarted controller must not read its absence as a failure).
pub const RESULT_ANNOTATION: &str = "ferry.dev/result";

impl Flow for DataDownload {
    type Outcome = RestoreResult;

    async fn admissible(&self, ctx: &Context) -> Result<Step> {
        rebind::admissible(self, ctx).await
    }

    async fn expose(&self, ctx: &Context) -> Result<Step<Exposure>> {
        rebind::expose(self, ctx).await
    }

    fn call(&self, repository: Repository, volume: Volume) -> Call {
        Call::Restore(restore_request(self, repository, volume))
    }

    /// Stores the result on the CR first, then hands the volume over, then Completed.
    async fn complete(
        &self,
        ctx: &Context,
        node: &str,
        message: &str,
        r: RestoreResult,
    ) -> Result<Step<Self>> {
        if !self.annotations().contains_key(RESULT_ANNOTATION) {
            let (m, n) = (message.to_string(), node.to_string());
            update(ctx, self, move |c| {
                c.annotations_mut().insert(RESULT_ANNOTATION.into(), m);
                *c.common().node = Some(n);
            })
            .await?;
            return Ok(Step::wait("result stored", Duration::from_millis(50)));
        }
        match rebind::rebind(self, ctx).await? {
            Step::Done(()) => {}
            Step::Wait { reason, requeue } => return Ok(Step::Wait { reason, requeue }),
            Step::Fail(m) => {
                return Ok(Step::fail(format!(
                    "restored the data but could not hand the volume over: {m}"
                )));
            }
        }
        ctx.metrics.moved("DataDownload", r.total_bytes);
        let mut done = self.clone();
        *done.common().progress = Some(DataMoveProgress {
            total_bytes: r.total_bytes as i64,
            bytes_done: r.total_bytes as i64,
        });
        Ok(Step::Done(done))
    }

    fn stored_result(&self) -> Option<String> {
        self.annotations().get(RESULT_ANNOTATION).cloned()
    }

    async fn cleanup(&self, ctx: &Context) -> Result<usize> {
        Ok(delete_pods_and_pvcs(ctx, self).await? + rebind::cleanup(self, ctx).await?)
    }
}

/// The DataDownload's restore call: the snapshot, the volume, the target PVC, the `spec.dataMoverConfig`
/// (`WriteSparseFiles` among it).
pub fn restore_request(
    dd: &DataDownload,
    repository: Repository,
    volume: Volume,
) -> RestoreRequest {
    RestoreRequest {
        operation_id: dd.name_any(),
        repository: Some(repository),
        volume: Some(volume),
        source: Some(Source {
            namespace: dd.spec.target_volume.namespace.clone(),
            pvc: dd.spec.target_volume.pvc.clone(),
            ..Default::default()
        }),
        snapshot_id: dd.spec.snapshot_id.clone(),
        backup_result: Default::default(),
        deadline_unix_ms: 0,
        mover_config: dd.mover_config_map(),
    }
}

#[cfg(test)]
mod tests {
    //! The restore flow's own steps against kube's mock service.
    use super::*;
    use crate::testing::{Seen, ctx, dd, echo_or, serve};
    use http::Method;
    use serde_json::json;

    #[tokio::test]
    async fn completion_stores_the_result_before_the_volume_is_handed_over() {
        let (ctx, handle) = ctx();
        let server = serve(handle, echo_or(|_| None));
        let cr = dd(json!({"phase": "InProgress"}), |_| {});
        let message = r#"{"version":1,"snapshotId":"s","totalBytes":7,"files":1,"dirs":0}"#;
        let r: RestoreResult = serde_json::from_str(message).expect("result");
        let step = cr
            .complete(&ctx, "node-b", message, r)
            .await
            .expect("complete");
        drop(ctx);
        let seen: Vec<Seen> = server.await.expect("server");
        assert!(
            matches!(&step, Step::Wait { reason, requeue }
                if reason == "result stored" && *requeue == Duration::from_millis(50)),
            "{step:?}"
        );
        assert_eq!(seen.len(), 1, "only the result is written: {seen:#?}");
        assert!(seen[0].is(&Method::PUT, "/datadownloads/r1-x"));
        assert_eq!(
            seen[0].body["metadata"]["annotations"][RESULT_ANNOTATION],
            message
        );
        assert_eq!(seen[0].body["status"]["node"], "node-b");
    }

    #[test]
    fn the_restore_request_names_the_snapshot_and_sparse_writes() {
        let cr = dd(json!(null), |v| {
            v["spec"]["dataMoverConfig"] = json!({"WriteSparseFiles": "true"})
        });
        let volume = crate::pod::request_volume(true);
        let Call::Restore(r) = cr.call(Repository::default(), volume.clone()) else {
            panic!("not a restore")
        };
        assert_eq!(r.operation_id, "r1-x");
        assert_eq!(r.snapshot_id, "ab".repeat(32));
        assert_eq!(r.volume, Some(volume));
        assert_eq!(r.mover_config["WriteSparseFiles"], "true");
        let target = r.source.expect("source");
        assert_eq!(
            (target.namespace.as_str(), target.pvc.as_str()),
            ("app", "data")
        );
        assert_eq!(cr.stored_result(), None);
    }
}
