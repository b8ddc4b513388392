//! Restore: recreate a snapshot's tree under a target directory (or write a block snapshot into a device
//! or image file).
//!
//! 1. A planner thread walks the trees; creates directories, files of several chunks at their final size,
//!    empty files, symlinks, FIFOs and devices; and plans which chunk goes to which file offsets, in
//!    batches of at most [`RestoreOptions::batch_placements`] placements (a large file's chunks may span batches). Each
//!    batch goes through a channel of one, so memory is bounded whatever the size of the tree and the
//!    planner walks ahead while the previous batch is written.
//! 2. Per batch: group the chunks by pack, merge nearby ones into ranged reads, fetch in parallel, decrypt
//!    (in the fetched range itself: a chunk stored uncompressed is written from there, never copied) and
//!    verify every chunk against its id, write it at its offsets (all-zero chunks are skipped with
//!    `--sparse`, else allocated with `fallocate` but not written; zeroed on a device); then the metadata
//!    of the files whose last chunk was in the batch.
//!    With [`RestoreOptions::drop_cache`], the pages written to files of several chunks and to devices leave
//!    the page cache once on disk (`crate::pagecache::WriteBehind`).
//!    A file of one chunk (most files of a tree of many small files) is created when its chunk arrives,
//!    written, and given its metadata through the open descriptor: one open and no path lookup after it.
//! 3. Hard links, then directories' metadata, deepest first (so writing children does not disturb a
//!    directory's mtime).
//! 4. Everything written is made durable before the restore reports success: `syncfs` on the target's
//!    filesystem (one call, not an fsync per file), or `fsync` of a block target. A DataDownload is
//!    Completed when its mover exits, and Velero then hands the volume to the workload: data still in the
//!    node's page cache would be lost if the node went down first, and a failed write-back would go unseen.
//!
//! Safety: names come from validated trees (single components, no duplicates), every directory entered is
//! one this restore created or found as a real directory (never a symlink), and files are opened with
//! `O_NOFOLLOW`, so nothing is written outside the target.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::{BlobId, PackId, SnapshotId};
use crate::index::Index;
use crate::pack::{self, BlobKind};
use crate::pagecache::WriteBehind;
use crate::progress::{Phase, Progress};
use crate::repo::Repository;
use crate::snapshot::{Snapshot, SourceKind};
use crate::tree::{Node, NodeKind, Tree};

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Directory to restore into (created if missing); for a block snapshot, the device or image file.
    pub target: PathBuf,
    /// Leave all-zero chunks as holes.
    pub sparse: bool,
    /// Read every restored file back and check it against the snapshot.
    pub verify: bool,
    /// Concurrent downloads.
    pub downloads: usize,
    /// The most chunk placements one batch of the plan holds (memory bound; see the module doc).
    pub batch_placements: usize,
    /// Drop the pages of large files and devices from the page cache once written
    /// (`crate::pagecache::WriteBehind`): for a target nobody else uses yet, such as a new volume in a
    /// memory-limited pod.
    pub drop_cache: bool,
}

impl RestoreOptions {
    /// Defaults for `target`.
    pub fn new(target: impl Into<PathBuf>) -> Self {
        RestoreOptions {
            target: target.into(),
            sparse: false,
            verify: false,
            downloads: 4,
            batch_placements: BATCH_PLACEMENTS,
            drop_cache: false,
        }
    }
}

/// Totals of a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Non-directories restored.
    pub files: u64,
    /// Directories restored.
    pub dirs: u64,
    /// Logical bytes.
    pub bytes: u64,
    /// Metadata this system could not apply (e.g. `security.*` xattrs as non-root).
    pub warnings: Vec<String>,
}

impl RestoreSummary {
    /// The result document (`ferry_proto::result`) of this restore of snapshot `id`: what `ferry restore
    /// --json` prints and a restore pod writes as its termination message.
    pub fn result(&self, id: &SnapshotId) -> ferry_proto::result::RestoreResult {
        ferry_proto::result::RestoreResult {
            version: ferry_proto::result::RESULT_VERSION,
            snapshot_id: id.to_hex(),
            total_bytes: self.bytes,
            files: self.files,
            dirs: self.dirs,
        }
    }
}

