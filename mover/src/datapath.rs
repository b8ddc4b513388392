//! Ferry's engine as a data path: the `ferry.datapath.v1.DataPath` service (`ferry datapath --socket PATH`)
//! that the pod agent calls, like any third-party data path. Each call runs the engine with its own
//! [`Progress`]; [`drive`] turns that into the stream (progress messages, then exactly one result), cancels
//! the engine when the client goes away or the deadline passes, and maps engine errors to the status codes
//! the API documents.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::backend::s3::S3Options;
use ferry_engine::backup::{BackupOptions, ParentSpec};
use ferry_engine::forget::Selection;
use ferry_engine::listing::ReadAhead;
use ferry_engine::open::Target;
use ferry_engine::progress::Progress;
use ferry_engine::prune::PruneOptions;
use ferry_engine::restore::RestoreOptions;
use ferry_engine::snapshot::SourceKind;
use ferry_proto::datapath::{
    self as api, BackupEvent, BackupRequest, Capability, ForgetEvent, ForgetRequest,
    GetInfoRequest, GetInfoResponse, RestoreEvent, RestoreRequest, VolumeMode,
    data_path_server::{DataPath, DataPathServer},
};
use ferry_proto::labels;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How long a forget waits for another maintenance run on the same repository.
const MAINTENANCE_LOCK_WAIT_SECONDS: u64 = 600;
/// Progress messages at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The service: the engine with a local cache directory.
#[derive(Debug, Clone, Default)]
pub struct EngineDataPath {
    /// Directory of the engine's metadata cache (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Hard size limit of the cache, bytes.
    pub cache_limit: u64,
    /// How repositories it creates compress (`ferry datapath --compression`, e.g. in the mover's `args`).
    pub compression: ferry_engine::pack::Compression,
}

type EventStream<E> = Pin<Box<dyn Stream<Item = Result<E, Status>> + Send>>;

