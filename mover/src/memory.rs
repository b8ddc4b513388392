//! Giving a backup's freed heap pages back to the kernel while it runs.
//!
//! The `ferry` binary keeps freed multi-MiB buffers in glibc's heap (its malloc settings, for the restore's
//! page faults). A backup of many files frees chunk buffers of every size, and the heap kept their pages:
//! `RssAnon` climbed from 84 to 147 MiB in the last second of a backup of the 20,000-file benchmark set
//! while the live heap never passed 87 MiB. Trimming every 250 ms during a backup kept that backup at
//! 102–106 MiB, no slower (`bench/RESULTS.md`, session 14). Restores are not trimmed: there it cost 10–20 %.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the heap is trimmed during a backup.
const EVERY: Duration = Duration::from_millis(250);

/// Trims the heap every 250 ms until dropped.
pub struct TrimWhileBackingUp {
    stop: Arc<AtomicBool>,
}

impl TrimWhileBackingUp {
    /// Starts trimming on a thread of its own.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(EVERY);
                trim();
            }
        });
        TrimWhileBackingUp { stop }
    }
}

impl Drop for TrimWhileBackingUp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Returns the heap's free pages to the kernel.
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own free lists; it takes the arenas' locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}
