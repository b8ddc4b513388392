//! Backup: walk a directory (or read a block device), split files into chunks, store the new ones.
//!
//! Pipeline, all stages bounded so memory depends on configuration, not data size:
//!
//! ```text
//! walker thread ──files──► reader threads (read, chunk, hash, dedup) ──new blobs──► worker threads
//!   (trees, post-order)                                                 (compress, encrypt, pack)
//!                                                                               │ full packs
//!                                               async uploads (N concurrent) ◄──┘
//!                                               └─► index segment every 64 packs or 65,536 blobs, and at the end
//! ```
//!
//! A file larger than [`BackupOptions::segment`] (a large file, a block device) is read as segments at fixed
//! offsets, each a job of its own, so several readers (and both cores' chunking and hashing) work on it at
//! once. Every segment is chunked on its own: a chunk boundary falls at each segment start. The offsets do not
//! move between backups, so an unchanged segment gives the same chunks again, and an insertion costs at most
//! one extra chunk per later segment (`design/0001-repository-format.md`, "Chunking"). At most
//! [`BackupOptions::segment_readers`] readers work on segments at once; the others stay free for small files.
//!
//! Memory is set by the options, not the data: a file being read holds a 1 MiB read buffer (a chunk within
//! one read is hashed where it lies and copied only when new to the repository, after it got one of two
//! slots per worker ([`BlobSlots`]); one spanning reads is gathered once), and data packs are built in
//! [`BackupOptions::uploads`] + 1 reused pack buffers (a [`Pool`]), so at most that many packs fill, wait
//! and upload at once.
//!
//! Packs are stored before the index segment naming them, and the snapshot after its index, so an
//! interrupted backup leaves only unreferenced packs, never a dangling reference.
//! A file whose type, size and mtime match its entry in the parent snapshot is not read again.
//! The walker takes each directory's entries from [`crate::listing`]: read ahead of it, from before the
//! repository opened, when the caller started a [`ReadAhead`] ([`BackupOptions::read_ahead`]).
//!
//! Against a concurrent prune, a backup holds a backup lease (`crate::lease`) from before it reads
//! `prune/state` until its snapshot is written, reuses no data from prune's candidates, and does not commit
//! if the lease lapsed (`design/0003-backup-deletion.md`).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use crossbeam_channel as cb;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::chunker::{Chunk, Chunker};
use crate::error::{Error, Result};
use crate::fsmeta;
use crate::holes::Holes;
use crate::id::{BlobId, SnapshotId};
use crate::idtable::IdTable;
use crate::index::{INDEX_VERSION, Index, IndexPack, IndexSegment};
use crate::lease::{Lease as RepoLease, LeaseKind};
use crate::listing::{Listings, ReadAhead};
use crate::pack::{self, BlobKind, FinishedPack, PackWriter};
use crate::pagecache::DropBehind;
use crate::pool::{Lease, Pool};
use crate::progress::{Phase, Progress};
use crate::repo::Repository;
use crate::snapshot::{SNAPSHOT_VERSION, Snapshot, SourceKind, Summary};
use crate::tree::{Node, NodeKind, Tree};

/// Which snapshot to compare against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ParentSpec {
    /// The snapshot with the same path, source kind, host and tags written last
    /// ([`Repository::latest_snapshot`]).
    #[default]
    Auto,
    /// No parent: read everything.
    None,
    /// `latest` or an id (prefix).
    Snapshot(String),
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Directory (or single file) to back up; with `block_device`, the device or image file.
    pub path: PathBuf,
    /// Back up the raw content of a block device or image file.
    pub block_device: bool,
    /// Parent snapshot selection.
    pub parent: ParentSpec,
    /// Tags to record.
    pub tags: BTreeMap<String, String>,
    /// Host name to record (defaults to this machine's).
    pub hostname: Option<String>,
    /// Threads that read and chunk files (several files at once: a cold read of many small files waits on
    /// the storage's latency more than on the CPU).
    pub readers: usize,
    /// Threads that compress and encrypt.
    pub workers: usize,
    /// Concurrent pack uploads.
    pub uploads: usize,
    /// Drop what was read from the page cache (`crate::pagecache`): for a source read once that nobody
    /// else uses, such as a snapshot's clone in a memory-limited pod.
    pub drop_cache: bool,
    /// Files larger than this are read as segments of this many bytes, several at once (the module's doc).
    pub segment: u64,
    /// Readers that may work on segments at once. Past a few per core they add memory (each holds its read
    /// buffer and the chunk it hands on), not speed; the other readers stay free for small files.
    pub segment_readers: usize,
    /// Directory listings read ahead of the walk, started by the caller before it opened the repository
    /// (`crate::listing`); without it the walk lists each directory when it gets there.
    pub read_ahead: Option<ReadAhead>,
}

impl BackupOptions {
    /// Defaults for `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let cpus = crate::cpus();
        BackupOptions {
            path: path.into(),
            block_device: false,
            parent: ParentSpec::Auto,
            tags: BTreeMap::new(),
            hostname: None,
            readers: default_readers(cpus),
            workers: cpus,
            uploads: 2,
            drop_cache: false,
            segment: SEGMENT,
            segment_readers: (cpus * 2).clamp(2, 8),
            read_ahead: None,
        }
    }
}