/// The most chunk placements (a chunk at one offset of one file) one batch of the plan holds by default
/// ([`RestoreOptions::batch_placements`]). A placement costs about 100–200 bytes of plan, so a batch stays
/// within a few MiB; batches follow the walk, as the backup packed the chunks, so a batch's chunks fill few
/// packs and are read in long ranges.
const BATCH_PLACEMENTS: usize = 32 * 1024;

/// A file (or, for a large one, the part of it) that a batch writes.
struct PlannedFile {
    path: PathBuf,
    how: Write,
}

/// How step 2 writes a planned file.
#[derive(Clone)]
enum Write {
    /// Created in step 1 at its final size; chunks written at their offsets (zero ones skipped if sparse,
    /// else allocated without being written).
    Chunks,
    /// A block device: every chunk written, zeros too (a device does not read as zeros where unwritten).
    Device,
    /// A file of one chunk, created when the chunk arrives and given this metadata then.
    OnArrival(Box<Node>),
}

/// One part of the plan, written as a whole before the next.
#[derive(Default)]
struct Batch {
    files: Vec<PlannedFile>,
    /// Chunk -> (file in `files`, offset) for every place it goes in this batch.
    targets: HashMap<BlobId, Vec<(u32, u64)>>,
    placements: usize,
    /// Metadata of the files whose last chunk is in this batch, applied once it is written.
    file_meta: Vec<(PathBuf, Node)>,
}

/// What the whole restore needs after the last batch: hard links and directories' metadata.
#[derive(Default)]
struct Finish {
    /// Directories with their depth, for metadata deepest first.
    dir_meta: Vec<(PathBuf, Node, usize)>,
    links: Vec<(PathBuf, u64)>,
    link_origin: HashMap<u64, PathBuf>,
    summary: RestoreSummary,
}

/// Step 1: walks the snapshot, makes the structure, and hands the content plan on batch by batch.
struct Planner<'a> {
    repo: &'a Repository,
    index: &'a Index,
    rt: &'a tokio::runtime::Handle,
    as_root: bool,
    batch_placements: usize,
    batch: Batch,
    tx: tokio::sync::mpsc::Sender<Batch>,
    finish: Finish,
}

/// Makes sure `path` is a real directory created or vetted by us.
fn ensure_dir(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => std::fs::remove_file(path).map_err(|e| Error::io(path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    std::fs::create_dir(path).map_err(|e| Error::io(path, e))
}

/// Creates a new file at `path`, replacing a non-directory already there (never following a symlink).
fn create_file(path: &Path) -> Result<std::fs::File> {
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            clear_slot(path)?;
            create()
        }
        r => r,
    }
    .map_err(|e| Error::io(path, e))
}

/// A file node's metadata without its name and content (what a planned file keeps until it is written).
fn file_meta_only(node: &Node) -> Node {
    Node {
        name: Vec::new(),
        kind: NodeKind::File {
            content: Vec::new(),
        },
        xattrs: node.xattrs.clone(),
        hardlink: None,
        ..*node
    }
}

