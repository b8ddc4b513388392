//! Randomized interleavings of backup, forget, prune and restore on one repository, with a hand-moved clock.
//!
//! Each case starts actors (backups, prunes, restores) that each use their own [`Pauser`] backend, which
//! stops the actor at randomly chosen storage calls; the case then moves actors forward one stop at a
//! time, forgets snapshots, moves the clock (past the grace period, past half and past the whole lease
//! stale period) and cancels actors, in a random order. After every step, every snapshot the repository
//! still holds must restore exactly to the tree it was taken from. Operations may fail (a lapsed lease, a
//! prune refused while another holds the maintenance lease, a restore of a snapshot forgotten meanwhile),
//! but never lose data: that is the invariant of `design/0003-backup-deletion.md`.
//!
//! `FERRY_INTERLEAVE_CASES` sets the number of cases (default 2000), `FERRY_INTERLEAVE_SEED` replays one.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{FAST_KDF, PASSWORD};
use ferry_engine::backend::memory::MemoryBackend;
use ferry_engine::backend::{Backend, ObjectInfo};
use ferry_engine::backup::{BackupOptions, ParentSpec};
use ferry_engine::clock::ManualClock;
use ferry_engine::id::SnapshotId;
use ferry_engine::progress::Progress;
use ferry_engine::prune::{PruneOptions, prune_with};
use ferry_engine::repo::{OpenOptions, Repository};
use ferry_engine::restore::{RestoreOptions, restore};
use ferry_engine::{Error, Result};

/// Small deterministic generator (xorshift*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A backend that stops its actor at chosen storage calls until the case lets it go on.
#[derive(Debug)]
struct Pauser {
    inner: Arc<dyn Backend>,
    calls: AtomicUsize,
    stops: Vec<usize>,
    /// One permit per stop reached (a semaphore, not a notification: two calls may stop at once).
    parked: tokio::sync::Semaphore,
    go: tokio::sync::Semaphore,
}

