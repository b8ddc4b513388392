//! Restore: recreate a snapshot's tree under a target directory (or write a block snapshot into a device
//! or image file).
//!
//! 1. Walk the trees; create directories, files of several chunks at their final size, empty files,
//!    symlinks, FIFOs and devices; plan which chunk goes to which file offsets.
//! 2. Group the chunks by pack, merge nearby ones into ranged reads, fetch in parallel, decrypt and verify
//!    every chunk against its id, write it at its offsets (all-zero chunks are skipped with `--sparse`).
//!    A file of one chunk (most files of a tree of many small files) is created when its chunk arrives,
//!    written, and given its metadata through the open descriptor: one open and no path lookup after it,
//!    instead of a create in step 1, an open in step 2 and three path-based calls in step 3.
//! 3. Hard links, then metadata: files first, directories deepest first (so writing children does not
//!    disturb a directory's mtime).
//!
//! Safety: names come from validated trees (single components, no duplicates), every directory entered is
//! one this restore created or found as a real directory (never a symlink), and files are opened with
//! `O_NOFOLLOW`, so nothing is written outside the target.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::fsmeta;
use crate::id::{BlobId, PackId, SnapshotId};
use crate::index::Index;
use crate::pack::{self, BlobKind};
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
}

impl RestoreOptions {
    /// Defaults for `target`.
    pub fn new(target: impl Into<PathBuf>) -> Self {
        RestoreOptions {
            target: target.into(),
            sparse: false,
            verify: false,
            downloads: 4,
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

struct PlannedFile {
    path: PathBuf,
    content: Vec<BlobId>,
    how: Write,
}

/// How step 2 writes a planned file.
enum Write {
    /// Created in step 1 at its final size; chunks written at their offsets (zero ones skipped if sparse).
    Chunks,
    /// A block device: every chunk written, zeros too (a device does not read as zeros where unwritten).
    Device,
    /// A file of one chunk, created when the chunk arrives and given this metadata then.
    OnArrival(Box<Node>),
}

#[derive(Default)]
struct Plan {
    files: Vec<PlannedFile>,
    /// Chunk -> (file, offset) for every place it goes.
    targets: HashMap<BlobId, Vec<(u32, u64)>>,
    /// Metadata to apply after content: files, then directories (deepest first).
    file_meta: Vec<(PathBuf, Node)>,
    dir_meta: Vec<(PathBuf, Node, usize)>,
    links: Vec<(PathBuf, u64)>,
    link_origin: HashMap<u64, PathBuf>,
    summary: RestoreSummary,
    /// Owners can be set (and are).
    as_root: bool,
    /// Warnings of step 2 (metadata of files created on arrival).
    late_warnings: std::sync::Mutex<Vec<String>>,
}

/// What planning needs besides the plan itself.
struct Env<'a> {
    repo: &'a Repository,
    index: &'a Index,
    rt: &'a tokio::runtime::Handle,
    as_root: bool,
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

impl Plan {
    fn add_file(
        &mut self,
        index: &Index,
        path: PathBuf,
        content: &[BlobId],
        size: u64,
        how: Write,
    ) -> Result<()> {
        let (offs, total) = offsets(index, content)?;
        if total != size {
            return Err(Error::Integrity(format!(
                "{}: chunks add up to {total} bytes, snapshot says {size}",
                path.display()
            )));
        }
        let f = self.files.len() as u32;
        for (id, o) in content.iter().zip(offs) {
            self.targets.entry(*id).or_default().push((f, o));
        }
        self.summary.bytes += size;
        self.files.push(PlannedFile {
            path,
            content: content.to_vec(),
            how,
        });
        Ok(())
    }

    fn create_node(&mut self, env: &Env<'_>, dir: &Path, node: &Node, depth: usize) -> Result<()> {
        let path = dir.join(std::ffi::OsStr::from_bytes(&node.name));
        match &node.kind {
            NodeKind::Dir { subtree } => {
                ensure_dir(&path)?;
                self.summary.dirs += 1;
                let tree = env.rt.block_on(env.repo.read_tree(subtree))?;
                for n in &tree.nodes {
                    self.create_node(env, &path, n, depth + 1)?;
                }
                self.dir_meta.push((path, node.clone(), depth));
                return Ok(());
            }
            NodeKind::File { content } => {
                self.summary.files += 1;
                if let Some(h) = node.hardlink {
                    if self.link_origin.contains_key(&h) {
                        clear_slot(&path)?;
                        self.links.push((path, h));
                        return Ok(());
                    }
                    self.link_origin.insert(h, path.clone());
                }
                if content.len() == 1 {
                    let how = Write::OnArrival(Box::new(file_meta_only(node)));
                    return self.add_file(env.index, path, content, node.size, how);
                }
                let f = create_file(&path)?;
                if content.is_empty() {
                    let w = fsmeta::apply_open(&f, &path, node, env.as_root)?;
                    self.summary.warnings.extend(w);
                    return Ok(());
                }
                f.set_len(node.size).map_err(|e| Error::io(&path, e))?;
                self.add_file(env.index, path.clone(), content, node.size, Write::Chunks)?;
                self.file_meta.push((path, file_meta_only(node)));
                return Ok(());
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
                if !env.as_root {
                    self.summary.warnings.push(format!(
                        "{}: device node not created (needs root)",
                        path.display()
                    ));
                    self.summary.files += 1;
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
                self.summary.files += 1;
                return Ok(());
            }
        }
        self.summary.files += 1;
        self.file_meta.push((path, node.clone()));
        Ok(())
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

fn write_chunk(plan: &Plan, targets: &[(u32, u64)], data: &[u8], sparse: bool) -> Result<()> {
    let zero = sparse && data.iter().all(|&b| b == 0);
    for &(f, off) in targets {
        let pf = &plan.files[f as usize];
        let io = |e| Error::io(&pf.path, e);
        match &pf.how {
            Write::OnArrival(node) => {
                let file = create_file(&pf.path)?;
                if zero {
                    file.set_len(node.size).map_err(io)?;
                } else {
                    file.write_all_at(data, off).map_err(io)?;
                }
                let w = fsmeta::apply_open(&file, &pf.path, node, plan.as_root)?;
                if !w.is_empty() {
                    plan.late_warnings.lock().expect("warnings lock").extend(w);
                }
            }
            // A fresh file already reads as zeros there.
            Write::Chunks if zero => {}
            Write::Chunks | Write::Device => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&pf.path)
                    .map_err(io)?;
                file.write_all_at(data, off).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// Checks restored files against their chunk ids.
fn verify_files(repo: &Repository, index: &Index, plan: &Plan, progress: &Progress) -> Result<()> {
    for pf in &plan.files {
        let f = std::fs::File::open(&pf.path).map_err(|e| Error::io(&pf.path, e))?;
        let mut off = 0u64;
        for id in &pf.content {
            progress.check()?;
            let len = index.get(id).map(|l| l.raw_length as usize).unwrap_or(0);
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off)
                .map_err(|e| Error::io(&pf.path, e))?;
            if repo.keys().blob_id(&buf) != *id {
                return Err(Error::Integrity(format!(
                    "{}: content at offset {off} differs from the snapshot",
                    pf.path.display()
                )));
            }
            off += len as u64;
        }
    }
    Ok(())
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
    let as_root = fsmeta::is_root();

    // 1. Structure and plan.
    let plan = {
        let (repo, index, target, source) = (
            repo.clone(),
            index.clone(),
            opts.target.clone(),
            snap.source,
        );
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<Plan> {
            let mut plan = Plan {
                as_root,
                ..Plan::default()
            };
            if source == SourceKind::Block {
                plan_block(&mut plan, &index, &root, &target)?;
            } else {
                std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
                if !std::fs::symlink_metadata(&target)
                    .map_err(|e| Error::io(&target, e))?
                    .is_dir()
                {
                    return Err(Error::Invalid(format!(
                        "{}: restore target must be a directory",
                        target.display()
                    )));
                }
                plan.summary.dirs += 1;
                let env = Env {
                    repo: &repo,
                    index: &index,
                    rt: &rt,
                    as_root,
                };
                for n in &root.nodes {
                    plan.create_node(&env, &target, n, 1)?;
                }
            }
            Ok(plan)
        })
        .await
        .map_err(|e| Error::Invalid(format!("restore planner: {e}")))??
    };
    progress.set_totals(plan.summary.files, plan.summary.bytes);

    // 2. Content, by pack.
    let plan = Arc::new(plan);
    let ranges = plan_ranges(&index, plan.targets.keys().copied())?;
    stream::iter(ranges)
        .map(|r| {
            let (repo, plan, progress, sparse) =
                (repo.clone(), plan.clone(), progress.clone(), opts.sparse);
            async move {
                progress.check()?;
                let fetched = fetch(&repo, r).await?;
                for (r, bytes) in fetched {
                    Progress::add(&progress.bytes_transferred, r.len);
                    let (repo, plan, progress) = (repo.clone(), plan.clone(), progress.clone());
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        for (id, off, len, raw) in &r.blobs {
                            let s = (off - r.start) as usize;
                            let data = pack::decode_blob(
                                repo.keys(),
                                BlobKind::Data,
                                id,
                                &bytes[s..s + *len as usize],
                            )?;
                            let targets = &plan.targets[id];
                            write_chunk(&plan, targets, &data, sparse)?;
                            Progress::add(&progress.bytes_done, *raw as u64 * targets.len() as u64);
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| Error::Invalid(format!("restore writer: {e}")))??;
                }
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(opts.downloads.max(1))
        .try_collect::<()>()
        .await?;

    // 3. Links and metadata.
    progress.set_phase(Phase::Finishing);
    let verify = opts.verify;
    let p = progress.clone();
    let summary = tokio::task::spawn_blocking(move || -> Result<RestoreSummary> {
        let progress = p;
        let mut summary = plan.summary.clone();
        summary
            .warnings
            .append(&mut plan.late_warnings.lock().expect("warnings lock"));
        for (path, key) in &plan.links {
            std::fs::hard_link(&plan.link_origin[key], path).map_err(|e| Error::io(path, e))?;
        }
        for (path, node) in &plan.file_meta {
            summary.warnings.extend(fsmeta::apply(path, node, as_root)?);
        }
        let mut dirs: Vec<_> = plan.dir_meta.iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.2));
        for (path, node, _) in dirs {
            summary.warnings.extend(fsmeta::apply(path, node, as_root)?);
        }
        if verify {
            verify_files(&repo, &index, &plan, &progress)?;
        }
        Progress::add(&progress.files_done, summary.files);
        Ok(summary)
    })
    .await
    .map_err(|e| Error::Invalid(format!("restore metadata: {e}")))??;
    progress.set_phase(Phase::Done);
    Ok(summary)
}

fn plan_block(plan: &mut Plan, index: &Index, root: &Tree, target: &Path) -> Result<()> {
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
    plan.summary.files = 1;
    let how = if device { Write::Device } else { Write::Chunks };
    plan.add_file(index, target.to_path_buf(), content, node.size, how)?;
    Ok(())
}
