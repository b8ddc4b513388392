//! A repository: storage, keys, configuration, index and cache, and reading and writing its objects.
//!
//! Layout under the repository root (see `design/0001-repository-format.md`):
//! `config`, `keys/<id>`, `data/<2 hex>/<pack id>`, `index/<id>`, `snapshots/<id>`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::cache::Cache;
use crate::chunker::ChunkerParams;
use crate::clock::Clock;
use crate::crypto::{self, KdfParams, Keys, Kind};
use crate::error::{Error, Result};
use crate::id::{BlobId, IndexId, PackId, SnapshotId, storage_hash};
use crate::index::{BlobLocation, Index, IndexSegment};
use crate::pack::{self, BlobKind, Compression};
use crate::snapshot::Snapshot;
use crate::tree::Tree;

/// Repository format version (of `config`).
pub const REPO_VERSION: u32 = 1;
/// Default target size of a pack file.
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
/// Parallel small-object downloads.
const FETCH_CONCURRENCY: usize = 16;
/// Where snapshot manifests live.
const SNAPSHOTS: &str = "snapshots/";

/// What [`Repository::each_snapshot`] read: the snapshots, oldest first, and the objects under
/// `snapshots/` that did not read as one, by name, with why.
pub type SnapshotsRead = (Vec<(SnapshotId, Snapshot)>, Vec<(String, Error)>);

/// The repository configuration (stored encrypted as `config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// [`REPO_VERSION`].
    pub version: u32,
    /// Random repository id (hex), names the local cache.
    pub id: String,
    /// Chunk sizes.
    pub chunker: ChunkerParams,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// How new objects are compressed (`lz4` when absent: repositories made before it existed).
    #[serde(default)]
    pub compression: Compression,
}

/// A password-wrapped master key (stored in plain JSON under `keys/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    kdf: String,
    params: KdfParams,
    salt: String,
    master: String,
    created: String,
    hostname: String,
}

/// How to open a repository.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Directory of the local cache; `None` disables it.
    pub cache_dir: Option<PathBuf>,
    /// Hard size limit of the cache file.
    pub cache_limit: u64,
    /// Where time comes from (the system clock but in tests).
    pub clock: Arc<dyn Clock>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_dir: default_cache_dir(),
            cache_limit: 256 * 1024 * 1024,
            clock: crate::clock::system(),
        }
    }
}

/// `$FERRY_CACHE_DIR`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FERRY_CACHE_DIR") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("ferry"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry"))
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    keys: Keys,
    config: Config,
    cache: Option<Cache>,
    clock: Arc<dyn Clock>,
    /// The merged index, loaded on first use and dropped when this handle writes a new segment.
    index: tokio::sync::Mutex<Option<Arc<Index>>>,
}

/// How often a read follows blobs that a concurrent prune moved to other packs before giving up.
pub const MAX_RELOCATIONS: usize = 3;

