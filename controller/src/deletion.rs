//! Backup deletion. Velero never deletes a third-party mover's data, and the DeleteBackupRequest it
//! processes is gone a moment after the Backup is, so Ferry holds a finalizer on every Backup that moved
//! data with one of its movers. When such a Backup is being deleted (`velero backup delete`, TTL expiry),
//! the controller runs a maintenance pod (a data-path Forget call) that forgets the backup's snapshots in every
//! namespace repository under the backup's BSL and prunes them, then releases the Backup
//! (`design/0003-backup-deletion.md`). Ferry writes nothing else on Backups.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::datapath::agent::agent_job::Call;
use ferry_proto::datapath::{ForgetRequest, Repository};
use ferry_proto::labels;
use ferry_proto::velero::Backup;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::clock;
use crate::config::Mover;
use crate::context::Context;
use crate::cr::Direction;
use crate::error::Result;
use crate::objects;
use crate::pod::{self, PodPlan, PodState};
use crate::repo::{self, RepoTarget};
use crate::step::Step;

/// Finalizer on Backups whose data Ferry moved.
pub const BACKUP_FINALIZER: &str = "ferry.dev/backup-data";

fn pod_name(b: &Backup) -> String {
    format!("ferry-prune-{}", b.name_any())
}

fn uses_ferry(ctx: &Context, b: &Backup) -> bool {
    b.spec.snapshot_move_data == Some(true)
        && ctx.config.mover(b.spec.datamover.as_deref()).is_some()
}

/// Sets the Backup's finalizers, checked against the resourceVersion read.
async fn set_finalizers(ctx: &Context, b: &Backup, finalizers: Vec<String>) -> Result<()> {
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &b.namespace().unwrap_or_default());
    api.patch(
        &b.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": b.resource_version(),
        }})),
    )
    .await?;
    Ok(())
}

async fn release(ctx: &Context, b: &Backup, outcome: &str) -> Result<Action> {
    tracing::info!(backup = %b.name_any(), outcome, "backup deletion");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &b.namespace().unwrap_or_default());
    objects::delete_idempotent(&pods, &pod_name(b), None).await?;
    let rest = b
        .finalizers()
        .iter()
        .filter(|f| *f != BACKUP_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(ctx, b, rest).await?;
    Ok(Action::await_change())
}

/// Whether a maintenance pod has been pending for longer than the prepare timeout.
fn pending_too_long(ctx: &Context, p: &Pod) -> bool {
    p.creation_timestamp()
        .is_some_and(|t| clock::since(t.0).as_secs() > ctx.config.prepare_timeout().as_secs())
}

/// Reconciles one Backup.
pub async fn reconcile(b: Arc<Backup>, ctx: Arc<Context>) -> Result<Action> {
    let ours = b.finalizers().iter().any(|f| f == BACKUP_FINALIZER);
    if b.meta().deletion_timestamp.is_none() {
        if !ours && ctx.config.prune_on_backup_deletion && uses_ferry(&ctx, &b) {
            let mut f = b.finalizers().to_vec();
            f.push(BACKUP_FINALIZER.into());
            set_finalizers(&ctx, &b, f).await?;
        }
        return Ok(Action::await_change());
    }
    if !ours {
        return Ok(Action::await_change());
    }
    match prune(&b, &ctx).await {
        // A request the API server refuses (a rejected maintenance pod, say) will be refused again: the
        // data stays, the Backup must not hang in Terminating.
        Err(e) if e.is_permanent() => release(&ctx, &b, &format!("failed: {}", e.describe())).await,
        out => out,
    }
}

/// The deleted Backup's maintenance pod: start it, follow it, release the Backup when it ends.
async fn prune(b: &Backup, ctx: &Context) -> Result<Action> {
    let ns = b.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(p) = objects::get_opt(&pods, &pod_name(b)).await? {
        return follow(b, ctx, &p).await;
    }
    start(b, ctx, &pods).await
}

