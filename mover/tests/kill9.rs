//! Tests of the `ferry` command line: a backup killed with SIGKILL leaves a repository that `check` accepts
//! and the next backup completes; damaged snapshots, clear errors, and a restore under a low limit on open
//! files.
#![allow(clippy::unwrap_used)]

// The engine's test helpers (tests of the `ferry` binary live with the binary).
#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn ferry(repo: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_PASSWORD", "kill9 test password")
        .env("FERRY_REPO", repo)
        .arg("--no-cache")
        .arg("--quiet");
    c
}

#[test]
fn kill_dash_nine_mid_backup_leaves_a_checkable_repository() {
    let (src, repo) = (tempdir(), tempdir());
    for i in 0..12 {
        std::fs::write(
            src.path().join(format!("f{i}")),
            pseudo_random(16 << 20, i + 1),
        )
        .unwrap();
    }
    assert!(ferry(repo.path()).arg("init").status().unwrap().success());

    // Start a backup, wait until some packs have reached storage, then kill -9.
    let mut child = ferry(repo.path())
        .arg("backup")
        .arg(src.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let data = repo.path().join("data");
    let t0 = Instant::now();
    loop {
        let packs = std::fs::read_dir(&data).map(|d| d.count()).unwrap_or(0);
        if packs >= 2 || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished before it could be killed; make the data bigger"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let out = ferry(repo.path())
        .args(["snapshots", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let snaps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        snaps.as_array().unwrap().len(),
        0,
        "a killed backup must not leave a snapshot"
    );

    let check = ferry(repo.path())
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check after kill -9: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // The next backup completes and restores exactly.
    let out = succeeds(
        ferry(repo.path())
            .args(["backup", "--json"])
            .arg(src.path()),
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["totalBytes"], 12 * (16 << 20));
    let target = tempdir();
    let st = ferry(repo.path())
        .args(["restore", "latest"])
        .arg(target.path())
        .arg("--verify")
        .status()
        .unwrap();
    assert!(st.success());
    ferry_engine::fsmeta::compare_trees(src.path(), target.path()).unwrap();
    let check = ferry(repo.path())
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(check.status.success());
}

/// One damaged object under `snapshots/` is named, and stops neither the listing nor the next backup;
/// `check` fails on it.
#[test]
fn a_damaged_snapshot_is_named_and_stops_nothing_else() {
    let (src, repo) = (tempdir(), tempdir());
    std::fs::write(src.path().join("f"), b"some content").unwrap();
    assert!(ferry(repo.path()).arg("init").status().unwrap().success());
    let backup = || {
        ferry(repo.path())
            .arg("backup")
            .arg(src.path())
            .status()
            .unwrap()
    };
    assert!(backup().success());
    let junk = "0".repeat(64);
    std::fs::write(repo.path().join("snapshots").join(&junk), b"junk").unwrap();
    assert!(backup().success(), "a backup stopped by a damaged snapshot");
    let out = ferry(repo.path())
        .args(["snapshots", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&junk));
    let check = ferry(repo.path()).arg("check").output().unwrap();
    assert!(!check.status.success());
}

#[test]
fn cli_errors_are_clear() {
    let (repo, empty) = (tempdir(), tempdir());
    assert!(ferry(repo.path()).arg("init").status().unwrap().success());
    let out = ferry(repo.path())
        .arg("snapshots")
        .env("FERRY_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry(empty.path()).arg("snapshots").output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ferry init"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry(repo.path())
        .args(["restore", "latest", "/tmp/x"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshots"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry(repo.path())
        .arg("backup")
        .arg(empty.path().join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["snapshots"])
        .env_remove("FERRY_REPO")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--repo"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--drop-cache` remembers written ranges to advise them again later, each with a descriptor: with a fixed
/// 1024 of them, this restore failed with "Too many open files" under `ulimit -n 64` (files of two chunks
/// are what it remembers).
#[test]
fn a_restore_that_drops_its_pages_stays_within_a_low_limit_on_open_files() {
    let (src, repo, out) = (tempdir(), tempdir(), tempdir());
    for i in 0..800u64 {
        let len = (200 << 10) + (i * 997) % (60 << 10);
        std::fs::write(
            src.path().join(format!("f{i}")),
            pseudo_random(len as usize, i + 1),
        )
        .unwrap();
    }
    assert!(ferry(repo.path()).arg("init").status().unwrap().success());
    succeeds(ferry(repo.path()).arg("backup").arg(src.path()));

    let target = out.path().join("r");
    let restore = ferry(repo.path());
    succeeds(
        Command::new("sh")
            .args(["-c", "ulimit -n 64 && exec \"$@\"", "sh"])
            .arg(restore.get_program())
            .args(restore.get_args())
            .envs(restore.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .args(["restore", "latest", "--drop-cache"])
            .arg(&target),
    );
    for i in [0u64, 399, 799] {
        let name = format!("f{i}");
        assert_eq!(
            std::fs::read(find_file(&target, &name)).unwrap(),
            std::fs::read(src.path().join(&name)).unwrap(),
            "{name}"
        );
    }
}

/// Runs `c` and checks it succeeded (its stderr in the failure).
fn succeeds(c: &mut Command) -> std::process::Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The file named `name` somewhere under `dir` (a restore recreates the source's absolute path below it).
fn find_file(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().is_some_and(|n| n == name) {
            return p;
        }
        if p.is_dir() {
            let found = find_file(&p, name);
            if found.exists() {
                return found;
            }
        }
    }
    dir.join(name)
}
