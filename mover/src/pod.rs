//! `ferry pod backup|restore`: the mover-pod entrypoint of the contract in [`ferry_proto::pod`]. Runs the
//! engine on the exposed volume, reports through Events on the CR, writes the result (or the error) to the
//! termination message and exits 0 / 1 / 2 (done / failed / canceled).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use ferry_mover::backup::{BackupOptions, ParentSpec};
use ferry_mover::crypto::KdfParams;
use ferry_mover::events::{EventReporter, Target};
use ferry_mover::progress::Progress;
use ferry_mover::repo::Repository;
use ferry_mover::restore::RestoreOptions;
use ferry_mover::snapshot::SourceKind;
use ferry_proto::labels;
use ferry_proto::pod as contract;
use ferry_proto::report::{REPORT_VERSION, Report, Stage};
use ferry_proto::result::{RESULT_VERSION, RestoreResult};

use crate::cli::Ctx;

/// Which CR the pod works for, and how it reports.
#[derive(Debug, clap::Args)]
pub struct PodArgs {
    /// `DataUpload` or `DataDownload`.
    #[arg(long)]
    pub kind: String,
    /// CR name.
    #[arg(long)]
    pub name: String,
    /// CR namespace.
    #[arg(long)]
    pub namespace: String,
    /// CR uid.
    #[arg(long)]
    pub uid: String,
    /// The volume is a raw block device at the contract's device path.
    #[arg(long)]
    pub block: bool,
    /// Seconds between progress events.
    #[arg(long, default_value_t = 5)]
    pub report_interval: u64,
    /// Where the result goes.
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// Emit no Events (outside a cluster).
    #[arg(long)]
    pub no_events: bool,
}

/// The pod operations.
#[derive(Debug, clap::Subcommand)]
pub enum PodOp {
    /// Back up the exposed volume.
    Backup {
        #[command(flatten)]
        pod: PodArgs,
        /// The source PVC as NAMESPACE/NAME: recorded as a tag, selects the parent snapshot.
        #[arg(long)]
        source_pvc: String,
        /// Extra tags, K=V.
        #[arg(long = "tag", value_parser = crate::cli::parse_tag)]
        tags: Vec<(String, String)>,
        /// Volume path (default: the contract's path for the volume mode).
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Forget snapshots by tag in every repository under `--repo` (one per source namespace), then prune
    /// the repositories that lost snapshots.
    Maintain {
        #[command(flatten)]
        pod: PodArgs,
        #[command(flatten)]
        args: MaintainArgs,
    },
    /// Restore a snapshot into the exposed volume.
    Restore {
        #[command(flatten)]
        pod: PodArgs,
        /// Snapshot id.
        #[arg(long)]
        snapshot: String,
        /// Write runs of zeros as holes.
        #[arg(long)]
        sparse: bool,
        /// Volume path (default: the contract's path for the volume mode).
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

/// Tags and grace period of a maintenance run.
#[derive(Debug, clap::Args)]
pub struct MaintainArgs {
    /// Forget snapshots carrying all these tags, K=V (repeatable), in every namespace repository.
    #[arg(long = "forget-tag", value_parser = crate::cli::parse_tag, required = true)]
    pub forget_tags: Vec<(String, String)>,
    /// Prune grace period in seconds.
    #[arg(long, default_value_t = crate::cli::DEFAULT_GRACE_SECONDS)]
    pub grace_seconds: u64,
}

enum Outcome {
    Done(String, Report),
    Failed(String),
    Canceled,
}

/// Runs a pod operation to its exit code. Never returns an error: every failure becomes the termination
/// message and exit code 1.
/// How long a maintenance pod waits for another maintenance run on the same repository.
const MAINTENANCE_LOCK_WAIT_SECONDS: u64 = 600;

pub async fn run(ctx: &Ctx, op: PodOp) -> ExitCode {
    let pod = match &op {
        PodOp::Backup { pod, .. } | PodOp::Restore { pod, .. } | PodOp::Maintain { pod, .. } => pod,
    };
    let target = Target {
        kind: pod.kind.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        uid: pod.uid.clone(),
    };
    let mut reporter = if pod.no_events {
        None
    } else {
        match EventReporter::connect(target).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes client: running without events");
                None
            }
        }
    };
    let progress = Arc::new(Progress::default());
    let signals = {
        let p = progress.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                tracing::warn!("SIGTERM: canceling at the next safe point");
                p.cancel();
            }
        })
    };
    if let Some(r) = reporter.as_mut() {
        r.emit(&report(Stage::Started, &progress, String::new()))
            .await;
    }
    let term_log = pod.termination_log.clone();
    let interval = Duration::from_secs(pod.report_interval.max(1));
    let work = work(ctx, &op, progress.clone());
    tokio::pin!(work);
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let mut last_done = u64::MAX;
    let outcome = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => {
                let r = report(Stage::Progress, &progress, String::new());
                if r.done_bytes != last_done {
                    last_done = r.done_bytes;
                    if let Some(rep) = reporter.as_mut() { rep.emit(&r).await; }
                }
            }
        }
    };
    signals.abort();
    let (final_report, message, code) = match outcome {
        Outcome::Done(json, r) => (r, json, ExitCode::SUCCESS),
        Outcome::Canceled => (
            report(Stage::Canceled, &progress, String::new()),
            "data path canceled".to_string(),
            ExitCode::from(contract::EXIT_CANCELED as u8),
        ),
        Outcome::Failed(e) => {
            eprintln!("ferry: error: {e}");
            (
                report(Stage::Failed, &progress, e.clone()),
                e,
                ExitCode::from(contract::EXIT_FAILED as u8),
            )
        }
    };
    if let Some(r) = reporter.as_mut() {
        r.emit(&final_report).await;
    }
    write_termination_log(&term_log, &message);
    code
}

