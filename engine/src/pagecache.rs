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
//! A restore has the same problem with the pages it writes: [`WriteBehind`] drops them once they are on disk.
//!
//! Not for a live filesystem others use: it drops their cached pages too. The command line only does it when
//! asked (`ferry backup --drop-cache`, `ferry restore --drop-cache`); the data path in a mover pod always
//! does.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek};
use std::sync::Mutex;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

/// Pages read are dropped in steps of this many bytes (and the rest when the reader is dropped).
const STEP: u64 = 8 << 20;

/// A [`Read`] over a file that drops the pages it has read from the page cache.
pub struct DropBehind {
    file: File,
    /// Where reading started: only pages from here on are dropped (another reader may be reading the
    /// file's earlier part).
    start: u64,
    /// Bytes read so far.
    read: u64,
    /// Bytes from `start` already dropped.
    dropped: u64,
    /// A read returned 0: the file ended.
    eof: bool,
}

impl DropBehind {
    /// Reads `file` from its current position.
    pub fn new(mut file: File) -> Self {
        DropBehind {
            start: file.stream_position().unwrap_or(0),
            file,
            read: 0,
            dropped: 0,
            eof: false,
        }
    }

    fn drop_range(&self, offset: u64, len: u64) {
        dont_need(&self.file, offset, len);
    }
}

/// Advises the kernel to drop `len` bytes of `file` at `offset` (0 = to the end) from the page cache; dirty
/// pages are not dropped, their write-back is started. Advice only: an error changes nothing the caller
/// depends on, so it is ignored.
fn dont_need(file: &File, offset: u64, len: u64) {
    let _ = posix_fadvise(
        file,
        offset as libc::off_t,
        len as libc::off_t,
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Written bytes whose pages a [`WriteBehind`] lets stay cached before advising them away again.
const WRITE_LAG: u64 = 64 << 20;
/// Written ranges a [`WriteBehind`] remembers at most. Each holds a file descriptor, so no more than an
/// eighth of the process's limit on them, and never more than 1024: with a fixed 1024, a restore under
/// `ulimit -n 256` failed with "Too many open files".
fn write_ranges() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    ranges_within(soft)
}

/// [`write_ranges`] for a limit of `descriptors`.
fn ranges_within(descriptors: u64) -> usize {
    usize::try_from(descriptors / 8)
        .unwrap_or(usize::MAX)
        .clamp(8, 1024)
}

/// Drops written pages from the page cache once they are on disk, for a restore into a volume nobody uses
/// yet. A dirty page cannot be dropped (the advice only starts its write-back), so each written range is
/// advised twice: when written, which starts its write-back at once instead of up to 30 s later, and again
/// after [`WRITE_LAG`] more bytes were written, when its write-back has most likely finished and the advice
/// drops it. Shared by a restore's writer threads.
pub struct WriteBehind {
    ranges: Mutex<Ranges>,
    /// The most ranges (and descriptors) remembered at once.
    max_ranges: usize,
}

impl Default for WriteBehind {
    fn default() -> Self {
        Self::with_max_ranges(write_ranges())
    }
}

#[derive(Default)]
struct Ranges {
    queue: VecDeque<(File, u64, u64)>,
    bytes: u64,
}

impl WriteBehind {
    /// Remembers at most `max_ranges` written ranges (at least one).
    pub fn with_max_ranges(max_ranges: usize) -> Self {
        WriteBehind {
            ranges: Default::default(),
            max_ranges: max_ranges.max(1),
        }
    }

    /// Notes that `len` bytes were just written to `file` at `offset`.
    pub fn wrote(&self, file: &File, offset: u64, len: u64) {
        dont_need(file, offset, len);
        let Ok(file) = file.try_clone() else {
            return; // out of descriptors: this range just stays cached
        };
        let due = {
            let mut r = self.ranges.lock().expect("write-behind lock");
            r.queue.push_back((file, offset, len));
            r.bytes += len;
            let mut due = Vec::new();
            while r.bytes > WRITE_LAG || r.queue.len() > self.max_ranges {
                let Some(old) = r.queue.pop_front() else {
                    break;
                };
                r.bytes -= old.2;
                due.push(old);
            }
            due
        };
        for (f, offset, len) in due {
            dont_need(&f, offset, len);
        }
    }

    /// Advises every range still remembered, and forgets them: after the writer flushed its files, this
    /// drops the rest of their pages.
    pub fn finish(&self) {
        let queue = std::mem::take(&mut *self.ranges.lock().expect("write-behind lock")).queue;
        for (f, offset, len) in queue {
            dont_need(&f, offset, len);
        }
    }
}

impl Read for DropBehind {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        self.eof |= n == 0 && !buf.is_empty();
        if self.read - self.dropped >= STEP {
            self.drop_range(self.start + self.dropped, self.read - self.dropped);
            self.dropped = self.read;
        }
        Ok(n)
    }
}

