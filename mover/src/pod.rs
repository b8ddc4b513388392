//! `ferry pod backup|restore|maintain`: the mover-pod run of the contract in [`ferry_proto::pod`]. Runs the
//! engine on the exposed volume (or, for maintenance, on every namespace repository under the root), reports
//! through Kubernetes Events on the CR ([`crate::events`]), writes the result document (or the error) to the
//! termination message and ends with 0 / 1 / 2 (done / failed / canceled). The `ferry` binary only parses
//! the arguments into a [`Job`] and an [`Operation`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::backup::{BackupOptions, ParentSpec};
use ferry_engine::cancel::CancelOnSignals;
use ferry_engine::forget::Selection;
use ferry_engine::open::Target;
use ferry_engine::progress::Progress;
use ferry_engine::prune::PruneOptions;
use ferry_engine::restore::RestoreOptions;
use ferry_engine::snapshot::SourceKind;
use ferry_proto::labels;
use ferry_proto::pod as contract;
use ferry_proto::report::{REPORT_VERSION, Report, Stage};

use crate::events::{EventReporter, Target as EventTarget};

/// Which CR the pod works for, and how it reports.
#[derive(Debug, Clone)]
pub struct Job {
    /// The CR the Events go to: kind (`DataUpload` or `DataDownload`), name, namespace, uid.
    pub cr: EventTarget,
    /// The volume is a raw block device at the contract's device path.
    pub block: bool,
    /// Time between progress events (at least a second).
    pub report_interval: Duration,
    /// Where the result goes.
    pub termination_log: PathBuf,
    /// Emit Events (off outside a cluster).
    pub events: bool,
}

/// What the pod does.
#[derive(Debug, Clone)]
pub enum Operation {
    /// Back up the exposed volume.
    Backup {
        /// The source PVC as NAMESPACE/NAME: recorded as a tag, selects the parent snapshot.
        source_pvc: String,
        /// Extra tags.
        tags: Vec<(String, String)>,
        /// Volume path (default: the contract's path for the volume mode).
        path: Option<PathBuf>,
    },
    /// Restore a snapshot into the exposed volume.
    Restore {
        /// Snapshot id.
        snapshot: String,
        /// Write runs of zeros as holes.
        sparse: bool,
        /// Volume path (default: the contract's path for the volume mode).
        path: Option<PathBuf>,
    },
    /// Forget the snapshots carrying all these tags in every repository under the target (one per source
    /// namespace), then prune the repositories that lost snapshots.
    Maintain {
        /// The tags, K=V; at least one.
        forget_tags: Vec<(String, String)>,
        /// Prune grace period in seconds.
        grace_seconds: u64,
    },
}

/// A pod run's failure (it becomes the termination message).
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Engine(#[from] ferry_engine::Error),
    #[error("encoding the result: {0}")]
    Json(#[from] serde_json::Error),
}

/// How long a maintenance pod waits for another maintenance run on the same repository.
const MAINTENANCE_LOCK_WAIT_SECONDS: u64 = 600;

enum Outcome {
    Done(String, Report),
    Failed(String),
    Canceled,
}

/// Runs a pod operation on the repository `target` to its exit code. Never returns an error: every failure
/// becomes the termination message and exit code 1.
pub async fn run(target: &Target, job: &Job, op: &Operation) -> ExitCode {
    let mut reporter = if !job.events {
        None
    } else {
        match EventReporter::connect(job.cr.clone()).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes client: running without events");
                None
            }
        }
    };
    let progress = Arc::new(Progress::default());
    let signals = CancelOnSignals::new(progress.clone());
    if let Some(r) = reporter.as_mut() {
        r.emit(&report(Stage::Started, &progress, String::new()))
            .await;
    }
    let interval = job.report_interval.max(Duration::from_secs(1));
    let work = work(target, job, op, progress.clone());
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
    drop(signals);
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
    write_termination_log(&job.termination_log, &message);
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

