//! Reading a file once without keeping it in the page cache.
//!
//! A mover pod reads a snapshot's clone exactly once, and nobody else reads it. The kernel still caches every
//! page it reads and charges that cache to the pod's memory cgroup, so a backup of a large volume fills the
//! pod's memory limit with cache nobody will use and evicts other pods' cache on the node. [`DropBehind`]
//! tells the kernel, every few MiB, that the pages already read will not be needed again
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`). Measured on the e2e cluster's btrfs volumes: a backup of one 4 GiB
//! file under a 1 GiB memory limit peaked at 116 MiB of charged memory instead of the whole 1 GiB, in the same
//! time (37–38 s either way).
//!
//! Not for a live filesystem others use: it drops their cached pages too. The command line only does it when
//! asked (`ferry backup --drop-cache`); the data path in a mover pod always does.

use std::fs::File;
use std::io::Read;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

/// Pages read are dropped in steps of this many bytes (and the rest when the reader is dropped).
const STEP: u64 = 8 << 20;

/// A [`Read`] over a file that drops the pages it has read from the page cache.
pub struct DropBehind {
    file: File,
    /// Bytes read so far.
    read: u64,
    /// Bytes from the start already dropped.
    dropped: u64,
}

impl DropBehind {
    /// Reads `file` from its current position (the start).
    pub fn new(file: File) -> Self {
        DropBehind {
            file,
            read: 0,
            dropped: 0,
        }
    }

    /// Advises the kernel to drop `len` bytes at `offset` (0 = to the end). Advice only: an error changes
    /// nothing the backup depends on, so it is ignored.
    fn drop_range(&self, offset: u64, len: u64) {
        let _ = posix_fadvise(
            &self.file,
            offset as libc::off_t,
            len as libc::off_t,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

impl Read for DropBehind {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        if self.read - self.dropped >= STEP {
            self.drop_range(self.dropped, self.read - self.dropped);
            self.dropped = self.read;
        }
        Ok(n)
    }
}

impl Drop for DropBehind {
    fn drop(&mut self) {
        if self.read > 0 {
            self.drop_range(0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of `path` resident in the page cache, as util-linux's `fincore` reports them.
    fn resident(path: &std::path::Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(
            out.status.success(),
            "fincore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("fincore prints a number")
    }

    #[test]
    fn a_file_read_through_drop_behind_leaves_little_in_the_page_cache() {
        // Not /tmp: a tmpfs keeps its pages whatever the advice.
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("f");
        let len = 24 << 20;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let open = || File::open(&path).expect("open");
        open().sync_all().expect("sync"); // clean pages can be dropped

        let mut plain = Vec::new();
        open().read_to_end(&mut plain).expect("read");
        assert_eq!(plain, data);
        let cached = resident(&path);

        let mut back = Vec::new();
        let mut r = DropBehind::new(open());
        r.read_to_end(&mut back).expect("read");
        assert_eq!(back, data, "the bytes are read unchanged");
        let during = resident(&path);
        drop(r);
        let after = resident(&path);
        assert!(
            cached > len as u64 / 2,
            "a plain read leaves the file cached ({cached} bytes)"
        );
        assert!(
            during < cached,
            "dropped while reading: {during} of {cached} bytes left"
        );
        assert_eq!(after, 0, "nothing left once the reader is dropped");
    }
}
