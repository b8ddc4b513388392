//! Directory listings for a backup's walk: each entry's name, lstat metadata and tree node (extended
//! attributes, a symlink's target), read when the walk gets there or ahead of it.
//!
//! Reading ahead ([`ReadAhead`]) starts before the repository opens: opening it derives the key from the
//! password (Argon2id, a core for a fraction of a second), and meanwhile another thread lists the
//! directories in the walk's order (depth first, entries by name), so the walk finds its metadata read, the
//! cold inodes fetched and the system calls made. An unchanged re-backup is mostly that walk.
//!
//! The listings run at most [`AHEAD_ENTRIES`] entries ahead of the walk (a few hundred bytes each; one
//! directory however large when the walk has taken all before it), so memory stays bounded whatever the
//! tree. A walk that finds a listing out of step (a caller that started the read-ahead elsewhere) lists its
//! directories itself from there on: the read-ahead changes only when the metadata is read, never what is
//! recorded from it.
//!
//! The read-ahead also counts what it lists ([`Tally`]): when it lists the whole tree within its budget,
//! those are the backup's progress totals, and the scan that would count them (another pass over every
//! entry, on the same two cores as the key derivation) is not made (`crate::backup::start_scan`).

use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel as cb;

use crate::error::{Error, Result};
use crate::fsmeta;
use crate::tree::Node;

/// Entries listed ahead of the walk at most: about 10 MiB, a 20,000-file tree whole.
const AHEAD_ENTRIES: usize = 32_768;

/// One entry of a directory.
pub(crate) struct Entry {
    /// Its name.
    pub name: OsString,
    /// Its lstat metadata and its node (`NotFound`: it vanished after the directory was read).
    pub stat: std::io::Result<(Metadata, Result<Node>)>,
}

/// The entries of `dir` sorted by name, each with its lstat metadata (taken relative to the open directory,
/// no path walk per entry) and its node.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        entries.push((e.file_name(), e.metadata()));
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(entries
        .into_iter()
        .map(|(name, meta)| {
            let stat = meta.map(|m| {
                let node = fsmeta::node_from(&name, &dir.join(&name), &m);
                (m, node)
            });
            Entry { name, stat }
        })
        .collect())
}

/// One directory's listing, read ahead.
struct Listing {
    dir: PathBuf,
    entries: Result<Vec<Entry>>,
}

impl Listing {
    /// What it counts against [`AHEAD_ENTRIES`].
    fn weight(&self) -> usize {
        self.entries.as_ref().map_or(1, |e| e.len().max(1))
    }
}

/// Entries listed but not yet taken by the walk, and whether the walk stopped taking them.
struct Budget {
    state: Mutex<(usize, bool)>,
    changed: Condvar,
    /// Entries held at most ([`AHEAD_ENTRIES`]).
    limit: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::with_limit(AHEAD_ENTRIES)
    }
}

impl Budget {
    fn with_limit(limit: usize) -> Self {
        Budget {
            state: Mutex::default(),
            changed: Condvar::new(),
            limit,
        }
    }

    /// Whether `n` more entries on top of `held` exceed the budget (any number fit when none are held).
    fn exceeds(&self, held: usize, n: usize) -> bool {
        held > 0 && held + n > self.limit
    }

    /// Whether `n` more entries would have to wait.
    fn full_for(&self, n: usize) -> bool {
        self.exceeds(self.state.lock().expect("budget lock").0, n)
    }

    /// Waits until `n` more entries fit; false once the walk stopped.
    fn take(&self, n: usize) -> bool {
        let mut s = self.state.lock().expect("budget lock");
        while !s.1 && self.exceeds(s.0, n) {
            s = self.changed.wait(s).expect("budget lock");
        }
        s.0 += n;
        !s.1
    }

    fn give(&self, n: usize) {
        let mut s = self.state.lock().expect("budget lock");
        s.0 = s.0.saturating_sub(n);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().expect("budget lock").1 = true;
        self.changed.notify_all();
    }
}

/// What a read-ahead counted: the files (every entry but directories) and the bytes of regular files
/// under its root, as the progress totals count them, once it listed the whole tree.
#[derive(Default)]
pub struct Tally {
    state: Mutex<Counted>,
    settled: Condvar,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    /// Still listing.
    #[default]
    Counting,
    /// The whole tree was listed: its files and bytes.
    Whole(u64, u64),
    /// It stopped short of the whole tree (its budget filled, the walk stopped taking listings, or there
    /// was no tree to list).
    Partial,
}

impl Tally {
    /// Settles the count once; later calls change nothing.
    fn settle(&self, c: Counted) {
        let mut s = self.state.lock().expect("tally lock");
        if *s == Counted::Counting {
            *s = c;
            self.settled.notify_all();
        }
    }

