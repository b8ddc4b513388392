//! The pod agent (`ferry agent`): the controller's side of a mover pod. It owns every Kubernetes
//! interaction — Events on the DataUpload / DataDownload ([`crate::events`]), the termination message, the
//! exit code, SIGTERM — and drives the data path, Ferry's engine or a third party's, through the gRPC API
//! `ferry.datapath.v1` on the unix socket both containers share. Its one input is the controller's typed
//! [`AgentJob`]. design/0004-datapath-api.md is the contract; this module is its client.
//!
//! What the agent guarantees the controller: exit 0 with the result document (`ferry_proto::result`) in the
//! termination message; exit 1 with a message naming the cause (data path missing, crashed, refused the
//! request, broke the protocol, failed); exit 2 when canceled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use ferry_proto::datapath::agent::{AgentJob, agent_job::Call};
use ferry_proto::datapath::{
    self as api, Capability, GetInfoResponse, Piece, StreamEvent, VolumeMode,
};
use ferry_proto::pod as contract;
use ferry_proto::report::{REPORT_VERSION, Report, Stage};
use ferry_proto::result::{BackupResult, RESULT_MAP_MAX, RESULT_VERSION, RestoreResult};
use prost::Message as _;
use tokio::sync::watch;
use tonic::Code;

use crate::events::{EventReporter, Target as EventTarget};

/// How the agent runs, besides the job.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The data path's socket.
    pub socket: PathBuf,
    /// Where the result (or the error) goes.
    pub termination_log: PathBuf,
    /// Emit Events (off outside a cluster).
    pub events: bool,
    /// How long the data path may take to answer `GetInfo` (its container may still be starting).
    pub connect_timeout: Duration,
    /// Attempts of a call that fails with `UNAVAILABLE` (a restarted data path), the first included.
    pub attempts: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: api::SOCKET_PATH.into(),
            termination_log: "/dev/termination-log".into(),
            events: true,
            connect_timeout: Duration::from_secs(120),
            attempts: 3,
        }
    }
}

/// A job that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Not base64.
    #[error("$FERRY_AGENT_JOB is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// Not an `AgentJob`.
    #[error("$FERRY_AGENT_JOB is not a ferry.agent.v1.AgentJob: {0}")]
    Decode(#[from] prost::DecodeError),
    /// No call or no CR.
    #[error("$FERRY_AGENT_JOB names {0}")]
    Incomplete(&'static str),
}

/// Reads the job from the value of `$FERRY_AGENT_JOB` (base64 of the protobuf encoding).
pub fn decode_job(value: &str) -> Result<AgentJob, JobError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.trim())?;
    let job = AgentJob::decode(bytes.as_slice())?;
    if job.call.is_none() {
        return Err(JobError::Incomplete("no call"));
    }
    if job.cr.is_none() {
        return Err(JobError::Incomplete("no CR"));
    }
    Ok(job)
}

/// The encoding [`decode_job`] reads (what the controller writes).
pub fn encode_job(job: &AgentJob) -> String {
    base64::engine::general_purpose::STANDARD.encode(job.encode_to_vec())
}

/// How a call ended.
#[derive(Debug)]
enum Outcome {
    /// The result document.
    Done(String, Report),
    /// Why it failed.
    Failed(String),
    Canceled,
}