impl Seek for DropBehind {
    /// Moves on (a hole skipped by `crate::holes::Holes`): what lies between counts as read, to be dropped
    /// with the rest (a hole has no pages to drop).
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let at = self.file.seek(to)?;
        self.read = self.read.max(at.saturating_sub(self.start));
        Ok(at)
    }
}

impl std::os::fd::AsFd for DropBehind {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for DropBehind {
    fn drop(&mut self) {
        // At the end of the file, to the end (the kernel keeps a partly covered last page otherwise); else
        // exactly what was read, leaving the next segment's pages to its own reader.
        match (self.read > self.dropped, self.eof) {
            (true, true) => self.drop_range(self.start + self.dropped, 0),
            (true, false) => self.drop_range(self.start + self.dropped, self.read - self.dropped),
            (false, _) => {}
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
    fn write_behind_holds_a_bounded_share_of_the_descriptor_limit() {
        assert_eq!(ranges_within(256), 32);
        assert_eq!(ranges_within(20), 8);
        assert_eq!(ranges_within(1 << 20), 1024);
        assert_eq!(ranges_within(u64::MAX), 1024); // RLIM_INFINITY
        let dir = tempfile::tempdir().expect("tempdir");
        let behind = WriteBehind::with_max_ranges(4);
        for k in 0..20 {
            let f = File::create(dir.path().join(format!("f{k}"))).expect("create");
            std::os::unix::fs::FileExt::write_all_at(&f, b"data", 0).expect("write");
            behind.wrote(&f, 0, 4);
        }
        let held = behind.ranges.lock().expect("lock").queue.len();
        assert_eq!(held, 4, "descriptors held past the bound");
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

    #[test]
    fn pages_written_through_write_behind_leave_the_page_cache() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("f");
        let (chunk, n) = (1usize << 20, 96u64);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("create");
        let behind = WriteBehind::default();
        for k in 0..n {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![k as u8; chunk], k * chunk as u64)
                .expect("write");
            behind.wrote(&f, k * chunk as u64, chunk as u64);
            if k == 31 {
                // The first 32 MiB on disk, as their early write-back would have them by the time they are
                // advised again (a test cannot wait on the disk's timing).
                f.sync_data().expect("sync");
            }
        }
        let during = resident(&path);
        f.sync_all().expect("sync");
        behind.finish();
        let after = resident(&path);
        let len = n * chunk as u64;
        assert!(
            during <= len - (32 << 20),
            "ranges written a lag ago and on disk are dropped while writing: {during} of {len} bytes cached"
        );
        assert_eq!(after, 0, "nothing left once flushed and finished");
        let mut back = Vec::new();
        File::open(&path)
            .expect("open")
            .read_to_end(&mut back)
            .expect("read");
        assert!(
            back.chunks(chunk)
                .enumerate()
                .all(|(k, c)| c.iter().all(|&b| b == k as u8))
        );
    }

    #[test]
    fn a_segment_read_through_drop_behind_drops_only_its_own_pages() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("f");
        let (len, offset, seg) = (24u64 << 20, 8u64 << 20, 10u64 << 20);
        std::fs::write(&path, vec![7u8; len as usize]).expect("write");
        let mut f = File::open(&path).expect("open");
        f.sync_all().expect("sync");
        std::io::copy(&mut f, &mut std::io::sink()).expect("read");
        let cached = resident(&path);
        assert_eq!(cached, len, "a plain read leaves the whole file cached");

        // One segment of the file, as a backup's reader reads a part of a large file.
        f.seek(std::io::SeekFrom::Start(offset)).expect("seek");
        let mut r = DropBehind::new(f).take(seg);
        assert_eq!(
            std::io::copy(&mut r, &mut std::io::sink()).expect("read"),
            seg
        );
        drop(r);
        assert_eq!(
            resident(&path),
            len - seg,
            "the segment's pages are dropped, the other readers' pages are kept"
        );
    }
}
