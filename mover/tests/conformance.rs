//! The data-path conformance kit (`ferry-conformance`) against both data paths CI builds: Ferry's engine
//! (`ferry datapath`) and the Go example (`examples/tar-datapath`, built by its script from the Go module
//! proxy), each on its own socket, writing to a real S3 server (versitygw).
#![allow(clippy::unwrap_used)]

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::datapath::Repository;

/// A data path process, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(mut cmd: Command, socket: &Path, log: &Path) -> Served {
    let log = std::fs::File::create(log).unwrap();
    let child = cmd
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("FERRY_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
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

async fn kit_passes(name: &str, data_path: impl FnOnce(&Path) -> Command) {
    let s3 = S3Server::start().await;
    s3.create_bucket("conformance").await;
    let dir = tempdir();
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id={}\naws_secret_access_key={}\n",
            s3.access, s3.secret
        ),
    )
    .unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "conformance password\n").unwrap();
    let socket = dir.path().join("datapath.sock");
    let log = dir.path().join("datapath.log");
    let served = serve(data_path(&socket), &socket, &log);
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let kit = ferry_conformance::Kit {
        socket: socket.clone(),
        repository: Repository {
            provider: "aws".into(),
            bucket: "conformance".into(),
            prefix: format!("{name}/ns1"),
            endpoint: s3.endpoint.clone(),
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: creds.display().to_string(),
            password_file: password.display().to_string(),
            ..Default::default()
        },
        work,
        big_volume_mib: 128,
    };
    let (table, ok) = ferry_conformance::table(&ferry_conformance::run(&kit).await);
    drop(served);
    println!("{name}:\n{table}");
    assert!(
        ok,
        "{name} failed the conformance kit:\n{table}\ndata path log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ferrys_data_path_passes_the_kit() {
    kit_passes("ferry", |socket| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.arg("datapath").arg("--socket").arg(socket);
        c
    })
    .await;
}

fn tar_example() -> PathBuf {
    let root = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("..");
    let out = Command::new(root.join("examples/tar-datapath/build"))
        .output()
        .expect("running examples/tar-datapath/build (needs Go)");
    assert!(
        out.status.success(),
        "building the tar example failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_go_tar_example_passes_the_kit() {
    let bin = tar_example();
    kit_passes("tar-example", |socket| {
        let mut c = Command::new(bin);
        c.arg("--socket").arg(socket);
        c
    })
    .await;
}