/// Default [`BackupOptions::segment`]: 64 MiB, about 128 chunks of the default average size, so the boundary
/// forced at each segment start costs little dedup, and a 4 GiB file gives 64 jobs for the readers.
pub const SEGMENT: u64 = 64 << 20;

/// Reader threads for `cpus` cores: 4 per core, between 4 and 16. A file (or segment) is read by one reader,
/// so only several readers keep several reads in flight; each holds a 1 MiB read buffer.
fn default_readers(cpus: usize) -> usize {
    (cpus * 4).clamp(4, 16)
}

/// An index segment is written after this many stored packs...
const SEGMENT_PACKS: usize = 64;
/// ...or as soon as the stored packs hold this many blobs (small files: a 16 MiB pack of 1 KiB files holds
/// 16,000), so the entries waiting for their segment stay a few MiB whatever the files' sizes.
const SEGMENT_BLOBS: usize = 65_536;

/// Whether `packs` stored packs holding `blobs` blobs are due for an index segment.
fn segment_due(packs: usize, blobs: usize) -> bool {
    packs >= SEGMENT_PACKS || blobs >= SEGMENT_BLOBS
}

/// A blob on its way to a pack.
struct NewBlob {
    kind: BlobKind,
    id: BlobId,
    data: Bytes,
    /// Its place among the blobs between readers and workers, given back once it is packed.
    _slot: Lease<()>,
}

/// The way from the readers (and the walker's trees) to the workers. A new blob takes one of a fixed number
/// of slots *before* its bytes are copied out of the reader's buffer, and gives it back when a worker has
/// packed it: readers that wait for busy workers wait without a copy of their chunk, so the chunks in flight
/// are at most the slots, not the slots plus one per waiting reader.
struct BlobSlots {
    slots: Pool<()>,
}

impl BlobSlots {
    /// `n` slots (at least one).
    fn new(n: usize) -> Self {
        BlobSlots {
            slots: Pool::new(vec![(); n.max(1)]),
        }
    }

    /// How many blobs may be in flight: the channel to the workers holds them all without blocking.
    fn capacity(&self) -> usize {
        self.slots.size()
    }

    /// Sends blob `id` of `kind` to the workers, made by `data` once a slot is free; gives up, without
    /// making it, once `stopped()` (the workers are gone or the backup was canceled).
    fn send(
        &self,
        tx: &cb::Sender<NewBlob>,
        kind: BlobKind,
        id: BlobId,
        data: impl FnOnce() -> Bytes,
        stopped: impl Fn() -> bool,
    ) -> Result<()> {
        let slot = self
            .slots
            .lease_unless(stopped)
            .ok_or_else(pipeline_stopped)?;
        tx.send(NewBlob {
            kind,
            id,
            data: data(),
            _slot: slot,
        })
        .map_err(|_| pipeline_stopped())
    }
}

/// A file, or one segment of it, to read.
struct FileJob {
    path: PathBuf,
    part: Part,
    /// Whether the file may have holes ([`crate::holes::may_have_holes`]): then they are not read.
    holes: bool,
    reply: cb::Sender<Result<Vec<BlobId>>>,
}

/// Which bytes of a file a job reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    offset: u64,
    /// `None`: to the end of the file (the file's last part).
    len: Option<u64>,
}

impl Part {
    /// Whether this is one segment of a file read in several (not a whole file).
    fn is_segment(&self) -> bool {
        self.offset > 0 || self.len.is_some()
    }
}

/// The parts of a file of `size` bytes: the whole file, or segments of `segment` bytes at fixed offsets with
/// the last one reading to the end (the file may have grown since it was measured).
fn parts(size: u64, segment: u64) -> Vec<Part> {
    let n = if segment == 0 {
        1
    } else {
        size.div_ceil(segment).max(1)
    };
    (0..n)
        .map(|k| Part {
            offset: k * segment,
            len: (k + 1 < n).then_some(segment),
        })
        .collect()
}

/// A file's content as it becomes known: the parent's, or the replies of its parts' jobs, in order.
enum Content {
    Known(Vec<BlobId>),
    Reading(Vec<cb::Receiver<Result<Vec<BlobId>>>>),
}

impl Content {
    /// Waits for every part and joins their chunks.
    fn wait(self) -> Result<Vec<BlobId>> {
        match self {
            Content::Known(ids) => Ok(ids),
            Content::Reading(parts) => {
                let mut ids = Vec::new();
                for rx in parts {
                    ids.extend(rx.recv().map_err(|_| pipeline_stopped())??);
                }
                Ok(ids)
            }
        }
    }
}

/// The readers' chunking buffers (1 MiB each, every page written), lent to one file or segment at a time,
/// the last one given back first: there are as many as jobs were ever read at once (four on a large
/// file's segments, up to the readers on many files), not one per reader thread.
#[derive(Default)]
struct ReadBuffers(Mutex<Vec<Vec<u8>>>);

impl ReadBuffers {
    /// A buffer, the most recently given back if any (empty when new: the chunker sizes it).
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .expect("read buffers lock")
            .pop()
            .unwrap_or_default()
    }

    /// Gives a buffer back.
    fn put(&self, buf: Vec<u8>) {
        self.0.lock().expect("read buffers lock").push(buf);
    }
}

