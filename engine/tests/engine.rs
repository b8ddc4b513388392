//! End-to-end engine behaviour on a local repository.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use ferry_engine::backup::{BackupOptions, ParentSpec};
use ferry_engine::crypto::Kind;
use ferry_engine::index::{INDEX_VERSION, IndexPack, IndexSegment};
use ferry_engine::pack::{BlobKind, PackWriter, encode_blob};
use ferry_engine::progress::Progress;
use ferry_engine::repo::{OpenOptions, Repository};
use ferry_engine::restore::RestoreOptions;
use ferry_engine::snapshot::{SNAPSHOT_VERSION, Snapshot, SourceKind, Summary};
use ferry_engine::tree::{Node, NodeKind, TREE_VERSION, Tree};
use ferry_engine::{Error, check::check};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_every_kind_of_entry_and_metadata() {
    let (src, repo_dir, out) = (tempdir(), tempdir(), tempdir());
    rich_tree(src.path());
    let repo = new_repo(local(repo_dir.path())).await;
    let b = backup(&repo, src.path()).await;
    let s = &b.snapshot.summary;
    assert_eq!(s.read_bytes, s.total_bytes);
    assert!(
        s.stored_bytes < s.total_bytes,
        "compression and zero dedup should shrink {s:?}"
    );
    let r = restore_latest(&repo, out.path()).await.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let n = ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();
    assert!(n >= 15, "compared {n} entries");
    // Hard links come back as hard links.
    assert_eq!(
        std::fs::metadata(out.path().join("hardlink"))
            .unwrap()
            .ino(),
        std::fs::metadata(out.path().join("a/small.txt"))
            .unwrap()
            .ino()
    );
    let report = check(repo, true, Default::default()).await.unwrap();
    assert!(report.ok() && report.warnings.is_empty(), "{report:?}");
}

/// Listings read ahead of the walk (started before the repository opened, as the CLI and the data path do)
/// record the same tree as listings read when the walk gets there, whatever the entries' kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_its_listings_read_ahead_records_the_same_tree() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let now = backup(&repo, src.path()).await;
    let mut o = BackupOptions::new(src.path());
    o.parent = ParentSpec::None;
    o.read_ahead = Some(ferry_engine::listing::ReadAhead::start(src.path()));
    let ahead =
        ferry_engine::backup::backup(reopen(&backend).await, o, Arc::new(Progress::default()))
            .await
            .unwrap();
    assert_eq!(ahead.snapshot.tree, now.snapshot.tree);
    assert_eq!(ahead.snapshot.summary.files, now.snapshot.summary.files);
}

/// Every compression a repository can be made with backs up, restores and checks the same tree; the
/// setting survives reopening, and text ends up smaller with Zstandard than with LZ4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_setting_round_trips() {
    use ferry_engine::pack::Compression;
    let src = tempdir();
    rich_tree(src.path());
    let log: String = (0..40_000)
        .map(|i| {
            format!(
                "2026-11-26T01:{:02}:00Z INFO GET /items/{i} 200 {} ms\n",
                i % 60,
                i % 89
            )
        })
        .collect();
    std::fs::write(src.path().join("app.log"), log).unwrap();
    let mut stored = Vec::new();
    for c in [Compression::Lz4, Compression::Zstd(3), Compression::Auto] {
        let (repo_dir, out) = (tempdir(), tempdir());
        let backend = local(repo_dir.path());
        Repository::init_with(backend.clone(), PASSWORD, FAST_KDF, c)
            .await
            .unwrap();
        let repo = reopen(&backend).await;
        assert_eq!(repo.config().compression, c);
        let b = backup(&repo, src.path()).await;
        stored.push(b.snapshot.summary.stored_bytes);
        restore_latest(&repo, out.path()).await.unwrap();
        ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();
        let report = check(repo, true, Default::default()).await.unwrap();
        assert!(report.ok(), "{c}: {report:?}");
    }
    assert!(
        stored[1] < stored[0] && stored[2] < stored[0],
        "stored bytes lz4/zstd/auto: {stored:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backups_skip_unchanged_files_even_from_a_fresh_clone() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let b1 = backup(&repo, src.path()).await;

    // Unchanged: nothing read, nothing new.
    let b2 = backup(&reopen(&backend).await, src.path()).await;
    assert_eq!(b2.snapshot.parent, Some(b1.id));
    assert_eq!(b2.snapshot.summary.read_bytes, 0);
    assert_eq!(b2.snapshot.summary.new_bytes, 0);
    assert_eq!(
        b2.snapshot.tree, b1.snapshot.tree,
        "identical trees dedup to the same root"
    );

    // One changed file: only it is read; only the changed chunk region is new.
    let f = src.path().join("a/b/random.bin");
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[1u8; 1000], 2 << 20).unwrap();
    let b3 = backup(&reopen(&backend).await, src.path()).await;
    let s = &b3.snapshot.summary;
    assert_eq!(s.read_bytes, 5 << 20);
    assert!(
        s.new_bytes > 0 && s.new_bytes < 3 << 20,
        "new bytes {}",
        s.new_bytes
    );

    // A fresh copy (new inodes and ctimes, same mtimes) with an explicit parent reads nothing.
    let clone = tempdir();
    copy_tree(src.path(), clone.path());
    let mut o = BackupOptions::new(clone.path());
    o.parent = ParentSpec::Snapshot(b3.id.to_hex());
    let b4 = ferry_engine::backup::backup(reopen(&backend).await, o, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(b4.snapshot.summary.read_bytes, 0);
    assert_eq!(b4.snapshot.tree, b3.snapshot.tree);
}