    /// Waits until the count settles: `(files, bytes)` of the whole tree, or `None` when the read-ahead
    /// stopped short of it (then whoever wants totals counts them itself).
    pub fn wait(&self) -> Option<(u64, u64)> {
        let mut s = self.state.lock().expect("tally lock");
        while *s == Counted::Counting {
            s = self.settled.wait(s).expect("tally lock");
        }
        match *s {
            Counted::Whole(files, bytes) => Some((files, bytes)),
            _ => None,
        }
    }
}

/// Settles a tally as partial when the read-ahead thread ends without having settled it (a panic), so the
/// scan waiting for it counts by itself instead of waiting forever.
struct SettleOnExit(Arc<Tally>);

impl Drop for SettleOnExit {
    fn drop(&mut self) {
        self.0.settle(Counted::Partial);
    }
}

/// Directory listings read ahead of a walk by a thread of their own (the module's doc). The thread stops
/// when the walk stops taking listings, or when the last clone of this is dropped unused (a backup that
/// failed before its walk).
#[derive(Clone)]
pub struct ReadAhead(Arc<Handle>);

struct Handle {
    rx: cb::Receiver<Listing>,
    budget: Arc<Budget>,
    tally: Arc<Tally>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.budget.close();
    }
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadAhead")
    }
}

impl ReadAhead {
    /// Starts listing the directory tree at `root` (nothing for a file or device). The thread stops when
    /// the tree is listed or the walk no longer takes listings.
    pub fn start(root: &Path) -> ReadAhead {
        Self::start_within(root, Budget::default())
    }

    fn start_within(root: &Path, budget: Budget) -> ReadAhead {
        let (tx, rx) = cb::unbounded();
        let (budget, tally) = (Arc::new(budget), Arc::new(Tally::default()));
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let started = std::fs::symlink_metadata(&root).is_ok_and(|m| m.is_dir()) && {
            let (b, t) = (budget.clone(), tally.clone());
            std::thread::Builder::new()
                .name("ferry-ahead".into())
                .spawn(move || {
                    let _unwinding = SettleOnExit(t.clone());
                    let mut count = (0, 0);
                    let whole = read_ahead(&root, &tx, &b, &mut count, &t);
                    t.settle(match whole {
                        true => Counted::Whole(count.0, count.1),
                        false => Counted::Partial,
                    });
                })
                .is_ok()
        };
        if !started {
            tally.settle(Counted::Partial);
        }
        ReadAhead(Arc::new(Handle { rx, budget, tally }))
    }

    /// What it counts of the tree, for the progress totals.
    pub fn tally(&self) -> Arc<Tally> {
        self.0.tally.clone()
    }
}

/// Lists `dir`, then its subdirectories in name order, depth first: the walk's order; adds the files and
/// bytes listed to `count`. False once the walk stopped taking listings.
fn read_ahead(
    dir: &Path,
    tx: &cb::Sender<Listing>,
    budget: &Budget,
    count: &mut (u64, u64),
    tally: &Tally,
) -> bool {
    let entries = list_dir(dir);
    for (m, _) in entries
        .iter()
        .flatten()
        .filter_map(|e| e.stat.as_ref().ok())
    {
        if !m.is_dir() {
            count.0 += 1;
            count.1 += if m.is_file() { m.len() } else { 0 };
        }
    }
    let subdirs: Vec<PathBuf> = entries
        .iter()
        .flatten()
        .filter(|e| e.stat.as_ref().is_ok_and(|(m, _)| m.is_dir()))
        .map(|e| dir.join(&e.name))
        .collect();
    let listing = Listing {
        dir: dir.to_path_buf(),
        entries,
    };
    if budget.full_for(listing.weight()) {
        tally.settle(Counted::Partial); // the walk may take long to make room: count without waiting
    }
    budget.take(listing.weight())
        && tx.send(listing).is_ok()
        && subdirs
            .iter()
            .all(|s| read_ahead(s, tx, budget, count, tally))
}

/// Where a walk gets its listings: read ahead while they are in step with it, else read now. Dropping it
/// stops the read-ahead.
pub(crate) struct Listings(Option<ReadAhead>);

impl Listings {
    /// Listings from `ahead` if given.
    pub fn new(ahead: Option<ReadAhead>) -> Self {
        Listings(ahead)
    }

    /// The entries of `dir`, which the walk enters now.
    pub fn of(&mut self, dir: &Path) -> Result<Vec<Entry>> {
        if let Some(ReadAhead(ahead)) = &self.0 {
            match ahead.rx.recv() {
                Ok(l) => {
                    ahead.budget.give(l.weight());
                    if l.dir == dir {
                        return l.entries;
                    }
                    self.stop(); // out of step: read directly from here on
                }
                Err(_) => self.0 = None, // the tree is listed
            }
        }
        list_dir(dir)
    }

    fn stop(&mut self) {
        if let Some(ReadAhead(ahead)) = self.0.take() {
            ahead.budget.close();
        }
    }
}