/// Removes whatever non-directory is at `path` so a new entry can be made there.
fn clear_slot(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::Invalid(format!(
            "{}: a directory is in the way",
            path.display()
        ))),
        Ok(_) => std::fs::remove_file(path).map_err(|e| Error::io(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Offset of each chunk in its file, and the file's total length.
fn offsets(index: &Index, content: &[BlobId]) -> Result<(Vec<u64>, u64)> {
    let mut off = 0u64;
    let mut out = Vec::with_capacity(content.len());
    for id in content {
        let loc = index
            .get(id)
            .ok_or_else(|| Error::Integrity(format!("chunk {} is not in the index", id.short())))?;
        if loc.kind != BlobKind::Data {
            return Err(Error::Integrity(format!(
                "chunk {} is not a data blob",
                id.short()
            )));
        }
        out.push(off);
        off += loc.raw_length as u64;
    }
    Ok((out, off))
}

impl Planner<'_> {
    /// Hands the current batch to the writer (waiting while it writes the previous one).
    fn flush(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        if batch.placements == 0 && batch.file_meta.is_empty() {
            return Ok(());
        }
        // The writer is gone only when it failed; its error is the restore's.
        self.tx.blocking_send(batch).map_err(|_| Error::Canceled)
    }

    /// Plans `content` of the file at `path`; `meta` is applied once its last chunk is written.
    fn add_file(
        &mut self,
        path: PathBuf,
        content: &[BlobId],
        size: u64,
        how: Write,
        meta: Option<Node>,
    ) -> Result<()> {
        let (offs, total) = offsets(self.index, content)?;
        if total != size {
            return Err(Error::Integrity(format!(
                "{}: chunks add up to {total} bytes, snapshot says {size}",
                path.display()
            )));
        }
        self.finish.summary.bytes += size;
        let mut here = None; // the file's index in the current batch
        for (id, off) in content.iter().zip(offs) {
            if self.batch.placements >= self.batch_placements {
                self.flush()?;
                here = None;
            }
            let f = *here.get_or_insert_with(|| {
                self.batch.files.push(PlannedFile {
                    path: path.clone(),
                    how: how.clone(),
                });
                self.batch.files.len() as u32 - 1
            });
            self.batch.targets.entry(*id).or_default().push((f, off));
            self.batch.placements += 1;
        }
        self.batch.file_meta.extend(meta.map(|m| (path, m)));
        Ok(())
    }

    fn create_node(&mut self, dir: &Path, node: &Node, depth: usize) -> Result<()> {
        if self.tx.is_closed() {
            return Err(Error::Canceled); // step 2 failed: create nothing more
        }
        let path = dir.join(std::ffi::OsStr::from_bytes(&node.name));
        let summary = &mut self.finish.summary;
        match &node.kind {
            NodeKind::Dir { subtree } => {
                ensure_dir(&path)?;
                summary.dirs += 1;
                let tree = self.rt.block_on(self.repo.read_tree(subtree))?;
                for n in &tree.nodes {
                    self.create_node(&path, n, depth + 1)?;
                }
                self.finish.dir_meta.push((path, node.clone(), depth));
                return Ok(());
            }
            NodeKind::File { content } => {
                summary.files += 1;
                if let Some(h) = node.hardlink {
                    if self.finish.link_origin.contains_key(&h) {
                        clear_slot(&path)?;
                        self.finish.links.push((path, h));
                        return Ok(());
                    }
                    self.finish.link_origin.insert(h, path.clone());
                }
                if content.len() == 1 {
                    let how = Write::OnArrival(Box::new(file_meta_only(node)));
                    return self.add_file(path, content, node.size, how, None);
                }
                let f = create_file(&path)?;
                if content.is_empty() {
                    let w = fsmeta::apply_open(&f, &path, node, self.as_root)?;
                    summary.warnings.extend(w);
                    return Ok(());
                }
                f.set_len(node.size).map_err(|e| Error::io(&path, e))?;
                let meta = Some(file_meta_only(node));
                return self.add_file(path, content, node.size, Write::Chunks, meta);
            }
            NodeKind::Symlink { target } => {
                clear_slot(&path)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path)
                    .map_err(|e| Error::io(&path, e))?;
            }
            NodeKind::Fifo => {
                clear_slot(&path)?;
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(node.mode))
                    .map_err(|e| Error::io(&path, e.into()))?;
            }
            NodeKind::CharDevice { rdev } | NodeKind::BlockDevice { rdev } => {
                if !self.as_root {
                    summary.files += 1;
                    summary.warnings.push(format!(
                        "{}: device node not created (needs root)",
                        path.display()
                    ));
                    return Ok(());
                }
                clear_slot(&path)?;
                let kind = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                nix::sys::stat::mknod(
                    &path,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(node.mode),
                    *rdev,
                )
                .map_err(|e| Error::io(&path, e.into()))?;
            }
            NodeKind::Socket => {
                summary.files += 1;
                return Ok(());
            }
        }
        summary.files += 1;
        self.batch.file_meta.push((path, node.clone()));
        Ok(())
    }

    /// Step 1 for a directory snapshot: the target directory, then every entry.
    fn plan_tree(&mut self, root: &Tree, target: &Path) -> Result<()> {
        std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
        if !std::fs::symlink_metadata(target)
            .map_err(|e| Error::io(target, e))?
            .is_dir()
        {
            return Err(Error::Invalid(format!(
                "{}: restore target must be a directory",
                target.display()
            )));
        }
        self.finish.summary.dirs += 1;
        for n in &root.nodes {
            self.create_node(target, n, 1)?;
        }
        Ok(())
    }

    /// Step 1 for a block snapshot: the device (checked large enough) or an image file of the size.
    fn plan_block(&mut self, root: &Tree, target: &Path) -> Result<()> {
        let [node] = root.nodes.as_slice() else {
            return Err(Error::Format(
                "a block snapshot must hold exactly one entry".into(),
            ));
        };
        let NodeKind::File { content } = &node.kind else {
            return Err(Error::Format(
                "a block snapshot's entry must be a file".into(),
            ));
        };
        let device = std::fs::metadata(target)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if device {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .map_err(|e| Error::io(target, e))?;
            let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
                .map_err(|e| Error::io(target, e))?;
            if size < node.size {
                return Err(Error::Invalid(format!(
                    "{}: device has {size} bytes, the snapshot needs {}",
                    target.display(),
                    node.size
                )));
            }
        } else {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(target)
                .map_err(|e| Error::io(target, e))?;
            f.set_len(node.size).map_err(|e| Error::io(target, e))?;
        }
        self.finish.summary.files = 1;
        let how = if device { Write::Device } else { Write::Chunks };
        self.add_file(target.to_path_buf(), content, node.size, how, None)
    }
}