fn report(stage: Stage, p: &Progress, message: String) -> Report {
    let r = p.report();
    Report {
        version: REPORT_VERSION,
        stage: stage as i32,
        total_bytes: if r.totals_known { r.bytes_total } else { 0 },
        done_bytes: r.bytes_done,
        total_files: if r.totals_known { r.files_total } else { 0 },
        done_files: r.files_done,
        message,
    }
}

/// The final report of a finished operation: everything done.
fn completed(bytes: u64, files: u64) -> Report {
    Report {
        version: REPORT_VERSION,
        stage: Stage::Completed as i32,
        total_bytes: bytes,
        done_bytes: bytes,
        total_files: files,
        done_files: files,
        message: String::new(),
    }
}

fn write_termination_log(path: &std::path::Path, message: &str) {
    let mut m = message.to_string();
    if m.len() > contract::TERMINATION_MESSAGE_MAX {
        let mut cut = contract::TERMINATION_MESSAGE_MAX - 3;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push_str("...");
    }
    if let Err(e) = std::fs::write(path, m) {
        tracing::warn!(error = %e, path = %path.display(), "cannot write the termination message");
    }
}

async fn work(ctx: &Ctx, op: &PodOp, progress: Arc<Progress>) -> Outcome {
    let res = match op {
        PodOp::Backup {
            pod,
            source_pvc,
            tags,
            path,
        } => backup(ctx, pod, source_pvc, tags, path.clone(), progress.clone()).await,
        PodOp::Restore {
            pod,
            snapshot,
            sparse,
            path,
        } => restore(ctx, pod, snapshot, *sparse, path.clone(), progress.clone()).await,
        PodOp::Maintain { args, .. } => maintain(ctx, args, progress.clone()).await,
    };
    match res {
        Ok(o) => o,
        Err(e)
            if progress.is_canceled()
                || e.downcast_ref::<ferry_mover::Error>()
                    .is_some_and(|e| matches!(e, ferry_mover::Error::Canceled)) =>
        {
            Outcome::Canceled
        }
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

fn volume_path(pod: &PodArgs, path: Option<PathBuf>) -> PathBuf {
    path.unwrap_or_else(|| {
        if pod.block {
            contract::DEVICE_PATH.into()
        } else {
            contract::VOLUME_PATH.into()
        }
    })
}

/// Opens the repository, creating it on first use. Safe when several pods race to create it: exactly one
/// `init` wins (conditional put of the config) and the others open what it made.
async fn open_or_init(ctx: &Ctx) -> Result<Arc<Repository>> {
    for attempt in 0..5 {
        match ctx.open().await {
            Ok(r) => return Ok(r),
            Err(e)
                if e.downcast_ref::<ferry_mover::Error>()
                    .is_some_and(|e| matches!(e, ferry_mover::Error::NoRepository(_))) =>
            {
                match Repository::init(ctx.backend().await?, &ctx.password()?, KdfParams::default())
                    .await
                {
                    Ok(cfg) => tracing::info!(id = %cfg.id, "created the repository"),
                    Err(ferry_mover::Error::AlreadyInitialised(_)) => {}
                    Err(e) => return Err(e).context("creating the repository"),
                }
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    Err(anyhow!("the repository could not be opened or created"))
}

async fn backup(
    ctx: &Ctx,
    pod: &PodArgs,
    source_pvc: &str,
    tags: &[(String, String)],
    path: Option<PathBuf>,
    progress: Arc<Progress>,
) -> Result<Outcome> {
    let source = volume_path(pod, path);
    ferry_mover::backup::start_scan(&source, pod.block, &progress);
    let repo = open_or_init(ctx).await?;
    let mut opts = BackupOptions::new(source);
    opts.block_device = pod.block;
    opts.tags = tags.iter().cloned().collect::<BTreeMap<_, _>>();
    opts.tags
        .insert(labels::TAG_SOURCE_PVC.into(), source_pvc.to_string());
    opts.tags
        .insert(labels::TAG_DATA_UPLOAD.into(), pod.name.clone());
    opts.hostname = std::env::var("NODE_NAME").ok();
    opts.uploads = 4;
    // Parent: the latest snapshot of the same PVC and volume mode, whatever its other tags.
    let kind = if pod.block {
        SourceKind::Block
    } else {
        SourceKind::Filesystem
    };
    let parent = repo.snapshots().await?.into_iter().rev().find(|(_, s)| {
        s.source == kind
            && s.tags.get(labels::TAG_SOURCE_PVC).map(String::as_str) == Some(source_pvc)
    });
    opts.parent = match parent {
        Some((id, _)) => ParentSpec::Snapshot(id.to_hex()),
        None => ParentSpec::None,
    };
    let out = ferry_mover::backup::backup(repo, opts, progress).await?;
    let s = &out.snapshot.summary;
    let result = s.result(&out.id);
    Ok(Outcome::Done(
        serde_json::to_string(&result)?,
        completed(s.total_bytes, s.files),
    ))
}

async fn restore(
    ctx: &Ctx,
    pod: &PodArgs,
    snapshot: &str,
    sparse: bool,
    path: Option<PathBuf>,
    progress: Arc<Progress>,
) -> Result<Outcome> {
    let repo = ctx.open().await?;
    let (id, snap) = repo
        .find_snapshot(snapshot)
        .await
        .with_context(|| format!("snapshot {snapshot}"))?;
    let opts = RestoreOptions {
        target: volume_path(pod, path),
        sparse,
        verify: false,
        downloads: 4,
    };
    let s = ferry_mover::restore::restore(repo, &snap, &opts, progress).await?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    let result = RestoreResult {
        version: RESULT_VERSION,
        snapshot_id: id.to_hex(),
        total_bytes: s.bytes,
        files: s.files,
        dirs: s.dirs,
    };
    Ok(Outcome::Done(
        serde_json::to_string(&result)?,
        completed(s.bytes, s.files),
    ))
}

async fn maintain(ctx: &Ctx, args: &MaintainArgs, progress: Arc<Progress>) -> Result<Outcome> {
    let root = ctx
        .global
        .repo
        .clone()
        .ok_or_else(|| anyhow!("no repository root given"))?;
    // Each source namespace's repository is a directory with a `config` under the root.
    let namespaces: std::collections::BTreeSet<String> = ctx
        .backend()
        .await?
        .list("")
        .await?
        .into_iter()
        .filter_map(|o| {
            o.key
                .strip_suffix("/config")
                .filter(|ns| !ns.contains('/'))
                .map(str::to_string)
        })
        .collect();
    let mut repos = Vec::new();
    for ns in namespaces {
        let mut global = ctx.global.clone();
        global.repo = Some(format!("{}/{ns}", root.trim_end_matches('/')));
        let sub = Ctx { global };
        let repo = sub
            .open()
            .await
            .with_context(|| format!("repository of namespace {ns}"))?;
        let gone = ferry_mover::prune::forget(&repo, |_, s| {
            args.forget_tags
                .iter()
                .all(|(k, v)| s.tags.get(k) == Some(v))
        })
        .await?;
        if gone.is_empty() {
            continue;
        }
        // Another maintenance run on the same repository (a second controller, a CLI user) is waited for.
        let report = ferry_mover::prune::prune_with(
            repo,
            &crate::cli::prune_options(args.grace_seconds, MAINTENANCE_LOCK_WAIT_SECONDS),
            progress.clone(),
        )
        .await?;
        tracing::info!(namespace = %ns, forgotten = gone.len(), ?report, "pruned");
        repos.push(serde_json::json!({
            "namespace": ns,
            "forgotten": gone.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
            "prune": report,
        }));
    }
    let result = serde_json::json!({"version": RESULT_VERSION, "repositories": repos});
    Ok(Outcome::Done(result.to_string(), completed(0, 0)))
}