/// A backup with a parent loads the index once: the reads of the parent's trees share the backup's copy
/// (two copies of a 2,000,000-blob index were hundreds of MiB), and the segments it writes do not make the
/// next read of a tree load it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_a_parent_loads_the_index_once() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    let gate = Gate::new(local(repo_dir.path()), "no-such-prefix/");
    let backend: Arc<dyn ferry_engine::backend::Backend> = gate.clone();
    backup(&new_repo(backend.clone()).await, src.path()).await;
    std::fs::write(src.path().join("a/new.txt"), b"a new file").unwrap();
    let before = gate.listings("index/");
    let b2 = backup(&reopen(&backend).await, src.path()).await;
    assert!(b2.snapshot.parent.is_some() && b2.snapshot.summary.new_bytes > 0);
    assert_eq!(gate.listings("index/") - before, 1, "index listings");
}

/// A namespace's repository holds the snapshots of all its volumes. Each mover pod starts with an empty
/// cache, so finding a backup's parent must not cost a read of every snapshot the repository holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_finds_its_parent_without_reading_every_snapshot() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    let gate = Gate::new(local(repo_dir.path()), "no-such-prefix/");
    let backend: Arc<dyn ferry_engine::backend::Backend> = gate.clone();
    let repo = new_repo(backend.clone()).await;
    let template = backup(&repo, src.path()).await.snapshot;
    let other_volumes = |range: std::ops::Range<usize>| {
        let (repo, template) = (repo.clone(), template.clone());
        async move {
            for i in range {
                let mut s = template.clone();
                s.path = format!("/other/{i}");
                repo.write_snapshot(&s).await.unwrap();
            }
        }
    };
    other_volumes(0..100).await;
    let parent = backup(&reopen(&backend).await, src.path()).await;
    other_volumes(100..105).await;
    let before = gate.reads("snapshots/");
    let b = backup(&reopen(&backend).await, src.path()).await;
    assert_eq!(
        b.snapshot.parent,
        Some(parent.id),
        "the latest of its source"
    );
    let read = gate.reads("snapshots/") - before;
    assert!(read <= 16, "{read} snapshots read of 107");
}

/// A parent is only a shortcut: an object under `snapshots/` that does not read as one is passed over, and
/// a snapshot named by its full id is read alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_does_not_stop_a_backup_and_a_full_id_reads_one_snapshot() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    let gate = Gate::new(local(repo_dir.path()), "no-such-prefix/");
    let backend: Arc<dyn ferry_engine::backend::Backend> = gate.clone();
    let first = backup(&new_repo(backend.clone()).await, src.path()).await;
    let junk = Bytes::from_static(b"not a snapshot");
    backend
        .put(&format!("snapshots/{}", "0".repeat(64)), junk.clone())
        .await
        .unwrap();
    backend.put("snapshots/stray", junk).await.unwrap();
    let repo = reopen(&backend).await;
    let b = backup(&repo, src.path()).await;
    assert_eq!(b.snapshot.parent, Some(first.id));
    let before = gate.reads("snapshots/");
    let (id, snap) = repo.find_snapshot(&b.id.to_hex()).await.unwrap();
    assert_eq!((id, snap.tree), (b.id, b.snapshot.tree));
    assert_eq!(gate.reads("snapshots/") - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_error() {
    let repo_dir = tempdir();
    let backend = local(repo_dir.path());
    new_repo(backend.clone()).await;
    let err = Repository::open(backend.clone(), b"not the password", &no_cache())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongPassword), "{err}");
    let err = Repository::init(backend, PASSWORD, FAST_KDF)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyInitialised(_)), "{err}");
    let empty = tempdir();
    let err = Repository::open(local(empty.path()), PASSWORD, &no_cache())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoRepository(_)), "{err}");
}