/// Serves `svc` on the unix socket `socket` until `shutdown` resolves. A stale socket file is replaced.
pub async fn serve(
    svc: EngineDataPath,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    if socket.exists() {
        std::fs::remove_file(socket)?;
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    tracing::info!(socket = %socket.display(), "data path serving");
    tonic::transport::Server::builder()
        .add_service(DataPathServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(std::io::Error::other)
}

#[tonic::async_trait]
impl DataPath for EngineDataPath {
    async fn get_info(
        &self,
        _: Request<GetInfoRequest>,
    ) -> Result<Response<GetInfoResponse>, Status> {
        Ok(Response::new(GetInfoResponse {
            name: "ferry".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: api::API_VERSION.into(),
            capabilities: [
                Capability::Filesystem,
                Capability::Block,
                Capability::Backup,
                Capability::Restore,
                Capability::Incremental,
                Capability::Cancel,
                Capability::Forget,
            ]
            .map(|c| c as i32)
            .to_vec(),
        }))
    }

    type BackupStream = EventStream<BackupEvent>;

    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let deadline = deadline(&req)?;
        let r = req.into_inner();
        let target = self.target(r.repository.as_ref())?;
        let (path, block) = volume(r.volume.as_ref())?;
        Ok(drive(
            deadline,
            |p| BackupEvent {
                event: Some(api::backup_event::Event::Progress(p)),
            },
            move |progress| async move {
                let res = backup(&target, &r, path, block, progress).await?;
                Ok(BackupEvent {
                    event: Some(api::backup_event::Event::Result(res)),
                })
            },
        ))
    }

    type RestoreStream = EventStream<RestoreEvent>;

    async fn restore(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let deadline = deadline(&req)?;
        let r = req.into_inner();
        let target = self.target(r.repository.as_ref())?;
        let (path, _block) = volume(r.volume.as_ref())?;
        snapshot_id(&r.snapshot_id)?;
        Ok(drive(
            deadline,
            |p| RestoreEvent {
                event: Some(api::restore_event::Event::Progress(p)),
            },
            move |progress| async move {
                let res = restore(&target, &r, path, progress).await?;
                Ok(RestoreEvent {
                    event: Some(api::restore_event::Event::Result(res)),
                })
            },
        ))
    }

    type ForgetStream = EventStream<ForgetEvent>;

    async fn forget(
        &self,
        req: Request<ForgetRequest>,
    ) -> Result<Response<Self::ForgetStream>, Status> {
        let deadline = deadline(&req)?;
        let r = req.into_inner();
        let target = self.target(r.repository.as_ref())?;
        if r.tags.is_empty() {
            return Err(Status::invalid_argument(
                "tags are required: forget selects snapshots by tags",
            ));
        }
        Ok(drive(
            deadline,
            |p| ForgetEvent {
                event: Some(api::forget_event::Event::Progress(p)),
            },
            move |progress| async move {
                let tags = r.tags.into_iter().collect::<Vec<_>>();
                let selection = Selection::new(Vec::new(), tags).map_err(status)?;
                let prune = PruneOptions::from_secs(r.grace_seconds, MAINTENANCE_LOCK_WAIT_SECONDS);
                let out = ferry_engine::forget::maintain(&target, &selection, &prune, progress)
                    .await
                    .map_err(status)?;
                let forgotten = out
                    .repositories
                    .iter()
                    .map(|r| r.forgotten.len())
                    .sum::<usize>();
                let namespaces = out
                    .repositories
                    .iter()
                    .map(|r| r.namespace.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                Ok(ForgetEvent {
                    event: Some(api::forget_event::Event::Result(api::ForgetResult {
                        forgotten: forgotten as u64,
                        result: [("namespaces".to_string(), namespaces)].into(),
                    })),
                })
            },
        ))
    }
}

impl EngineDataPath {
    /// The engine's repository target for a request's repository: `s3://bucket/prefix` with the endpoint
    /// settings, the credentials file and the password file.
    fn target(&self, r: Option<&api::Repository>) -> Result<Target, Status> {
        let r = r.ok_or_else(|| Status::invalid_argument("repository is required"))?;
        if !(r.provider.is_empty() || r.provider == "aws") {
            return Err(Status::failed_precondition(format!(
                "provider {:?} is not supported: Ferry's data path stores to S3 (\"aws\")",
                r.provider
            )));
        }
        if r.bucket.is_empty() {
            return Err(Status::invalid_argument("repository.bucket is required"));
        }
        if r.password_file.is_empty() {
            return Err(Status::invalid_argument(
                "repository.password_file is required: Ferry's data path encrypts everything",
            ));
        }
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Target {
            repo: Some(format!("s3://{}/{}", r.bucket, r.prefix.trim_matches('/'))),
            password_file: Some(r.password_file.clone().into()),
            s3: S3Options {
                endpoint: some(&r.endpoint),
                region: some(&r.region),
                path_style: r.path_style,
                profile: some(&r.profile),
                credentials_file: some(&r.credentials_file).map(PathBuf::from),
                insecure_skip_tls_verify: r.insecure_skip_tls_verify,
                ..S3Options::default()
            },
            s3_ca_file: some(&r.ca_file).map(PathBuf::from),
            cache_dir: self.cache_dir.clone(),
            no_cache: self.cache_dir.is_none(),
            cache_limit: self.cache_limit,
            compression: self.compression,
        })
    }
}

/// The call's deadline: the earlier of the gRPC deadline and `deadline_unix_ms`; one already past is
/// `DEADLINE_EXCEEDED` at once.
fn deadline<T: HasDeadline>(req: &Request<T>) -> Result<Option<tokio::time::Instant>, Status> {
    let now = std::time::SystemTime::now();
    let field = match req.get_ref().deadline_unix_ms() {
        0 => None,
        ms => {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0).unsigned_abs());
            Some(at.duration_since(now).unwrap_or(Duration::ZERO))
        }
    };
    let grpc = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout);
    let left = match (field, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match left {
        Some(d) if d.is_zero() => Err(Status::deadline_exceeded("the deadline has passed")),
        Some(d) => Ok(Some(tokio::time::Instant::now() + d)),
        None => Ok(None),
    }
}

/// A `grpc-timeout` header value (`<digits><unit>`).
fn grpc_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Requests that carry `deadline_unix_ms`.
trait HasDeadline {
    fn deadline_unix_ms(&self) -> i64;
}

macro_rules! has_deadline {
    ($($t:ty),*) => {$(
        impl HasDeadline for $t {
            fn deadline_unix_ms(&self) -> i64 { self.deadline_unix_ms }
        }
    )*};
}
has_deadline!(BackupRequest, RestoreRequest, ForgetRequest);

/// A snapshot id of Ferry's engine: exactly 64 hex digits. The engine's own lookup also takes `latest` and
/// unique prefixes (for people at a terminal); a restore through the API must name one snapshot exactly.
fn snapshot_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("snapshot_id is required"));
    }
    if id.len() != 64 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "snapshot_id {id:?} is not a snapshot id of Ferry's engine (64 hex digits)"
        )));
    }
    Ok(())
}