impl Drop for Listings {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        for d in ["a", "a/x", "a/x/deep", "b", "c"] {
            std::fs::create_dir(t.path().join(d)).expect("mkdir");
        }
        for f in ["f", "a/f1", "a/x/f2", "a/x/deep/f3", "c/f4"] {
            std::fs::write(t.path().join(f), f).expect("write");
        }
        t
    }

    /// Every directory in the walk's order: depth first, by name.
    fn walk(dir: &Path, listings: &mut Listings, seen: &mut Vec<(PathBuf, Vec<OsString>)>) {
        let entries = listings.of(dir).expect("listing");
        let names = entries.iter().map(|e| e.name.clone()).collect();
        seen.push((dir.to_path_buf(), names));
        for e in entries {
            if e.stat.expect("stat").0.is_dir() {
                walk(&dir.join(&e.name), listings, seen);
            }
        }
    }

    #[test]
    fn listings_read_ahead_are_the_ones_read_now_in_the_walks_order() {
        let t = tree();
        let root = std::path::absolute(t.path()).expect("absolute");
        let (mut now, mut ahead) = (Vec::new(), Vec::new());
        walk(&root, &mut Listings::new(None), &mut now);
        let read_ahead = ReadAhead::start(&root);
        // Let the thread run ahead of the walk as far as it may.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(read_ahead.0.rx.len(), 6, "not all was read ahead");
        walk(&root, &mut Listings::new(Some(read_ahead)), &mut ahead);
        assert_eq!(ahead, now);
        assert_eq!(now.len(), 6, "{now:?}");
    }

    /// The read-ahead waits while the walk has not taken [`AHEAD_ENTRIES`] entries, and stops when the walk
    /// stops.
    #[test]
    fn the_read_ahead_stays_within_its_budget() {
        let budget = Arc::new(Budget::default());
        assert!(budget.take(AHEAD_ENTRIES + 5), "one directory always fits");
        let waiting = {
            let b = budget.clone();
            std::thread::spawn(move || b.take(1))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiting.is_finished(), "took more than its budget");
        budget.give(AHEAD_ENTRIES);
        assert!(waiting.join().expect("join"));
        let stopped = {
            let b = budget.clone();
            std::thread::spawn(move || b.take(AHEAD_ENTRIES))
        };
        budget.close();
        assert!(
            !stopped.join().expect("join"),
            "went on after the walk stopped"
        );
    }

    /// A read-ahead dropped before any walk took from it (the repository did not open) stops at its budget's
    /// wait instead of waiting forever.
    #[test]
    fn an_unused_read_ahead_stops_when_dropped() {
        let (tx, rx) = cb::unbounded();
        let budget = Arc::new(Budget::default());
        let ahead = ReadAhead(Arc::new(Handle {
            rx,
            budget: budget.clone(),
            tally: Default::default(),
        }));
        assert!(budget.take(AHEAD_ENTRIES));
        let producer = std::thread::spawn(move || budget.take(1) && tx.send(listing()).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let kept = ahead.clone();
        drop(ahead);
        assert!(!producer.is_finished(), "a clone is still held");
        drop(kept);
        let waited = std::time::Instant::now();
        while !producer.is_finished() && waited.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            producer.is_finished(),
            "still waiting after the last handle was dropped"
        );
        assert!(
            !producer.join().expect("join"),
            "went on after the last handle was dropped"
        );
    }

    fn listing() -> Listing {
        Listing {
            dir: PathBuf::from("/"),
            entries: Ok(Vec::new()),
        }
    }

    /// A read-ahead that must wait for the walk to make room leaves the totals to the scan at once, and one
    /// that lists the whole tree gives them.
    #[test]
    fn only_a_tree_listed_whole_ahead_is_counted() {
        let t = tree();
        let small = ReadAhead::start_within(t.path(), Budget::with_limit(2));
        assert_eq!(small.tally().wait(), None, "its budget filled");
        let whole = ReadAhead::start(t.path());
        assert_eq!(whole.tally().wait(), Some((5, 26)));
        let file = ReadAhead::start(&t.path().join("f"));
        assert_eq!(file.tally().wait(), None, "no tree to list");
    }

    /// A read-ahead thread that dies before it settles its count (a panic) leaves the totals to the scan
    /// rather than keeping it waiting.
    #[test]
    fn a_read_ahead_that_dies_unsettled_leaves_the_count_to_the_scan() {
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        let died = std::thread::spawn(move || {
            let _unwinding = SettleOnExit(t);
            panic!("a listing thread dies");
        })
        .join();
        assert!(died.is_err());
        assert_eq!(tally.wait(), None);
    }

    /// A walk elsewhere than where the read-ahead started lists its directories itself.
    #[test]
    fn a_walk_out_of_step_reads_its_own_listings() {
        let t = tree();
        let root = std::path::absolute(t.path()).expect("absolute");
        let mut listings = Listings::new(Some(ReadAhead::start(&root)));
        let a = listings.of(&root.join("a")).expect("listing");
        assert!(listings.0.is_none(), "still taking listings out of step");
        let names: Vec<_> = a.iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["f1", "x"]);
        let again = listings.of(&root).expect("listing");
        assert_eq!(again.len(), 4);
    }
}
