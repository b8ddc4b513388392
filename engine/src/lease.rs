//! Leases (`locks/<id>`): who is working on a repository right now.
//!
//! * A backup holds a *backup lease* from before it reads `prune/state` until its snapshot is written. The
//!   lease records the state generation the backup had read; prune never deletes a pack marked in a later
//!   generation while the lease is live (`crate::prune`, `design/0003-backup-deletion.md`).
//! * `prune` holds the *maintenance lease*; at most one is live per repository.
//!
//! A holder rewrites its lease every tenth of its stale period. A lease whose last write is older than its
//! stale period, by the storage's clock (compared with the reader's own lease, just rewritten), is presumed
//! dead and ignored, so a killed pod never blocks anyone for long. A holder that went longer than half the
//! stale period without a successful rewrite stops before its next irreversible step (a backup does not
//! commit, a prune does not delete): others may already have treated it as dead.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::clock::{age, unix_seconds};
use crate::crypto::Kind;
use crate::error::{Error, Result};
use crate::pack;
use crate::repo::Repository;

/// Lease file format version.
const LEASE_VERSION: u32 = 1;
/// Default stale period.
pub const DEFAULT_STALE: Duration = Duration::from_secs(300);
/// The longest stale period a lease may declare.
const MAX_STALE: Duration = Duration::from_secs(86_400);
const PREFIX: &str = "locks/";

/// What a lease holder does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// A backup: protects what it reuses and uploads until its snapshot is written.
    Backup,
    /// forget/prune: exclusive.
    Maintenance,
}

/// The content of a lease object (stored encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseInfo {
    /// [`LEASE_VERSION`].
    pub version: u32,
    /// What the holder does.
    pub kind: LeaseKind,
    /// Host (in a pod: the pod name) of the holder.
    pub hostname: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the lease was taken (RFC 3339, holder's clock).
    pub started: String,
    /// The holder's clock at its last rewrite (Unix seconds); used only where storage keeps no times.
    pub refreshed: u64,
    /// After this long without a rewrite the lease is stale.
    pub stale_seconds: u64,
    /// Backups: the `prune/state` generation read before the lease was written.
    pub generation: u64,
}

impl LeaseInfo {
    /// "backup on host h (pid 7) since 2026-…".
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            LeaseKind::Backup => "backup",
            LeaseKind::Maintenance => "maintenance",
        };
        format!(
            "{kind} on host {} (pid {}) since {}",
            self.hostname, self.pid, self.started
        )
    }
}

/// A lease found in storage.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its key.
    pub key: String,
    /// Its content; `None` when it does not decrypt or parse (treated as the most restrictive lease).
    pub info: Option<LeaseInfo>,
    /// Time since its last write.
    pub age: Duration,
    /// Older than its stale period: its holder is presumed dead.
    pub stale: bool,
}

impl Found {
    /// Whether it stops a maintenance run from starting.
    pub fn is_maintenance(&self) -> bool {
        self.info
            .as_ref()
            .is_none_or(|i| i.kind == LeaseKind::Maintenance)
    }