/// One ranged read covering several blobs of a pack.
struct Range {
    pack: PackId,
    start: u64,
    len: u64,
    blobs: Vec<(BlobId, u64, u32, u32)>, // id, offset in pack, length, raw length
}

fn plan_ranges(index: &Index, ids: impl Iterator<Item = BlobId>) -> Result<Vec<Range>> {
    const GAP: u64 = 256 * 1024;
    // Bounds memory: at most `downloads` ranges of this size are held at once.
    const MAX: u64 = 8 * 1024 * 1024;
    let mut by_pack: HashMap<PackId, Vec<(BlobId, u64, u32, u32)>> = HashMap::new();
    for id in ids {
        let l = index
            .get(&id)
            .ok_or_else(|| Error::Integrity(format!("chunk {} is not in the index", id.short())))?;
        by_pack
            .entry(l.pack)
            .or_default()
            .push((id, l.offset as u64, l.length, l.raw_length));
    }
    let mut out = Vec::new();
    for (pack, mut blobs) in by_pack {
        blobs.sort_by_key(|b| b.1);
        let mut cur: Option<Range> = None;
        for b in blobs {
            if let Some(r) = &mut cur
                && b.1 <= r.start + r.len + GAP
                && b.1 + b.2 as u64 - r.start <= MAX
            {
                r.len = b.1 + b.2 as u64 - r.start;
                r.blobs.push(b);
                continue;
            }
            out.extend(cur.take());
            cur = Some(Range {
                pack,
                start: b.1,
                len: b.2 as u64,
                blobs: vec![b],
            });
        }
        out.extend(cur);
    }
    // Largest first keeps the tail of the restore short.
    out.sort_by_key(|r| std::cmp::Reverse(r.len));
    Ok(out)
}

