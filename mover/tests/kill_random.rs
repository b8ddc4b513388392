//! SIGKILL at random points of backups and restores, on a local repository (16 runs) and on S3 (10 runs):
//! after every kill `check --read-data` is clean and a prune deletes nothing a snapshot needs (the killed
//! backup's lease is still there: its data waits); at the end the next backup completes and every snapshot
//! restores exactly. Prints one summary line per repository kind (figures for `e2e/README.md`).
#![allow(clippy::unwrap_used)]

// The engine's test helpers (tests of the `ferry` binary live with the binary).
#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How to reach one repository from the command line.
struct Target {
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Target {
    fn ferry(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env("FERRY_PASSWORD", "kill test password")
            .arg("--no-cache")
            .arg("--quiet")
            .args(&self.args);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    fn ok(&self, args: &[&str], what: &str) {
        let out = self.ferry().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A tree of incompressible files; `round` rewrites one of them so every backup has new data.
fn write_tree(src: &Path, round: u64) {
    for i in 0..6u64 {
        let seed = if i == round % 6 { 1000 + round } else { i + 1 };
        std::fs::write(src.join(format!("f{i}")), pseudo_random(6 << 20, seed)).unwrap();
    }
}

#[derive(Default, Debug)]
struct Tally {
    runs: usize,
    killed: usize,
    finished_first: usize,
}

fn kill_runs(t: &Target, runs: u64, seed: u64) -> Tally {
    let src = tempdir();
    write_tree(src.path(), 0);
    t.ok(&["init"], "init");
    t.ok(&["backup", src.path().to_str().unwrap()], "first backup");
    let mut tally = Tally::default();
    let mut x = seed | 1;
    for round in 1..=runs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(20 + x % 400);
        let restore = round % 3 == 0;
        let target = tempdir();
        let mut cmd = t.ferry();
        if restore {
            cmd.args(["restore", "latest"]).arg(target.path());
        } else {
            write_tree(src.path(), round);
            cmd.arg("backup").arg(src.path());
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        tally.runs += 1;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            tally.killed += 1;
        } else {
            tally.finished_first += 1;
        }
        child.wait().unwrap();
        t.ok(
            &["check", "--read-data"],
            &format!("check after kill {round}"),
        );
        if round % 2 == 0 {
            t.ok(&["prune", "--grace-seconds", "0"], "prune after a kill");
            t.ok(&["check", "--read-data"], "check after prune");
        }
    }
    // The next backup completes; every snapshot (the first, those that finished before their kill, the
    // last) restores; the last one exactly to the tree.
    write_tree(src.path(), runs + 1);
    t.ok(
        &["backup", src.path().to_str().unwrap()],
        "backup after the kills",
    );
    let out = t.ferry().args(["snapshots", "--json"]).output().unwrap();
    let snaps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in snaps.as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let target = tempdir();
        t.ok(
            &["restore", id, target.path().to_str().unwrap(), "--verify"],
            &format!("restore of {id}"),
        );
    }
    let target = tempdir();
    t.ok(
        &[
            "restore",
            "latest",
            target.path().to_str().unwrap(),
            "--verify",
        ],
        "restore of the last snapshot",
    );
    ferry_engine::fsmeta::compare_trees(src.path(), target.path()).unwrap();
    t.ok(&["prune", "--grace-seconds", "0"], "final prune");
    t.ok(&["check", "--read-data"], "final check");
    tally
}

#[test]
fn sigkill_at_random_points_on_a_local_repository_loses_nothing() {
    let repo = tempdir();
    let t = Target {
        args: vec!["--repo".into(), repo.path().to_str().unwrap().into()],
        envs: vec![],
    };
    let tally = kill_runs(&t, 16, 0x5eed_0001);
    println!("kill -9 (local): {tally:?}");
    assert!(
        tally.killed >= tally.runs / 2,
        "too few runs were killed: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_on_s3_loses_nothing() {
    let server = S3Server::start().await;
    server.create_bucket("kills").await;
    let t = Target {
        args: vec![
            "--repo".into(),
            "s3://kills/repo".into(),
            "--s3-endpoint".into(),
            server.endpoint.clone(),
            "--s3-region".into(),
            "us-east-1".into(),
            "--s3-path-style".into(),
        ],
        envs: vec![
            ("AWS_ACCESS_KEY_ID".into(), server.access.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), server.secret.clone()),
        ],
    };
    let tally = tokio::task::spawn_blocking(move || kill_runs(&t, 10, 0x5eed_0002))
        .await
        .unwrap();
    println!("kill -9 (S3): {tally:?}");
    assert!(
        tally.killed >= tally.runs / 2,
        "too few runs were killed: {tally:?}"
    );
}
