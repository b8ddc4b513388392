//! Reading a sparse file without reading its holes.
//!
//! A hole (a range of a sparse file with no blocks: the unused space of a disk image, a preallocated log)
//! reads as zeros, and the kernel copies those zeros into the reader's buffer like any data. [`Holes`] asks
//! the filesystem where the data is (`lseek` with `SEEK_DATA` and `SEEK_HOLE`) and hands out the zeros of
//! a hole without a read; the chunker then passes over zero runs at memory speed (`crate::chunker`). The
//! bytes are the same either way, so the chunks and their ids are too. A filesystem that keeps no hole
//! information is read whole.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// A [`Read`] over a file (at its current position) that skips the file's holes.
pub struct Holes<R> {
    inner: R,
    /// Offset in the file of the next byte handed out.
    pos: u64,
    /// `pos..hole_end` is a hole, `hole_end..data_end` data; past `data_end` the filesystem is asked again.
    hole_end: u64,
    data_end: u64,
}

impl<R: Read + Seek + AsFd> Holes<R> {
    /// Reads `inner` from its current offset `at`, asking where its holes are only if `sparse` (a file
    /// with fewer blocks than its size: most files have no holes, and then no `lseek` is spent on them).
    pub fn new(inner: R, at: u64, sparse: bool) -> Self {
        Holes {
            inner,
            pos: at,
            hole_end: at,
            data_end: if sparse { at } else { u64::MAX },
        }
    }

    /// Finds the hole and the data from `pos` on, and leaves the file's offset at `pos`.
    fn locate(&mut self) -> std::io::Result<()> {
        let fd = self.inner.as_fd();
        let at = self.pos as libc::off_t;
        match lseek(fd, at, Whence::SeekData) {
            Ok(data) => {
                let hole = lseek(fd, data, Whence::SeekHole)?;
                self.hole_end = data as u64;
                self.data_end = (hole as u64).max(self.hole_end);
            }
            // No data from here on: a hole to the end of the file.
            Err(Errno::ENXIO) => {
                let size = nix::sys::stat::fstat(fd)?.st_size as u64;
                self.hole_end = size.max(self.pos);
                self.data_end = self.hole_end;
            }
            // No hole information here: read the rest.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                self.hole_end = self.pos;
                self.data_end = u64::MAX;
            }
            Err(e) => return Err(e.into()),
        }
        // `lseek` moved the descriptor's offset: back to where the reading is.
        self.inner.seek(SeekFrom::Start(self.pos))?;
        Ok(())
    }
}

impl<R: Read + Seek + AsFd> Read for Holes<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.data_end {
            self.locate()?;
        }
        if self.pos < self.hole_end {
            let n = (self.hole_end - self.pos).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.pos += n as u64;
            self.inner.seek(SeekFrom::Start(self.pos))?;
            return Ok(n);
        }
        let want = (self.data_end - self.pos).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Whether a file with this metadata may have holes: fewer bytes in blocks than its size. Never a device.
pub fn may_have_holes(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.is_file() && meta.blocks() * 512 < meta.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::pseudo_random;
    use std::fs::File;
    use std::os::fd::BorrowedFd;
    use std::os::unix::fs::FileExt;

    /// A file that counts the bytes read from it.
    struct Counted {
        file: File,
        read: u64,
    }

    impl Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.file.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    impl Seek for Counted {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            self.file.seek(to)
        }
    }

    impl AsFd for Counted {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.file.as_fd()
        }
    }

    /// Reads all of `path` from `offset` through [`Holes`]: the bytes, and how many were read from the file.
    fn read_through(path: &std::path::Path, offset: u64, sparse: bool) -> (Vec<u8>, u64) {
        let mut file = File::open(path).expect("open");
        file.seek(SeekFrom::Start(offset)).expect("seek");
        let mut h = Holes::new(Counted { file, read: 0 }, offset, sparse);
        let mut out = Vec::new();
        let mut buf = vec![0xAAu8; 300_000]; // not a divisor of the extents: reads end mid-hole
        loop {
            let n = h.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, h.inner.read)
    }

    #[test]
    fn holes_read_as_zeros_without_reading_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let f = File::create(&path).expect("create");
        let (a, b) = (pseudo_random(1 << 20, 1), pseudo_random(100_000, 2));
        f.set_len(64 << 20).expect("size"); // ends in a hole
        f.write_all_at(&a, 8 << 20).expect("write");
        f.write_all_at(&b, 40 << 20).expect("write");
        f.sync_all().expect("sync"); // some filesystems report holes only for written-back extents
        let whole = std::fs::read(&path).expect("read");
        assert!(may_have_holes(&f.metadata().expect("meta")));

        let (got, read) = read_through(&path, 0, true);
        assert_eq!(got, whole);
        // Only the data extents were read (a filesystem rounds them to its blocks).
        assert!(read < 4 << 20, "{read} bytes read for 1.1 MB of data");

        // From an offset inside a hole and inside data, as a segment's reader starts.
        for offset in [(3 << 20) + 5, (8 << 20) + 12_345] {
            let (got, _) = read_through(&path, offset, true);
            assert_eq!(got, whole[offset as usize..]);
        }
        // Not known to be sparse: read whole, the same bytes.
        let (got, read) = read_through(&path, 0, false);
        assert_eq!((got.len() as u64, read), (64 << 20, 64 << 20));
    }

    #[test]
    fn a_file_without_holes_is_read_as_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dense");
        let data = pseudo_random(3 << 20, 3);
        std::fs::write(&path, &data).expect("write");
        let (got, read) = read_through(&path, 0, true);
        assert_eq!((got, read), (data, 3 << 20));
    }
}
