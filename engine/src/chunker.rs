//! Content-defined chunking: FastCDC (gear rolling hash with normalized chunking) over a gear table
//! derived from the repository's chunker key, so chunk boundaries do not leak across repositories.
//!
//! Runs of zero bytes (empty regions of block devices and images, holes of sparse files) are skipped at
//! memory speed instead of being hashed byte by byte: after 64 zero bytes the gear hash sits at a fixed
//! point, so whether a zero run can hold a boundary is known in advance. The boundaries are exactly those
//! of the byte-by-byte loop; all-zero chunks are handed out as [`Chunk::Zeros`], without a copy.

use std::borrow::Cow;
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
pub enum Chunk<'a> {
    /// Bytes that are not all zero: borrowed from the chunker's read buffer when the chunk lies within one
    /// read, or gathered across reads into a buffer of its own.
    Data(Cow<'a, [u8]>),
    /// This many zero bytes.
    Zeros(usize),
}

impl Chunk<'_> {
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

    /// Its bytes as an owned buffer (copied when borrowed, zeros allocated).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Chunk::Data(b) => Bytes::from(b.into_owned()),
            Chunk::Zeros(n) => Bytes::from(vec![0u8; n]),
        }
    }
}

/// The state of a chunk being cut across reads: its bytes so far, and the gear hash over them.
#[derive(Debug, Default)]
struct Cutting {
    len: usize,
    h: u64,
}