/// The volume's path and whether it is a block device; a missing path is `FAILED_PRECONDITION`.
fn volume(v: Option<&api::Volume>) -> Result<(PathBuf, bool), Status> {
    let v = v.ok_or_else(|| Status::invalid_argument("volume is required"))?;
    let block = match VolumeMode::try_from(v.mode) {
        Ok(VolumeMode::Filesystem) => false,
        Ok(VolumeMode::Block) => true,
        _ => {
            return Err(Status::invalid_argument(
                "volume.mode must be FILESYSTEM or BLOCK",
            ));
        }
    };
    if v.path.is_empty() {
        return Err(Status::invalid_argument("volume.path is required"));
    }
    let path = PathBuf::from(&v.path);
    if !path.exists() {
        return Err(Status::failed_precondition(format!(
            "volume path {} does not exist",
            v.path
        )));
    }
    Ok((path, block))
}

/// Runs `work` with a fresh [`Progress`] and streams its progress (at most once a second, only when it
/// moved), then its one result or error. When the client goes away (cancel) or the deadline passes, the
/// engine is canceled and waited for, so it stops at a safe point.
fn drive<E, F, Fut>(
    deadline: Option<tokio::time::Instant>,
    progress_event: fn(api::Progress) -> E,
    work: F,
) -> Response<EventStream<E>>
where
    E: Send + 'static,
    F: FnOnce(Arc<Progress>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<E, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let progress = Arc::new(Progress::default());
        let work = tokio::spawn(work(progress.clone()));
        tokio::pin!(work);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let mut last = None;
        let out = loop {
            tokio::select! {
                out = &mut work => break joined(out),
                _ = tick.tick() => {
                    let p = report(&progress);
                    if last.as_ref() != Some(&p) {
                        last = Some(p.clone());
                        // A slow reader misses a progress message, never the result.
                        let _ = tx.try_send(Ok(progress_event(p)));
                    }
                }
                _ = tx.closed() => {
                    tracing::info!("the client canceled the call: stopping at the next safe point");
                    progress.cancel();
                    let _ = work.await;
                    return;
                }
                _ = &mut expired => {
                    tracing::info!("deadline exceeded: stopping at the next safe point");
                    progress.cancel();
                    let _ = work.await;
                    break Err(Status::deadline_exceeded("the deadline passed while working"));
                }
            }
        };
        let _ = tx.send(out).await;
    });
    Response::new(Box::pin(ReceiverStream::new(rx)))
}

fn joined<E>(r: Result<Result<E, Status>, tokio::task::JoinError>) -> Result<E, Status> {
    r.unwrap_or_else(|e| Err(Status::internal(format!("the data path task failed: {e}"))))
}

fn report(p: &Progress) -> api::Progress {
    let r = p.report();
    api::Progress {
        total_bytes: if r.totals_known { r.bytes_total } else { 0 },
        done_bytes: r.bytes_done,
        total_files: if r.totals_known { r.files_total } else { 0 },
        done_files: r.files_done,
        message: String::new(),
    }
}

/// The API's status for an engine error.
fn status(e: ferry_engine::Error) -> Status {
    use ferry_engine::Error as E;
    let text = error_chain(&e);
    match e.root() {
        E::Canceled => Status::cancelled(text),
        E::Invalid(_) => Status::invalid_argument(text),
        E::Snapshot(_) | E::NoRepository(_) => Status::not_found(text),
        E::WrongPassword | E::Locked(_) => Status::failed_precondition(text),
        E::Integrity(_) | E::Format(_) | E::NotFound(_) | E::UnsafePath(_) => {
            Status::data_loss(text)
        }
        E::LeaseLost(_) => Status::aborted(text),
        _ => Status::internal(text),
    }
}

/// `error: cause: cause of the cause`.
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

/// A JSON object's scalar fields as strings (the result map).
fn flatten(v: &serde_json::Value) -> std::collections::HashMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k.clone(), s.clone())),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                Some((k.clone(), v.to_string()))
            }
            _ => None,
        })
        .collect()
}