/// Reads a range of a pack. When the pack is gone (a concurrent prune moved its used blobs into new
/// packs), reads the index again and the blobs from where they are now.
async fn fetch(repo: &Repository, r: Range) -> Result<Vec<(Range, Bytes)>> {
    let mut todo = vec![r];
    let mut out = Vec::new();
    let mut lost = None;
    for moves in 0..=crate::repo::MAX_RELOCATIONS {
        let mut gone = Vec::new();
        for r in todo {
            match repo
                .backend()
                .get_range(&r.pack.key(), r.start, r.len)
                .await
            {
                Ok(b) => out.push((r, b)),
                Err(Error::NotFound(_)) => gone.push(r),
                Err(e) => return Err(e),
            }
        }
        let Some(first) = gone.first() else {
            return Ok(out);
        };
        lost = Some(first.pack);
        if moves == crate::repo::MAX_RELOCATIONS {
            break;
        }
        tracing::info!(pack = %first.pack.short(), "a pack was pruned meanwhile; reading the index again");
        let index = repo.load_index().await?;
        todo = plan_ranges(
            &index,
            gone.iter().flat_map(|r| r.blobs.iter().map(|b| b.0)),
        )?;
        if todo.iter().any(|t| gone.iter().any(|g| g.pack == t.pack)) {
            break; // the index still names the missing pack: it is lost, not moved
        }
    }
    Err(Error::Integrity(format!(
        "pack {} is missing from the repository",
        lost.map(|p| p.key()).unwrap_or_default()
    )))
}

/// Makes `len` bytes at `offset` of a file created in step 1 (where it still reads as zeros) allocated, as a
/// restore that is not sparse leaves them, without writing them: `fallocate` gives the range blocks marked
/// unwritten, which read as zeros and cost no data I/O, where writing the zeros cost as much as writing
/// data (a mostly empty 2 GiB image took 7 s to restore, most of it zeros). Written as zeros where the
/// filesystem cannot allocate that way.
fn allocate_zeros(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    match nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::empty(),
        offset as libc::off_t,
        len as libc::off_t,
    ) {
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {
            file.write_all_at(&vec![0u8; len as usize], offset)
        }
        r => r.map_err(std::io::Error::from),
    }
}

/// Writes `len` zero bytes to a block device at `offset` without sending them through the page cache: the
/// page-aligned middle with `fallocate(FALLOC_FL_ZERO_RANGE)` (the device's write-zeroes command, or the
/// kernel writing zeros itself where the device has none), the unaligned edges as plain writes. The empty
/// regions of a volume cost almost nothing to restore and to flush.
fn zero_device_range(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    const PAGE: u64 = 4096;
    let (start, end) = (offset.next_multiple_of(PAGE), (offset + len) / PAGE * PAGE);
    if start >= end {
        return file.write_all_at(&vec![0u8; len as usize], offset);
    }
    file.write_all_at(&vec![0u8; (start - offset) as usize], offset)?;
    file.write_all_at(&vec![0u8; (offset + len - end) as usize], end)?;
    nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE,
        start as libc::off_t,
        (end - start) as libc::off_t,
    )
    .map_err(std::io::Error::from)
}

/// How step 2 writes every chunk of a restore.
struct Writer {
    sparse: bool,
    as_root: bool,
    behind: Option<WriteBehind>,
}

/// Writes one decoded chunk at each of its places in the batch. Returns warnings of metadata applied to
/// files created on arrival.
fn write_chunk(
    batch: &Batch,
    targets: &[(u32, u64)],
    data: &[u8],
    how: &Writer,
) -> Result<Vec<String>> {
    let all_zero = data.iter().all(|&b| b == 0); // stops at the first non-zero byte
    let zero = how.sparse && all_zero;
    let mut warnings = Vec::new();
    for &(f, off) in targets {
        let pf = &batch.files[f as usize];
        let io = |e| Error::io(&pf.path, e);
        match &pf.how {
            Write::OnArrival(node) => {
                let file = create_file(&pf.path)?;
                if zero {
                    file.set_len(node.size).map_err(io)?;
                } else {
                    file.write_all_at(data, off).map_err(io)?;
                }
                warnings.extend(fsmeta::apply_open(&file, &pf.path, node, how.as_root)?);
            }
            // A fresh file already reads as zeros there.
            Write::Chunks if zero => {}
            Write::Chunks | Write::Device => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&pf.path)
                    .map_err(io)?;
                if all_zero && matches!(pf.how, Write::Device) {
                    zero_device_range(&file, off, data.len() as u64).map_err(io)?;
                } else if all_zero {
                    allocate_zeros(&file, off, data.len() as u64).map_err(io)?;
                } else {
                    file.write_all_at(data, off).map_err(io)?;
                    if let Some(b) = &how.behind {
                        b.wrote(&file, off, data.len() as u64);
                    }
                }
            }
        }
    }
    Ok(warnings)
}