/// The bytes of a chunk that began in an earlier read. While all of them are zero they are only counted.
#[derive(Default)]
struct Held {
    zeros: usize,
    bytes: Vec<u8>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.zeros == 0 && self.bytes.is_empty()
    }

    /// Adds `data`, kept as a count while everything held is zero.
    fn push(&mut self, data: &[u8], max: usize) {
        if self.bytes.is_empty() && first_nonzero(data) == data.len() {
            self.zeros += data.len();
            return;
        }
        if self.bytes.is_empty() {
            self.bytes.reserve_exact(max);
            self.bytes.resize(std::mem::take(&mut self.zeros), 0);
        }
        self.bytes.extend_from_slice(data);
    }

    /// The chunk made of what is held and then `tail`.
    fn chunk<'a>(&mut self, tail: &'a [u8], max: usize) -> Chunk<'a> {
        if self.is_empty() {
            return if first_nonzero(tail) == tail.len() {
                Chunk::Zeros(tail.len())
            } else {
                Chunk::Data(Cow::Borrowed(tail))
            };
        }
        self.push(tail, max);
        if self.bytes.is_empty() {
            return Chunk::Zeros(std::mem::take(&mut self.zeros));
        }
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.shrink_to_fit();
        Chunk::Data(Cow::Owned(bytes))
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

    /// Length of the first chunk of `data`, which holds the whole rest of the stream or at least `max` bytes
    /// (for tests, against [`Chunker::cut_bytewise`]; a backup cuts across its reads with `feed`).
    #[cfg(test)]
    fn cut(&self, data: &[u8]) -> usize {
        self.feed(&mut Cutting::default(), data)
            .unwrap_or(data.len())
    }

    /// Feeds the next bytes of the chunk being cut: how many of them end it, when it ends within them.
    /// With `None` all of `data` belongs to the chunk, which is still shorter than `max`.
    fn feed(&self, st: &mut Cutting, data: &[u8]) -> Option<usize> {
        let limit = data.len().min(self.max - st.len);
        // Bytes below `min` are not hashed; then the small mask up to `avg`, the large one up to `max`.
        let from = self.min.saturating_sub(st.len).min(limit);
        let mid = self.avg.saturating_sub(st.len).clamp(from, limit);
        let found = self
            .roll(&mut st.h, data, from, mid, self.mask_small)
            .or_else(|| self.roll(&mut st.h, data, mid, limit, self.mask_large))
            .or((st.len + limit == self.max).then_some(limit));
        st.len += data.len();
        found
    }

    /// Rolls the gear hash `h` over `data[from..to]` until it matches `mask`: the index after the matching byte
    /// (`h` is then stale: the chunk ends there).
    ///
    /// Every 64 bytes it looks whether the hash sits at its zero fixed point: then a zero byte leaves it as it
    /// is, and where the fixed point fails the mask no boundary can fall anywhere in the zero run, so the run
    /// is skipped whole (exactly what the byte loop would find).
    fn roll(&self, h: &mut u64, data: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
        let skip_zeros = self.zero_fixed & mask != 0;
        let mut i = from;
        while i < to {
            let block = &data[i..to.min(i + 64)];
            if let Some(k) = self.roll_block(h, block, mask) {
                return Some(i + k);
            }
            i += block.len();
            if skip_zeros && *h == self.zero_fixed {
                i += first_nonzero(&data[i..to]);
            }
        }
        None
    }

    /// [`Chunker::roll`] over a block, testing nothing but the mask. Two bytes per step, both hashes from the
    /// one before the step (`h2 = 4h + 2g0 + g1`, the same value as `2h1 + g1`): the chain of dependent
    /// shifts and adds is half as long.
    fn roll_block(&self, h: &mut u64, block: &[u8], mask: u64) -> Option<usize> {
        let mut hash = *h;
        let mut pairs = block.chunks_exact(2);
        for (k, p) in pairs.by_ref().enumerate() {
            let (g0, g1) = (self.gear[p[0] as usize], self.gear[p[1] as usize]);
            let h1 = (hash << 1).wrapping_add(g0);
            let h2 = (hash << 2).wrapping_add((g0 << 1).wrapping_add(g1));
            if h1 & mask == 0 {
                return Some(2 * k + 1);
            }
            if h2 & mask == 0 {
                return Some(2 * k + 2);
            }
            hash = h2;
        }
        if let [b] = pairs.remainder() {
            hash = (hash << 1).wrapping_add(self.gear[*b as usize]);
            if hash & mask == 0 {
                return Some(block.len());
            }
        }
        *h = hash;
        None
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

    /// Splits a stream into chunks, calling `f` with each. One read buffer of 1 MiB is reused for the whole
    /// stream; a chunk within one read is lent from it, one spanning reads is gathered into a buffer of its
    /// own, and an all-zero chunk comes as [`Chunk::Zeros`].
    pub fn chunk_stream<R: Read, E>(
        &self,
        r: R,
        f: impl FnMut(Chunk<'_>) -> Result<(), E>,
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
        mut f: impl FnMut(Chunk<'_>) -> Result<(), E>,
        mut on_io: impl FnMut(std::io::Error) -> E,
    ) -> Result<(), E> {
        const READ: usize = 1 << 20;
        if buf.len() < READ {
            buf.resize(READ, 0);
        }
        let mut st = Cutting::default();
        let mut held = Held::default();
        loop {
            let got = loop {
                match r.read(&mut buf[..READ]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(on_io(e)),
                }
            };
            if got == 0 {
                if !held.is_empty() {
                    f(held.chunk(&[], self.max))?;
                }
                return Ok(());
            }
            let mut at = 0;
            while at < got {
                let rest = &buf[at..got];
                match self.feed(&mut st, rest) {
                    Some(n) => {
                        f(held.chunk(&rest[..n], self.max))?;
                        st = Cutting::default();
                        at += n;
                    }
                    None => {
                        held.push(rest, self.max);
                        at = got;
                    }
                }
            }
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

    /// The chunks of what `r` reads, each kept (owned).
    fn owned_chunks(c: &Chunker, r: impl Read) -> Vec<Chunk<'static>> {
        let mut out = Vec::new();
        c.chunk_stream(
            r,
            |ch| -> Result<(), ()> {
                out.push(match ch {
                    Chunk::Data(d) => Chunk::Data(Cow::Owned(d.into_owned())),
                    Chunk::Zeros(n) => Chunk::Zeros(n),
                });
                Ok(())
            },
            |_| (),
        )
        .expect("chunk");
        out
    }

    fn chunks(c: &Chunker, data: &[u8]) -> Vec<Bytes> {
        owned_chunks(c, data)
            .into_iter()
            .map(Chunk::into_bytes)
            .collect()
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
        let got = owned_chunks(&c, data.as_slice());
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

    /// Reads `data` in pieces of the given sizes, in turn (as a pipe or a short-reading file would).
    struct Pieces<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        next: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let want = self.sizes[self.next % self.sizes.len()].max(1);
            self.next += 1;
            let n = want.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// The chunks of `data` as the byte loop cuts it whole, each as zeros or bytes.
    fn reference_chunks(c: &Chunker, data: &[u8]) -> Vec<Chunk<'static>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = c.cut_bytewise(&data[at..]);
            let bytes = &data[at..at + n];
            out.push(if bytes.iter().all(|&b| b == 0) {
                Chunk::Zeros(n)
            } else {
                Chunk::Data(Cow::Owned(bytes.to_vec()))
            });
            at += n;
        }
        out
    }

    proptest! {
        #[test]
        fn chunks_cut_across_reads_are_the_chunks_of_the_whole_stream(
            seed in 0u64..1000,
            sizes in proptest::collection::vec(1usize..40_000, 1..8),
        ) {
            let c = chunker();
            let data = sparse_image(seed);
            let got = owned_chunks(&c, Pieces { data: &data, sizes, next: 0 });
            prop_assert_eq!(got, reference_chunks(&c, &data));
        }

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