async fn backup(
    target: &Target,
    r: &BackupRequest,
    source: PathBuf,
    block: bool,
    progress: Arc<Progress>,
) -> Result<api::BackupResult, Status> {
    // Both run while the repository opens (the password's key derivation takes a core meanwhile).
    let read_ahead = (!block).then(|| ReadAhead::start(&source));
    ferry_engine::backup::start_scan(&source, block, &progress, read_ahead.as_ref());
    let repo = target.open_or_init().await.map_err(status)?;
    let mut opts = BackupOptions::new(source);
    opts.block_device = block;
    opts.read_ahead = read_ahead;
    opts.tags = r.tags.clone().into_iter().collect::<BTreeMap<_, _>>();
    let src = r.source.clone().unwrap_or_default();
    let source_pvc = format!("{}/{}", src.namespace, src.pvc);
    if !src.pvc.is_empty() {
        opts.tags
            .insert(labels::TAG_SOURCE_PVC.into(), source_pvc.clone());
    }
    if !r.operation_id.is_empty() {
        opts.tags
            .insert(labels::TAG_DATA_UPLOAD.into(), r.operation_id.clone());
    }
    opts.hostname = (!src.node.is_empty()).then(|| src.node.clone());
    // Each upload holds a whole 16 MiB pack (the backup keeps uploads + 1 pack buffers): two keep a pack
    // filling while one stores, at 48 MiB of packs. Four were no faster on the e2e cluster's S3 server
    // (bench/CLUSTER.md, run 8) and cost 32 MiB more.
    opts.uploads = 2;
    // The mover pod reads a snapshot's clone once; its page cache would only fill the pod's memory limit.
    opts.drop_cache = true;
    opts.parent = if !r.parent_snapshot_id.is_empty() {
        ParentSpec::Snapshot(r.parent_snapshot_id.clone())
    } else if src.pvc.is_empty() {
        ParentSpec::None
    } else {
        // The latest snapshot of the same PVC and volume mode, whatever its other tags.
        let kind = if block {
            SourceKind::Block
        } else {
            SourceKind::Filesystem
        };
        let parent = repo
            .latest_snapshot(|s| {
                s.source == kind
                    && s.tags.get(labels::TAG_SOURCE_PVC).map(String::as_str)
                        == Some(source_pvc.as_str())
            })
            .await
            .map_err(status)?;
        match parent {
            Some((id, _)) => ParentSpec::Snapshot(id.to_hex()),
            None => ParentSpec::None,
        }
    };
    let trim = crate::memory::TrimWhileBackingUp::start();
    let out = ferry_engine::backup::backup(repo, opts, progress)
        .await
        .map_err(status)?;
    drop(trim);
    let s = &out.snapshot.summary;
    let doc = s.result(&out.id);
    Ok(api::BackupResult {
        snapshot_id: doc.snapshot_id.clone(),
        total_bytes: doc.total_bytes,
        files: doc.files,
        incremental_bytes: doc.incremental_bytes,
        result: flatten(&serde_json::to_value(&doc).unwrap_or_default()),
    })
}

async fn restore(
    target: &Target,
    r: &RestoreRequest,
    path: PathBuf,
    progress: Arc<Progress>,
) -> Result<api::RestoreResult, Status> {
    let repo = target.open().await.map_err(status)?;
    let (id, snap) = repo
        .find_snapshot(&r.snapshot_id)
        .await
        .map_err(|e| status(e.context(format!("snapshot {}", r.snapshot_id))))?;
    let sparse = r.mover_config.get("WriteSparseFiles").map(String::as_str) == Some("true");
    // The volume is new and only this pod uses it: what is written need not stay in the pod's page cache.
    let opts = RestoreOptions {
        sparse,
        drop_cache: true,
        ..RestoreOptions::new(path)
    };
    let s = ferry_engine::restore::restore(repo, &snap, &opts, progress)
        .await
        .map_err(status)?;
    for w in &s.warnings {
        tracing::warn!("{w}");
    }
    let doc = s.result(&id);
    Ok(api::RestoreResult {
        total_bytes: doc.total_bytes,
        files: doc.files,
        result: flatten(&serde_json::to_value(&doc).unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `latest` or a prefix would restore some other snapshot than the one the DataUpload recorded.
    #[test]
    fn only_whole_snapshot_ids_are_restored() {
        assert!(snapshot_id(&"ab".repeat(32)).is_ok());
        for bad in ["", "latest", "abcd", &"ab".repeat(31), &"zz".repeat(32)] {
            assert_eq!(
                snapshot_id(bad).map_err(|s| s.code()),
                Err(tonic::Code::InvalidArgument),
                "{bad:?}"
            );
        }
    }
}