/// Runs the job to its exit code; every failure becomes the termination message.
pub async fn run(job: AgentJob, settings: &Settings) -> ExitCode {
    let cr = job.cr.clone().unwrap_or_default();
    let mut reporter = reporter(settings, &cr).await;
    let (progress_tx, mut progress_rx) = watch::channel(api::Progress::default());
    if let Some(r) = reporter.as_mut() {
        r.emit(&report(
            Stage::Started,
            &api::Progress::default(),
            String::new(),
        ))
        .await;
    }
    let interval = Duration::from_secs(u64::from(job.report_interval_seconds.max(1)));
    let work = drive(job, settings, progress_tx);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let terminated = ferry_engine::cancel::terminated();
    tokio::pin!(terminated);
    let outcome = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => {
                if progress_rx.has_changed().unwrap_or(false) {
                    let p = progress_rx.borrow_and_update().clone();
                    if let Some(r) = reporter.as_mut() {
                        r.emit(&report(Stage::Progress, &p, String::new())).await;
                    }
                }
            }
            name = &mut terminated => {
                // Dropping the call cancels it: the data path sees the cancellation and stops.
                tracing::info!("{name}: canceling the data path call");
                break Outcome::Canceled;
            }
        }
    };
    let last = progress_rx.borrow().clone();
    let (final_report, message, code) = match outcome {
        Outcome::Done(json, r) => (r, json, ExitCode::SUCCESS),
        Outcome::Canceled => (
            report(Stage::Canceled, &last, String::new()),
            "data path canceled".to_string(),
            ExitCode::from(contract::EXIT_CANCELED as u8),
        ),
        Outcome::Failed(e) => {
            eprintln!("ferry agent: {e}");
            (
                report(Stage::Failed, &last, e.clone()),
                e,
                ExitCode::from(contract::EXIT_FAILED as u8),
            )
        }
    };
    if let Some(r) = reporter.as_mut() {
        r.emit(&final_report).await;
    }
    write_termination_log(&settings.termination_log, &message);
    code
}

async fn reporter(settings: &Settings, cr: &api::agent::CrRef) -> Option<EventReporter> {
    if !settings.events {
        return None;
    }
    let target = EventTarget {
        kind: cr.kind.clone(),
        name: cr.name.clone(),
        namespace: cr.namespace.clone(),
        uid: cr.uid.clone(),
    };
    match EventReporter::connect(target).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes client: running without events");
            None
        }
    }
}

/// Prepares the call, checks the data path, makes the call (again after `UNAVAILABLE`, within bounds).
async fn drive(mut job: AgentJob, s: &Settings, progress: watch::Sender<api::Progress>) -> Outcome {
    let Some(mut call) = job.call.take() else {
        return Outcome::Failed("the agent job names no call".into());
    };
    if let Err(e) = prepare(&mut call) {
        return Outcome::Failed(e);
    }
    let info = match get_info(s).await {
        Ok(i) => i,
        Err(e) => return Outcome::Failed(e),
    };
    if let Err(e) = admissible(&info, &call) {
        return Outcome::Failed(e);
    }
    let mut attempt = 1;
    loop {
        match make_call(s, &call, &progress).await {
            Err(CallError::Status(st))
                if st.code() == Code::Unavailable && attempt < s.attempts =>
            {
                tracing::warn!(attempt, status = %st.message(), "data path unavailable; calling again");
                tokio::time::sleep(Duration::from_secs(2u64.pow(attempt))).await;
                attempt += 1;
            }
            Ok(done) => return done,
            Err(e) => return Outcome::Failed(e.explain(&info.name)),
        }
    }
}

/// Fills what only the pod knows: the node, and the CA file from `$FERRY_S3_CA_PEM`.
fn prepare(call: &mut Call) -> Result<(), String> {
    let (repo, source) = match call {
        Call::Backup(r) => (r.repository.as_mut(), r.source.as_mut()),
        Call::Restore(r) => (r.repository.as_mut(), r.source.as_mut()),
        Call::Forget(r) => (r.repository.as_mut(), None),
    };
    if let Some(src) = source
        && src.node.is_empty()
    {
        src.node = std::env::var("NODE_NAME").unwrap_or_default();
    }
    let pem = std::env::var(contract::ENV_S3_CA_PEM).unwrap_or_default();
    if let Some(repo) = repo
        && !pem.is_empty()
    {
        if !contract::holds_pem_certificate(pem.as_bytes()) {
            return Err(format!(
                "${} holds no PEM certificate",
                contract::ENV_S3_CA_PEM
            ));
        }
        let file = if repo.ca_file.is_empty() {
            api::CA_FILE.to_string()
        } else {
            repo.ca_file.clone()
        };
        std::fs::write(&file, pem).map_err(|e| format!("writing the CA file {file}: {e}"))?;
        repo.ca_file = file;
    }
    Ok(())
}

