//! The test volumes: a tree with the shapes a data path must keep (nested directories, an empty file and
//! directory, a multi-MiB file, modes, a symlink), a big file for cancel and deadlines, and the comparison
//! of a restored tree with its source.

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};

/// Deterministic bytes (xorshift), incompressible enough to make a data path work.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the test tree under `root` (created).
pub fn write_tree(root: &Path) -> Result<()> {
    let w = |rel: &str, data: &[u8], mode: u32| -> Result<()> {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    std::fs::create_dir_all(root.join("empty-dir"))?;
    w("a/b/c/deep.txt", b"deep\n", 0o644)?;
    w("empty", b"", 0o644)?;
    w("big.bin", &pseudo_random(3 << 20, 7), 0o600)?;
    w("run.sh", b"#!/bin/sh\necho hi\n", 0o755)?;
    w("read-only.txt", b"read only\n", 0o444)?;
    w("name with spaces and \u{00e9}.txt", b"unicode\n", 0o644)?;
    symlink("a/b/c/deep.txt", root.join("link"))?;
    Ok(())
}

/// Writes one file of `mib` MiB under `root` (created).
pub fn write_big(root: &Path, mib: u64) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let mut f = std::fs::File::create(root.join("big.bin"))?;
    for i in 0..mib {
        std::io::Write::write_all(&mut f, &pseudo_random(1 << 20, 1000 + i))?;
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
enum Entry {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(PathBuf),
}

fn entries(root: &Path) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(root)?.to_path_buf();
            // A filesystem's own lost+found is not data.
            if rel == Path::new("lost+found") {
                continue;
            }
            let m = std::fs::symlink_metadata(&p)?;
            let mode = m.permissions().mode() & 0o7777;
            let entry = if m.file_type().is_symlink() {
                Entry::Link(std::fs::read_link(&p)?)
            } else if m.is_dir() {
                todo.push(p.clone());
                Entry::Dir(mode)
            } else {
                Entry::File(mode, std::fs::read(&p)?)
            };
            out.insert(rel, entry);
        }
    }
    Ok(out)
}

/// `Err` naming the first difference between the trees at `a` and `b`.
pub fn same_tree(a: &Path, b: &Path) -> Result<()> {
    let (ea, eb) = (entries(a)?, entries(b)?);
    for (p, e) in &ea {
        match eb.get(p) {
            None => anyhow::bail!("{} is missing from the restore", p.display()),
            Some(f) if f != e => anyhow::bail!(
                "{} differs: {} restored as {}",
                p.display(),
                describe(e),
                describe(f)
            ),
            Some(_) => {}
        }
    }
    let extra: Vec<_> = eb.keys().filter(|p| !ea.contains_key(*p)).collect();
    ensure!(extra.is_empty(), "restore has extra entries: {extra:?}");
    Ok(())
}

fn describe(e: &Entry) -> String {
    match e {
        Entry::Dir(m) => format!("a directory {m:o}"),
        Entry::File(m, d) => format!("a file {m:o} of {} bytes", d.len()),
        Entry::Link(t) => format!("a symlink to {}", t.display()),
    }
}
