//! Reading metadata from the filesystem into tree nodes, and applying it back on restore.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::tree::{Node, NodeKind};

/// Builds a node for `path` from its `lstat` metadata. File content, subtrees and hard-link groups are
/// filled in by the walker.
pub fn node_from(name: &OsStr, path: &Path, meta: &Metadata) -> Result<Node> {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        NodeKind::File {
            content: Vec::new(),
        }
    } else if ft.is_dir() {
        NodeKind::Dir {
            subtree: BlobId([0; 32]),
        }
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(|e| Error::io(path, e))?;
        NodeKind::Symlink {
            target: t.as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_fifo() {
        NodeKind::Fifo
    } else if ft.is_char_device() {
        NodeKind::CharDevice { rdev: meta.rdev() }
    } else if ft.is_block_device() {
        NodeKind::BlockDevice { rdev: meta.rdev() }
    } else {
        NodeKind::Socket
    };
    let mut xattrs = Vec::new();
    match xattr::list(path) {
        Ok(names) => {
            for n in names {
                match xattr::get(path, &n) {
                    Ok(Some(v)) => xattrs.push((n.as_bytes().to_vec(), v)),
                    Ok(None) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(path, e)),
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    xattrs.sort();
    Ok(Node {
        name: name.as_bytes().to_vec(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: if ft.is_file() { meta.len() } else { 0 },
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec() as u32,
        xattrs,
        hardlink: None,
    })
}

/// Whether this process may set owners and create device nodes.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Applies owner, mode, xattrs and mtime to an entry already in place (never following symlinks).
/// Returns warnings for metadata this filesystem or user cannot take (e.g. `security.*` xattrs).
pub fn apply(path: &Path, node: &Node, as_root: bool) -> Result<Vec<String>> {
    apply_to(Entry::Path(path), node, as_root)
}

/// [`apply`] through an open file (`fchown`, `fsetxattr`, `fchmod`, `futimens`): no path lookups, for a
/// file the restore has just created and written. `path` is for messages.
pub fn apply_open(
    file: &std::fs::File,
    path: &Path,
    node: &Node,
    as_root: bool,
) -> Result<Vec<String>> {
    apply_to(Entry::Open(file, path), node, as_root)
}

/// Where metadata goes: a path (not followed if a symlink) or an open file.
#[derive(Clone, Copy)]
enum Entry<'a> {
    Path(&'a Path),
    Open(&'a std::fs::File, &'a Path),
}

fn apply_to(entry: Entry<'_>, node: &Node, as_root: bool) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    use xattr::FileExt;
    let path = match entry {
        Entry::Path(p) | Entry::Open(_, p) => p,
    };
    let io = |e| Error::io(path, e);
    let mut warnings = Vec::new();
    if as_root {
        match entry {
            Entry::Path(p) => std::os::unix::fs::lchown(p, Some(node.uid), Some(node.gid)),
            Entry::Open(f, _) => std::os::unix::fs::fchown(f, Some(node.uid), Some(node.gid)),
        }
        .map_err(io)?;
    }
    for (k, v) in &node.xattrs {
        let name = OsStr::from_bytes(k);
        let set = match entry {
            Entry::Path(p) => xattr::set(p, name, v),
            Entry::Open(f, _) => f.set_xattr(name, v),
        };
        if let Err(e) = set {
            warnings.push(format!(
                "{}: xattr {}: {e}",
                path.display(),
                String::from_utf8_lossy(k)
            ));
        }
    }
    let t = filetime::FileTime::from_unix_time(node.mtime_sec, node.mtime_nsec);
    let mode = std::fs::Permissions::from_mode(node.mode);
    match entry {
        Entry::Path(p) => {
            if !matches!(node.kind, NodeKind::Symlink { .. }) {
                std::fs::set_permissions(p, mode).map_err(io)?;
            }
            filetime::set_symlink_file_times(p, t, t).map_err(io)?;
        }
        Entry::Open(f, _) => {
            f.set_permissions(mode).map_err(io)?;
            filetime::set_file_handle_times(f, Some(t), Some(t)).map_err(io)?;
        }
    }
    Ok(warnings)
}

/// Compares two trees entry by entry: names, types, content, mode, owner, mtime (non-directories), symlink
/// targets, xattrs, and hard-link grouping. Returns the number of entries compared, or the first difference.
/// Used by `ferry demo` and the tests.
pub fn compare_trees(a: &Path, b: &Path) -> std::result::Result<u64, String> {
    let mut links_a = std::collections::HashMap::new();
    let mut links_b = std::collections::HashMap::new();
    compare_dir(a, b, Path::new(""), &mut links_a, &mut links_b)
}

type LinkMap = std::collections::HashMap<(u64, u64), std::path::PathBuf>;

fn compare_dir(
    ra: &Path,
    rb: &Path,
    rel: &Path,
    la: &mut LinkMap,
    lb: &mut LinkMap,
) -> std::result::Result<u64, String> {
    let (a, b) = (&ra.join(rel), &rb.join(rel));
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let list = |d: &Path| -> std::result::Result<Vec<std::ffi::OsString>, String> {
        let mut v = std::fs::read_dir(d)
            .map_err(|e| err(d, e))?
            .map(|e| e.map(|e| e.file_name()).map_err(|e| err(d, e)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        v.sort();
        Ok(v)
    };
    let (na, nb) = (list(a)?, list(b)?);
    if na != nb {
        return Err(format!("{}: entries differ: {na:?} vs {nb:?}", b.display()));
    }
    let mut n = 0;
    for name in na {
        let (pa, pb) = (a.join(&name), b.join(&name));
        let ma = std::fs::symlink_metadata(&pa).map_err(|e| err(&pa, e))?;
        let mb = std::fs::symlink_metadata(&pb).map_err(|e| err(&pb, e))?;
        let diff = |what: &str| Err(format!("{}: {what} differs", pb.display()));
        if ma.file_type() != mb.file_type() {
            return diff("type");
        }
        if !ma.file_type().is_symlink() && ma.mode() != mb.mode() {
            return diff("mode");
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            return diff("owner");
        }
        if !ma.is_dir() && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            return diff("mtime");
        }
        let xa: Vec<_> = xattr::list(&pa).map(|l| l.collect()).unwrap_or_default();
        let xb: Vec<_> = xattr::list(&pb).map(|l| l.collect()).unwrap_or_default();
        if xa.len() != xb.len()
            || xa
                .iter()
                .any(|k| xattr::get(&pa, k).ok() != xattr::get(&pb, k).ok())
        {
            return diff("xattrs");
        }
        if ma.is_dir() {
            n += compare_dir(ra, rb, &rel.join(&name), la, lb)?;
        } else if ma.file_type().is_symlink() {
            if std::fs::read_link(&pa).ok() != std::fs::read_link(&pb).ok() {
                return diff("link target");
            }
        } else if ma.is_file() {
            if std::fs::read(&pa).map_err(|e| err(&pa, e))?
                != std::fs::read(&pb).map_err(|e| err(&pb, e))?
            {
                return diff("content");
            }
            if ma.nlink() > 1 {
                let here = rel.join(&name);
                let first_a = la
                    .entry((ma.dev(), ma.ino()))
                    .or_insert_with(|| here.clone())
                    .clone();
                let first_b = lb
                    .entry((mb.dev(), mb.ino()))
                    .or_insert_with(|| here.clone())
                    .clone();
                if first_a != first_b {
                    return diff("hard-link grouping");
                }
            }
        } else if (ma.file_type().is_char_device() || ma.file_type().is_block_device())
            && ma.rdev() != mb.rdev()
        {
            return diff("device number");
        }
        n += 1;
    }
    Ok(n)
}