/// `GetInfo`, retried while the data path is not (yet) serving, up to the connect timeout.
async fn get_info(s: &Settings) -> Result<GetInfoResponse, String> {
    let started = tokio::time::Instant::now();
    let mut client = api::connect(&s.socket);
    loop {
        match client.get_info(api::GetInfoRequest {}).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(st) if st.code() == Code::Unavailable && started.elapsed() < s.connect_timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(st) => {
                return Err(format!(
                    "the data path did not answer on {} within {} s: {}",
                    s.socket.display(),
                    s.connect_timeout.as_secs(),
                    describe(&st)
                ));
            }
        }
    }
}

/// Whether the data path can do the call, from what `GetInfo` advertised.
fn admissible(info: &GetInfoResponse, call: &Call) -> Result<(), String> {
    if info.api_version != api::API_VERSION {
        return Err(format!(
            "data path {:?} speaks API {:?}; this agent speaks {:?}",
            info.name,
            info.api_version,
            api::API_VERSION
        ));
    }
    let (op, needed, volume) = match call {
        Call::Backup(r) => ("backups", Capability::Backup, r.volume.as_ref()),
        Call::Restore(r) => ("restores", Capability::Restore, r.volume.as_ref()),
        Call::Forget(_) => ("deleting backups", Capability::Forget, None),
    };
    if !info.can(needed) {
        return Err(format!("data path {:?} does not support {op}", info.name));
    }
    if let Some(v) = volume {
        let (mode, cap) = match VolumeMode::try_from(v.mode) {
            Ok(VolumeMode::Block) => ("block", Capability::Block),
            _ => ("filesystem", Capability::Filesystem),
        };
        if !info.can(cap) {
            return Err(format!(
                "data path {:?} does not support {mode} volumes",
                info.name
            ));
        }
    }
    Ok(())
}

/// Why a call did not produce a result.
#[derive(Debug)]
enum CallError {
    Status(tonic::Status),
    /// The stream broke the API's shape rules.
    Protocol(String),
}

impl CallError {
    fn explain(&self, name: &str) -> String {
        match self {
            CallError::Protocol(why) => {
                format!("data path {name:?} broke the data-path protocol: {why}")
            }
            CallError::Status(st) if st.code() == Code::Unavailable => format!(
                "data path {name:?} became unavailable (crashed or stopped?): {}",
                describe(st)
            ),
            CallError::Status(st) => format!("data path {name:?}: {}", describe(st)),
        }
    }
}

fn describe(st: &tonic::Status) -> String {
    let code = format!("{:?}", st.code());
    if st.message().is_empty() {
        code
    } else {
        format!("{} ({code})", st.message())
    }
}

/// Reads a stream to its end, checking its shape: progress messages, then exactly one result.
async fn drain<E: StreamEvent>(
    stream: Result<tonic::Response<tonic::Streaming<E>>, tonic::Status>,
    progress: &watch::Sender<api::Progress>,
) -> Result<E::Result, CallError> {
    let mut stream = stream.map_err(CallError::Status)?.into_inner();
    let mut result = None;
    while let Some(ev) = stream.message().await.map_err(CallError::Status)? {
        match ev.piece() {
            Some(Piece::Progress(p)) => {
                if result.is_some() {
                    return Err(CallError::Protocol(
                        "a progress message after the result".into(),
                    ));
                }
                progress.send_replace(p);
            }
            Some(Piece::Result(r)) => {
                if result.replace(r).is_some() {
                    return Err(CallError::Protocol("a second result".into()));
                }
            }
            None => return Err(CallError::Protocol("an empty message".into())),
        }
    }
    result.ok_or_else(|| CallError::Protocol("the call ended without a result".into()))
}

