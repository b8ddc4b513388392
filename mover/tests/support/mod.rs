//! What the data-path tests share: a data path process (killed when dropped), fake data paths that break
//! the API in one way each, and an S3 repository on the test server with its credentials and password files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use std::pin::Pin;

use ferry_proto::datapath::data_path_server::{DataPath, DataPathServer};
use ferry_proto::datapath::{self as api, Capability, Repository};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::common::S3Server;

/// A data path process, killed when dropped.
pub struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (output to `log` when given) and waits for it to create `socket`.
pub fn serve(mut cmd: Command, socket: &Path, log: Option<&Path>) -> Served {
    if let Some(log) = log {
        let log = std::fs::File::create(log).unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
    }
    let child = cmd
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("FERRY_LOG", "info")
        .spawn()
        .expect("starting the data path");
    let served = Served(child);
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the data path did not create {} within 20 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    served
}

/// `ferry datapath` on `socket`.
pub fn ferry_datapath(socket: &Path, log: Option<&Path>) -> Served {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.arg("datapath").arg("--socket").arg(socket);
    serve(c, socket, log)
}

/// The bucket `bucket` (created) under `prefix` on `s3`, with credentials and password files in `dir`.
pub async fn s3_repository(s3: &S3Server, dir: &Path, bucket: &str, prefix: &str) -> Repository {
    s3.create_bucket(bucket).await;
    let creds = dir.join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id={}\naws_secret_access_key={}\n",
            s3.access, s3.secret
        ),
    )
    .unwrap();
    let password = dir.join("password");
    std::fs::write(&password, "data path test password\n").unwrap();
    Repository {
        provider: "aws".into(),
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint: s3.endpoint.clone(),
        region: "us-east-1".into(),
        path_style: true,
        credentials_file: creds.display().to_string(),
        password_file: password.display().to_string(),
        ..Default::default()
    }
}

/// How a fake data path misbehaves.
#[derive(Debug, Clone, Copy)]
pub enum Fake {
    /// Two results.
    TwoResults,
    /// The stream ends OK without a result.
    NoResult,
    /// A result without a snapshot id.
    NoSnapshotId,
    /// Every Backup: UNAVAILABLE.
    Unavailable,
    /// Advertises filesystem volumes only.
    NoBlock,
    /// One result whose map holds `{"object": <n × 'o'>}`.
    ResultMap(usize),
    /// One progress message, then nothing, ever (cancellation ignored).
    Hang,
}

pub type Events<E> = Pin<Box<dyn Stream<Item = Result<E, Status>> + Send>>;

#[tonic::async_trait]
impl DataPath for Fake {
    async fn get_info(
        &self,
        _: Request<api::GetInfoRequest>,
    ) -> Result<Response<api::GetInfoResponse>, Status> {
        Ok(Response::new(api::GetInfoResponse {
            name: format!("fake-{self:?}"),
            version: "0".into(),
            api_version: api::API_VERSION.into(),
            capabilities: [
                Capability::Filesystem,
                Capability::Backup,
                Capability::Restore,
            ]
            .map(|c| c as i32)
            .to_vec(),
        }))
    }

    type BackupStream = Events<api::BackupEvent>;

    async fn backup(
        &self,
        _: Request<api::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let result_with = |id: &str, result: HashMap<String, String>| {
            Ok(api::BackupEvent {
                event: Some(api::backup_event::Event::Result(api::BackupResult {
                    snapshot_id: id.into(),
                    result,
                    ..Default::default()
                })),
            })
        };
        let result = |id: &str| result_with(id, HashMap::new());
        let progress = Ok(api::BackupEvent {
            event: Some(api::backup_event::Event::Progress(api::Progress::default())),
        });
        let events = match self {
            Fake::TwoResults => vec![progress, result("a"), result("b")],
            Fake::NoResult => vec![progress],
            Fake::NoSnapshotId => vec![result("")],
            Fake::Unavailable => return Err(Status::unavailable("fake: restarting")),
            Fake::NoBlock => vec![result("a")],
            Fake::ResultMap(n) => vec![result_with(
                "a",
                HashMap::from([("object".to_string(), "o".repeat(*n))]),
            )],
            Fake::Hang => {
                use tokio_stream::StreamExt as _;
                let hung = tokio_stream::iter([progress]).chain(tokio_stream::pending());
                return Ok(Response::new(Box::pin(hung)));
            }
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    type RestoreStream = Events<api::RestoreEvent>;

    async fn restore(
        &self,
        _: Request<api::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type ForgetStream = Events<api::ForgetEvent>;

    async fn forget(
        &self,
        _: Request<api::ForgetRequest>,
    ) -> Result<Response<Self::ForgetStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `fake` on `socket` in this process.
pub fn serve_fake(fake: Fake, socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DataPathServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
}