/// State shared by the pipeline's threads.
struct Shared {
    repo: Arc<Repository>,
    chunker: Chunker,
    index: Arc<Index>,
    /// Whether `index` names every pack (no prune candidates were left out).
    index_is_whole: bool,
    /// Blobs new to the repository that this backup already queued (one entry per new blob: compact, as
    /// a first backup of millions of small files puts millions here).
    inflight: Mutex<IdTable<()>>,
    progress: Arc<Progress>,
    rt: tokio::runtime::Handle,
    read_bytes: std::sync::atomic::AtomicU64,
    /// Set when a worker failed: readers drop their remaining jobs, and blobs stop waiting for a slot.
    stop: std::sync::atomic::AtomicBool,
    /// Id of the all-zero chunk of the chunker's largest size (how long zero runs come), hashed once.
    zero_max: std::sync::OnceLock<BlobId>,
    /// `BackupOptions::drop_cache`.
    drop_cache: bool,
    /// `BackupOptions::segment`.
    segment: u64,
    /// [`BackupOptions::segment_readers`].
    segment_slots: Pool<()>,
    /// The readers' read buffers.
    read_buffers: ReadBuffers,
    /// The blobs between readers and workers.
    blob_slots: BlobSlots,
    /// The buffers of data packs being filled, waiting or uploading: [`BackupOptions::uploads`] + 1, so one
    /// pack fills while the others upload (a full pack waits for a free upload with its buffer).
    buffers: Pool<Vec<u8>>,
}

impl Shared {
    /// Queues a blob unless the repository or this backup already has it.
    fn store(&self, tx: &cb::Sender<NewBlob>, kind: BlobKind, data: Bytes) -> Result<BlobId> {
        let id = self.repo.keys().blob_id(&data);
        self.store_as(tx, kind, id, data.len(), || data)
    }

    /// A data chunk, hashed where the chunker lent it and copied only when new: zero runs are not hashed
    /// again, nor their bytes copied, unless new to the repository.
    fn store_chunk(&self, tx: &cb::Sender<NewBlob>, chunk: Chunk<'_>) -> Result<BlobId> {
        match chunk {
            Chunk::Zeros(n) if n == self.chunker.max_size() => {
                let id = *self
                    .zero_max
                    .get_or_init(|| self.repo.keys().blob_id(&vec![0u8; n]));
                self.store_as(tx, BlobKind::Data, id, n, || Chunk::Zeros(n).into_bytes())
            }
            Chunk::Data(bytes) => {
                let id = self.repo.keys().blob_id(&bytes);
                let len = bytes.len();
                self.store_as(tx, BlobKind::Data, id, len, || {
                    Bytes::from(bytes.into_owned())
                })
            }
            zeros => self.store(tx, BlobKind::Data, zeros.into_bytes()),
        }
    }

    /// Queues blob `id` (`len` bytes, made by `data`) unless the repository or this backup already has it.
    fn store_as(
        &self,
        tx: &cb::Sender<NewBlob>,
        kind: BlobKind,
        id: BlobId,
        len: usize,
        data: impl FnOnce() -> Bytes,
    ) -> Result<BlobId> {
        if self.index.contains(&id) {
            return Ok(id);
        }
        if !self.inflight.lock().expect("inflight lock").insert(id, ()) {
            return Ok(id);
        }
        if kind == BlobKind::Data {
            Progress::add(&self.progress.bytes_new, len as u64);
        }
        self.blob_slots
            .send(tx, kind, id, data, || self.stopped())?;
        Ok(id)
    }

