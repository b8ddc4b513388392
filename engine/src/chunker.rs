//! Content-defined chunking: FastCDC (gear rolling hash with normalized chunking) over a gear table
//! derived from the repository's chunker key, so chunk boundaries do not leak across repositories.

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
            gear,
            min: p.min as usize,
            avg: p.avg as usize,
            max: p.max as usize,
            mask_small: spread_mask(bits + 2),
            mask_large: spread_mask(bits.saturating_sub(2)),
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
        while i < mid {
            h = (h << 1).wrapping_add(self.gear[data[i] as usize]);
            if h & self.mask_small == 0 {
                return i + 1;
            }
            i += 1;
        }
        while i < end {
            h = (h << 1).wrapping_add(self.gear[data[i] as usize]);
            if h & self.mask_large == 0 {
                return i + 1;
            }
            i += 1;
        }
        end
    }

    /// Splits a stream into chunks, calling `f` with each. One read buffer of `max + 1 MiB` is reused for
    /// the whole stream (compacted in place); each chunk is handed out as its own exact-size copy.
    pub fn chunk_stream<R: Read, E>(
        &self,
        r: R,
        f: impl FnMut(Bytes) -> Result<(), E>,
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
        mut f: impl FnMut(Bytes) -> Result<(), E>,
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
            f(Bytes::copy_from_slice(&buf[start..start + n]))?;
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
                out.push(b);
                Ok(())
            },
            |_| (),
        )
        .expect("chunk");
        out
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
