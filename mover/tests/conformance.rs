//! The data-path conformance kit (`ferry-conformance`) against both data paths CI builds: Ferry's engine
//! (`ferry datapath`) and the Go example (`examples/tar-datapath`, built by its script from the Go module
//! proxy), each on its own socket, writing to a real S3 server (versitygw).
#![allow(clippy::unwrap_used)]

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

async fn kit_passes(name: &str, data_path: impl FnOnce(&Path) -> Command) {
    let s3 = S3Server::start().await;
    let dir = tempdir();
    let repository =
        support::s3_repository(&s3, dir.path(), "conformance", &format!("{name}/ns1")).await;
    let socket = dir.path().join("datapath.sock");
    let log = dir.path().join("datapath.log");
    let served = support::serve(data_path(&socket), &socket, Some(&log));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let kit = ferry_conformance::Kit {
        socket: socket.clone(),
        repository,
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

/// The kit can fail: a data path that sends two results fails the round trip, naming the breach.
#[tokio::test(flavor = "multi_thread")]
async fn the_kit_fails_a_data_path_that_breaks_the_protocol() {
    let dir = tempdir();
    let socket = dir.path().join("fake.sock");
    support::serve_fake(support::Fake::TwoResults, &socket);
    let kit = ferry_conformance::Kit {
        socket,
        repository: ferry_proto::datapath::Repository {
            bucket: "b".into(),
            prefix: "root/ns".into(),
            ..Default::default()
        },
        work: dir.path().to_path_buf(),
        big_volume_mib: 1,
    };
    let outcomes = ferry_conformance::run(&kit).await;
    let (table, ok) = ferry_conformance::table(&outcomes);
    assert!(!ok, "{table}");
    let round_trip = outcomes
        .iter()
        .find(|o| o.name == "backup_restore_round_trip")
        .unwrap();
    assert!(
        round_trip
            .result
            .as_ref()
            .is_err_and(|e| e.contains("a second result")),
        "{table}"
    );
}