    /// Whether the pipeline is being torn down: a worker failed, or the backup was canceled.
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed) || self.progress.is_canceled()
    }

    /// Compresses and encrypts a blob into `stored` (the worker's buffer, reused for every blob) and adds it
    /// to its kind's pack. A blob that does not fit (`PackWriter::fits`) first sends the pack on, so a pack
    /// never outgrows its buffer. A data pack takes one of the pooled buffers when it starts, waiting while
    /// all are filling, queued or uploading (tree packs, a quarter the size and far fewer, allocate their
    /// own).
    fn pack_blob(
        &self,
        packers: &[Mutex<PackWriter>; 2],
        b: NewBlob,
        stored: &mut Vec<u8>,
        tx: &tokio::sync::mpsc::Sender<FinishedPack>,
    ) -> Result<()> {
        let keys = self.repo.keys();
        let compression = self.repo.config().compression;
        pack::encode_blob_into(keys, b.kind, &b.data, compression, stored)?;
        let packer = &packers[(b.kind == BlobKind::Tree) as usize];
        loop {
            let full = {
                let mut p = packer.lock().expect("packer lock");
                if !p.is_empty() && !p.fits(stored.len()) {
                    p.finish(keys)?
                } else {
                    if b.kind == BlobKind::Data && !p.has_buffer() {
                        let stopped = || tx.is_closed() || self.progress.is_canceled();
                        let buf = self
                            .buffers
                            .take_unless(stopped)
                            .ok_or_else(pipeline_stopped)?;
                        p.set_buffer(buf, pack::Recycle::new(self.buffers.returner()));
                    }
                    p.add(b.id, b.data.len(), stored);
                    return Ok(());
                }
            };
            // Sent with the lock released: another worker may fill the next pack meanwhile.
            tx.blocking_send(full).map_err(|_| pipeline_stopped())?;
        }
    }

    /// Reads, chunks and stores one file, or one part of it.
    fn read_file(
        &self,
        path: &Path,
        part: Part,
        holes: bool,
        tx: &cb::Sender<NewBlob>,
    ) -> Result<Vec<BlobId>> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        if part.offset > 0 {
            f.seek(SeekFrom::Start(part.offset))
                .map_err(|e| Error::io(path, e))?;
        }
        let len = part.len.unwrap_or(u64::MAX);
        if self.drop_cache {
            let r = Holes::new(DropBehind::new(f), part.offset, holes);
            self.chunk_file(path, r.take(len), tx)
        } else {
            self.chunk_file(path, Holes::new(f, part.offset, holes).take(len), tx)
        }
    }

    /// Chunks and stores what `r` reads (the content of `path`).
    fn chunk_file(
        &self,
        path: &Path,
        r: impl std::io::Read,
        tx: &cb::Sender<NewBlob>,
    ) -> Result<Vec<BlobId>> {
        let mut ids = Vec::new();
        let mut buf = self.read_buffers.take();
        let r = self.chunker.chunk_stream_in(
            &mut buf,
            r,
            |chunk| {
                self.progress.check()?;
                if self.stopped() {
                    return Err(pipeline_stopped());
                }
                let n = chunk.len() as u64;
                ids.push(self.store_chunk(tx, chunk)?);
                Progress::add(&self.progress.bytes_done, n);
                self.read_bytes
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
            |e| Error::io(path, e),
        );
        self.read_buffers.put(buf);
        r?;
        Ok(ids)
    }

    /// A tree of the parent snapshot ([`read_parent_tree`] through this backup's index).
    fn parent_tree(&self, id: &BlobId) -> Result<Tree> {
        self.rt.block_on(read_parent_tree(
            &self.repo,
            &self.index,
            self.index_is_whole,
            id,
        ))
    }

    /// A worker: packs blobs until the channel closes. On failure (or panic) it stops the pipeline, so
    /// nothing waits for a slot or buffer that no worker will give back.
    fn pack_all(
        &self,
        blobs: cb::Receiver<NewBlob>,
        packers: &[Mutex<PackWriter>; 2],
        tx: &tokio::sync::mpsc::Sender<FinishedPack>,
    ) -> Result<()> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Every blob is encoded into this one buffer, then copied into its pack.
            let mut encoded = Vec::new();
            for b in blobs {
                self.pack_blob(packers, b, &mut encoded, tx)?;
            }
            Ok(())
        }))
        .unwrap_or_else(|_| Err(worker_panicked()));
        if r.is_err() {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

/// A tree of the parent snapshot, located through `index` when that is the whole index (`index_is_whole`:
/// no second copy of it, and no reload after each segment this backup writes); with prune's candidates
/// left out of it, through the repository's.
async fn read_parent_tree(
    repo: &Repository,
    index: &Index,
    index_is_whole: bool,
    id: &BlobId,
) -> Result<Tree> {
    if index_is_whole {
        repo.read_tree_via(index, id).await
    } else {
        repo.read_tree(id).await
    }
}

fn pipeline_stopped() -> Error {
    Error::Stopped
}

fn worker_panicked() -> Error {
    Error::Invalid("a backup worker panicked".into())
}

/// What the pipeline's threads report together: the walk's result, unless it only stopped because a worker
/// failed, in which case the worker's error (the cause) is reported.
fn pipeline_outcome<T>(
    walked: Result<T>,
    workers: impl IntoIterator<Item = std::thread::Result<Result<()>>>,
) -> Result<T> {
    let mut worker_err = None;
    for w in workers {
        let e = match w {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => worker_panicked(),
        };
        if worker_err
            .as_ref()
            .is_none_or(|w: &Error| matches!(w.root(), Error::Stopped))
        {
            worker_err = Some(e);
        }
    }
    match (walked, worker_err) {
        (Err(e), Some(w)) if matches!(e.root(), Error::Stopped) => Err(w),
        (Err(e), _) => Err(e),
        (Ok(_), Some(w)) => Err(w),
        (Ok(v), None) => Ok(v),
    }
}

/// Counts kept by the walker.
#[derive(Default)]
struct WalkStats {
    files: u64,
    dirs: u64,
    bytes: u64,
}

struct Walker<'a> {
    shared: &'a Shared,
    jobs: cb::Sender<FileJob>,
    blobs: cb::Sender<NewBlob>,
    stats: WalkStats,
    /// (device, inode) of multiply-linked files -> hard-link group number.
    links: std::collections::HashMap<(u64, u64), u64>,
    /// Where each directory's entries come from.
    listings: Listings,
}

fn same_file(parent: &Node, now: &Node) -> bool {
    matches!(parent.kind, NodeKind::File { .. })
        && parent.size == now.size
        && parent.mtime_sec == now.mtime_sec
        && parent.mtime_nsec == now.mtime_nsec
}

