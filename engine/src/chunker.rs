//! Content-defined chunking: FastCDC (gear rolling hash with normalized chunking) over a gear table
//! derived from the repository's chunker key, so chunk boundaries do not leak across repositories.
//!
//! Runs of zero bytes (empty regions of block devices and images, holes of sparse files) are skipped at
//! memory speed instead of being hashed byte by byte: after 64 zero bytes the gear hash sits at a fixed
//! point, so whether a zero run can hold a boundary is known in advance. The boundaries are exactly those
//! of the byte-by-byte loop; all-zero chunks are handed out as [`Chunk::Zeros`], without a copy.

use std::io::Read;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Chunk size parameters, stored in the repository config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// Smallest chunk (except the last one of a file).
    pub min: u32,
    /// Target average chunk size; a power of two.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 128 * 1024,
            avg: 512 * 1024,
            max: 2 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Checks the parameters are usable.
    pub fn validate(&self) -> Result<(), String> {
        if !self.avg.is_power_of_two()
            || self.min == 0
            || self.min >= self.avg
            || self.avg >= self.max
        {
            return Err(format!("bad chunker parameters {self:?}"));
        }
        if self.max > 64 * 1024 * 1024 {
            return Err("chunks over 64 MiB are not supported".into());
        }
        Ok(())
    }
}

/// A FastCDC chunker with a keyed gear table.
#[derive(Clone)]
pub struct Chunker {
    gear: Box<[u64; 256]>,
    min: usize,
    avg: usize,
    max: usize,
    mask_small: u64,
    mask_large: u64,
    /// The gear hash after 64 or more zero bytes: `h = 2h + gear[0]` has the one fixed point `-gear[0]`.
    zero_fixed: u64,
}

/// One chunk of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes that are not all zero (its own exact-size copy).
    Data(Bytes),
    /// This many zero bytes.
    Zeros(usize),
}

impl Chunk {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Chunk::Data(b) => b.len(),
            Chunk::Zeros(n) => *n,
        }
    }

    /// Whether it holds no bytes (never the case for a chunk a stream hands out).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its bytes (zeros allocated).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Chunk::Data(b) => b,
            Chunk::Zeros(n) => Bytes::from(vec![0u8; n]),
        }
    }
}

/// Index of the first non-zero byte of `data` (its length when all are zero), 64 bytes at a time.
fn first_nonzero(data: &[u8]) -> usize {
    let mut i = 0;
    for c in data.chunks_exact(64) {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            break;
        }
        i += 64;
    }
    i + data[i..]
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(data.len() - i)
}

/// A mask with `bits` bits set, spread over the high 48 bits of the hash (which depend on the most bytes).
fn spread_mask(bits: u32) -> u64 {
    let mut m = 0u64;
    let step = 48 / bits.max(1);
    for i in 0..bits {
        m |= 1 << (63 - i * step);
    }
    m
}

impl Chunker {
    /// Builds a chunker from the repository's chunker key and parameters.
    pub fn new(key: &[u8; 32], p: ChunkerParams) -> Self {
        let mut gear = Box::new([0u64; 256]);
        let mut xof = blake3::Hasher::new_keyed(key)
            .update(b"gear table")
            .finalize_xof();
        let mut b = [0u8; 8];
        for g in gear.iter_mut() {
            xof.fill(&mut b);
            *g = u64::from_le_bytes(b);
        }
        let bits = p.avg.trailing_zeros();
        Chunker {
            min: p.min as usize,
            avg: p.avg as usize,
            max: p.max as usize,
            mask_small: spread_mask(bits + 2),
            mask_large: spread_mask(bits.saturating_sub(2)),
            zero_fixed: gear[0].wrapping_neg(),
            gear,
        }
    }

    /// Largest chunk this chunker emits.
    pub fn max_size(&self) -> usize {
        self.max
    }