/// This machine's host name (empty when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn exists(b: &dyn Backend, key: &str) -> Result<bool> {
    match b.get(key).await {
        Ok(_) => Ok(true),
        Err(Error::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Repository {
    /// Creates a new repository protected by `password`, compressing with LZ4.
    pub async fn init(
        backend: Arc<dyn Backend>,
        password: &[u8],
        kdf: KdfParams,
    ) -> Result<Config> {
        Self::init_with(backend, password, kdf, Compression::default()).await
    }

    /// Creates a new repository protected by `password` that compresses with `compression`.
    pub async fn init_with(
        backend: Arc<dyn Backend>,
        password: &[u8],
        kdf: KdfParams,
        compression: Compression,
    ) -> Result<Config> {
        if exists(backend.as_ref(), "config").await? {
            return Err(Error::AlreadyInitialised(backend.location()));
        }
        if password.is_empty() {
            return Err(Error::Invalid(
                "the repository password must not be empty".into(),
            ));
        }
        let keys = Keys::generate()?;
        let mut rid = [0u8; 16];
        crypto::fill_random(&mut rid)?;
        let config = Config {
            version: REPO_VERSION,
            id: hex::encode(rid),
            chunker: ChunkerParams::default(),
            pack_size: DEFAULT_PACK_SIZE,
            compression,
        };
        // The key file first (content-addressed, harmless if orphaned), then the config with a conditional
        // put: of two racing inits exactly one wins, the other removes its key file and reports
        // AlreadyInitialised, so no backup is ever written under a master key that lost the race.
        let key_name = Self::add_key(backend.as_ref(), &keys, password, kdf).await?;
        let plain = serde_json::to_vec(&config).map_err(|e| Error::Format(e.to_string()))?;
        let ours = Bytes::from(pack::encode(&keys, Kind::Config, &plain, None)?);
        let mut won = backend.put_if_absent("config", ours.clone()).await?;
        if won && !backend.settle_delay().is_zero() {
            // Not every S3 server makes the condition atomic: read back after a while, and the one whose
            // config is there is the winner.
            tokio::time::sleep(backend.settle_delay()).await;
            won = backend.get("config").await? == ours;
        }
        if !won {
            backend.delete(&key_name).await?;
            return Err(Error::AlreadyInitialised(backend.location()));
        }
        Ok(config)
    }

    async fn add_key(
        backend: &dyn Backend,
        keys: &Keys,
        password: &[u8],
        kdf: KdfParams,
    ) -> Result<String> {
        let mut salt = [0u8; 32];
        crypto::fill_random(&mut salt)?;
        let mut kek = crypto::derive_kek(password, &salt, kdf)?;
        let wrapped = crypto::seal_with(&kek, Kind::MasterKey, keys.master());
        zeroize::Zeroize::zeroize(&mut kek);
        let kf = KeyFile {
            version: 1,
            kdf: "argon2id".into(),
            params: kdf,
            salt: hex::encode(salt),
            master: hex::encode(wrapped?),
            created: crate::snapshot::rfc3339(std::time::SystemTime::now()),
            hostname: hostname(),
        };
        let bytes = serde_json::to_vec_pretty(&kf).map_err(|e| Error::Format(e.to_string()))?;
        let name = format!("keys/{}", hex::encode(storage_hash(&bytes)));
        backend.put(&name, Bytes::from(bytes)).await?;
        Ok(name)
    }

    /// Opens an existing repository with `password`.
    pub async fn open(
        backend: Arc<dyn Backend>,
        password: &[u8],
        opts: &OpenOptions,
    ) -> Result<Self> {
        let key_objs = backend.list("keys/").await?;
        if key_objs.is_empty() {
            return Err(if exists(backend.as_ref(), "config").await? {
                Error::Integrity("the repository has a config but no keys".into())
            } else {
                Error::NoRepository(backend.location())
            });
        }
        // Every key file the password opens is a candidate; the one whose master key decrypts the config
        // is the repository's (a racing, losing `init` may briefly leave a key file of its own).
        let config_raw = match backend.get("config").await {
            Ok(raw) => raw,
            Err(Error::NotFound(_)) => return Err(Error::NoRepository(backend.location())),
            Err(e) => return Err(e),
        };
        let mut opened_any = false;
        let mut found = None;
        for o in &key_objs {
            let raw = backend.get(&o.key).await?;
            let kf: KeyFile = serde_json::from_slice(&raw)
                .map_err(|e| Error::Format(format!("key file {}: {e}", o.key)))?;
            if kf.kdf != "argon2id" || kf.version != 1 {
                return Err(Error::Format(format!(
                    "key file {} uses unsupported {} v{}",
                    o.key, kf.kdf, kf.version
                )));
            }
            let salt = hex::decode(&kf.salt)
                .map_err(|e| Error::Format(format!("key file {}: {e}", o.key)))?;
            let wrapped = hex::decode(&kf.master)
                .map_err(|e| Error::Format(format!("key file {}: {e}", o.key)))?;
            let mut kek = crypto::derive_kek(password, &salt, kf.params).map_err(|e| match e {
                Error::Format(m) => Error::Format(format!("key file {}: {m}", o.key)),
                e => e,
            })?;
            let opened = crypto::open_with(&kek, Kind::MasterKey, &wrapped);
            zeroize::Zeroize::zeroize(&mut kek);
            if let Ok(mut m) = opened {
                opened_any = true;
                let master: [u8; 64] = m
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::Format("master key has the wrong length".into()))?;
                zeroize::Zeroize::zeroize(&mut m);
                let keys = Keys::from_master(master);
                if let Ok(plain) = pack::decode(&keys, Kind::Config, &config_raw) {
                    found = Some((keys, plain));
                    break;
                }
            }
        }
        let (keys, plain) = match found {
            Some(f) => f,
            None if opened_any => {
                return Err(Error::Integrity(
                    "the config object does not decrypt with any key: it was tampered with".into(),
                ));
            }
            None => return Err(Error::WrongPassword),
        };
        let config: Config =
            serde_json::from_slice(&plain).map_err(|e| Error::Format(format!("config: {e}")))?;
        if config.version != REPO_VERSION {
            return Err(Error::Format(format!(
                "repository version {} is not supported",
                config.version
            )));
        }
        config.chunker.validate().map_err(Error::Format)?;
        let cache = opts.cache_dir.as_ref().and_then(|d| {
            match Cache::open(d, &config.id, opts.cache_limit) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "running without a local cache");
                    None
                }
            }
        });
        Ok(Repository {
            backend,
            keys,
            config,
            cache,
            clock: opts.clock.clone(),
            index: Default::default(),
        })
    }

    /// The storage backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Reads a content-addressed metadata object (`index/…`, `snapshots/…`) through the cache, checking its
    /// name against its content and decrypting it.
    async fn read_named(
        &self,
        kind: Kind,
        cache_kind: &str,
        key: &str,
        hex_id: &str,
    ) -> Result<Vec<u8>> {
        if let Some(c) = &self.cache
            && let Some(v) = c.get(cache_kind, hex_id)
        {
            match pack::decode(&self.keys, kind, &v) {
                Ok(p) if hex::encode(storage_hash(&v)) == hex_id => return Ok(p),
                _ => c.remove(cache_kind, hex_id),
            }
        }
        let raw = self.backend.get(key).await?;
        if hex::encode(storage_hash(&raw)) != hex_id {
            return Err(Error::Integrity(format!(
                "{key} does not match its name (corrupt or tampered)"
            )));
        }
        let plain = pack::decode(&self.keys, kind, &raw)
            .map_err(|e| Error::Integrity(format!("{key}: {e}")))?;
        if let Some(c) = &self.cache {
            c.put(cache_kind, hex_id, &raw);
        }
        Ok(plain)
    }

    /// Stores a content-addressed metadata object and returns its id.
    async fn write_named(&self, kind: Kind, dir: &str, plain: &[u8]) -> Result<[u8; 32]> {
        let stored = pack::encode(&self.keys, kind, plain, Some(self.config.compression))?;
        let id = storage_hash(&stored);
        self.backend
            .put(&format!("{dir}/{}", hex::encode(id)), Bytes::from(stored))
            .await?;
        Ok(id)
    }

    /// Loads (once) and returns the merged index.
    pub async fn index(&self) -> Result<Arc<Index>> {
        let mut slot = self.index.lock().await;
        if let Some(i) = slot.as_ref() {
            return Ok(i.clone());
        }
        let i = Arc::new(self.load_index().await?);
        *slot = Some(i.clone());
        Ok(i)
    }

    /// Reads every index segment into a fresh [`Index`].
    pub async fn load_index(&self) -> Result<Index> {
        self.load_index_without(&HashSet::new()).await
    }

    /// Reads every index segment into a fresh [`Index`], leaving out the packs in `skip` (a backup leaves
    /// out prune's candidates, so it never reuses their data). Each segment is merged as it arrives and
    /// dropped, so loading holds the index and a few segments, not every segment besides. When a segment
    /// vanished (a prune replaced it) the index is built again from a fresh listing, never from a mix.
    pub async fn load_index_without(&self, skip: &HashSet<PackId>) -> Result<Index> {
        let mut tries = 0;
        loop {
            let mut index = Index::default();
            let merged = self
                .each_listed_segment(|_, s| {
                    for p in s.packs.iter().filter(|p| !skip.contains(&p.id)) {
                        index.add_pack(p);
                    }
                })
                .await;
            match merged {
                Err(Error::NotFound(_)) if tries < MAX_RELOCATIONS => tries += 1,
                r => return r.map(|()| index),
            }
        }
    }

    /// Every index segment with its id (the name under `index/`). A segment that vanishes between the
    /// listing and its read was replaced by a prune (which writes the replacement first): the listing is
    /// read again.
    pub async fn index_segments(&self) -> Result<Vec<(String, IndexSegment)>> {
        let mut tries = 0;
        loop {
            let mut all = Vec::new();
            match self.each_listed_segment(|id, s| all.push((id, s))).await {
                Err(Error::NotFound(_)) if tries < MAX_RELOCATIONS => tries += 1,
                r => return r.map(|()| all),
            }
        }
    }

    /// Lists the index segments and hands each to `f` with its id as it is read ([`FETCH_CONCURRENCY`] at
    /// once, in no particular order); then drops segments no longer listed from the cache. Fails with
    /// `NotFound` when a listed segment is gone.
    async fn each_listed_segment(&self, mut f: impl FnMut(String, IndexSegment)) -> Result<()> {
        let listed = self.backend.list("index/").await?;
        let ids: Vec<String> = listed
            .iter()
            .map(|o| o.key.trim_start_matches("index/").to_string())
            .collect();
        let mut segments = stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let plain = self
                    .read_named(Kind::Index, "index", &format!("index/{id}"), &id)
                    .await?;
                Ok::<_, Error>((id, IndexSegment::from_bytes(&plain)?))
            })
            .buffer_unordered(FETCH_CONCURRENCY);
        while let Some((id, s)) = segments.try_next().await? {
            f(id, s);
        }
        drop(segments);
        if let Some(c) = &self.cache {
            c.retain("index", &ids.into_iter().collect());
        }
        Ok(())
    }

    /// Forgets the loaded index (after segments were replaced).
    pub async fn invalidate_index(&self) {
        *self.index.lock().await = None;
    }

    /// Writes an index segment.
    pub async fn write_index(&self, segment: &IndexSegment) -> Result<IndexId> {
        let id = IndexId(
            self.write_named(Kind::Index, "index", &segment.to_bytes()?)
                .await?,
        );
        *self.index.lock().await = None;
        Ok(id)
    }

    /// Writes a snapshot manifest.
    pub async fn write_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId> {
        let plain = serde_json::to_vec(snap).map_err(|e| Error::Format(e.to_string()))?;
        Ok(SnapshotId(
            self.write_named(Kind::Snapshot, "snapshots", &plain)
                .await?,
        ))
    }

    /// Every snapshot, oldest first. Fails when any object under `snapshots/` does not read as one: what
    /// relies on the whole list (prune's view of what is used) must not go on without a part of it.
    pub async fn snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>> {
        let (found, mut failed) = self.each_snapshot().await?;
        match failed.pop() {
            Some((_, e)) => Err(e),
            None => Ok(found),
        }
    }

    /// Every snapshot that reads, oldest first, and the name and error of every object under
    /// `snapshots/` that does not (damaged, tampered with, or not a snapshot at all). Fails only when the
    /// storage does.
    pub async fn each_snapshot(&self) -> Result<SnapshotsRead> {
        let names: Vec<String> = self
            .listed_snapshots()
            .await?
            .into_iter()
            .map(|(_, name)| name)
            .collect();
        let read = self.read_listed(names.clone()).await?;
        let (mut found, mut failed) = (Vec::new(), Vec::new());
        for (name, r) in names.into_iter().zip(read) {
            match r {
                Ok(s) => found.extend(s),
                Err(e) => failed.push((name, e)),
            }
        }
        found.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((found, failed))
    }

    /// The names under `snapshots/`, each with when the storage says it was written.
    async fn listed_snapshots(&self) -> Result<Vec<(Option<std::time::SystemTime>, String)>> {
        Ok(self
            .backend
            .list(SNAPSHOTS)
            .await?
            .into_iter()
            .map(|o| (o.modified, o.key.trim_start_matches(SNAPSHOTS).to_string()))
            .collect())
    }

    /// Reads the snapshots listed as `names`, [`FETCH_CONCURRENCY`] at once, in the order given. Each is
    /// `Ok(None)` when it is gone (a snapshot forgotten since the listing is not an error), and an error
    /// when it does not read as a snapshot (damaged, tampered with, or not a snapshot at all). Fails only
    /// when the storage does.
    async fn read_listed(
        &self,
        names: Vec<String>,
    ) -> Result<Vec<Result<Option<(SnapshotId, Snapshot)>>>> {
        let read: Vec<_> = stream::iter(names)
            .map(|name| async move { self.parse_and_read(&name).await })
            .buffered(FETCH_CONCURRENCY)
            .collect()
            .await;
        read.into_iter()
            .map(|r| match r {
                Err(e @ (Error::Integrity(_) | Error::Format(_))) => Ok(Err(e)),
                Err(e) => Err(e),
                Ok(s) => Ok(Ok(s)),
            })
            .collect()
    }

    /// Reads one snapshot; `None` when there is none by that id (never written, or forgotten).
    pub async fn read_snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>> {
        let hex = id.to_hex();
        let key = format!("{SNAPSHOTS}{hex}");
        match self
            .read_named(Kind::Snapshot, "snapshot", &key, &hex)
            .await
        {
            Ok(plain) => Snapshot::from_bytes(&plain).map(Some),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The snapshot `wanted` accepts that was written last by the storage's clock (then the latest start
    /// time, then the largest id): a backup's parent. Snapshots are read newest-written first, a wave of
    /// [`FETCH_CONCURRENCY`] at a time, until none left unread can be newer than the one found; so a
    /// repository shared by many sources (one per volume of a namespace) costs a wave or two of reads, not
    /// one read per snapshot it holds. Where the storage tells no times, every snapshot is read.
    ///
    /// Only a snapshot that reads and verifies can be a parent: a damaged or foreign object under
    /// `snapshots/` is passed over with a warning (`ferry check` reports it), so it cannot stop backups.
    pub async fn latest_snapshot(
        &self,
        wanted: impl Fn(&Snapshot) -> bool,
    ) -> Result<Option<(SnapshotId, Snapshot)>> {
        let mut listed: Vec<(std::time::SystemTime, String)> = self
            .listed_snapshots()
            .await?
            .into_iter()
            .map(|(written, name)| (written.unwrap_or(std::time::UNIX_EPOCH), name))
            .collect();
        listed.sort_by_key(|b| std::cmp::Reverse(b.0));
        let mut best: Option<(std::time::SystemTime, SnapshotId, Snapshot)> = None;
        for wave in listed.chunks(FETCH_CONCURRENCY) {
            if let (Some(b), Some(next)) = (&best, wave.first())
                && next.0 < b.0
            {
                break; // every snapshot left was written before the one found
            }
            let read = self
                .read_listed(wave.iter().map(|(_, name)| name.clone()).collect())
                .await?;
            for ((written, name), r) in wave.iter().zip(read) {
                let (id, snap) = match r {
                    Ok(Some(found)) => found,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(snapshot = %name, error = %e, "passing over a snapshot that does not read");
                        continue;
                    }
                };
                let newer = best
                    .as_ref()
                    .is_none_or(|(w, bid, b)| (*written, &snap.time, &id) > (*w, &b.time, bid));
                if wanted(&snap) && newer {
                    best = Some((*written, id, snap));
                }
            }
        }
        Ok(best.map(|(_, id, snap)| (id, snap)))
    }

    /// [`Repository::read_snapshot`] of a listed name, which may not be an id at all.
    async fn parse_and_read(&self, hex: &str) -> Result<Option<(SnapshotId, Snapshot)>> {
        let id = SnapshotId::from_hex(hex)?;
        Ok(self.read_snapshot(&id).await?.map(|s| (id, s)))
    }

    /// Finds a snapshot by `latest`, a full id (read alone) or a unique id prefix.
    pub async fn find_snapshot(&self, spec: &str) -> Result<(SnapshotId, Snapshot)> {
        if spec.len() == 64
            && let Ok(id) = SnapshotId::from_hex(&spec.to_ascii_lowercase())
        {
            return match self.read_snapshot(&id).await? {
                Some(snap) => Ok((id, snap)),
                None => Err(Error::Snapshot(format!("{} not found", id.to_hex()))),
            };
        }
        let all = self.snapshots().await?;
        if spec == "latest" {
            return all
                .into_iter()
                .last()
                .ok_or_else(|| Error::Snapshot("latest: the repository has no snapshots".into()));
        }
        if spec.len() < 4 || !spec.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "snapshot {spec:?}: give `latest` or at least 4 hex digits of an id"
            )));
        }
        let spec = spec.to_ascii_lowercase();
        let mut hits = all
            .into_iter()
            .filter(|(id, _)| id.to_hex().starts_with(&spec));
        match (hits.next(), hits.next()) {
            (Some(s), None) => Ok(s),
            (None, _) => Err(Error::Snapshot(format!("{spec} not found"))),
            (Some(_), Some(_)) => Err(Error::Snapshot(format!(
                "{spec} is ambiguous; give more digits"
            ))),
        }
    }

    /// Reads and verifies one blob. When its pack is gone (a concurrent prune moved the blob to a new
    /// pack), the index is read again and the blob read from where it is now.
    pub async fn read_blob(&self, kind: BlobKind, id: &BlobId) -> Result<Vec<u8>> {
        self.read_blob_via(None, kind, id).await
    }

    /// [`Repository::read_blob`], located through `index` when it names the blob (a backup's own index,
    /// so its reads of the parent's trees neither load a second copy nor reload after each segment it
    /// writes), else through the repository's.
    async fn read_blob_via(
        &self,
        index: Option<&Index>,
        kind: BlobKind,
        id: &BlobId,
    ) -> Result<Vec<u8>> {
        let cache_key = id.to_hex();
        if kind == BlobKind::Tree
            && let Some(c) = &self.cache
            && let Some(v) = c.get("tree", &cache_key)
        {
            match pack::decode_blob(&self.keys, kind, id, &v) {
                Ok(p) => return Ok(p),
                Err(_) => c.remove("tree", &cache_key),
            }
        }
        let mut loc = match index.and_then(|i| i.get(id)).filter(|l| l.kind == kind) {
            Some(l) => l,
            None => self.locate(kind, id).await?,
        };
        let mut moves = 0;
        let stored = loop {
            match self
                .backend
                .get_range(&loc.pack.key(), loc.offset as u64, loc.length as u64)
                .await
            {
                Ok(s) => break s,
                Err(Error::NotFound(k)) => {
                    self.invalidate_index().await;
                    let now = self.locate(kind, id).await?;
                    if now.pack == loc.pack || moves == MAX_RELOCATIONS {
                        return Err(Error::Integrity(format!(
                            "pack {k} is missing (needed for blob {})",
                            id.short()
                        )));
                    }
                    (loc, moves) = (now, moves + 1);
                }
                Err(e) => return Err(e),
            }
        };
        let plain = pack::decode_blob(&self.keys, kind, id, &stored)?;
        if kind == BlobKind::Tree
            && let Some(c) = &self.cache
        {
            c.put("tree", &cache_key, &stored);
        }
        Ok(plain)
    }

    /// Where the index says a blob of `kind` is. A blob the loaded index does not know may have been
    /// written since it was loaded (a snapshot that appeared meanwhile): the index is read again once.
    async fn locate(&self, kind: BlobKind, id: &BlobId) -> Result<BlobLocation> {
        let mut found = self.index().await?.get(id);
        if found.is_none() {
            self.invalidate_index().await;
            found = self.index().await?.get(id);
        }
        let loc = found
            .ok_or_else(|| Error::Integrity(format!("blob {} is not in the index", id.short())))?;
        if loc.kind != kind {
            return Err(Error::Integrity(format!(
                "blob {} is a {:?}, expected {kind:?}",
                id.short(),
                loc.kind
            )));
        }
        Ok(loc)
    }

    /// Reads a tree.
    pub async fn read_tree(&self, id: &BlobId) -> Result<Tree> {
        Tree::from_bytes(&self.read_blob(BlobKind::Tree, id).await?)
    }

    /// Reads a tree located through `index` where it names it (see `read_blob_via`).
    pub(crate) async fn read_tree_via(&self, index: &Index, id: &BlobId) -> Result<Tree> {
        Tree::from_bytes(&self.read_blob_via(Some(index), BlobKind::Tree, id).await?)
    }

    /// The pack files in storage with their sizes, and the keys under `data/` that are not pack names.
    pub async fn list_packs(
        &self,
    ) -> Result<(std::collections::HashMap<PackId, u64>, Vec<String>)> {
        let mut packs = std::collections::HashMap::new();
        let mut unexpected = Vec::new();
        for o in self.backend().list("data/").await? {
            match PackId::from_hex(o.key.rsplit('/').next().unwrap_or_default()) {
                Ok(id) if id.key() == o.key => {
                    packs.insert(id, o.size);
                }
                _ => unexpected.push(o.key),
            }
        }
        Ok((packs, unexpected))
    }

    /// Visits every tree reachable from `snaps` once, depth first, with the snapshot it was first reached
    /// from. `visit` gets the tree or the error reading it, and may end the walk by returning an error.
    /// Returns the ids of the trees visited.
    pub async fn walk_trees(
        &self,
        snaps: &[(SnapshotId, Snapshot)],
        progress: &crate::progress::Progress,
        mut visit: impl FnMut(&SnapshotId, &BlobId, Result<&Tree>) -> Result<()>,
    ) -> Result<HashSet<BlobId>> {
        let mut seen = HashSet::new();
        for (sid, snap) in snaps {
            let mut stack = vec![snap.tree];
            while let Some(t) = stack.pop() {
                if !seen.insert(t) {
                    continue;
                }
                progress.check()?;
                match self.read_tree(&t).await {
                    Ok(tree) => {
                        stack.extend(tree.nodes.iter().filter_map(|n| match &n.kind {
                            crate::tree::NodeKind::Dir { subtree } => Some(*subtree),
                            _ => None,
                        }));
                        visit(sid, &t, Ok(&tree))?;
                    }
                    Err(e) => visit(sid, &t, Err(e))?,
                }
            }
        }
        Ok(seen)
    }
}
