//! The conformance kit of Ferry's data-path API (`ferry.datapath.v1`), for data path authors: point it at
//! the socket a data path serves and at a repository it may write to, and it checks what the agent relies
//! on (design/0004-datapath-api.md): `GetInfo`, the stream shape (progress messages, then exactly one
//! result, then the end), a backup → restore round trip of a test tree with contents, modes and symlinks,
//! block volumes or their refusal, the status codes of bad requests, an unknown snapshot, deadlines, cancel
//! in the middle of a backup (the data path keeps serving and the next backup works), and `Forget` or its
//! refusal. Capabilities decide which behaviour a case expects. Run it as `ferry-conformance`, or call
//! [`run`] from a test.

mod cases;
mod tree;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use ferry_proto::datapath::{
    self as api, BackupRequest, Capability, GetInfoResponse, Piece, RestoreRequest, StreamEvent,
    data_path_client::DataPathClient,
};
use tonic::transport::Channel;

/// What the kit needs: the socket and a repository the data path may write to.
#[derive(Debug, Clone)]
pub struct Kit {
    /// The data path's unix socket.
    pub socket: PathBuf,
    /// The repository every request names (a fresh prefix per run is best).
    pub repository: api::Repository,
    /// Scratch directory for the test volumes.
    pub work: PathBuf,
    /// Size of the volume the cancel and deadline cases back up (it must take the data path a while).
    pub big_volume_mib: u64,
}

/// One case's outcome.
#[derive(Debug)]
pub struct Outcome {
    /// The case.
    pub name: &'static str,
    /// `Err(why)` when it failed.
    pub result: Result<(), String>,
    /// How long it took.
    pub took: Duration,
}

/// Runs every case in order and returns their outcomes.
pub async fn run(kit: &Kit) -> Vec<Outcome> {
    let mut out = Vec::new();
    for (name, case) in cases::ALL {
        let started = Instant::now();
        let result = case(kit).await.map_err(|e| format!("{e:#}"));
        out.push(Outcome {
            name,
            result,
            took: started.elapsed(),
        });
    }
    out
}

/// The table [`run`]'s outcomes print as, and whether all passed.
pub fn table(outcomes: &[Outcome]) -> (String, bool) {
    let mut s = String::new();
    for o in outcomes {
        match &o.result {
            Ok(()) => s.push_str(&format!(
                "PASS  {:<40} {:>6.1}s\n",
                o.name,
                o.took.as_secs_f64()
            )),
            Err(e) => s.push_str(&format!(
                "FAIL  {:<40} {:>6.1}s  {e}\n",
                o.name,
                o.took.as_secs_f64()
            )),
        }
    }
    let passed = outcomes.iter().filter(|o| o.result.is_ok()).count();
    s.push_str(&format!("{passed} of {} cases passed\n", outcomes.len()));
    (s, passed == outcomes.len())
}

impl Kit {
    fn client(&self) -> DataPathClient<Channel> {
        api::connect(&self.socket)
    }

    async fn info(&self) -> Result<GetInfoResponse> {
        Ok(self
            .client()
            .get_info(api::GetInfoRequest {})
            .await
            .context("GetInfo")?
            .into_inner())
    }

    fn backup_request(&self, path: &std::path::Path, mode: api::VolumeMode) -> BackupRequest {
        BackupRequest {
            operation_id: format!("conformance-{}", std::process::id()),
            repository: Some(self.repository.clone()),
            volume: Some(api::Volume {
                mode: mode as i32,
                path: path.display().to_string(),
            }),
            source: Some(api::Source {
                namespace: "conformance".into(),
                pvc: "data".into(),
                ..Default::default()
            }),
            tags: [("ferry.dev/conformance".to_string(), "yes".to_string())].into(),
            ..Default::default()
        }
    }

    fn restore_request(
        &self,
        path: &std::path::Path,
        mode: api::VolumeMode,
        result: &api::BackupResult,
    ) -> RestoreRequest {
        RestoreRequest {
            operation_id: format!("conformance-restore-{}", std::process::id()),
            repository: Some(self.repository.clone()),
            volume: Some(api::Volume {
                mode: mode as i32,
                path: path.display().to_string(),
            }),
            // As in production: the snapshot id is all a restore gets from its backup (backup_result stays
            // empty in v1, design/0004).
            snapshot_id: result.snapshot_id.clone(),
            ..Default::default()
        }
    }

    /// A backup, its stream checked: progress messages (done values never decreasing), then one result.
    async fn backup(&self, req: BackupRequest) -> Result<api::BackupResult, tonic::Status> {
        collect(self.client().backup(req).await?.into_inner()).await
    }

    /// A restore, its stream checked like [`Kit::backup`]'s.
    async fn restore(&self, req: RestoreRequest) -> Result<api::RestoreResult, tonic::Status> {
        collect(self.client().restore(req).await?.into_inner()).await
    }
}

/// Reads a call's stream to its end under the [`Shape`] rules.
async fn collect<E: StreamEvent>(
    mut stream: tonic::Streaming<E>,
) -> Result<E::Result, tonic::Status> {
    let mut shape = Shape::default();
    while let Some(ev) = stream.message().await? {
        match ev.piece() {
            Some(Piece::Progress(p)) => shape.progress(&p)?,
            Some(Piece::Result(r)) => shape.result(r)?,
            None => return Err(tonic::Status::internal("kit: an empty stream message")),
        }
    }
    shape.end()
}

/// The stream-shape rules, as a kit failure (`INTERNAL` with a "kit:" message) when broken.
struct Shape<R> {
    last: (u64, u64),
    result: Option<R>,
}

impl<R> Default for Shape<R> {
    fn default() -> Self {
        Shape {
            last: (0, 0),
            result: None,
        }
    }
}

impl<R> Shape<R> {
    fn progress(&mut self, p: &api::Progress) -> Result<(), tonic::Status> {
        if self.result.is_some() {
            return Err(tonic::Status::internal(
                "kit: a progress message after the result",
            ));
        }
        if p.done_bytes < self.last.0 || p.done_files < self.last.1 {
            return Err(tonic::Status::internal(format!(
                "kit: progress went backwards: {:?} after {:?}",
                (p.done_bytes, p.done_files),
                self.last
            )));
        }
        self.last = (p.done_bytes, p.done_files);
        Ok(())
    }

    fn result(&mut self, r: R) -> Result<(), tonic::Status> {
        if self.result.replace(r).is_some() {
            return Err(tonic::Status::internal("kit: a second result"));
        }
        Ok(())
    }

    fn end(self) -> Result<R, tonic::Status> {
        self.result
            .ok_or_else(|| tonic::Status::internal("kit: the stream ended OK without a result"))
    }
}

/// `Err` unless `r` failed with one of `codes`.
fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    codes: &[tonic::Code],
) -> Result<()> {
    match r {
        Ok(v) => bail!("{what}: succeeded ({v:?}); expected {codes:?}"),
        Err(s) if s.message().starts_with("kit:") => bail!("{what}: {}", s.message()),
        Err(s) => {
            ensure!(
                codes.contains(&s.code()),
                "{what}: {:?} ({}); expected {codes:?}",
                s.code(),
                s.message()
            );
            Ok(())
        }
    }
}

fn can(info: &GetInfoResponse, c: Capability) -> bool {
    info.can(c)
}
