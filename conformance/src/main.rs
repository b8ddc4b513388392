//! `ferry-conformance`: runs the data-path conformance kit against a socket and prints one line per case.
//!
//!   ferry-conformance --socket /run/dp.sock --bucket b --prefix conformance/ns1 \
//!     --endpoint http://127.0.0.1:9000 --path-style --credentials-file creds --password-file pw

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_proto::datapath::Repository;

/// Conformance kit for data paths of Ferry's gRPC API (ferry.datapath.v1).
#[derive(Debug, Parser)]
#[command(name = "ferry-conformance", version)]
struct Args {
    /// The data path's unix socket.
    #[arg(long, env = "FERRY_DATAPATH_SOCKET")]
    socket: PathBuf,
    /// Bucket the data path may write to.
    #[arg(long)]
    bucket: String,
    /// Prefix inside it, ROOT/NAMESPACE (Forget is sent for ROOT); a fresh one per run.
    #[arg(long)]
    prefix: String,
    /// S3 endpoint URL.
    #[arg(long, default_value = "")]
    endpoint: String,
    /// S3 region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Path-style addressing.
    #[arg(long)]
    path_style: bool,
    /// AWS shared-credentials file.
    #[arg(long, default_value = "")]
    credentials_file: String,
    /// Repository password file (for data paths that encrypt).
    #[arg(long, default_value = "")]
    password_file: String,
    /// PEM file of extra CA certificates.
    #[arg(long, default_value = "")]
    ca_file: String,
    /// Size of the volume the cancel and deadline cases back up.
    #[arg(long, default_value_t = 256)]
    big_volume_mib: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let a = Args::parse();
    let work = tempfile::tempdir()?;
    let kit = ferry_conformance::Kit {
        socket: a.socket,
        repository: Repository {
            provider: "aws".into(),
            bucket: a.bucket,
            prefix: a.prefix,
            endpoint: a.endpoint,
            region: a.region,
            path_style: a.path_style,
            credentials_file: a.credentials_file,
            password_file: a.password_file,
            ca_file: a.ca_file,
            ..Default::default()
        },
        work: work.path().to_path_buf(),
        big_volume_mib: a.big_volume_mib,
    };
    let (table, ok) = ferry_conformance::table(&ferry_conformance::run(&kit).await);
    print!("{table}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
