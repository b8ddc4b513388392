//! Local cache of repository metadata (index segments, snapshots, trees) in one SQLite file per repository.
//!
//! The cache holds objects exactly as stored in the repository (encrypted), so it holds no plaintext, and
//! every value is authenticated again when used: a corrupt entry is dropped and fetched anew. The file has
//! a hard size limit (`max_page_count`); when full, the oldest entries are evicted. A file that is not a
//! database, has another format version or belongs to another repository is deleted and rebuilt. The
//! cache is never needed for correctness: any failure here only costs a download.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

/// Cache file format version.
pub const CACHE_VERSION: &str = "1";

/// An open cache.
#[derive(Debug)]
pub struct Cache {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn open_checked(path: &Path, repo_id: &str, limit_bytes: u64) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    conn.pragma_update(None, "max_page_count", (limit_bytes as i64 / page).max(16))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS objects (kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                                             PRIMARY KEY (kind, key));",
    )?;
    let get = |k: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT v FROM meta WHERE k = ?1", [k], |r| r.get(0))
            .optional()
    };
    match (get("version")?, get("repo")?) {
        (None, None) => {
            conn.execute(
                "INSERT INTO meta (k, v) VALUES ('version', ?1), ('repo', ?2)",
                params![CACHE_VERSION, repo_id],
            )?;
        }
        (Some(v), Some(r)) if v == CACHE_VERSION && r == repo_id => {}
        _ => return Err(rusqlite::Error::InvalidQuery),
    }
    Ok(conn)
}

impl Cache {
    /// Opens (or creates, or rebuilds) the cache of repository `repo_id` in `dir`, limited to `limit_bytes`.
    pub fn open(dir: &Path, repo_id: &str, limit_bytes: u64) -> Result<Cache, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("{repo_id}.sqlite"));
        let conn = match open_checked(&path, repo_id, limit_bytes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cache unusable (corrupt, old or foreign); rebuilding");
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                open_checked(&path, repo_id, limit_bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        Ok(Cache {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A cached object, if present.
    pub fn get(&self, kind: &str, key: &str) -> Option<Vec<u8>> {
        let conn = self.conn.lock().ok()?;
        conn.query_row(
            "SELECT value FROM objects WHERE kind = ?1 AND key = ?2",
            [kind, key],
            |r| r.get(0),
        )
        .optional()
        .unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cache read failed");
            None
        })
    }

    /// Stores an object, evicting the oldest entries if the size limit is reached.
    pub fn put(&self, kind: &str, key: &str, value: &[u8]) {
        let Ok(conn) = self.conn.lock() else { return };
        let insert = |c: &Connection| {
            c.execute(
                "INSERT OR REPLACE INTO objects (kind, key, value) VALUES (?1, ?2, ?3)",
                params![kind, key, value],
            )
        };
        for _ in 0..4 {
            match insert(&conn) {
                Ok(_) => return,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DiskFull =>
                {
                    // Evict the oldest quarter and try again.
                    let evicted = conn.execute(
                        "DELETE FROM objects WHERE rowid IN
                           (SELECT rowid FROM objects ORDER BY rowid LIMIT (SELECT count(*) / 4 + 1 FROM objects))",
                        [],
                    );
                    if !matches!(evicted, Ok(n) if n > 0) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cache write failed");
                    return;
                }
            }
        }
    }

    /// Drops one entry (e.g. after it failed authentication).
    pub fn remove(&self, kind: &str, key: &str) {
        if let Ok(conn) = self.conn.lock() {
            let _ = conn.execute(
                "DELETE FROM objects WHERE kind = ?1 AND key = ?2",
                [kind, key],
            );
        }
    }

    /// Drops every entry of `kind` whose key is not in `keep` (objects removed from the repository).
    pub fn retain(&self, kind: &str, keep: &std::collections::HashSet<String>) {
        let Ok(conn) = self.conn.lock() else { return };
        let keys: Vec<String> = match conn.prepare("SELECT key FROM objects WHERE kind = ?1") {
            Ok(mut st) => st
                .query_map([kind], |r| r.get(0))
                .map(|rows| rows.filter_map(|r| r.ok()).collect())
                .unwrap_or_default(),
            Err(_) => return,
        };
        for k in keys.iter().filter(|k| !keep.contains(*k)) {
            let _ = conn.execute(
                "DELETE FROM objects WHERE kind = ?1 AND key = ?2",
                [kind, k.as_str()],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_evicts_within_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Cache::open(dir.path(), "r1", 512 * 1024).expect("open");
        c.put("index", "a", b"hello");
        assert_eq!(c.get("index", "a").as_deref(), Some(&b"hello"[..]));
        for i in 0..200 {
            c.put("tree", &format!("{i}"), &vec![7u8; 16 * 1024]);
        }
        // The newest entry is there, the file stayed under its limit, old entries were evicted.
        assert!(c.get("tree", "199").is_some());
        assert!(c.get("tree", "0").is_none());
        drop(c);
        let size = std::fs::metadata(dir.path().join("r1.sqlite"))
            .expect("meta")
            .len();
        assert!(size <= 600 * 1024, "cache file {size} bytes");
    }

    #[test]
    fn foreign_or_corrupt_cache_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = Cache::open(dir.path(), "r1", 1 << 20).expect("open");
            c.put("index", "a", b"x");
        }
        // Same file claimed by another repository id.
        std::fs::copy(dir.path().join("r1.sqlite"), dir.path().join("r2.sqlite")).expect("copy");
        let c2 = Cache::open(dir.path(), "r2", 1 << 20).expect("open foreign");
        assert!(
            c2.get("index", "a").is_none(),
            "foreign entries must not be used"
        );
        // Garbage file.
        std::fs::write(
            dir.path().join("r3.sqlite"),
            b"this is not a database at all, just garbage bytes",
        )
        .expect("w");
        let c3 = Cache::open(dir.path(), "r3", 1 << 20).expect("open corrupt");
        c3.put("index", "b", b"y");
        assert_eq!(c3.get("index", "b").as_deref(), Some(&b"y"[..]));
    }
}