/// Checks a written batch: every placement read back and hashed against its chunk id.
fn verify_batch(
    repo: &Repository,
    index: &Index,
    batch: &Batch,
    progress: &Progress,
) -> Result<()> {
    let mut places: Vec<(u32, u64, &BlobId)> = batch
        .targets
        .iter()
        .flat_map(|(id, t)| t.iter().map(move |&(f, off)| (f, off, id)))
        .collect();
    places.sort_unstable_by_key(|p| (p.0, p.1));
    let mut open: Option<(u32, std::fs::File)> = None;
    for (f, off, id) in places {
        progress.check()?;
        let path = &batch.files[f as usize].path;
        if open.as_ref().is_none_or(|o| o.0 != f) {
            open = Some((
                f,
                std::fs::File::open(path).map_err(|e| Error::io(path, e))?,
            ));
        }
        let file = &open.as_ref().expect("opened above").1;
        let len = index.get(id).map(|l| l.raw_length as usize).unwrap_or(0);
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off)
            .map_err(|e| Error::io(path, e))?;
        if repo.keys().blob_id(&buf) != *id {
            return Err(Error::Integrity(format!(
                "{}: content at offset {off} differs from the snapshot",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Step 2 for one batch: its chunks fetched by pack and written, then its files' metadata (and, with
/// `verify`, every placement read back). Returns the metadata warnings.
async fn write_batch(
    repo: &Arc<Repository>,
    index: &Arc<Index>,
    batch: Batch,
    opts: &RestoreOptions,
    progress: &Arc<Progress>,
    writer: &Arc<Writer>,
) -> Result<Vec<String>> {
    let batch = Arc::new(batch);
    let ranges = plan_ranges(index, batch.targets.keys().copied())?;
    let warnings = stream::iter(ranges)
        .map(|r| {
            let (repo, batch, progress, writer) = (
                repo.clone(),
                batch.clone(),
                progress.clone(),
                writer.clone(),
            );
            async move {
                progress.check()?;
                let fetched = fetch(&repo, r).await?;
                let mut warnings = Vec::new();
                for (r, bytes) in fetched {
                    Progress::add(&progress.bytes_transferred, r.len);
                    let (repo, batch, progress, writer) = (
                        repo.clone(),
                        batch.clone(),
                        progress.clone(),
                        writer.clone(),
                    );
                    let w = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
                        // Blobs are decrypted where they arrived: the range is this task's alone.
                        let mut bytes = bytes
                            .try_into_mut()
                            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                        let mut warnings = Vec::new();
                        for (id, off, len, raw) in &r.blobs {
                            let s = (off - r.start) as usize;
                            let data = pack::decode_blob_in_place(
                                repo.keys(),
                                BlobKind::Data,
                                id,
                                &mut bytes[s..s + *len as usize],
                            )?;
                            let targets = &batch.targets[id];
                            warnings.extend(write_chunk(&batch, targets, &data, &writer)?);
                            Progress::add(&progress.bytes_done, *raw as u64 * targets.len() as u64);
                        }
                        Ok(warnings)
                    })
                    .await
                    .map_err(|e| Error::Invalid(format!("restore writer: {e}")))??;
                    warnings.extend(w);
                }
                Ok::<_, Error>(warnings)
            }
        })
        .buffer_unordered(opts.downloads.max(1))
        .try_concat()
        .await?;
    let (repo, index, progress, verify, as_root) = (
        repo.clone(),
        index.clone(),
        progress.clone(),
        opts.verify,
        writer.as_root,
    );
    tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let mut warnings = warnings;
        for (path, node) in &batch.file_meta {
            warnings.extend(fsmeta::apply(path, node, as_root)?);
        }
        if verify {
            verify_batch(&repo, &index, &batch, &progress)?;
        }
        Ok(warnings)
    })
    .await
    .map_err(|e| Error::Invalid(format!("restore metadata: {e}")))?
}

/// Step 4: flushes what the restore wrote to stable storage, and reports a failed write-back.
fn sync_target(target: &Path) -> Result<()> {
    let f = std::fs::File::open(target).map_err(|e| Error::io(target, e))?;
    let is_dir = f.metadata().map_err(|e| Error::io(target, e))?.is_dir();
    if is_dir {
        nix::unistd::syncfs(&f).map_err(|e| Error::io(target, e.into()))
    } else {
        f.sync_all().map_err(|e| Error::io(target, e))
    }
}

/// Restores `snap` according to `opts`.
pub async fn restore(
    repo: Arc<Repository>,
    snap: &Snapshot,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary> {
    let index = repo.index().await?;
    let root = repo.read_tree(&snap.tree).await?;
    progress.set_phase(Phase::Running);
    // The snapshot's own totals: the plan is never whole in memory to count them.
    progress.set_totals(snap.summary.files, snap.summary.total_bytes);
    let as_root = fsmeta::is_root();

    // 1. Structure and plan, on a thread of its own, one batch ahead of step 2.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(1);
    let planner = {
        let (repo, index, target, block, batch_placements) = (
            repo.clone(),
            index.clone(),
            opts.target.clone(),
            snap.source == SourceKind::Block,
            opts.batch_placements.max(1),
        );
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<Finish> {
            let mut p = Planner {
                repo: &repo,
                index: &index,
                rt: &rt,
                as_root,
                batch_placements,
                batch: Batch::default(),
                tx,
                finish: Finish::default(),
            };
            if block {
                p.plan_block(&root, &target)?;
            } else {
                p.plan_tree(&root, &target)?;
            }
            p.flush()?;
            Ok(p.finish)
        })
    };

    // 2. Content, batch by batch.
    let writer = Arc::new(Writer {
        sparse: opts.sparse,
        as_root,
        behind: opts.drop_cache.then(WriteBehind::default),
    });
    let mut warnings = Vec::new();
    while let Some(batch) = rx.recv().await {
        match write_batch(&repo, &index, batch, opts, &progress, &writer).await {
            Ok(w) => warnings.extend(w),
            Err(e) => {
                drop(rx); // the planner stops at its next batch
                let _ = planner.await;
                return Err(e);
            }
        }
    }
    let finish = planner
        .await
        .map_err(|e| Error::Invalid(format!("restore planner: {e}")))??;

    // 3. Links and directories' metadata.
    progress.set_phase(Phase::Finishing);
    let (p, target) = (progress.clone(), opts.target.clone());
    let summary = tokio::task::spawn_blocking(move || -> Result<RestoreSummary> {
        let mut summary = finish.summary;
        summary.warnings.append(&mut warnings);
        for (path, key) in &finish.links {
            std::fs::hard_link(&finish.link_origin[key], path).map_err(|e| Error::io(path, e))?;
        }
        let mut dirs: Vec<_> = finish.dir_meta.iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.2));
        for (path, node, _) in dirs {
            summary.warnings.extend(fsmeta::apply(path, node, as_root)?);
        }
        Progress::add(&p.files_done, summary.files);
        sync_target(&target)?;
        if let Some(b) = &writer.behind {
            b.finish(); // all on disk now: this drops the rest
        }
        Ok(summary)
    })
    .await
    .map_err(|e| Error::Invalid(format!("restore metadata: {e}")))??;
    progress.set_phase(Phase::Done);
    Ok(summary)
}