    /// For a backup (or unreadable) lease: the state generation its holder has seen.
    pub fn backup_generation(&self) -> Option<u64> {
        match &self.info {
            Some(i) if i.kind == LeaseKind::Backup => Some(i.generation),
            Some(_) => None,
            None => Some(0),
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match &self.info {
            Some(i) => format!("{} ({} s ago)", i.describe(), self.age.as_secs()),
            None => format!("unreadable lease {}", self.key),
        }
    }
}

/// Every lease, as seen at `now` (a storage time).
pub struct Leases {
    /// The storage's clock at the listing, as far as known.
    pub now: SystemTime,
    /// The leases, the reader's own excluded.
    pub others: Vec<Found>,
}

/// How a holder's rewrites went.
#[derive(Debug)]
struct Health {
    /// Send time of the last successful write.
    last_ok: SystemTime,
    /// The longest time between two successful writes (send of the earlier to completion of the later).
    max_gap: Duration,
}

#[derive(Debug)]
struct Inner {
    repo: Arc<Repository>,
    key: String,
    info: Mutex<LeaseInfo>,
    stale: Duration,
    health: Mutex<Health>,
}

impl Inner {
    async fn write(&self) -> Result<()> {
        let sent = self.repo.clock().now();
        let info = {
            let mut i = self.info.lock().expect("lease lock");
            i.refreshed = unix_seconds(sent);
            i.clone()
        };
        let plain = serde_json::to_vec(&info).map_err(|e| Error::Format(e.to_string()))?;
        let sealed = pack::encode(self.repo.keys(), Kind::Lease, &plain, None)?;
        self.repo
            .backend()
            .put(&self.key, Bytes::from(sealed))
            .await?;
        let done = self.repo.clock().now();
        let mut h = self.health.lock().expect("lease health lock");
        h.max_gap = h.max_gap.max(age(done, h.last_ok));
        h.last_ok = sent;
        Ok(())
    }
}

/// A lease this process holds; rewritten in the background until released.
#[derive(Debug)]
pub struct Lease {
    inner: Arc<Inner>,
    refresher: tokio::task::JoinHandle<()>,
    released: bool,
}

impl Lease {
    /// Takes a lease of `kind` (for a backup, `generation` is the state generation it has read).
    pub async fn acquire(repo: Arc<Repository>, kind: LeaseKind, generation: u64) -> Result<Lease> {
        let mut id = [0u8; 16];
        crate::crypto::fill_random(&mut id)?;
        let now = repo.clock().now();
        let stale = DEFAULT_STALE;
        let inner = Arc::new(Inner {
            key: format!("{PREFIX}{}", hex::encode(id)),
            info: Mutex::new(LeaseInfo {
                version: LEASE_VERSION,
                kind,
                hostname: crate::repo::hostname(),
                pid: std::process::id(),
                started: crate::snapshot::rfc3339(now),
                refreshed: unix_seconds(now),
                stale_seconds: stale.as_secs(),
                generation,
            }),
            stale,
            health: Mutex::new(Health {
                last_ok: now,
                max_gap: Duration::ZERO,
            }),
            repo,
        });
        inner.write().await?;
        // The first write starts the record: the time before it does not count as a gap.
        inner.health.lock().expect("lease health lock").max_gap = Duration::ZERO;
        let bg = inner.clone();
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(bg.stale / 10).await;
                if let Err(e) = bg.write().await {
                    tracing::warn!(lease = %bg.key, error = %e, "could not renew the repository lease");
                }
            }
        });
        Ok(Lease {
            inner,
            refresher,
            released: false,
        })
    }

    /// Takes the maintenance lease, waiting up to `wait` while another maintenance run holds it.
    pub async fn acquire_maintenance(repo: Arc<Repository>, wait: Duration) -> Result<Lease> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let lease = Lease::acquire(repo.clone(), LeaseKind::Maintenance, 0).await?;
            let view = lease.leases().await?;
            let Some(other) = view.others.iter().find(|f| !f.stale && f.is_maintenance()) else {
                return Ok(lease);
            };
            let who = other.describe();
            lease.release().await;
            let waited = started.elapsed();
            if waited >= wait {
                return Err(Error::Locked(format!(
                    "{}: another maintenance run holds the repository: {who}; it is stale after {} s \
                     without renewal",
                    repo.backend().location(),
                    other
                        .info
                        .as_ref()
                        .map_or(DEFAULT_STALE.as_secs(), |i| i.stale_seconds)
                )));
            }
            let mut jitter = [0u8; 1];
            crate::crypto::fill_random(&mut jitter)?;
            let sleep = (pause + pause * jitter[0] as u32 / 255).min(wait - waited);
            tokio::time::sleep(sleep).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    /// Rewrites the lease, then lists every other lease; the storage time of this lease's write is `now`.
    pub async fn leases(&self) -> Result<Leases> {
        self.inner.write().await?;
        let repo = &self.inner.repo;
        let listed = repo.backend().list(PREFIX).await?;
        let now = listed
            .iter()
            .find(|o| o.key == self.inner.key)
            .and_then(|o| o.modified)
            .unwrap_or_else(|| repo.clock().now());
        let mut others = Vec::new();
        for o in listed.into_iter().filter(|o| o.key != self.inner.key) {
            let info = match repo.backend().get(&o.key).await {
                Ok(raw) => decode(repo, &raw),
                Err(Error::NotFound(_)) => continue, // released meanwhile
                Err(e) => return Err(e),
            };
            let written = o.modified.unwrap_or_else(|| {
                info.as_ref().map_or(now, |i| {
                    std::time::UNIX_EPOCH + Duration::from_secs(i.refreshed)
                })
            });
            let stale_after = info
                .as_ref()
                .map_or(DEFAULT_STALE, |i| Duration::from_secs(i.stale_seconds))
                .min(MAX_STALE);
            let age = age(now, written);
            others.push(Found {
                key: o.key,
                info,
                age,
                stale: age > stale_after,
            });
        }
        Ok(Leases { now, others })
    }

    /// Rewrites the lease now and fails if it ever went half its stale period without a successful rewrite:
    /// then others may have presumed the holder dead, and it must not take an irreversible step.
    pub async fn ensure_held(&self) -> Result<()> {
        let renewed = self.inner.write().await;
        let gap = self.inner.health.lock().expect("lease health lock").max_gap;
        let limit = self.inner.stale / 2;
        match renewed {
            Ok(()) if gap < limit => Ok(()),
            Ok(()) => Err(Error::LeaseLost(format!(
                "the repository lease went {} s without renewal (limit {} s); a concurrent prune may \
                 have treated this run as dead",
                gap.as_secs(),
                limit.as_secs()
            ))),
            Err(e) => Err(Error::LeaseLost(format!(
                "could not renew the repository lease: {e}"
            ))),
        }
    }

    /// Stops renewing and deletes the lease.
    pub async fn release(mut self) {
        self.refresher.abort();
        self.released = true;
        if let Err(e) = self.inner.repo.backend().delete(&self.inner.key).await {
            tracing::warn!(lease = %self.inner.key, error = %e, "could not delete the repository lease; it goes stale");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.refresher.abort();
        if !self.released
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let inner = self.inner.clone();
            rt.spawn(async move {
                let _ = inner.repo.backend().delete(&inner.key).await;
            });
        }
    }
}

fn decode(repo: &Repository, raw: &[u8]) -> Option<LeaseInfo> {
    let plain = pack::decode(repo.keys(), Kind::Lease, raw).ok()?;
    let info: LeaseInfo = serde_json::from_slice(&plain).ok()?;
    (info.version == LEASE_VERSION).then_some(info)
}

/// Deletes the given stale leases (their holders are presumed dead).
pub async fn remove_stale(repo: &Repository, found: &[Found]) -> Result<()> {
    for f in found.iter().filter(|f| f.stale) {
        tracing::info!(lease = %f.key, holder = %f.describe(), "removing a stale repository lease");
        repo.backend().delete(&f.key).await?;
    }
    Ok(())
}