async fn work(target: &Target, job: &Job, op: &Operation, progress: Arc<Progress>) -> Outcome {
    let res = match op {
        Operation::Backup {
            source_pvc,
            tags,
            path,
        } => {
            backup(
                target,
                job,
                source_pvc,
                tags,
                path.clone(),
                progress.clone(),
            )
            .await
        }
        Operation::Restore {
            snapshot,
            sparse,
            path,
        } => {
            restore(
                target,
                job,
                snapshot,
                *sparse,
                path.clone(),
                progress.clone(),
            )
            .await
        }
        Operation::Maintain {
            forget_tags,
            grace_seconds,
        } => maintain(target, forget_tags, *grace_seconds, progress.clone()).await,
    };
    match res {
        Ok(o) => o,
        Err(e) if progress.is_canceled() || matches!(&e, Error::Engine(e) if e.is_canceled()) => {
            Outcome::Canceled
        }
        Err(e) => Outcome::Failed(error_chain(&e)),
    }
}

/// `error: cause: cause of the cause`, as the termination message carries it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn volume_path(job: &Job, path: Option<PathBuf>) -> PathBuf {
    path.unwrap_or_else(|| {
        if job.block {
            contract::DEVICE_PATH.into()
        } else {
            contract::VOLUME_PATH.into()
        }
    })
}

async fn backup(
    target: &Target,
    job: &Job,
    source_pvc: &str,
    tags: &[(String, String)],
    path: Option<PathBuf>,
    progress: Arc<Progress>,
) -> Result<Outcome, Error> {
    let source = volume_path(job, path);
    ferry_engine::backup::start_scan(&source, job.block, &progress);
    let repo = target.open_or_init().await?;
    let mut opts = BackupOptions::new(source);
    opts.block_device = job.block;
    opts.tags = tags.iter().cloned().collect::<BTreeMap<_, _>>();
    opts.tags
        .insert(labels::TAG_SOURCE_PVC.into(), source_pvc.to_string());
    opts.tags
        .insert(labels::TAG_DATA_UPLOAD.into(), job.cr.name.clone());
    opts.hostname = std::env::var("NODE_NAME").ok();
    opts.uploads = 4;
    // Parent: the latest snapshot of the same PVC and volume mode, whatever its other tags.
    let kind = if job.block {
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
    let out = ferry_engine::backup::backup(repo, opts, progress).await?;
    let s = &out.snapshot.summary;
    Ok(Outcome::Done(
        serde_json::to_string(&s.result(&out.id))?,
        completed(s.total_bytes, s.files),
    ))
}

async fn restore(
    target: &Target,
    job: &Job,
    snapshot: &str,
    sparse: bool,
    path: Option<PathBuf>,
    progress: Arc<Progress>,
) -> Result<Outcome, Error> {
    let repo = target.open().await?;
    let (id, snap) = repo
        .find_snapshot(snapshot)
        .await
        .map_err(|e| e.context(format!("snapshot {snapshot}")))?;
    let opts = RestoreOptions {
        sparse,
        ..RestoreOptions::new(volume_path(job, path))
    };
    let s = ferry_engine::restore::restore(repo, &snap, &opts, progress).await?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    Ok(Outcome::Done(
        serde_json::to_string(&s.result(&id))?,
        completed(s.bytes, s.files),
    ))
}

async fn maintain(
    target: &Target,
    forget_tags: &[(String, String)],
    grace_seconds: u64,
    progress: Arc<Progress>,
) -> Result<Outcome, Error> {
    let selection = Selection::new(Vec::new(), forget_tags.to_vec())?;
    // Another maintenance run on the same repository (a second controller, a CLI user) is waited for.
    let prune = PruneOptions::from_secs(grace_seconds, MAINTENANCE_LOCK_WAIT_SECONDS);
    let result = ferry_engine::forget::maintain(target, &selection, &prune, progress).await?;
    Ok(Outcome::Done(
        serde_json::to_string(&result)?,
        completed(0, 0),
    ))
}