    /// Length of the first chunk of `data`. With `eof` false, `data` must hold at least `max` bytes
    /// (or the whole rest of the stream).
    pub fn cut(&self, data: &[u8]) -> usize {
        let n = data.len();
        if n <= self.min {
            return n;
        }
        let end = n.min(self.max);
        let mid = self.avg.min(end);
        let mut h: u64 = 0;
        let mut i = self.min;
        // At the fixed point a zero byte leaves the hash as it is; where the fixed point fails the mask, no
        // boundary can fall anywhere in the zero run, so the run is skipped whole.
        let skip_small = self.zero_fixed & self.mask_small != 0;
        let skip_large = self.zero_fixed & self.mask_large != 0;
        while i < mid {
            if skip_small && h == self.zero_fixed && data[i] == 0 {
                i += first_nonzero(&data[i..mid]);
                continue;
            }
            h = (h << 1).wrapping_add(self.gear[data[i] as usize]);
            if h & self.mask_small == 0 {
                return i + 1;
            }
            i += 1;
        }
        while i < end {
            if skip_large && h == self.zero_fixed && data[i] == 0 {
                i += first_nonzero(&data[i..end]);
                continue;
            }
            h = (h << 1).wrapping_add(self.gear[data[i] as usize]);
            if h & self.mask_large == 0 {
                return i + 1;
            }
            i += 1;
        }
        end
    }

    /// [`Chunker::cut`] one byte at a time, as the format defines it (the reference for tests).
    #[cfg(test)]
    fn cut_bytewise(&self, data: &[u8]) -> usize {
        let n = data.len();
        if n <= self.min {
            return n;
        }
        let end = n.min(self.max);
        let mid = self.avg.min(end);
        let mut h: u64 = 0;
        for (i, &b) in data.iter().enumerate().take(end).skip(self.min) {
            h = (h << 1).wrapping_add(self.gear[b as usize]);
            let mask = if i < mid {
                self.mask_small
            } else {
                self.mask_large
            };
            if h & mask == 0 {
                return i + 1;
            }
        }
        end
    }

    /// Splits a stream into chunks, calling `f` with each. One read buffer of `max + 1 MiB` is reused for
    /// the whole stream (compacted in place); each chunk is handed out as its own exact-size copy, or as
    /// [`Chunk::Zeros`] when all its bytes are zero.
    pub fn chunk_stream<R: Read, E>(
        &self,
        r: R,
        f: impl FnMut(Chunk) -> Result<(), E>,
        on_io: impl FnMut(std::io::Error) -> E,
    ) -> Result<(), E> {
        self.chunk_stream_in(&mut Vec::new(), r, f, on_io)
    }

