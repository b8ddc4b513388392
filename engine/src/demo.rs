//! `ferry demo`: back up a generated tree, change it, back up again, restore, and compare, in a
//! temporary local repository. The README's first command.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ferry_mover::backend::local::LocalBackend;
use ferry_mover::backup::BackupOptions;
use ferry_mover::crypto::KdfParams;
use ferry_mover::progress::Progress;
use ferry_mover::repo::{OpenOptions, Repository};
use ferry_mover::restore::RestoreOptions;

use ferry_mover::testdata::pseudo_random;

use crate::cli::human;

fn write_tree(root: &Path) -> Result<()> {
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

fn change_tree(root: &Path) -> Result<()> {
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

/// Runs the demo.
pub async fn run(dir: Option<PathBuf>) -> Result<()> {
    let tmp;
    let work = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let (src, repo_dir, out) = (
        work.join("source"),
        work.join("repo"),
        work.join("restored"),
    );
    for d in [&src, &repo_dir, &out] {
        let _ = std::fs::remove_dir_all(d);
    }
    std::fs::create_dir_all(&src)?;
    println!("== Ferry demo in {}", work.display());
    write_tree(&src).context("writing the demo tree")?;
    let password = b"demo password";
    let backend: Arc<dyn ferry_mover::backend::Backend> = Arc::new(LocalBackend::new(&repo_dir));
    let cfg = Repository::init(backend.clone(), password, KdfParams::default()).await?;
    println!(
        "1. created an encrypted repository {} at {}",
        cfg.id,
        repo_dir.display()
    );
    let opts = OpenOptions {
        cache_dir: Some(work.join("cache")),
        cache_limit: 64 << 20,
        ..Default::default()
    };
    let repo = Arc::new(Repository::open(backend.clone(), password, &opts).await?);

    let b1 = ferry_mover::backup::backup(
        repo.clone(),
        BackupOptions::new(&src),
        Arc::new(Progress::default()),
    )
    .await?;
    let s = &b1.snapshot.summary;
    println!(
        "2. first backup {}: {} files, {} logical, {} new, {} stored (dedup + lz4), {:.2}s",
        b1.id.short(),
        s.files,
        human(s.total_bytes),
        human(s.new_bytes),
        human(s.stored_bytes),
        s.seconds
    );
    change_tree(&src)?;
    println!("3. changed 64 KiB inside a 24 MiB file, added one file, removed one");
    let repo = Arc::new(Repository::open(backend.clone(), password, &opts).await?);
    let b2 = ferry_mover::backup::backup(
        repo.clone(),
        BackupOptions::new(&src),
        Arc::new(Progress::default()),
    )
    .await?;
    let s = &b2.snapshot.summary;
    println!(
        "4. second backup {} (parent {}): read {} of {}, {} new, {} stored, {:.2}s",
        b2.id.short(),
        b2.snapshot.parent.map(|p| p.short()).unwrap_or_default(),
        human(s.read_bytes),
        human(s.total_bytes),
        human(s.new_bytes),
        human(s.stored_bytes),
        s.seconds
    );
    let (_, snap) = repo.find_snapshot("latest").await?;
    let mut ro = RestoreOptions::new(&out);
    ro.sparse = true;
    ro.verify = true;
    let r = ferry_mover::restore::restore(repo.clone(), &snap, &ro, Arc::new(Progress::default()))
        .await?;
    println!(
        "5. restored latest to {}: {} files, {} (sparse, every chunk verified)",
        out.display(),
        r.files,
        human(r.bytes)
    );
    let n = ferry_mover::fsmeta::compare_trees(&src, &out).map_err(anyhow::Error::msg)?;
    println!(
        "6. compared source and restore: {n} entries identical (content, type, mode, mtime, links)"
    );
    let report = ferry_mover::check::check(repo, true, Arc::new(Progress::default())).await?;
    if !report.ok() {
        bail!("check failed: {:?}", report.errors);
    }
    println!(
        "7. check --read-data: {} packs, {} blobs, {} snapshots: no errors",
        report.packs, report.blobs, report.snapshots
    );
    if std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())) == work {
        std::fs::remove_dir_all(&work)?;
    }
    println!("demo passed");
    Ok(())
}
