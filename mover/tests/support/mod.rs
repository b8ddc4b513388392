//! What the data-path tests share: a data path process (killed when dropped) and an S3 repository on the
//! test server with its credentials and password files.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ferry_proto::datapath::Repository;

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