/// The maintenance pod exists: release the Backup once it ended, or never started within the prepare
/// timeout.
async fn follow(b: &Backup, ctx: &Context, p: &Pod) -> Result<Action> {
    match pod::state(p) {
        PodState::Succeeded { message, .. } => release(ctx, b, &format!("done: {message}")).await,
        PodState::Failed { message, .. }
        | PodState::Pending {
            fatal: Some(message),
            ..
        } => {
            // The data stays (nothing was lost); the Backup must not hang in Terminating.
            tracing::error!(backup = %b.name_any(), %message, "pruning the deleted backup's data failed");
            release(ctx, b, &format!("failed: {message}")).await
        }
        PodState::Pending { waiting, .. } if pending_too_long(ctx, p) => {
            let why = waiting.unwrap_or_else(|| "pending".into());
            let limit = ctx.config.prepare_timeout().as_secs();
            release(
                ctx,
                b,
                &format!("failed: maintenance pod not running after {limit}s: {why}"),
            )
            .await
        }
        _ => Ok(Action::requeue(Duration::from_secs(2))),
    }
}

/// Starts the maintenance pod, one at a time, for the Backup's repositories.
async fn start(b: &Backup, ctx: &Context, pods: &Api<Pod>) -> Result<Action> {
    let ns = b.namespace().unwrap_or_default();
    // One maintenance pod at a time: two prunes of one repository could disagree on its index.
    let busy = pods
        .list(&ListParams::default().labels(&format!(
            "{}=maintenance,{}={}",
            labels::COMPONENT,
            labels::MANAGED_BY,
            labels::MANAGED_BY_VALUE
        )))
        .await?;
    if !busy.items.is_empty() {
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    let bsl = b
        .spec
        .storage_location
        .clone()
        .unwrap_or_else(|| "default".into());
    let Some(mover) = ctx.config.mover(b.spec.datamover.as_deref()).cloned() else {
        return release(ctx, b, "skipped: mover no longer configured").await;
    };
    let name = b.spec.datamover.as_deref().unwrap_or_default();
    let repo = match repo::repo_target_in(ctx, &ns, &bsl, name, None).await? {
        Step::Done(r) => r,
        Step::Fail(m) | Step::Wait { reason: m, .. } => {
            return release(ctx, b, &format!("failed: {m}")).await;
        }
    };
    let plan = maintenance_plan(b, ctx, repo, mover);
    let mut p = pod::build(&plan, &ctx.config);
    if let Some(l) = p.metadata.labels.as_mut() {
        l.insert(labels::COMPONENT.to_string(), "maintenance".to_string());
    }
    objects::create_idempotent(pods, &p).await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// The maintenance pod: a Forget call forgetting the Backup's snapshots in every namespace repository under
/// `repo` (the mover's root), then pruning; no volume.
fn maintenance_plan(b: &Backup, ctx: &Context, repo: RepoTarget, mover: Mover) -> PodPlan {
    PodPlan {
        name: pod_name(b),
        namespace: b.namespace().unwrap_or_default(),
        labels: std::collections::BTreeMap::from([
            (labels::OWNER_KIND.to_string(), "Backup".to_string()),
            (
                labels::OWNER_NAME.to_string(),
                labels::label_value(&b.name_any()),
            ),
            (labels::OWNER_UID.to_string(), b.uid().unwrap_or_default()),
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
        ]),
        owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: Backup::api_version(&()).into_owned(),
            kind: Backup::kind(&()).into_owned(),
            name: b.name_any(),
            uid: b.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        },
        direction: Direction::Backup,
        mover,
        pvc: None,
        block: false,
        nodes: Vec::new(),
        cr: objects::cr_ref(b),
        call: Call::Forget(forget_request(
            b,
            repo.repository(),
            ctx.config.prune_grace_seconds,
        )),
        repo,
        password_secret: ctx.config.repository_password_secret.clone(),
    }
}

/// Forget the snapshots of Backup `b` in `repository` (the mover's root), keeping data unreferenced for
/// less than `grace_seconds`.
fn forget_request(b: &Backup, repository: Repository, grace_seconds: u64) -> ForgetRequest {
    // Snapshots carry the Backup's name as the DataUploads' `velero.io/backup-name` label gave it (names
    // are unique per location, and survive a sync into another cluster, unlike uids).
    ForgetRequest {
        operation_id: b.name_any(),
        repository: Some(repository),
        tags: [(
            labels::TAG_BACKUP_NAME.to_string(),
            labels::velero_label_value(&b.name_any()),
        )]
        .into_iter()
        .collect(),
        grace_seconds,
        deadline_unix_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    //! Backup deletion's steps against kube's mock service.
    use super::*;
    use crate::testing::{Seen, ago, ctx, echo_or, ok, serve};
    use http::Method;

    fn backup(deleting: bool, finalizers: &[&str]) -> Backup {
        let mut v = json!({
            "apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {"name": "b1", "namespace": "velero", "uid": "bu1", "resourceVersion": "3",
                "finalizers": finalizers},
            "spec": {"snapshotMoveData": true, "datamover": "ferry", "storageLocation": "default"},
        });
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!(ago(1));
        }
        serde_json::from_value(v).expect("backup")
    }

    /// A patched Backup: the API server answers with the whole object.
    fn patched_backup(s: &Seen) -> Option<http::Response<kube::client::Body>> {
        s.is(&Method::PATCH, "/backups/b1")
            .then(|| ok(serde_json::to_value(backup(false, &[])).expect("json")))
    }

    #[tokio::test]
    async fn the_maintenance_pod_forgets_the_backup_in_the_movers_root() {
        let (ctx, _handle) = ctx();
        let root = RepoTarget {
            url: "s3://b/velero/plugins/ferry".into(),
            bucket: "b".into(),
            prefix: "velero/plugins/ferry".into(),
            ..Default::default()
        };
        let mover = ctx.config.movers["ferry"].clone();
        let plan = maintenance_plan(&backup(true, &[]), &ctx, root, mover);
        let p = pod::build(&plan, &ctx.config);
        let spec = p.spec.as_ref().expect("spec");
        assert!(
            spec.volumes
                .iter()
                .flatten()
                .all(|v| v.persistent_volume_claim.is_none()),
            "a maintenance pod has no volume"
        );
        let job = pod::tests::job_of(&p);
        let who = job.cr.expect("cr");
        assert_eq!((who.kind.as_str(), who.uid.as_str()), ("Backup", "bu1"));
        let Some(Call::Forget(r)) = job.call else {
            panic!("not a forget: {:?}", job.call)
        };
        assert_eq!(r.operation_id, "b1");
        assert_eq!(
            r.repository.expect("repository").prefix,
            "velero/plugins/ferry"
        );
        assert_eq!(r.tags.len(), 1);
        assert_eq!(r.tags[labels::TAG_BACKUP_NAME], "b1");
        assert_eq!(r.grace_seconds, ctx.config.prune_grace_seconds);
    }

    #[tokio::test]
    async fn a_backup_moving_data_with_ferry_gets_the_finalizer_once() {
        let (ctx, handle) = ctx();
        let server = serve(handle, echo_or(patched_backup));
        reconcile(Arc::new(backup(false, &["other/keep"])), ctx.clone())
            .await
            .expect("reconcile");
        reconcile(Arc::new(backup(false, &[BACKUP_FINALIZER])), ctx)
            .await
            .expect("reconcile");
        let seen = server.await.expect("server");
        assert_eq!(seen.len(), 1, "{seen:#?}");
        assert!(seen[0].is(&Method::PATCH, "/namespaces/velero/backups/b1"));
        assert_eq!(
            seen[0].body["metadata"],
            json!({"finalizers": ["other/keep", BACKUP_FINALIZER], "resourceVersion": "3"})
        );
    }

    #[tokio::test]
    async fn a_finished_maintenance_pod_releases_the_backup() {
        let (ctx, handle) = ctx();
        let server = serve(
            handle,
            echo_or(|s| {
                if let Some(r) = patched_backup(s) {
                    return Some(r);
                }
                s.is(&Method::GET, "/namespaces/velero/pods/ferry-prune-b1")
                    .then(|| {
                        ok(json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "ferry-prune-b1", "namespace": "velero"},
                        "spec": {"nodeName": "n1", "containers": [{"name": "mover"}]},
                        "status": {"phase": "Succeeded"}}))
                    })
            }),
        );
        let out = reconcile(
            Arc::new(backup(true, &[BACKUP_FINALIZER, "other/keep"])),
            ctx,
        )
        .await
        .expect("reconcile");
        let seen = server.await.expect("server");
        assert_eq!(out, Action::await_change());
        assert!(
            seen.iter()
                .any(|s| s.is(&Method::DELETE, "/pods/ferry-prune-b1")),
            "{seen:#?}"
        );
        let release = seen
            .iter()
            .find(|s| s.is(&Method::PATCH, "/backups/b1"))
            .unwrap_or_else(|| panic!("not released: {seen:#?}"));
        assert_eq!(
            release.body["metadata"]["finalizers"],
            json!(["other/keep"])
        );
    }
}