    /// [`Chunker::chunk_stream`] with a caller-owned read buffer, so a thread chunking many files allocates
    /// (and zeroes) it once instead of once per file.
    pub fn chunk_stream_in<R: Read, E>(
        &self,
        buf: &mut Vec<u8>,
        mut r: R,
        mut f: impl FnMut(Chunk) -> Result<(), E>,
        mut on_io: impl FnMut(std::io::Error) -> E,
    ) -> Result<(), E> {
        const READ: usize = 1 << 20;
        if buf.len() < self.max + READ {
            buf.resize(self.max + READ, 0);
        }
        let (mut start, mut end, mut eof) = (0usize, 0usize, false);
        loop {
            while !eof && end - start < self.max {
                if end + READ > buf.len() {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                let got = loop {
                    match r.read(&mut buf[end..end + READ]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(on_io(e)),
                    }
                };
                if got == 0 {
                    eof = true;
                }
                end += got;
            }
            if start == end {
                return Ok(());
            }
            let n = self.cut(&buf[start..end]);
            let bytes = &buf[start..start + n];
            f(if first_nonzero(bytes) == n {
                Chunk::Zeros(n)
            } else {
                Chunk::Data(Bytes::copy_from_slice(bytes))
            })?;
            start += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::pseudo_random;
    use proptest::prelude::*;

    fn chunker() -> Chunker {
        Chunker::new(
            &[7; 32],
            ChunkerParams {
                min: 1024,
                avg: 4096,
                max: 16384,
            },
        )
    }

    fn chunks(c: &Chunker, data: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        c.chunk_stream(
            data,
            |b| -> Result<(), ()> {
                out.push(b.into_bytes());
                Ok(())
            },
            |_| (),
        )
        .expect("chunk");
        out
    }

    /// Data with long zero runs between random stretches, as a mostly empty disk image has.
    fn sparse_image(seed: u64) -> Vec<u8> {
        let mut data = Vec::new();
        for i in 0..12u64 {
            data.extend(pseudo_random(
                ((seed + i) % 7 * 3000 + 10) as usize,
                seed ^ i,
            ));
            data.extend(std::iter::repeat_n(
                0u8,
                ((seed * 31 + i * 977) % 50_000) as usize,
            ));
        }
        data
    }

    #[test]
    fn zero_runs_are_cut_exactly_where_the_bytewise_loop_cuts() {
        // Many keys: the fixed point passes one of the masks for some of them (no skipping then).
        for key in 0..64u8 {
            let c = Chunker::new(
                &[key; 32],
                ChunkerParams {
                    min: 1024,
                    avg: 4096,
                    max: 16384,
                },
            );
            for seed in 0..8 {
                let data = sparse_image(seed + u64::from(key));
                let mut at = 0;
                while at < data.len() {
                    let n = c.cut(&data[at..]);
                    assert_eq!(
                        n,
                        c.cut_bytewise(&data[at..]),
                        "key {key} seed {seed} at {at}"
                    );
                    at += n;
                }
            }
        }
    }

    #[test]
    fn all_zero_chunks_come_as_zeros_without_bytes() {
        let c = chunker();
        let mut data = pseudo_random(5000, 1);
        data.extend(vec![0u8; 100_000]);
        data.extend(pseudo_random(5000, 2));
        let mut got = Vec::new();
        c.chunk_stream(
            data.as_slice(),
            |ch| -> Result<(), ()> {
                got.push(ch);
                Ok(())
            },
            |_| (),
        )
        .expect("chunk");
        assert!(
            got.iter()
                .filter(|c| matches!(c, Chunk::Zeros(16384)))
                .count()
                >= 4,
            "{got:?}"
        );
        let joined: Vec<u8> = got.into_iter().flat_map(|c| c.into_bytes()).collect();
        assert_eq!(joined, data);
    }

    #[test]
    fn average_size_is_near_target() {
        let c = Chunker::new(&[1; 32], ChunkerParams::default());
        let data = pseudo_random(64 << 20, 3);
        let n = chunks(&c, &data).len();
        let avg = data.len() / n;
        assert!((300_000..900_000).contains(&avg), "average chunk {avg}");
    }

    #[test]
    fn boundaries_resynchronise_after_an_insert() {
        let c = chunker();
        let data = pseudo_random(400_000, 9);
        let mut shifted = b"inserted prefix".to_vec();
        shifted.extend_from_slice(&data);
        let a: std::collections::HashSet<_> = chunks(&c, &data).into_iter().collect();
        let b = chunks(&c, &shifted);
        let shared = b.iter().filter(|x| a.contains(*x)).count();
        assert!(
            shared * 10 >= b.len() * 8,
            "only {shared} of {} chunks shared",
            b.len()
        );
    }

    #[test]
    fn different_keys_cut_differently() {
        let data = pseudo_random(200_000, 5);
        let p = ChunkerParams {
            min: 1024,
            avg: 4096,
            max: 16384,
        };
        let a: Vec<usize> = chunks(&Chunker::new(&[1; 32], p), &data)
            .iter()
            .map(|b| b.len())
            .collect();
        let b: Vec<usize> = chunks(&Chunker::new(&[2; 32], p), &data)
            .iter()
            .map(|b| b.len())
            .collect();
        assert_ne!(a, b);
    }

    proptest! {
        #[test]
        fn chunks_reassemble_and_respect_bounds(data in proptest::collection::vec(any::<u8>(), 0..60_000), seed in any::<u64>()) {
            let c = chunker();
            let mut data = data;
            data.extend(pseudo_random((seed % 50_000) as usize, seed));
            let parts = chunks(&c, &data);
            let joined: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
            prop_assert_eq!(&joined, &data);
            for (i, p) in parts.iter().enumerate() {
                prop_assert!(p.len() <= 16384);
                if i + 1 < parts.len() { prop_assert!(p.len() > 1024); }
                prop_assert!(!p.is_empty());
            }
        }
    }
}
