//! The round trip `ferry demo` shows: back up a generated tree, change it, back up again, restore, compare
//! and check, in a local repository in a work directory. The README's first command. Each step is handed to
//! the caller as a [`Step`] to print.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, local::LocalBackend};
use crate::backup::{BackupOptions, BackupOutcome};
use crate::check::CheckReport;
use crate::crypto::KdfParams;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{OpenOptions, Repository};
use crate::restore::{RestoreOptions, RestoreSummary};
use crate::testdata::pseudo_random;

fn write_tree(root: &Path) -> std::io::Result<()> {
    let mut seed = 0;
    let mut rnd = |n: usize| {
        seed += 1;
        pseudo_random(n, seed)
    };
    for d in 0..20 {
        let dir = root.join(format!("dir{d:02}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..25 {
            let body = if f % 2 == 0 {
                rnd(4096 + f * 997)
            } else {
                format!("line {f} of dir {d}\n").repeat(300).into_bytes()
            };
            std::fs::write(dir.join(format!("file{f:02}.dat")), body)?;
        }
    }
    std::fs::create_dir_all(root.join("big"))?;
    std::fs::write(root.join("big/random.bin"), rnd(24 << 20))?;
    std::fs::write(
        root.join("big/logs.txt"),
        "GET /api/v1/volumes status=200 latency_ms=3\n".repeat(200_000),
    )?;
    std::fs::create_dir_all(root.join("empty-dir"))?;
    std::fs::write(root.join("empty-file"), b"")?;
    std::os::unix::fs::symlink("big/random.bin", root.join("link-to-random"))?;
    std::fs::hard_link(
        root.join("dir00/file00.dat"),
        root.join("hardlink-to-file00"),
    )?;
    std::fs::write(root.join("non-utf8-\u{fffd}-name"), b"name test")?;
    std::fs::set_permissions(
        root.join("dir01/file01.dat"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let sparse = std::fs::File::create(root.join("sparse.img"))?;
    sparse.set_len(64 << 20)?;
    Ok(())
}

fn change_tree(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("big/random.bin"))?;
    f.write_all_at(&[0xAB; 65536], 10 << 20)?;
    std::fs::write(
        root.join("dir03/new-file.txt"),
        b"added after the first backup\n",
    )?;
    std::fs::remove_file(root.join("dir04/file04.dat"))?;
    Ok(())
}

/// A step of the demo, done.
#[derive(Debug)]
pub enum Step<'a> {
    /// The demo runs in `work`.
    Started {
        /// The work directory.
        work: &'a Path,
    },
    /// 1: an encrypted repository was created.
    Created {
        /// Its id.
        id: &'a str,
        /// Its directory.
        repo: &'a Path,
    },
    /// 2: the first backup.
    FirstBackup(&'a BackupOutcome),
    /// 3: 64 KiB changed inside a 24 MiB file, one file added, one removed.
    Changed,
    /// 4: the second backup, on the first as its parent.
    SecondBackup(&'a BackupOutcome),
    /// 5: the latest snapshot restored sparse and verified.
    Restored {
        /// Where.
        target: &'a Path,
        /// What.
        summary: &'a RestoreSummary,
    },
    /// 6: source and restore compared equal.
    Compared {
        /// Entries compared.
        entries: u64,
    },
    /// 7: `check --read-data` found no errors.
    Checked(&'a CheckReport),
}

/// The work directory used when none is given: a new one under the system's temporary directory, removed
/// when the demo passes.
pub fn default_work_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Runs the demo in `dir` (default: [`default_work_dir`]), handing each finished step to `step`.
pub async fn run(dir: Option<PathBuf>, mut step: impl FnMut(Step<'_>)) -> Result<()> {
    let work = dir.unwrap_or_else(default_work_dir);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let (src, repo_dir, out) = (
        work.join("source"),
        work.join("repo"),
        work.join("restored"),
    );
    for d in [&src, &repo_dir, &out] {
        let _ = std::fs::remove_dir_all(d);
    }
    std::fs::create_dir_all(&src).map_err(io(&src))?;
    step(Step::Started { work: &work });
    write_tree(&src).map_err(|e| Error::io(&src, e).context("writing the demo tree"))?;
    let password = b"demo password";
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&repo_dir));
    let cfg = Repository::init(backend.clone(), password, KdfParams::default()).await?;
    step(Step::Created {
        id: &cfg.id,
        repo: &repo_dir,
    });
    let opts = OpenOptions {
        cache_dir: Some(work.join("cache")),
        cache_limit: 64 << 20,
        ..Default::default()
    };
    // Each backup opens the repository anew, as a separate `ferry backup` run would.
    let backup = async || -> Result<(Arc<Repository>, BackupOutcome)> {
        let repo = Arc::new(Repository::open(backend.clone(), password, &opts).await?);
        let opts = BackupOptions::new(&src);
        let out = crate::backup::backup(repo.clone(), opts, Arc::new(Progress::default())).await?;
        Ok((repo, out))
    };
    let (_, b1) = backup().await?;
    step(Step::FirstBackup(&b1));
    change_tree(&src).map_err(io(&src))?;
    step(Step::Changed);
    let (repo, b2) = backup().await?;
    step(Step::SecondBackup(&b2));
    let (_, snap) = repo.find_snapshot("latest").await?;
    let mut ro = RestoreOptions::new(&out);
    ro.sparse = true;
    ro.verify = true;
    let r =
        crate::restore::restore(repo.clone(), &snap, &ro, Arc::new(Progress::default())).await?;
    step(Step::Restored {
        target: &out,
        summary: &r,
    });
    let entries = crate::fsmeta::compare_trees(&src, &out).map_err(Error::Invalid)?;
    step(Step::Compared { entries });
    let report = crate::check::check(repo, true, Arc::new(Progress::default())).await?;
    if !report.ok() {
        return Err(Error::Invalid(format!("check failed: {:?}", report.errors)));
    }
    step(Step::Checked(&report));
    if default_work_dir() == work {
        std::fs::remove_dir_all(&work).map_err(io(&work))?;
    }
    Ok(())
}