impl Pauser {
    async fn gate(&self) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.stops.contains(&n) {
            self.parked.add_permits(1);
            // Closed when the actor is canceled or the case ends: everything runs on.
            if let Ok(p) = self.go.acquire().await {
                p.forget();
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for Pauser {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn settle_delay(&self) -> Duration {
        Duration::ZERO
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.gate().await;
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        self.gate().await;
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.gate().await;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        self.gate().await;
        self.inner.get_range(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.gate().await;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.gate().await;
        self.inner.delete(key).await
    }
}

/// What an actor does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Backup(usize),
    Prune,
    Restore(SnapshotId),
}

/// What an actor ended with.
enum Ended {
    Backup(Result<SnapshotId>),
    Prune(Result<ferry_engine::prune::PruneReport>),
    Restore(Result<()>),
}

struct Actor {
    job: Job,
    pauser: Arc<Pauser>,
    task: tokio::task::JoinHandle<Ended>,
    /// A restore's snapshot was forgotten while it ran (it may then fail).
    target_forgotten: bool,
}

struct Case {
    rng: Rng,
    clock: ManualClock,
    store: Arc<dyn Backend>,
    sources: Vec<PathBuf>,
    /// Snapshots the repository holds, with the source each was taken from.
    kept: BTreeMap<SnapshotId, usize>,
    forgotten: BTreeSet<SnapshotId>,
    actors: Vec<Actor>,
    work: tempfile::TempDir,
    /// A repository handle of the checks (no pauses).
    verifier: Arc<Repository>,
    log: Vec<String>,
    stats: Stats,
}

#[derive(Default, Debug)]
struct Stats {
    backups_ok: usize,
    backups_failed: usize,
    prunes_ok: usize,
    prunes_failed: usize,
    restores_ok: usize,
    restores_failed: usize,
    deleted_packs: usize,
    checks: usize,
}

fn opts(clock: &ManualClock) -> OpenOptions {
    OpenOptions {
        cache_dir: None,
        cache_limit: 0,
        clock: Arc::new(clock.clone()),
    }
}

/// Source trees sharing content, so snapshots share blobs (and packs become partly used).
fn sources(root: &Path, rng: &mut Rng) -> Vec<PathBuf> {
    let pool: Vec<Vec<u8>> = (0..6)
        .map(|i| common::pseudo_random(1000 + rng.below(60_000), rng.next() ^ i))
        .collect();
    (0..3)
        .map(|s| {
            let dir = root.join(format!("src{s}"));
            std::fs::create_dir_all(dir.join("sub")).unwrap();
            for f in 0..2 + rng.below(3) {
                let sub = if f % 2 == 0 { "" } else { "sub/" };
                std::fs::write(dir.join(format!("{sub}f{f}")), &pool[rng.below(pool.len())])
                    .unwrap();
            }
            dir
        })
        .collect()
}

impl Case {
    async fn new(seed: u64) -> Case {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let clock = ManualClock::default();
        let store: Arc<dyn Backend> = Arc::new(MemoryBackend::new(Arc::new(clock.clone())));
        Repository::init(store.clone(), PASSWORD, FAST_KDF)
            .await
            .unwrap();
        // Thousands of small restores: in memory where the machine has a tmpfs.
        let work = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm").unwrap(),
            false => tempfile::tempdir().unwrap(),
        };
        let sources = sources(work.path(), &mut rng);
        let verifier = Arc::new(
            Repository::open(store.clone(), PASSWORD, &opts(&clock))
                .await
                .unwrap(),
        );
        Case {
            verifier,
            rng,
            clock,
            store,
            sources,
            kept: BTreeMap::new(),
            forgotten: BTreeSet::new(),
            actors: Vec::new(),
            work,
            log: vec![format!("seed {seed}")],
            stats: Stats::default(),
        }
    }

    async fn repo(&self, backend: Arc<dyn Backend>) -> Arc<Repository> {
        Arc::new(
            Repository::open(backend, PASSWORD, &opts(&self.clock))
                .await
                .unwrap(),
        )
    }

    async fn start(&mut self, job: Job) {
        let stops: Vec<usize> = (0..1 + self.rng.below(3))
            .map(|_| self.rng.below(40))
            .collect();
        let pauser = Arc::new(Pauser {
            inner: self.store.clone(),
            calls: AtomicUsize::new(0),
            stops,
            parked: tokio::sync::Semaphore::new(0),
            go: tokio::sync::Semaphore::new(0),
        });
        let backend: Arc<dyn Backend> = pauser.clone();
        let clock = self.clock.clone();
        let task = match job {
            Job::Backup(s) => {
                let mut o = BackupOptions::new(&self.sources[s]);
                (o.readers, o.workers, o.uploads) = (1, 1, 1);
                o.parent = if self.rng.below(2) == 0 {
                    ParentSpec::Auto
                } else {
                    ParentSpec::None
                };
                tokio::spawn(async move {
                    let r = async {
                        let repo =
                            Arc::new(Repository::open(backend, PASSWORD, &opts(&clock)).await?);
                        ferry_engine::backup::backup(repo, o, Arc::new(Progress::default())).await
                    };
                    Ended::Backup(r.await.map(|b| b.id))
                })
            }
            Job::Prune => {
                let grace = Duration::from_secs([0, 0, 60][self.rng.below(3)]);
                tokio::spawn(async move {
                    let r = async {
                        let repo =
                            Arc::new(Repository::open(backend, PASSWORD, &opts(&clock)).await?);
                        let o = PruneOptions {
                            grace,
                            lock_wait: Duration::ZERO,
                        };
                        prune_with(repo, &o, Arc::new(Progress::default())).await
                    };
                    Ended::Prune(r.await)
                })
            }
            Job::Restore(id) => {
                let target = self.work.path().join(format!("r{}", self.rng.next()));
                tokio::spawn(async move {
                    let r = async {
                        let repo =
                            Arc::new(Repository::open(backend, PASSWORD, &opts(&clock)).await?);
                        let (_, snap) = repo.find_snapshot(&id.to_hex()).await?;
                        let mut o = RestoreOptions::new(&target);
                        o.downloads = 1;
                        restore(repo, &snap, &o, Arc::new(Progress::default())).await?;
                        Ok(())
                    };
                    Ended::Restore(r.await)
                })
            }
        };
        self.log.push(format!("start {job:?}"));
        self.actors.push(Actor {
            job,
            pauser,
            task,
            target_forgotten: false,
        });
        let i = self.actors.len() - 1;
        self.run_to_stop(i).await;
    }

    /// Lets actor `i` run until it stops at its next stop or ends; an ended actor is settled.
    async fn run_to_stop(&mut self, i: usize) {
        let a = &mut self.actors[i];
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::select! {
                p = a.pauser.parked.acquire() => {
                    p.unwrap().forget();
                    None
                }
                r = &mut a.task => Some(r.unwrap()),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("actor {:?} hangs; log: {:#?}", a.job, self.log));
        if let Some(e) = ended {
            let a = self.actors.remove(i);
            self.settle(a, e);
        }
    }

    async fn step_actor(&mut self, i: usize) {
        self.log.push(format!("step {:?}", self.actors[i].job));
        self.actors[i].pauser.go.add_permits(1);
        self.run_to_stop(i).await;
    }

    fn settle(&mut self, a: Actor, e: Ended) {
        match (a.job, e) {
            (Job::Backup(s), Ended::Backup(Ok(id))) => {
                self.stats.backups_ok += 1;
                self.log
                    .push(format!("backup of src{s} committed {}", id.short()));
                self.kept.insert(id, s);
            }
            (Job::Backup(_), Ended::Backup(Err(e))) => {
                self.stats.backups_failed += 1;
                self.log.push(format!("backup failed: {e}"));
            }
            (Job::Prune, Ended::Prune(Ok(r))) => {
                self.stats.prunes_ok += 1;
                self.stats.deleted_packs += r.packs_deleted;
                self.log.push(format!("prune: {r:?}"));
            }
            (Job::Prune, Ended::Prune(Err(e))) => {
                assert!(
                    matches!(e, Error::Locked(_) | Error::LeaseLost(_)),
                    "prune failed unexpectedly: {e}; log: {:#?}",
                    self.log
                );
                self.stats.prunes_failed += 1;
                self.log.push(format!("prune failed: {e}"));
            }
            (Job::Restore(id), Ended::Restore(r)) => {
                if a.target_forgotten {
                    self.log
                        .push(format!("restore of forgotten {}: {r:?}", id.short()));
                } else if let Err(e) = r {
                    panic!(
                        "restore of kept snapshot {} failed: {e}; log: {:#?}",
                        id.short(),
                        self.log
                    );
                } else {
                    self.stats.restores_ok += 1;
                }
                if a.target_forgotten {
                    self.stats.restores_failed += 1;
                }
            }
            _ => unreachable!(),
        }
    }

    async fn forget(&mut self) {
        let Some(&id) = self.kept.keys().nth(self.rng.below(self.kept.len().max(1))) else {
            return;
        };
        let repo = self.repo(self.store.clone()).await;
        ferry_engine::prune::forget(&repo, |s, _| *s == id)
            .await
            .unwrap();
        self.kept.remove(&id);
        self.forgotten.insert(id);
        for a in &mut self.actors {
            if a.job == Job::Restore(id) {
                a.target_forgotten = true;
            }
        }
        self.log.push(format!("forget {}", id.short()));
    }

    /// Cancels an actor where it stands. A backup stopped after writing its snapshot (releasing its lease)
    /// has committed: its snapshot joins the model.
    async fn cancel(&mut self) {
        let i = self.rng.below(self.actors.len());
        let a = self.actors.remove(i);
        a.task.abort();
        // Its blocking parts (a restore's planner, a backup's walker) wind down on their own.
        a.pauser.go.close();
        let _ = a.task.await;
        self.log.push(format!("cancel {:?}", a.job));
        if let Job::Backup(s) = a.job {
            let path = std::path::absolute(&self.sources[s]).unwrap();
            let repo = self.repo(self.store.clone()).await;
            for (id, snap) in repo.snapshots().await.unwrap() {
                if !self.kept.contains_key(&id)
                    && !self.forgotten.contains(&id)
                    && Path::new(&snap.path) == path
                {
                    self.log
                        .push(format!("canceled backup had committed {}", id.short()));
                    self.kept.insert(id, s);
                }
            }
        }
    }
}

/// Lets every stopped actor run on, so no blocking thread is left waiting (also when a check panicked:
/// the runtime's shutdown waits for blocking threads).
impl Drop for Case {
    fn drop(&mut self) {
        for a in &self.actors {
            a.pauser.go.close();
        }
    }
}

impl Case {
    /// Every snapshot the repository holds (the model's, and those of backups that wrote theirs but have
    /// not returned yet) restores exactly to its source; none of the model's is missing.
    async fn check(&mut self) {
        self.stats.checks += 1;
        let repo = self.verifier.clone();
        repo.invalidate_index().await;
        let listed = repo.snapshots().await.unwrap();
        let ids: BTreeSet<SnapshotId> = listed.iter().map(|(id, _)| *id).collect();
        let missing: Vec<_> = self.kept.keys().filter(|id| !ids.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "snapshots {missing:?} vanished; log: {:#?}",
            self.log
        );
        for (n, (id, snap)) in listed.iter().enumerate() {
            assert!(!self.forgotten.contains(id), "a forgotten snapshot is back");
            let source = self
                .sources
                .iter()
                .position(|p| std::path::absolute(p).unwrap() == Path::new(&snap.path))
                .expect("every snapshot is of a source");
            let target = self.work.path().join(format!("check{n}"));
            let r = restore(
                repo.clone(),
                snap,
                &RestoreOptions::new(&target),
                Arc::new(Progress::default()),
            )
            .await;
            if let Err(e) = r {
                panic!(
                    "snapshot {} does not restore: {e}; log: {:#?}",
                    id.short(),
                    self.log
                );
            }
            if let Err(e) = ferry_engine::fsmeta::compare_trees(&self.sources[source], &target) {
                panic!(
                    "snapshot {} restores wrong data: {e}; log: {:#?}",
                    id.short(),
                    self.log
                );
            }
            std::fs::remove_dir_all(&target).unwrap();
        }
    }

    /// One random step.
    async fn step(&mut self) {
        match self.rng.below(12) {
            0..=2 if self.actors.len() < 4 => {
                let s = self.rng.below(self.sources.len());
                self.start(Job::Backup(s)).await
            }
            3 if self.actors.len() < 4 => self.start(Job::Prune).await,
            4 if self.actors.len() < 4 && !self.kept.is_empty() => {
                let id = *self
                    .kept
                    .keys()
                    .nth(self.rng.below(self.kept.len()))
                    .unwrap();
                self.start(Job::Restore(id)).await
            }
            5 => self.forget().await,
            6 => {
                let secs = [1, 70, 160, 400][self.rng.below(4)];
                self.clock.advance(Duration::from_secs(secs));
                self.log.push(format!("clock +{secs} s"));
            }
            7 if !self.actors.is_empty() && self.rng.below(4) == 0 => self.cancel().await,
            _ if !self.actors.is_empty() => {
                let i = self.rng.below(self.actors.len());
                self.step_actor(i).await
            }
            _ => {}
        }
        self.check().await;
    }

    async fn finish(&mut self) {
        while !self.actors.is_empty() {
            self.step_actor(0).await;
            self.check().await;
        }
        // A last prune with nothing running must be able to delete everything forgotten.
        self.start(Job::Prune).await;
        while !self.actors.is_empty() {
            self.step_actor(0).await;
        }
        self.check().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kept_snapshot_restores_under_random_interleavings() {
    let cases: u64 = std::env::var("FERRY_INTERLEAVE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seeds: Vec<u64> = match std::env::var("FERRY_INTERLEAVE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=cases).collect(),
    };
    let mut total = Stats::default();
    let started = std::time::Instant::now();
    for seed in seeds {
        let mut case = Case::new(seed).await;
        let steps = 8 + case.rng.below(16);
        for _ in 0..steps {
            case.step().await;
        }
        case.finish().await;
        let s = &case.stats;
        total.backups_ok += s.backups_ok;
        total.backups_failed += s.backups_failed;
        total.prunes_ok += s.prunes_ok;
        total.prunes_failed += s.prunes_failed;
        total.restores_ok += s.restores_ok;
        total.restores_failed += s.restores_failed;
        total.deleted_packs += s.deleted_packs;
        total.checks += s.checks;
    }
    println!(
        "interleavings: {total:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        total.backups_ok > total.backups_failed && total.deleted_packs > 0,
        "the cases must mostly commit backups and delete data: {total:?}"
    );
}
