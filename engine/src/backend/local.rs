//! Local filesystem backend: one file per object, written to a temporary name, synced, then renamed.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ObjectInfo};
use crate::error::{Error, Result};

/// A repository in a local directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// A backend rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::Invalid(format!("bad object key {key:?}")));
        }
        Ok(self.root.join(key))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("storage worker panicked: {e}")))?
}

/// Writes `data` durably to a temporary file beside `path`, then lets `publish` move it into place (rename
/// or link), then syncs the directory. The temporary file never outlives a failure.
fn write_via_temp<T>(
    path: &Path,
    data: &[u8],
    publish: impl FnOnce(&Path, &Path) -> std::io::Result<T>,
) -> Result<T> {
    let dir = path.parent().expect("keys have a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rnd = [0u8; 8];
    crate::crypto::fill_random(&mut rnd)?;
    let tmp = dir.join(format!(".tmp-{}", hex::encode(rnd)));
    let write = || -> std::io::Result<T> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        let out = publish(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

fn not_found_or(key: &str, path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound(key.to_string())
    } else {
        Error::io(path, e)
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        blocking(move || {
            write_via_temp(&path, &data, |tmp, path| {
                std::fs::rename(tmp, path)?;
                Ok(())
            })
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        let path = self.path(key)?;
        blocking(move || {
            write_via_temp(&path, &data, |tmp, path| {
                // link(2) never replaces an existing name: exactly one racer wins.
                let won = match std::fs::hard_link(tmp, path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(e),
                };
                std::fs::remove_file(tmp)?;
                Ok(won)
            })
        })
        .await
    }

    fn settle_delay(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            std::fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| not_found_or(&key, &path, e))
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            let mut f = std::fs::File::open(&path).map_err(|e| not_found_or(&key, &path, e))?;
            let mut buf = vec![0u8; len as usize];
            f.seek(SeekFrom::Start(offset))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| Error::io(&path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![String::new()];
            while let Some(rel) = stack.pop() {
                let dir = root.join(&rel);
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(&dir, e)),
                };
                for entry in rd {
                    let entry = entry.map_err(|e| Error::io(&dir, e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".tmp-") {
                        continue;
                    }
                    let key = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
                    if ft.is_dir() {
                        // Only descend where the prefix can still match.
                        let k = format!("{key}/");
                        if k.starts_with(&prefix) || prefix.starts_with(&k) {
                            stack.push(key);
                        }
                    } else if key.starts_with(&prefix) {
                        let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
                        out.push(ObjectInfo {
                            key,
                            size: meta.len(),
                            modified: meta.modified().ok(),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_backend_conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new(dir.path().join("repo"));
        crate::backend::conformance::run(&b).await;
    }

    #[tokio::test]
    async fn rejects_escaping_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new(dir.path());
        for k in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(b.put(k, Bytes::from_static(b"x")).await.is_err(), "{k}");
        }
    }
}
