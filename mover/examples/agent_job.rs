//! Prints an agent job (`$FERRY_AGENT_JOB`: base64 protobuf `ferry.agent.v1.AgentJob`) for a backup or a
//! restore on an S3 repository, so `ferry agent --no-events` can drive a data path outside Kubernetes: how
//! `bench/api` times Ferry's engine behind the data-path API, and how a vendor can try a data path by hand.
//!
//! ```text
//! cargo run --example agent_job -- backup --volume /data --bucket b --prefix p \
//!     --endpoint http://127.0.0.1:9000 --password-file pw --credentials-file creds
//! ```

use clap::{Parser, ValueEnum};
use ferry_proto::datapath as api;
use ferry_proto::datapath::agent::{AgentJob, CrRef, agent_job::Call};

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Backup,
    Restore,
}

#[derive(Parser)]
struct Args {
    kind: Kind,
    /// The volume: the directory to back up or restore into.
    #[arg(long)]
    volume: String,
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "")]
    prefix: String,
    /// S3 endpoint URL (path-style addressing is used with it).
    #[arg(long, default_value = "")]
    endpoint: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// AWS shared-credentials file.
    #[arg(long, default_value = "")]
    credentials_file: String,
    /// The repository password file.
    #[arg(long)]
    password_file: String,
    /// Restore: the snapshot.
    #[arg(long, default_value = "")]
    snapshot_id: String,
    /// The source PVC (`namespace/pvc`): a backup's parent is the latest snapshot of the same PVC.
    #[arg(long, default_value = "")]
    pvc: String,
    /// The operation id (and the CR name the job names).
    #[arg(long, default_value = "manual")]
    operation_id: String,
}

fn main() {
    let a = Args::parse();
    let repository = Some(api::Repository {
        provider: "aws".into(),
        bucket: a.bucket,
        prefix: a.prefix,
        path_style: !a.endpoint.is_empty(),
        endpoint: a.endpoint,
        region: a.region,
        credentials_file: a.credentials_file,
        password_file: a.password_file,
        ..Default::default()
    });
    let volume = Some(api::Volume {
        mode: api::VolumeMode::Filesystem as i32,
        path: a.volume,
    });
    let (namespace, pvc) = a.pvc.split_once('/').unwrap_or(("default", a.pvc.as_str()));
    let source = Some(api::Source {
        namespace: namespace.into(),
        pvc: pvc.into(),
        ..Default::default()
    });
    let (kind, call) = match a.kind {
        Kind::Backup => (
            "DataUpload",
            Call::Backup(api::BackupRequest {
                operation_id: a.operation_id.clone(),
                repository,
                volume,
                source,
                ..Default::default()
            }),
        ),
        Kind::Restore => (
            "DataDownload",
            Call::Restore(api::RestoreRequest {
                operation_id: a.operation_id.clone(),
                repository,
                volume,
                source,
                snapshot_id: a.snapshot_id,
                ..Default::default()
            }),
        ),
    };
    let job = AgentJob {
        cr: Some(CrRef {
            kind: kind.into(),
            name: a.operation_id,
            namespace: "default".into(),
            uid: String::new(),
        }),
        report_interval_seconds: 5,
        call: Some(call),
    };
    println!("{}", ferry_mover::agent::encode_job(&job));
}