impl Walker<'_> {
    /// The content of the file at `path` (its metadata `meta`), its parent's when unchanged.
    fn file_content(
        &mut self,
        path: PathBuf,
        meta: &std::fs::Metadata,
        node: &Node,
        parent: Option<&Node>,
    ) -> Result<Content> {
        self.stats.bytes += node.size;
        if let Some(p) = parent
            && same_file(p, node)
            && let NodeKind::File { content } = &p.kind
            && content.iter().all(|c| self.shared.index.contains(c))
        {
            Progress::add(&self.shared.progress.bytes_done, node.size);
            Progress::add(&self.shared.progress.files_done, 1);
            return Ok(Content::Known(content.clone()));
        }
        let holes = crate::holes::may_have_holes(meta);
        let mut replies = Vec::new();
        for part in parts(node.size, self.shared.segment) {
            let (reply, rx) = cb::bounded(1);
            let path = path.clone();
            self.jobs
                .send(FileJob {
                    path,
                    part,
                    holes,
                    reply,
                })
                .map_err(|_| pipeline_stopped())?;
            replies.push(rx);
        }
        Ok(Content::Reading(replies))
    }

    fn walk_dir(&mut self, dir: &Path, parent: Option<&Tree>) -> Result<BlobId> {
        self.shared.progress.check()?;
        self.stats.dirs += 1;
        let mut nodes = Vec::new();
        let mut pending = Vec::new();
        let mut subdirs = Vec::new();
        for entry in self.listings.of(dir)? {
            let path = dir.join(&entry.name);
            let (meta, node) = match entry.stat {
                Ok(stat) => stat,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished since readdir
                Err(e) => return Err(Error::io(&path, e)),
            };
            let mut node = node?;
            if !meta.is_dir() && meta.nlink() > 1 {
                let next = self.links.len() as u64;
                node.hardlink = Some(*self.links.entry((meta.dev(), meta.ino())).or_insert(next));
            }
            let pnode = parent.and_then(|t| t.find(&node.name));
            match node.kind {
                NodeKind::Dir { .. } => subdirs.push((nodes.len(), path)),
                NodeKind::File { .. } => {
                    self.stats.files += 1;
                    pending.push((nodes.len(), self.file_content(path, &meta, &node, pnode)?));
                }
                _ => {
                    self.stats.files += 1;
                    Progress::add(&self.shared.progress.files_done, 1);
                }
            }
            nodes.push(node);
        }
        for (i, path) in subdirs {
            let ptree = match parent.and_then(|t| t.find(&nodes[i].name)).map(|n| &n.kind) {
                Some(NodeKind::Dir { subtree }) => Some(self.shared.parent_tree(subtree)?),
                _ => None,
            };
            let id = self.walk_dir(&path, ptree.as_ref())?;
            nodes[i].kind = NodeKind::Dir { subtree: id };
        }
        for (i, content) in pending {
            nodes[i].kind = NodeKind::File {
                content: content.wait()?,
            };
        }
        let tree = Tree::new(nodes).to_bytes()?;
        self.shared
            .store(&self.blobs, BlobKind::Tree, Bytes::from(tree))
    }

    /// A single file or device as the only entry of a root tree.
    fn walk_single(&mut self, path: &Path, block: bool, parent: Option<&Tree>) -> Result<BlobId> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
        let name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "volume".into());
        let mut node = fsmeta::node_from(&name, path, &meta)?;
        if block {
            let ft = meta.file_type();
            if !(ft.is_block_device() || ft.is_file()) {
                return Err(Error::Invalid(format!(
                    "{}: not a block device or regular file",
                    path.display()
                )));
            }
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            node.size = f.seek(SeekFrom::End(0)).map_err(|e| Error::io(path, e))?;
            node.kind = NodeKind::File {
                content: Vec::new(),
            };
            node.hardlink = None;
        }
        self.stats.files = 1;
        self.stats.dirs = 1;
        if let NodeKind::File { .. } = node.kind {
            // A block device's mtime says nothing about its content: always read it (dedup still applies).
            // An image file read as one has an mtime like any file's: unchanged, its parent's chunks stand.
            let pnode = if meta.file_type().is_block_device() {
                None
            } else {
                parent.and_then(|t| t.find(&node.name))
            };
            let content = self.file_content(path.to_path_buf(), &meta, &node, pnode)?;
            node.kind = NodeKind::File {
                content: content.wait()?,
            };
        }
        let tree = Tree::new(vec![node]).to_bytes()?;
        self.shared
            .store(&self.blobs, BlobKind::Tree, Bytes::from(tree))
    }
}

/// Sums sizes ahead of the backup so progress has totals.
/// Starts counting the files and bytes under `path` for progress totals, on a thread of its own, unless
/// already started for `progress`. Callers start it before opening the repository: the scan then runs on
/// the other core while the password's key derivation (Argon2id) runs, and leaves the inode cache warm for
/// the backup's own walk.
///
/// With the backup's [`ReadAhead`], the scan first waits for what it counts: a tree it lists whole within
/// its budget needs no second pass (an unchanged re-backup of 20,000 files saves 20,000 `statx` calls on
/// the cores the key derivation runs on); a larger one is scanned once the read-ahead's budget is full.
pub fn start_scan(path: &Path, block: bool, progress: &Arc<Progress>, ahead: Option<&ReadAhead>) {
    if !progress.claim_scan() {
        return;
    }
    let (p, progress) = (path.to_path_buf(), progress.clone());
    let tally = ahead.filter(|_| !block).map(ReadAhead::tally);
    let _ = std::thread::Builder::new()
        .name("ferry-scan".into())
        .spawn(move || match tally.and_then(|t| t.wait()) {
            Some((files, bytes)) => progress.set_totals(files, bytes),
            None => scan_totals(&p, block, &progress),
        });
}

fn scan_totals(path: &Path, block: bool, progress: &Progress) {
    if block {
        if let Ok(mut f) = std::fs::File::open(path)
            && let Ok(n) = f.seek(SeekFrom::End(0))
        {
            progress.set_totals(1, n);
        }
        return;
    }
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        if progress.is_canceled() {
            return;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else {
            files += 1;
            if m.is_file() {
                bytes += m.len();
            }
        }
    }
    progress.set_totals(files, bytes);
}

