//! DataUpload: the backup flow. The volume is the CSI snapshot Velero hands over, exposed by
//! [`crate::expose::snapshot`]; on success the mover's snapshot is recorded where Velero reads it.

use std::collections::BTreeMap;

use ferry_proto::labels::{TAG_BACKUP_NAME, TAG_BACKUP_UID};
use ferry_proto::result::BackupResult;
use ferry_proto::velero::{DataMoveProgress, DataUpload, DataUploadStatus};
use kube::ResourceExt;

use crate::context::Context;
use crate::error::Result;
use crate::expose::{Exposure, snapshot};
use crate::flow::{Flow, delete_pods_and_pvcs};
use crate::objects;
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

    fn mover_args(&self) -> Vec<String> {
        let mut args = objects::owner_args(self);
        args.push(format!(
            "--source-pvc={}/{}",
            self.spec.source_namespace, self.spec.source_pvc
        ));
        for (label, tag) in [
            ("velero.io/backup-name", TAG_BACKUP_NAME),
            ("velero.io/backup-uid", TAG_BACKUP_UID),
        ] {
            if let Some(v) = self.labels().get(label) {
                args.push(format!("--tag={tag}={v}"));
            }
        }
        args
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
        s.data_mover_result = Some(BTreeMap::from([
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
        ]));
        Ok(Step::Done(done))
    }

    async fn cleanup(&self, ctx: &Context) -> Result<usize> {
        Ok(delete_pods_and_pvcs(ctx, self).await? + snapshot::cleanup(self, ctx).await?)
    }
}