fn flip(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_anywhere_is_detected_never_restored_as_data() {
    let (src, repo_dir) = (tempdir(), tempdir());
    std::fs::write(src.path().join("f"), pseudo_random(3 << 20, 5)).unwrap();
    std::fs::write(src.path().join("g"), b"small file").unwrap();
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    backup(&repo, src.path()).await;
    let pristine = tempdir();
    copy_tree(repo_dir.path(), pristine.path());

    let objects = files_under(repo_dir.path());
    assert!(objects.len() >= 6, "{objects:?}");
    for obj in &objects {
        let rel = obj.strip_prefix(repo_dir.path()).unwrap().to_path_buf();
        let size = std::fs::metadata(obj).unwrap().len() as usize;
        for at in [0, 30, size / 2, size.saturating_sub(20), size - 1] {
            flip(obj, at);
            let outcome = async {
                let repo =
                    Arc::new(Repository::open(backend.clone(), PASSWORD, &no_cache()).await?);
                let out = tempdir();
                restore_latest(&repo, out.path()).await?;
                // If a restore "succeeds", its data must still be exactly right.
                ferry_engine::fsmeta::compare_trees(src.path(), out.path())
                    .map_err(Error::Invalid)?;
                let r = check(repo, true, Default::default()).await?;
                if r.ok() {
                    Ok(())
                } else {
                    Err(Error::Integrity(r.errors.join("; ")))
                }
            }
            .await;
            let is_key = rel.starts_with("keys");
            match outcome {
                Err(Error::Integrity(_) | Error::Format(_)) => {}
                Err(Error::WrongPassword) if is_key => {}
                other => panic!("flip in {} at {at}: {other:?}", rel.display()),
            }
            std::fs::copy(pristine.path().join(&rel), obj).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pack_is_a_clear_error() {
    let (src, repo_dir, out) = (tempdir(), tempdir(), tempdir());
    std::fs::write(src.path().join("f"), pseudo_random(1 << 20, 2)).unwrap();
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    backup(&repo, src.path()).await;
    for p in files_under(&repo_dir.path().join("data")) {
        std::fs::remove_file(p).unwrap();
    }
    let repo = reopen(&backend).await;
    let err = restore_latest(&repo, out.path()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Integrity(m) if m.contains("missing")),
        "{err}"
    );
    let r = check(repo, false, Default::default()).await.unwrap();
    assert!(r.errors.iter().any(|e| e.contains("missing")), "{r:?}");
}

/// `check` reports every object under `snapshots/` that does not read, and still checks every snapshot
/// that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_damaged_snapshot_and_checks_the_others() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let good = backup(&repo, src.path()).await;
    let mut broken = good.snapshot.clone();
    broken.tree = ferry_engine::id::BlobId([9; 32]);
    repo.write_snapshot(&broken).await.unwrap();
    let junk = format!("snapshots/{}", "0".repeat(64));
    backend
        .put(&junk, Bytes::from_static(b"junk"))
        .await
        .unwrap();
    let r = check(reopen(&backend).await, false, Default::default())
        .await
        .unwrap();
    assert_eq!(r.snapshots, 2, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains(&"0".repeat(64))),
        "{r:?}"
    );
    assert!(r.errors.iter().any(|e| e.contains("09090909")), "{r:?}");
}

/// Stores `trees` (in order, the last is the root) and a snapshot naming the root, bypassing the backup code.
async fn forge_snapshot(repo: &Repository, trees: Vec<Tree>, data: &[&[u8]]) -> Tree {
    let keys = repo.keys();
    let root = trees.last().unwrap().clone();
    let mut packs = Vec::new();
    for (kind, blobs) in [
        (
            BlobKind::Data,
            data.iter().map(|d| d.to_vec()).collect::<Vec<_>>(),
        ),
        (
            BlobKind::Tree,
            trees.iter().map(|t| t.to_bytes().unwrap()).collect(),
        ),
    ] {
        let mut w = PackWriter::new(kind, 1 << 20);
        for b in &blobs {
            w.add(
                keys.blob_id(b),
                b.len(),
                &encode_blob(keys, kind, b, Default::default()).unwrap(),
            );
        }
        let p = w.finish(keys).unwrap();
        repo.backend()
            .put(&p.id.key(), p.bytes.clone())
            .await
            .unwrap();
        packs.push(IndexPack {
            id: p.id,
            kind,
            size: p.bytes.len() as u64,
            blobs: p.header.blobs,
        });
    }
    repo.write_index(&IndexSegment {
        version: INDEX_VERSION,
        packs,
    })
    .await
    .unwrap();
    let snap = Snapshot {
        version: SNAPSHOT_VERSION,
        time: "2026-01-01T00:00:00.000000000Z".into(),
        hostname: "forger".into(),
        path: "/".into(),
        source: SourceKind::Filesystem,
        tree: keys.blob_id(&root.to_bytes().unwrap()),
        parent: None,
        tags: Default::default(),
        summary: Summary::default(),
    };
    repo.write_snapshot(&snap).await.unwrap();
    root
}

fn node(name: &[u8], kind: NodeKind, size: u64) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime_sec: 0,
        mtime_nsec: 0,
        xattrs: vec![],
        hardlink: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_never_writes_outside_its_target() {
    let payload: &[u8] = b"evil";
    for bad in [
        &b".."[..],
        b"../../escape",
        b"/etc/cron.d/x",
        b"a/../../x",
        b".",
    ] {
        let repo_dir = tempdir();
        let backend = local(repo_dir.path());
        let repo = new_repo(backend.clone()).await;
        let id = repo.keys().blob_id(payload);
        // Encode the tree directly: Tree::new would not validate, but restore must.
        let t = Tree {
            version: TREE_VERSION,
            nodes: vec![node(bad, NodeKind::File { content: vec![id] }, 4)],
        };
        forge_snapshot(&repo, vec![t], &[payload]).await;
        let repo = reopen(&backend).await;
        let out = tempdir();
        let target = out.path().join("t");
        let err = restore_latest(&repo, &target).await.unwrap_err();
        assert!(matches!(err, Error::UnsafePath(_)), "{bad:?}: {err}");
        assert_eq!(files_under(out.path()).len(), 0, "{bad:?} wrote something");
    }

    // A symlink and a directory of the same name: the tree is rejected.
    let repo_dir = tempdir();
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let id = repo.keys().blob_id(payload);
    let inner = Tree::new(vec![node(b"f", NodeKind::File { content: vec![id] }, 4)]);
    let inner_id = repo.keys().blob_id(&inner.to_bytes().unwrap());
    let root = Tree {
        version: TREE_VERSION,
        nodes: vec![
            node(
                b"d",
                NodeKind::Symlink {
                    target: b"/tmp".to_vec(),
                },
                0,
            ),
            node(b"d", NodeKind::Dir { subtree: inner_id }, 0),
        ],
    };
    forge_snapshot(&repo, vec![inner.clone(), root], &[payload]).await;
    let out = tempdir();
    let err = restore_latest(&reopen(&backend).await, out.path())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnsafePath(_)), "{err}");

    // A symlink already in the target where the snapshot has a directory is replaced, not followed.
    let repo_dir = tempdir();
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let id = repo.keys().blob_id(payload);
    let inner = Tree::new(vec![node(b"f", NodeKind::File { content: vec![id] }, 4)]);
    let inner_id = repo.keys().blob_id(&inner.to_bytes().unwrap());
    let root = Tree::new(vec![node(b"d", NodeKind::Dir { subtree: inner_id }, 0)]);
    forge_snapshot(&repo, vec![inner, root], &[payload]).await;
    let (out, outside) = (tempdir(), tempdir());
    std::os::unix::fs::symlink(outside.path(), out.path().join("d")).unwrap();
    restore_latest(&reopen(&backend).await, out.path())
        .await
        .unwrap();
    assert!(
        files_under(outside.path()).is_empty(),
        "restore followed a symlink out of its target"
    );
    assert_eq!(std::fs::read(out.path().join("d/f")).unwrap(), payload);
}