/// The outcome of a backup.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The new snapshot's id.
    pub id: SnapshotId,
    /// The snapshot.
    pub snapshot: Snapshot,
}

async fn resolve_parent(
    repo: &Repository,
    opts: &BackupOptions,
    path: &str,
    host: &str,
) -> Result<Option<(SnapshotId, Snapshot)>> {
    match &opts.parent {
        ParentSpec::None => Ok(None),
        ParentSpec::Snapshot(s) => repo.find_snapshot(s).await.map(Some),
        ParentSpec::Auto => {
            let kind = if opts.block_device {
                SourceKind::Block
            } else {
                SourceKind::Filesystem
            };
            repo.latest_snapshot(|s| {
                s.path == path && s.source == kind && s.hostname == host && s.tags == opts.tags
            })
            .await
        }
    }
}

/// Writes an index segment while the lease holds: once a prune may have presumed this backup dead (and
/// deleted its packs as garbage), it must not name them in an index.
async fn write_index(repo: &Repository, lease: &RepoLease, segment: &IndexSegment) -> Result<()> {
    lease.ensure_held().await?;
    repo.write_index(segment).await.map(|_| ())
}

/// Backs up `opts.path` into `repo`, reporting through `progress`.
pub async fn backup(
    repo: Arc<Repository>,
    opts: BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupOutcome> {
    let path = std::path::absolute(&opts.path).map_err(|e| Error::io(&opts.path, e))?;
    std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
    // The lease first, naming the state generation seen so far; then the state it protects against.
    let seen = crate::candidates::load(&repo).await?.generation;
    let lease = RepoLease::acquire(repo.clone(), LeaseKind::Backup, seen).await?;
    let r = run(repo, opts, path, &lease, progress).await;
    lease.release().await;
    r
}

async fn run(
    repo: Arc<Repository>,
    opts: BackupOptions,
    path: PathBuf,
    lease: &RepoLease,
    progress: Arc<Progress>,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let start_time = SystemTime::now();
    let path_str = path.to_string_lossy().into_owned();
    let host = opts.hostname.clone().unwrap_or_else(crate::repo::hostname);
    let candidates = crate::candidates::load(&repo).await?.packs();
    let index = Arc::new(repo.load_index_without(&candidates).await?);
    let parent = resolve_parent(&repo, &opts, &path_str, &host).await?;
    let index_is_whole = candidates.is_empty();
    let parent_tree = match &parent {
        Some((_, s)) => Some(read_parent_tree(&repo, &index, index_is_whole, &s.tree).await?),
        None => None,
    };
    progress.set_phase(Phase::Running);

    let shared = Arc::new(Shared {
        chunker: Chunker::new(repo.keys().chunker_key(), repo.config().chunker),
        repo: repo.clone(),
        index,
        index_is_whole,
        inflight: Mutex::new(IdTable::default()),
        progress: progress.clone(),
        rt: tokio::runtime::Handle::current(),
        read_bytes: Default::default(),
        stop: Default::default(),
        zero_max: Default::default(),
        drop_cache: opts.drop_cache,
        segment: opts.segment,
        segment_slots: Pool::new(vec![(); opts.segment_readers.max(1)]),
        read_buffers: ReadBuffers::default(),
        // Two per worker: one being packed, one queued.
        blob_slots: BlobSlots::new(opts.workers.max(1) * 2),
        buffers: Pool::new((0..=opts.uploads.max(1)).map(|_| Vec::new())),
    });
    let pack_size = repo.config().pack_size as usize;
    let (pack_tx, mut pack_rx) = tokio::sync::mpsc::channel::<FinishedPack>(1);

    // The walker thread owns the whole synchronous pipeline and tears it down in order.
    let walker = {
        let shared = shared.clone();
        let opts = opts.clone();
        let path = path.clone();
        std::thread::Builder::new()
            .name("ferry-walk".into())
            .spawn(move || -> Result<(BlobId, WalkStats)> {
                start_scan(
                    &path,
                    opts.block_device,
                    &shared.progress,
                    opts.read_ahead.as_ref(),
                );
                let (blob_tx, blob_rx) = cb::bounded::<NewBlob>(shared.blob_slots.capacity());
                let (job_tx, job_rx) = cb::bounded::<FileJob>(256);
                let packers = Arc::new([
                    Mutex::new(PackWriter::new(BlobKind::Data, pack_size)),
                    Mutex::new(PackWriter::new(BlobKind::Tree, pack_size / 4)),
                ]);
                let workers: Vec<_> = (0..opts.workers.max(1))
                    .map(|_| {
                        let (rx, tx, shared, packers) = (
                            blob_rx.clone(),
                            pack_tx.clone(),
                            shared.clone(),
                            packers.clone(),
                        );
                        std::thread::spawn(move || shared.pack_all(rx, &packers, &tx))
                    })
                    .collect();
                drop(blob_rx);
                let readers: Vec<_> = (0..opts.readers.max(1))
                    .map(|_| {
                        let (rx, tx, shared) = (job_rx.clone(), blob_tx.clone(), shared.clone());
                        std::thread::spawn(move || {
                            for job in rx {
                                let slot =
                                    job.part.is_segment().then(|| shared.segment_slots.lease());
                                let r = shared.read_file(&job.path, job.part, job.holes, &tx);
                                drop(slot);
                                if r.is_ok() && job.part.len.is_none() {
                                    Progress::add(&shared.progress.files_done, 1);
                                }
                                let _ = job.reply.send(r);
                            }
                        })
                    })
                    .collect();
                drop(job_rx);

                let mut w = Walker {
                    shared: &shared,
                    jobs: job_tx,
                    blobs: blob_tx,
                    stats: WalkStats::default(),
                    links: Default::default(),
                    listings: Listings::new(opts.read_ahead.clone()),
                };
                let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e));
                let result = meta.and_then(|m| {
                    if m.is_dir() && !opts.block_device {
                        w.walk_dir(&path, parent_tree.as_ref())
                    } else {
                        w.walk_single(&path, opts.block_device, parent_tree.as_ref())
                    }
                });
                let Walker {
                    jobs, blobs, stats, ..
                } = w;
                drop(jobs);
                for r in readers {
                    let _ = r.join();
                }
                drop(blobs);
                let root = pipeline_outcome(result, workers.into_iter().map(|h| h.join()))?;
                for p in packers.iter() {
                    let mut p = p.lock().expect("packer lock");
                    if !p.is_empty() {
                        let f = p.finish(shared.repo.keys())?;
                        pack_tx.blocking_send(f).map_err(|_| pipeline_stopped())?;
                    }
                }
                Ok((root, stats))
            })
            .map_err(|e| Error::Invalid(format!("cannot start the backup thread: {e}")))?
    };

    // Upload packs as they come, and index them.
    let mut uploads = FuturesUnordered::new();
    let mut pending: Vec<IndexPack> = Vec::new();
    let mut pending_blobs = 0usize;
    let mut stored_bytes = 0u64;
    let mut upload_err: Option<Error> = None;
    let mut open = true;
    while open || !uploads.is_empty() {
        tokio::select! {
            p = pack_rx.recv(), if open && uploads.len() < opts.uploads.max(1) => match p {
                Some(p) => {
                    let repo = repo.clone();
                    uploads.push(async move {
                        let size = p.bytes.len() as u64;
                        // The pack's buffer goes back to the pool when the last copy of its bytes is
                        // dropped (the S3 client may keep one a little longer).
                        repo.backend().put(&p.id.key(), p.bytes).await?;
                        Ok::<_, Error>(IndexPack { id: p.id, kind: p.header.kind, size, blobs: p.header.blobs })
                    });
                }
                None => open = false,
            },
            Some(r) = uploads.next(), if !uploads.is_empty() => match r {
                Ok(ip) => {
                    stored_bytes += ip.size;
                    Progress::add(&progress.bytes_transferred, ip.size);
                    pending_blobs += ip.blobs.len();
                    pending.push(ip);
                    if segment_due(pending.len(), pending_blobs) {
                        pending_blobs = 0;
                        let seg = IndexSegment { version: INDEX_VERSION, packs: std::mem::take(&mut pending) };
                        if let Err(e) = write_index(&repo, lease, &seg).await { upload_err = Some(e); break; }
                    }
                }
                Err(e) => { upload_err = Some(e); break; }
            },
        }
    }
    if upload_err.is_some() {
        progress.cancel(); // stop the walker promptly
    }
    drop(pack_rx);
    let walked = tokio::task::spawn_blocking(move || walker.join())
        .await
        .map_err(|e| Error::Invalid(format!("join: {e}")))?
        .map_err(|_| Error::Invalid("the backup walker panicked".into()))?;
    progress.set_phase(Phase::Finishing);
    // Index what reached storage even when the backup failed or was canceled, so the next one resumes
    // from it instead of uploading the same data again.
    let indexed = if pending.is_empty() {
        Ok(())
    } else {
        let segment = IndexSegment {
            version: INDEX_VERSION,
            packs: pending,
        };
        write_index(&repo, lease, &segment).await
    };
    if let Some(e) = upload_err {
        return Err(e);
    }
    let (root, stats) = walked?;
    indexed?;
    let summary = Summary {
        files: stats.files,
        dirs: stats.dirs,
        total_bytes: stats.bytes,
        read_bytes: shared.read_bytes.load(std::sync::atomic::Ordering::Relaxed),
        new_bytes: progress
            .bytes_new
            .load(std::sync::atomic::Ordering::Relaxed),
        stored_bytes,
        seconds: started.elapsed().as_secs_f64(),
    };
    let snapshot = Snapshot {
        version: SNAPSHOT_VERSION,
        time: crate::snapshot::rfc3339(start_time),
        hostname: host,
        path: path_str,
        source: if opts.block_device {
            SourceKind::Block
        } else {
            SourceKind::Filesystem
        },
        tree: root,
        parent: parent.map(|(id, _)| id),
        tags: opts.tags,
        summary,
    };
    lease.ensure_held().await?;
    let id = repo.write_snapshot(&snapshot).await?;
    progress.set_phase(Phase::Done);
    Ok(BackupOutcome { id, snapshot })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a read-ahead counts while it lists a whole tree is what the scan counts: every entry but
    /// directories as a file, the sizes of regular files as bytes.
    #[test]
    fn a_worker_s_error_is_reported_not_the_stop_it_caused() {
        let failed = || Ok(Err(Error::Integrity("the worker's own failure".into())));
        let stopped = || Ok(Err(Error::Stopped));
        // The walk stopped because the worker failed: the worker's error is the cause, reported whichever
        // worker stopped first.
        for workers in [vec![failed(), Ok(Ok(()))], vec![stopped(), failed()]] {
            let e = pipeline_outcome(Err::<(), _>(Error::Stopped), workers).expect_err("failed");
            assert!(matches!(e, Error::Integrity(_)), "{e}");
        }
        // A walk that failed for its own reason keeps it; a worker's panic is named.
        let e =
            pipeline_outcome(Err::<(), _>(Error::Canceled), vec![failed()]).expect_err("failed");
        assert!(e.is_canceled(), "{e}");
        let panicked: std::thread::Result<Result<()>> = Err(Box::new("boom"));
        let e = pipeline_outcome(Ok(()), vec![panicked]).expect_err("failed");
        assert!(e.to_string().contains("worker panicked"), "{e}");
        assert_eq!(pipeline_outcome(Ok(7), vec![Ok(Ok(()))]).expect("ok"), 7);
    }

    #[test]
    fn a_tree_listed_whole_ahead_has_the_scans_totals() {
        let t = tempfile::tempdir().expect("tempdir");
        for d in ["a", "a/b", "c", "empty"] {
            std::fs::create_dir(t.path().join(d)).expect("mkdir");
        }
        for (f, len) in [("x", 10), ("a/y", 3000), ("a/b/z", 0), ("c/w", 70_000)] {
            std::fs::write(t.path().join(f), vec![7u8; len]).expect("write");
        }
        std::os::unix::fs::symlink("a/y", t.path().join("c/link")).expect("symlink");
        nix::unistd::mkfifo(&t.path().join("a/fifo"), nix::sys::stat::Mode::S_IRWXU)
            .expect("mkfifo");
        let scanned = Progress::default();
        scan_totals(t.path(), false, &scanned);
        let r = scanned.report();
        assert_eq!((r.files_total, r.bytes_total), (6, 73_010));
        let counted = ReadAhead::start(t.path()).tally().wait();
        assert_eq!(counted, Some((r.files_total, r.bytes_total)));
    }

    fn part(offset: u64, len: Option<u64>) -> Part {
        Part { offset, len }
    }

    #[test]
    fn a_file_splits_into_segments_at_fixed_offsets_with_the_last_to_the_end() {
        assert_eq!(parts(0, 64), vec![part(0, None)]);
        assert_eq!(parts(64, 64), vec![part(0, None)]);
        assert_eq!(parts(65, 64), vec![part(0, Some(64)), part(64, None)]);
        assert_eq!(
            parts(200, 64),
            vec![
                part(0, Some(64)),
                part(64, Some(64)),
                part(128, Some(64)),
                part(192, None)
            ]
        );
        assert_eq!(parts(1 << 40, 0), vec![part(0, None)], "0: never split");
    }

    #[test]
    fn read_buffers_are_reused_last_given_back_first() {
        let b = ReadBuffers::default();
        assert!(b.take().is_empty(), "none yet: a new one");
        b.put(vec![1]);
        b.put(vec![2]);
        assert_eq!(
            b.take(),
            vec![2],
            "the one given back last, still in the cache"
        );
        assert_eq!(b.take(), vec![1]);
        assert!(b.take().is_empty());
    }

    #[test]
    fn packs_of_small_files_get_their_segment_by_blob_count() {
        assert!(!segment_due(1, 1000));
        assert!(segment_due(64, 64), "64 packs of big chunks");
        assert!(
            segment_due(4, 4 * 16_384),
            "four 16 MiB packs of 1 KiB files: 64k entries"
        );
    }

    #[test]
    fn a_blob_waits_for_a_slot_before_its_bytes_are_copied() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let slots = BlobSlots::new(2);
        let (tx, rx) = cb::bounded::<NewBlob>(slots.capacity());
        let copies = AtomicUsize::new(0);
        let send = |n: u8| {
            slots.send(
                &tx,
                BlobKind::Data,
                BlobId([n; 32]),
                || {
                    copies.fetch_add(1, Ordering::SeqCst);
                    Bytes::from(vec![n; 1024])
                },
                || false,
            )
        };
        std::thread::scope(|s| {
            let reader = s.spawn(|| (1..=3).try_for_each(send));
            while rx.len() < 2 {
                std::thread::yield_now();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            let copied_while_full = copies.load(Ordering::SeqCst);
            drop(rx.recv().expect("the first blob"));
            reader.join().expect("no panic").expect("all three sent");
            assert_eq!(
                copied_while_full, 2,
                "the third blob waits for a slot with its bytes still uncopied"
            );
        });
        assert_eq!(
            copies.load(Ordering::SeqCst),
            3,
            "once packed, its slot freed"
        );
        let stopped = slots.send(
            &tx,
            BlobKind::Data,
            BlobId([9; 32]),
            || unreachable!("no copy for a stopped pipeline"),
            || true,
        );
        assert!(stopped.is_err(), "all slots out and the workers gone");
    }

    #[test]
    fn only_the_parts_of_a_split_file_take_a_segment_readers_lease() {
        // The cap itself is the pool's (`pool::tests`); what takes from it is decided here.
        assert!(!part(0, None).is_segment(), "a whole file");
        assert!(parts(200, 64).iter().all(Part::is_segment));
        assert!(part(0, Some(64)).is_segment(), "the first segment too");
    }
}
