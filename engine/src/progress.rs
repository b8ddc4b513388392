//! The engine's progress interface: lock-free counters the engine updates and any front end (terminal bar,
//! JSON lines, Kubernetes events) polls at its own pace, plus a cancel flag the engine honours promptly.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

/// What the engine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening the repository, loading the index.
    Starting,
    /// Moving data.
    Running,
    /// Writing index and snapshot, applying metadata.
    Finishing,
    /// Done.
    Done,
}

/// Shared progress counters. Cheap to update from many threads.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    phase: AtomicU8,
    canceled: AtomicBool,
    totals_known: AtomicBool,
    scan_started: AtomicBool,
    /// Files expected in total (valid once totals are known).
    pub files_total: AtomicU64,
    /// Bytes expected in total (valid once totals are known).
    pub bytes_total: AtomicU64,
    /// Files processed.
    pub files_done: AtomicU64,
    /// Bytes processed (read, or skipped as unchanged, or restored).
    pub bytes_done: AtomicU64,
    /// Logical bytes new to the repository.
    pub bytes_new: AtomicU64,
    /// Bytes written to (backup) or read from (restore) storage.
    pub bytes_transferred: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            started: Instant::now(),
            phase: AtomicU8::new(0),
            canceled: AtomicBool::new(false),
            totals_known: AtomicBool::new(false),
            scan_started: AtomicBool::new(false),
            files_total: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_new: AtomicU64::new(0),
            bytes_transferred: AtomicU64::new(0),
        }
    }
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    /// Current phase.
    pub phase: Phase,
    /// Whether the totals are final.
    pub totals_known: bool,
    /// Files expected.
    pub files_total: u64,
    /// Bytes expected.
    pub bytes_total: u64,
    /// Files done.
    pub files_done: u64,
    /// Bytes done.
    pub bytes_done: u64,
    /// Logical bytes new to the repository.
    pub bytes_new: u64,
    /// Bytes moved to or from storage.
    pub bytes_transferred: u64,
    /// Seconds since start.
    pub elapsed_secs: f64,
}

impl Progress {
    /// Requests cancellation; the engine stops at its next check and returns [`crate::Error::Canceled`].
    pub fn cancel(&self) {
        self.canceled.store(true, Relaxed);
    }

    /// Whether cancellation was requested.
    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Relaxed)
    }

    /// Fails with [`crate::Error::Canceled`] once cancellation was requested.
    pub fn check(&self) -> crate::Result<()> {
        if self.is_canceled() {
            Err(crate::Error::Canceled)
        } else {
            Ok(())
        }
    }

    /// Sets the phase.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }

    /// Claims the totals scan: true for the first caller only.
    pub fn claim_scan(&self) -> bool {
        !self.scan_started.swap(true, Relaxed)
    }

    /// Sets final totals.
    pub fn set_totals(&self, files: u64, bytes: u64) {
        self.files_total.store(files, Relaxed);
        self.bytes_total.store(bytes, Relaxed);
        self.totals_known.store(true, Relaxed);
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Copies the counters.
    pub fn report(&self) -> ProgressReport {
        let phase = match self.phase.load(Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Finishing,
            _ => Phase::Done,
        };
        ProgressReport {
            phase,
            totals_known: self.totals_known.load(Relaxed),
            files_total: self.files_total.load(Relaxed),
            bytes_total: self.bytes_total.load(Relaxed),
            files_done: self.files_done.load(Relaxed),
            bytes_done: self.bytes_done.load(Relaxed),
            bytes_new: self.bytes_new.load(Relaxed),
            bytes_transferred: self.bytes_transferred.load(Relaxed),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
        }
    }
}
