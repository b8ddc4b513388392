//! DataUpload: the backup flow. The volume is the CSI snapshot Velero hands over, exposed by
//! [`crate::expose::snapshot`]; on success the mover's snapshot is recorded where Velero reads it.

use ferry_proto::datapath::agent::agent_job::Call;
use ferry_proto::datapath::{BackupRequest, Repository, Source, Volume};
use ferry_proto::labels::{TAG_BACKUP_NAME, TAG_BACKUP_UID};
use ferry_proto::result::BackupResult;
use ferry_proto::velero::{DataMoveProgress, DataUpload, DataUploadStatus};
use kube::ResourceExt;

use crate::context::Context;
use crate::cr::MoverCr as _;
use crate::error::Result;
use crate::expose::{Exposure, snapshot};
use crate::flow::{Flow, delete_pods_and_pvcs};
use crate::repo;
use crate::step::Step;

impl Flow for DataUpload {
    type Outcome = BackupResult;

    async fn admissible(&self, _ctx: &Context) -> Result<Step> {
        // Everything a DataUpload needs before acceptance is in its spec, checked by validation.
        Ok(Step::Done(()))
    }

    async fn expose(&self, ctx: &Context) -> Result<Step<Exposure>> {
        snapshot::expose(self, ctx).await
    }

    fn call(&self, repository: Repository, volume: Volume) -> Call {
        Call::Backup(backup_request(self, repository, volume))
    }

    async fn complete(
        &self,
        ctx: &Context,
        node: &str,
        _message: &str,
        r: BackupResult,
    ) -> Result<Step<Self>> {
        ctx.metrics.moved("DataUpload", r.read_bytes);
        let repo = match repo::repo_target(ctx, self).await? {
            Step::Done(t) => t.url,
            _ => String::new(),
        };
        let mut done = self.clone();
        let s = done.status.get_or_insert_with(DataUploadStatus::default);
        s.snapshot_id = Some(r.snapshot_id.clone());
        s.incremental_bytes = Some(r.incremental_bytes as i64);
        s.progress = Some(DataMoveProgress {
            total_bytes: r.total_bytes as i64,
            bytes_done: r.total_bytes as i64,
        });
        s.node = Some(node.to_string());
        s.node_os = Some("linux".into());
        s.path = Some(ferry_proto::pod::VOLUME_PATH.into());
        s.message = (r.total_bytes == 0).then(|| "volume was empty so no data was upload".into());
        // The data path's own entries first; Ferry's keys below win over any of the same name.
        let mut result = r.result;
        result.extend([
            ("repository".to_string(), repo),
            ("snapshotID".to_string(), r.snapshot_id),
            ("files".to_string(), r.files.to_string()),
            ("storedBytes".to_string(), r.stored_bytes.to_string()),
            // Also here: Velero releases before 1.18 have no status.incrementalBytes in their CRD, so
            // the API server drops that field.
            (
                "incrementalBytes".to_string(),
                r.incremental_bytes.to_string(),
            ),
        ]);
        s.data_mover_result = Some(result);
        Ok(Step::Done(done))
    }

    async fn cleanup(&self, ctx: &Context) -> Result<usize> {
        Ok(delete_pods_and_pvcs(ctx, self).await? + snapshot::cleanup(self, ctx).await?)
    }
}

/// The DataUpload's backup call: the source PVC, the volume, the Velero backup's name and uid as tags, the
/// `spec.dataMoverConfig`.
pub fn backup_request(du: &DataUpload, repository: Repository, volume: Volume) -> BackupRequest {
    let tags = [
        ("velero.io/backup-name", TAG_BACKUP_NAME),
        ("velero.io/backup-uid", TAG_BACKUP_UID),
    ]
    .into_iter()
    .filter_map(|(label, tag)| Some((tag.to_string(), du.labels().get(label)?.clone())))
    .collect();
    BackupRequest {
        operation_id: du.name_any(),
        repository: Some(repository),
        volume: Some(volume),
        source: Some(Source {
            namespace: du.spec.source_namespace.clone(),
            pvc: du.spec.source_pvc.clone(),
            storage_class: du
                .spec
                .csi_snapshot
                .as_ref()
                .map(|c| c.storage_class.clone())
                .unwrap_or_default(),
            node: String::new(),
        }),
        tags,
        parent_snapshot_id: String::new(),
        deadline_unix_ms: 0,
        mover_config: du.mover_config_map(),
    }
}