/// Makes the call once and turns its result into the termination message's document.
async fn make_call(
    s: &Settings,
    call: &Call,
    progress: &watch::Sender<api::Progress>,
) -> Result<Outcome, CallError> {
    let mut client = api::connect(&s.socket);
    match call {
        Call::Backup(req) => {
            let r = client.backup(with_deadline(req.clone(), req.deadline_unix_ms));
            backup_done(drain(r.await, progress).await?)
        }
        Call::Restore(req) => {
            let r = client.restore(with_deadline(req.clone(), req.deadline_unix_ms));
            restore_done(&req.snapshot_id, drain(r.await, progress).await?)
        }
        Call::Forget(req) => {
            let r = client.forget(with_deadline(req.clone(), req.deadline_unix_ms));
            forget_done(drain(r.await, progress).await?)
        }
    }
}

/// The request with the gRPC deadline of `deadline_unix_ms` (0: none).
fn with_deadline<T>(req: T, deadline_unix_ms: i64) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    if deadline_unix_ms > 0 {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(deadline_unix_ms.unsigned_abs());
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::from_millis(1));
        r.set_timeout(left);
    }
    r
}

fn number(map: &std::collections::HashMap<String, String>, key: &str) -> Option<u64> {
    map.get(key).and_then(|v| v.parse().ok())
}

/// The backup result document; a result without a snapshot id breaks the protocol.
fn backup_done(r: api::BackupResult) -> Result<Outcome, CallError> {
    if r.snapshot_id.is_empty() {
        return Err(CallError::Protocol(
            "the result names no snapshot_id".into(),
        ));
    }
    let encoded = serde_json::to_string(&r.result).map_or(usize::MAX, |j| j.len());
    if encoded > RESULT_MAP_MAX {
        return Err(CallError::Protocol(format!(
            "the result map is {encoded} bytes as JSON; at most {RESULT_MAP_MAX} fit in the termination \
             message"
        )));
    }
    let doc = BackupResult {
        version: RESULT_VERSION,
        read_bytes: number(&r.result, "readBytes").unwrap_or(r.total_bytes),
        stored_bytes: number(&r.result, "storedBytes").unwrap_or(r.incremental_bytes),
        dirs: number(&r.result, "dirs").unwrap_or(0),
        snapshot_id: r.snapshot_id,
        total_bytes: r.total_bytes,
        incremental_bytes: r.incremental_bytes,
        files: r.files,
        result: r.result.into_iter().collect(),
    };
    let json = serde_json::to_string(&doc)
        .map_err(|e| CallError::Protocol(format!("encoding the result: {e}")))?;
    Ok(Outcome::Done(json, completed(doc.total_bytes, doc.files)))
}

fn forget_done(r: api::ForgetResult) -> Result<Outcome, CallError> {
    let mut doc = serde_json::Map::new();
    doc.insert("forgotten".into(), r.forgotten.into());
    for (k, v) in r.result {
        doc.entry(k).or_insert(v.into());
    }
    Ok(Outcome::Done(
        serde_json::Value::Object(doc).to_string(),
        completed(0, 0),
    ))
}

fn restore_done(snapshot: &str, r: api::RestoreResult) -> Result<Outcome, CallError> {
    let doc = RestoreResult {
        version: RESULT_VERSION,
        snapshot_id: snapshot.to_string(),
        total_bytes: r.total_bytes,
        files: r.files,
        dirs: number(&r.result, "dirs").unwrap_or(0),
    };
    let json = serde_json::to_string(&doc)
        .map_err(|e| CallError::Protocol(format!("encoding the result: {e}")))?;
    Ok(Outcome::Done(json, completed(doc.total_bytes, doc.files)))
}

fn report(stage: Stage, p: &api::Progress, message: String) -> Report {
    Report {
        version: REPORT_VERSION,
        stage: stage as i32,
        total_bytes: p.total_bytes,
        done_bytes: p.done_bytes,
        total_files: p.total_files,
        done_files: p.done_files,
        message,
    }
}

/// The final report of a finished call: everything done.
fn completed(bytes: u64, files: u64) -> Report {
    report(
        Stage::Completed,
        &api::Progress {
            total_bytes: bytes,
            done_bytes: bytes,
            total_files: files,
            done_files: files,
            message: String::new(),
        },
        String::new(),
    )
}

fn write_termination_log(path: &Path, message: &str) {
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