/// The plan is written in batches (a few MiB each by default): a tree restores the same whatever the
/// batch size, with files split across batches, deduplicated chunks in several, and hard links, metadata
/// and verification intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_in_batches_of_any_size_is_the_same_tree() {
    let (src, repo_dir) = (tempdir(), tempdir());
    rich_tree(src.path());
    std::fs::write(src.path().join("a/b/copy.bin"), pseudo_random(5 << 20, 1)).unwrap();
    let repo = new_repo(local(repo_dir.path())).await;
    let b = backup(&repo, src.path()).await;
    for batch in [1, 2, 3, 7, 1 << 20] {
        let out = tempdir();
        let o = RestoreOptions {
            verify: true,
            batch_placements: batch,
            ..RestoreOptions::new(out.path())
        };
        let r = ferry_engine::restore::restore(repo.clone(), &b.snapshot, &o, Default::default())
            .await
            .unwrap();
        assert!(r.warnings.is_empty(), "batch {batch}: {:?}", r.warnings);
        ferry_engine::fsmeta::compare_trees(src.path(), out.path())
            .unwrap_or_else(|e| panic!("batch {batch}: {e}"));
    }
}

/// A restore into a target that already holds an earlier restore (changed since) makes it the snapshot
/// again: files replaced, a symlink where a file goes replaced and not followed; a directory where a file
/// goes is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_again_over_a_changed_target_replaces_what_is_there() {
    use std::os::unix::fs::PermissionsExt;
    let (src, repo_dir, out, outside) = (tempdir(), tempdir(), tempdir(), tempdir());
    rich_tree(src.path());
    let repo = new_repo(local(repo_dir.path())).await;
    backup(&repo, src.path()).await;
    restore_latest(&repo, out.path()).await.unwrap();

    let o = out.path();
    std::fs::remove_file(o.join("a/small.txt")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), o.join("a/small.txt")).unwrap();
    std::fs::write(o.join("a/b/c/text.log"), b"changed").unwrap();
    std::fs::set_permissions(o.join("a/read-only.txt"), PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(o.join("a/read-only.txt"), b"changed").unwrap();
    std::fs::remove_file(o.join("empty-file")).unwrap();
    std::fs::write(o.join("empty-file"), b"not empty").unwrap();
    let r = restore_latest(&repo, o).await.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    ferry_engine::fsmeta::compare_trees(src.path(), o).unwrap();
    assert!(
        files_under(outside.path()).is_empty(),
        "restore followed a symlink"
    );

    std::fs::remove_file(o.join("a/read-only.txt")).unwrap();
    std::fs::create_dir(o.join("a/read-only.txt")).unwrap();
    let err = restore_latest(&repo, o).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("a directory is in the way")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_at_once_both_succeed() {
    let (a, b, repo_dir) = (tempdir(), tempdir(), tempdir());
    rich_tree(a.path());
    std::fs::write(b.path().join("x"), pseudo_random(6 << 20, 77)).unwrap();
    std::fs::write(b.path().join("same-as-a"), pseudo_random(5 << 20, 1)).unwrap();
    let backend = local(repo_dir.path());
    new_repo(backend.clone()).await;
    let (r1, r2) = (reopen(&backend).await, reopen(&backend).await);
    let (s1, s2) = tokio::join!(backup(&r1, a.path()), backup(&r2, b.path()));
    let repo = reopen(&backend).await;
    for (src, s) in [(a.path(), &s1), (b.path(), &s2)] {
        let out = tempdir();
        let o = RestoreOptions {
            verify: true,
            ..RestoreOptions::new(out.path())
        };
        ferry_engine::restore::restore(repo.clone(), &s.snapshot, &o, Default::default())
            .await
            .unwrap();
        ferry_engine::fsmeta::compare_trees(src, out.path()).unwrap();
    }
    let r = check(repo, true, Default::default()).await.unwrap();
    assert!(r.ok(), "{r:?}");
}

/// A sparse image file of `len` bytes holding each `(offset, bytes)` of `parts`, holes elsewhere.
fn sparse_image(path: &std::path::Path, len: u64, parts: &[(u64, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (offset, bytes) in parts {
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, *offset).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_chunks_as_its_dense_copy_does() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let (sparse, dense) = (dir.path().join("sparse"), dir.path().join("dense"));
    std::fs::create_dir_all(&sparse).unwrap();
    std::fs::create_dir_all(&dense).unwrap();
    // Holes between, before and after data, one file larger than a segment (64 MiB).
    let parts: [(u64, &[u8]); 3] = [
        (3 << 20, &pseudo_random(1 << 20, 6)),
        ((30 << 20) + 7, &pseudo_random(300_000, 7)),
        ((70 << 20) + 1, b"tail"),
    ];
    sparse_image(&sparse.join("img"), 96 << 20, &parts);
    std::fs::write(
        dense.join("img"),
        std::fs::read(sparse.join("img")).unwrap(),
    )
    .unwrap();
    let repo = new_repo(local(repo_dir.path())).await;
    let backup = |path: std::path::PathBuf| {
        ferry_engine::backup::backup(repo.clone(), BackupOptions::new(path), Default::default())
    };
    let s = backup(sparse.clone()).await.unwrap();
    // The same bytes, read in full: no new chunk (the holes' zeros were cut where the data's are).
    let d = backup(dense.clone()).await.unwrap();
    assert_eq!(d.snapshot.summary.new_bytes, 0, "{:?}", d.snapshot.summary);
    let out = dir.path().join("out");
    restore_with(repo, &s.snapshot, &RestoreOptions::new(&out)).await;
    assert_eq!(
        std::fs::read(out.join("img")).unwrap(),
        std::fs::read(dense.join("img")).unwrap()
    );
}

/// Backs up the image file `img` as a block device (`--block-device`).
async fn backup_image(
    repo: &Arc<Repository>,
    img: &std::path::Path,
) -> ferry_engine::Result<ferry_engine::backup::BackupOutcome> {
    let mut o = BackupOptions::new(img);
    o.block_device = true;
    ferry_engine::backup::backup(repo.clone(), o, Default::default()).await
}

/// Restores `snapshot` with `opts`.
async fn restore_with(repo: Arc<Repository>, snapshot: &Snapshot, opts: &RestoreOptions) {
    ferry_engine::restore::restore(repo, snapshot, opts, Default::default())
        .await
        .unwrap();
}

/// Options to restore to `target` and read every restored chunk back.
fn verified(target: impl Into<std::path::PathBuf>) -> RestoreOptions {
    RestoreOptions {
        verify: true,
        ..RestoreOptions::new(target)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_image_file_is_not_read_again_and_a_changed_one_is() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let img = dir.path().join("disk.img");
    sparse_image(&img, 24 << 20, &[(1 << 20, &pseudo_random(2 << 20, 3))]);
    let repo = new_repo(local(repo_dir.path())).await;
    let backup = || backup_image(&repo, &img);
    let first = backup().await.unwrap();
    assert_eq!(first.snapshot.summary.read_bytes, 24 << 20);
    // Unchanged (same size and mtime): its parent's chunks stand, as for any file.
    let again = backup().await.unwrap();
    assert_eq!(
        again.snapshot.summary.read_bytes, 0,
        "{:?}",
        again.snapshot.summary
    );
    assert_eq!(again.snapshot.tree, first.snapshot.tree);
    // Changed in place: read again.
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&img).unwrap(),
        b"changed",
        20 << 20,
    )
    .unwrap();
    let changed = backup().await.unwrap();
    assert_eq!(changed.snapshot.summary.read_bytes, 24 << 20);
    let out = dir.path().join("restored.img");
    restore_with(repo, &changed.snapshot, &RestoreOptions::new(&out)).await;
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

/// Bytes of `path` in extents its filesystem reports as allocated but unwritten (`filefrag -v`, FIEMAP).
fn unwritten_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "filefrag: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let block: u64 = text
        .split("blocks of ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("filefrag reports no block size (no FIEMAP here?): {text}"));
    text.lines()
        .filter(|l| l.contains("unwritten"))
        .map(|l| {
            let len = l.split(':').nth(3).expect("an extent's length");
            len.trim().parse::<u64>().expect("a length in blocks") * block
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_is_not_sparse_allocates_zero_runs_without_writing_them() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let img = dir.path().join("disk.img");
    let data = pseudo_random(3 << 20, 5);
    sparse_image(
        &img,
        48 << 20,
        &[(1 << 20, &data), (40 << 20, b"superblock")],
    );
    let repo = new_repo(local(repo_dir.path())).await;
    let b = backup_image(&repo, &img).await.unwrap();

    let out = dir.path().join("restored.img");
    restore_with(repo, &b.snapshot, &verified(&out)).await;
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    // Not sparse: every byte has its block...
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated >= 48 << 20, "only {allocated} bytes allocated");
    // ...but the zero runs (44 MiB less the chunks that hold data and zeros together) were not written.
    let unwritten = unwritten_bytes(&out);
    assert!(
        unwritten >= 32 << 20,
        "only {unwritten} bytes unwritten: the zeros were written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_device_images_round_trip_and_restore_sparse() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let img = dir.path().join("disk.img");
    sparse_image(
        &img,
        48 << 20,
        &[
            (1 << 20, &pseudo_random(3 << 20, 9)),
            (40 << 20, b"superblock"),
        ],
    );
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let b = backup_image(&repo, &img).await.unwrap();
    assert_eq!(b.snapshot.source, SourceKind::Block);
    assert_eq!(b.snapshot.summary.total_bytes, 48 << 20);
    assert!(
        b.snapshot.summary.stored_bytes < 5 << 20,
        "zeros must dedup: {:?}",
        b.snapshot.summary
    );

    let out = dir.path().join("restored.img");
    let mut ro = RestoreOptions::new(&out);
    ro.sparse = true;
    ro.verify = true;
    ferry_engine::restore::restore(repo.clone(), &b.snapshot, &ro, Default::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 16 << 20,
        "sparse restore allocated {allocated} bytes"
    );

    // Restoring over an existing, dirty image gives the same bytes.
    std::fs::write(&out, vec![0xFFu8; 50 << 20]).unwrap();
    ferry_engine::restore::restore(repo, &b.snapshot, &ro, Default::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

/// The chunk ids of file `name` in the root tree of `snap`.
async fn content_of(
    repo: &Repository,
    snap: &Snapshot,
    name: &[u8],
) -> Vec<ferry_engine::id::BlobId> {
    match &repo
        .read_tree(&snap.tree)
        .await
        .unwrap()
        .find(name)
        .unwrap()
        .kind
    {
        NodeKind::File { content } => content.clone(),
        other => panic!("{other:?} is not a file"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_is_read_in_segments_that_chunk_like_files_of_their_own() {
    let (src, parts_dir, repo_dir, out) = (tempdir(), tempdir(), tempdir(), tempdir());
    let (seg, len) = (4usize << 20, 10usize << 20);
    let mut data = pseudo_random(len, 21);
    data[5 << 20..6 << 20].fill(0); // a zero run inside a segment
    std::fs::write(src.path().join("big"), &data).unwrap();
    let repo = new_repo(local(repo_dir.path())).await;

    let mut o = BackupOptions::new(src.path());
    o.segment = seg as u64;
    let b = ferry_engine::backup::backup(repo.clone(), o, Default::default())
        .await
        .unwrap();
    assert_eq!(b.snapshot.summary.read_bytes, len as u64);

    // Each segment backed up as a file of its own gives the same chunks, in order.
    for (k, part) in data.chunks(seg).enumerate() {
        std::fs::write(parts_dir.path().join(format!("{k}")), part).unwrap();
    }
    let parts = backup(&repo, parts_dir.path()).await.snapshot;
    let mut joined = Vec::new();
    for k in 0..len.div_ceil(seg) {
        joined.extend(content_of(&repo, &parts, format!("{k}").as_bytes()).await);
    }
    assert_eq!(content_of(&repo, &b.snapshot, b"big").await, joined);

    restore_with(repo.clone(), &b.snapshot, &verified(out.path())).await;
    assert_eq!(std::fs::read(out.path().join("big")).unwrap(), data);

    // A block device image in segments, with a length that is not a multiple of them.
    let img = src.path().join("disk.img");
    std::fs::write(&img, &data[..len - 12345]).unwrap();
    let mut o = BackupOptions::new(&img);
    (o.block_device, o.segment) = (true, seg as u64);
    let b = ferry_engine::backup::backup(repo.clone(), o, Default::default())
        .await
        .unwrap();
    let restored = out.path().join("restored.img");
    restore_with(repo.clone(), &b.snapshot, &verified(&restored)).await;
    assert_eq!(std::fs::read(&restored).unwrap(), &data[..len - 12345]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_has_reached_the_device_when_it_returns() {
    let (src, repo_dir) = (tempdir(), tempdir());
    let len = 8 << 20;
    std::fs::write(src.path().join("f"), pseudo_random(len, 5)).unwrap();
    let repo = new_repo(local(repo_dir.path())).await;
    let snap = backup(&repo, src.path()).await.snapshot;

    let fs = LoopFs::new(64 << 20);
    let before = fs.dev.written();
    let o = RestoreOptions::new(fs.mount.join("out"));
    ferry_engine::restore::restore(repo, &snap, &o, Default::default())
        .await
        .unwrap();
    // Without a flush the bytes would sit in the page cache for up to 30 s (dirty_expire_centisecs).
    let written = fs.dev.written() - before;
    assert!(
        written >= len as u64,
        "only {written} of {len} bytes reached the device when the restore returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_snapshot_restores_onto_a_used_device_with_its_zeros_written() {
    let (dir, repo_dir) = (tempdir(), tempdir());
    let img = dir.path().join("disk.img");
    // Data at unaligned offsets, so zero chunks start and end inside pages.
    sparse_image(
        &img,
        24 << 20,
        &[
            ((1 << 20) + 7, &pseudo_random(3 << 20, 4)),
            ((24 << 20) - 3, b"end"),
        ],
    );
    let repo = new_repo(local(repo_dir.path())).await;
    let b = backup_image(&repo, &img).await.unwrap();

    // The device held other data everywhere: the snapshot's zeros must replace it.
    let dev = LoopDev::new(32 << 20, |p| {
        std::fs::write(p, vec![0xA5u8; 32 << 20]).unwrap()
    });
    let mut ro = RestoreOptions::new(&dev.device);
    ro.drop_cache = true;
    ferry_engine::restore::restore(repo, &b.snapshot, &ro, Default::default())
        .await
        .unwrap();
    let back = std::fs::read(&dev.device).unwrap();
    assert_eq!(&back[..24 << 20], &std::fs::read(&img).unwrap()[..]);
    assert!(
        back[24 << 20..].iter().all(|&b| b == 0xA5),
        "nothing written past the image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_used_and_a_corrupt_cache_is_harmless() {
    let (src, repo_dir, cache_dir) = (tempdir(), tempdir(), tempdir());
    rich_tree(src.path());
    let backend = local(repo_dir.path());
    new_repo(backend.clone()).await;
    let opts = OpenOptions {
        cache_dir: Some(cache_dir.path().to_path_buf()),
        cache_limit: 8 << 20,
        ..Default::default()
    };
    let repo = Arc::new(
        Repository::open(backend.clone(), PASSWORD, &opts)
            .await
            .unwrap(),
    );
    backup(&repo, src.path()).await;
    let repo = Arc::new(
        Repository::open(backend.clone(), PASSWORD, &opts)
            .await
            .unwrap(),
    );
    assert!(repo.index().await.unwrap().len() > 3);
    let db = cache_dir
        .path()
        .join(format!("{}.sqlite", repo.config().id));
    assert!(db.exists());
    // Corrupt every cached value in place: results must stay correct.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE objects SET value = zeroblob(length(value))", [])
        .unwrap();
    drop(conn);
    let repo = Arc::new(
        Repository::open(backend.clone(), PASSWORD, &opts)
            .await
            .unwrap(),
    );
    let out = tempdir();
    restore_latest(&repo, out.path()).await.unwrap();
    ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();
    // Garbage instead of a database: rebuilt.
    std::fs::write(
        &db,
        b"garbage garbage garbage garbage garbage garbage garbage garbage garbage",
    )
    .unwrap();
    let repo = Arc::new(Repository::open(backend, PASSWORD, &opts).await.unwrap());
    backup(&repo, src.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_backup_and_leaves_a_consistent_repository() {
    let (src, repo_dir) = (tempdir(), tempdir());
    std::fs::write(src.path().join("f"), pseudo_random(8 << 20, 3)).unwrap();
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let p = Arc::new(Progress::default());
    p.cancel();
    let err = ferry_engine::backup::backup(repo.clone(), BackupOptions::new(src.path()), p)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Canceled), "{err}");
    assert!(repo.snapshots().await.unwrap().is_empty());
    let r = check(reopen(&backend).await, true, Default::default())
        .await
        .unwrap();
    assert!(r.ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_confused_object_is_rejected() {
    // A snapshot replaced by a validly encrypted index segment of the same repository.
    let repo_dir = tempdir();
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let stored = ferry_engine::pack::encode(repo.keys(), Kind::Index, b"{}", None).unwrap();
    let name = hex::encode(blake3::hash(&stored).as_bytes());
    backend
        .put(&format!("snapshots/{name}"), Bytes::from(stored))
        .await
        .unwrap();
    let err = reopen(&backend).await.snapshots().await.unwrap_err();
    assert!(matches!(err, Error::Integrity(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_canceled_midway_is_resumed_by_the_next_one() {
    let (src, repo_dir) = (tempdir(), tempdir());
    for i in 0..6 {
        std::fs::write(
            src.path().join(format!("f{i}")),
            pseudo_random(24 << 20, 1000 + 2 * i),
        )
        .unwrap();
    }
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let p = Arc::new(Progress::default());
    let task = tokio::spawn(ferry_engine::backup::backup(
        repo.clone(),
        BackupOptions::new(src.path()),
        p.clone(),
    ));
    while p.report().bytes_transferred < 16 << 20 && !task.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    p.cancel();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Canceled),
        "{err} (the backup finished before it could be canceled?)"
    );
    let b = backup(&reopen(&backend).await, src.path()).await;
    let s = &b.snapshot.summary;
    assert!(
        s.new_bytes + (16 << 20) <= s.total_bytes,
        "nothing was reused: {s:?}"
    );
    assert_eq!(s.read_bytes, s.total_bytes);
    let r = check(reopen(&backend).await, true, Default::default())
        .await
        .unwrap();
    assert!(r.ok() && r.warnings.is_empty(), "{r:?}");
}

/// Several first backups racing to create one repository (mover pods of one namespace): exactly one
/// `init` wins, the others see AlreadyInitialised, and everyone then opens the same repository.
#[tokio::test]
async fn racing_inits_agree_on_one_repository() {
    let dir = tempdir();
    let backend = local(dir.path());
    let inits = (0..4).map(|_| Repository::init(backend.clone(), PASSWORD, FAST_KDF));
    let results = futures::future::join_all(inits).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, ferry_engine::Error::AlreadyInitialised(_)),
                "{e}"
            );
        }
    }
    let repo = reopen(&backend).await;
    assert_eq!(repo.config().id, winners[0].id);
    assert_eq!(
        backend.list("keys/").await.expect("list keys").len(),
        1,
        "losers removed their keys"
    );
}

/// Every backup writes an index segment and reads them all. A prune with nothing to delete merges them into
/// one once there are more than `MERGE_SEGMENTS`, and the repository stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_merges_many_index_segments_into_one() {
    use ferry_engine::prune::{MERGE_SEGMENTS, prune};
    let (src, repo_dir, out) = (tempdir(), tempdir(), tempdir());
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    let segments = || files_under(&repo_dir.path().join("index")).len();
    for i in 0..=MERGE_SEGMENTS {
        std::fs::write(src.path().join(format!("f{i}")), format!("file {i}")).unwrap();
        backup(&repo, src.path()).await;
    }
    let before = segments();
    assert!(before > MERGE_SEGMENTS, "{before} segments");
    let repo = reopen(&backend).await;
    let grace = std::time::Duration::from_secs(3600);
    let r = prune(repo.clone(), grace, Default::default())
        .await
        .unwrap();
    assert_eq!(
        (r.index_segments_merged, r.packs_deleted),
        (before, 0),
        "{r:?}"
    );
    assert_eq!(segments(), 1);
    let repo = reopen(&backend).await;
    assert!(
        check(repo.clone(), true, Default::default())
            .await
            .unwrap()
            .ok()
    );
    restore_latest(&repo, out.path()).await.unwrap();
    ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();
    // A second prune has one segment to read, and leaves it.
    let r = prune(repo.clone(), grace, Default::default())
        .await
        .unwrap();
    assert_eq!(r.index_segments_merged, 0, "{r:?}");
}

/// Forget + prune: data only the forgotten snapshot used goes (whole packs deleted, partly used packs
/// rewritten), everything the remaining snapshot needs stays and restores; with a grace period nothing is
/// deleted on the first prune.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_only_what_forgotten_snapshots_used() {
    use ferry_engine::prune::{forget, prune};
    use std::time::Duration;
    let (src, repo_dir) = (tempdir(), tempdir());
    let backend = local(repo_dir.path());
    let repo = new_repo(backend.clone()).await;
    std::fs::write(
        src.path().join("keep.bin"),
        ferry_engine::testdata::pseudo_random(3 << 20, 1),
    )
    .unwrap();
    std::fs::write(
        src.path().join("gone.bin"),
        ferry_engine::testdata::pseudo_random(3 << 20, 2),
    )
    .unwrap();
    let a = backup(&repo, src.path()).await;
    std::fs::remove_file(src.path().join("gone.bin")).unwrap();
    let b = backup(&repo, src.path()).await;
    let size = |d: &std::path::Path| {
        files_under(&d.join("data"))
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum::<u64>()
    };
    let before = size(repo_dir.path());

    // With a grace period the first prune only records candidates.
    let forgotten = forget(&repo, |id, _| *id == a.id).await.unwrap();
    assert_eq!(forgotten, vec![a.id]);
    let repo = reopen(&backend).await;
    let r = prune(
        repo.clone(),
        Duration::from_secs(3600),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert!(r.packs_pending > 0, "{r:?}");
    assert_eq!(size(repo_dir.path()), before);

    // Grace 0: gone.bin's data is deleted, keep.bin's stays.
    let r = prune(repo.clone(), Duration::ZERO, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert!(r.packs_deleted > 0 && r.bytes_deleted > 0, "{r:?}");
    let after = size(repo_dir.path());
    assert!(
        after < before - (2 << 20),
        "only {} of {} bytes freed",
        before - after,
        before
    );
    let repo = reopen(&backend).await;
    let report = ferry_engine::check::check(repo.clone(), true, Default::default())
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.errors);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let out = tempdir();
    restore_latest(&repo, out.path()).await.unwrap();
    ferry_engine::fsmeta::compare_trees(src.path(), out.path()).unwrap();
    assert_eq!(repo.snapshots().await.unwrap().len(), 1);
    assert_eq!(repo.snapshots().await.unwrap()[0].0, b.id);
}

/// A key file's derivation parameters are read before the password can be checked, so a corrupt or tampered
/// one must not make `open` allocate terabytes (an abort) or loop for hours: it is refused with a clear error.
#[tokio::test]
async fn a_key_file_asking_for_absurd_key_derivation_is_refused() {
    let dir = tempdir();
    let backend = local(dir.path());
    new_repo(backend.clone()).await;
    let key = backend
        .list("keys/")
        .await
        .expect("list keys")
        .remove(0)
        .key;
    let good: serde_json::Value =
        serde_json::from_slice(&backend.get(&key).await.expect("key file")).expect("json");
    for (field, value) in [("m_kib", u32::MAX), ("t", u32::MAX), ("p", 1 << 20)] {
        let mut kf = good.clone();
        kf["params"][field] = value.into();
        let path = dir.path().join(&key);
        std::fs::write(&path, serde_json::to_vec(&kf).expect("json")).expect("write key file");
        let err = Repository::open(backend.clone(), PASSWORD, &no_cache())
            .await
            .err()
            .unwrap_or_else(|| panic!("{field} = {value}: opened"));
        let msg = err.to_string();
        assert!(
            matches!(err, ferry_engine::Error::Format(_)) && msg.contains(field),
            "{field} = {value}: {msg}"
        );
    }
}