#[cfg(test)]
mod tests {
    //! The backup flow's own steps against kube's mock service.
    use std::collections::BTreeMap;

    use super::*;
    use crate::testing::{ctx, du, echo_or, serve};
    use serde_json::json;

    #[test]
    fn the_backup_request_names_the_source_and_the_backup_tags() {
        let cr = du(json!(null), |v| {
            v["metadata"]["labels"] =
                json!({"velero.io/backup-name": "b1", "velero.io/backup-uid": "bu1"});
            v["spec"]["dataMoverConfig"] = json!({"k": "v"});
        });
        let repo = Repository {
            bucket: "b".into(),
            ..Default::default()
        };
        let volume = crate::pod::request_volume(false);
        let Call::Backup(r) = cr.call(repo.clone(), volume.clone()) else {
            panic!("not a backup")
        };
        assert_eq!(r.operation_id, "b1-x");
        assert_eq!(r.repository, Some(repo));
        assert_eq!(r.volume, Some(volume.clone()));
        let source = r.source.expect("source");
        assert_eq!(
            (source.namespace.as_str(), source.pvc.as_str()),
            ("app", "p")
        );
        assert_eq!(source.storage_class, "sc");
        assert_eq!(r.tags.len(), 2, "{:?}", r.tags);
        assert_eq!(r.tags[TAG_BACKUP_NAME], "b1");
        assert_eq!(r.tags[TAG_BACKUP_UID], "bu1");
        assert_eq!(r.mover_config["k"], "v");
        assert_eq!((r.deadline_unix_ms, r.parent_snapshot_id.as_str()), (0, ""));
        let untagged = backup_request(&du(json!(null), |_| {}), Repository::default(), volume);
        assert!(untagged.tags.is_empty() && untagged.mover_config.is_empty());
    }

    #[tokio::test]
    async fn completion_records_the_mover_snapshot_where_velero_reads_it() {
        let (ctx, handle) = ctx();
        // The BSL is gone by now: the repository is recorded empty, the CR still completes.
        let server = serve(handle, echo_or(|_| None));
        let cr = du(json!({"phase": "InProgress"}), |_| {});
        let r = BackupResult {
            snapshot_id: "s1".into(),
            total_bytes: 10,
            read_bytes: 10,
            incremental_bytes: 4,
            stored_bytes: 3,
            files: 2,
            dirs: 1,
            version: ferry_proto::result::RESULT_VERSION,
            result: BTreeMap::from([
                (
                    "object".to_string(),
                    "plugins/acme/ns/s1.tar.gz".to_string(),
                ),
                ("snapshotID".to_string(), "a data path's own".to_string()),
            ]),
        };
        let step = cr
            .complete(&ctx, "node-b", "{}", r)
            .await
            .expect("complete");
        drop(ctx);
        server.await.expect("server");
        let Step::Done(done) = step else {
            panic!("not done: {step:?}")
        };
        let s = done.status.expect("status");
        assert_eq!(s.snapshot_id.as_deref(), Some("s1"));
        assert_eq!(s.incremental_bytes, Some(4));
        assert_eq!(s.node.as_deref(), Some("node-b"));
        assert_eq!(s.message, None);
        let result = s.data_mover_result.expect("dataMoverResult");
        assert_eq!(result["snapshotID"], "s1", "Ferry's keys win");
        assert_eq!(
            result["object"], "plugins/acme/ns/s1.tar.gz",
            "the data path's entries are kept"
        );
        assert_eq!(result["incrementalBytes"], "4");
        assert_eq!(result["repository"], "");
    }
}
