//! Pack files and blob encoding.
//!
//! A blob's stored form is an envelope (see [`crate::crypto`]) around `compression (1) || payload`, where
//! compression is 0 (raw), 1 (LZ4 block with its length prefixed) or 2 (a Zstandard frame with its length
//! prefixed). Which one a repository writes is its [`Compression`]; every object says how it was stored,
//! so one repository may hold all three. Data is stored raw when compressing does not save at least 1/64.
//!
//! A pack is `blob envelope… || header envelope || header length (u32 LE) || "FERRYPK1"`. The header
//! (postcard [`PackHeader`]) lists every blob with its offset and lengths, so the index can be rebuilt from
//! the packs alone. A pack's id is the BLAKE3 hash of all its bytes. Data and tree blobs go to separate packs.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::crypto::{ENVELOPE_OVERHEAD, Keys, Kind};
use crate::error::{Error, Result};
use crate::id::{BlobId, PackId, storage_hash};

/// Trailer magic of a pack file.
pub const PACK_MAGIC: &[u8; 8] = b"FERRYPK1";
/// Pack header format version.
pub const PACK_VERSION: u32 = 1;
const COMPRESS_NONE: u8 = 0;
const COMPRESS_LZ4: u8 = 1;
const COMPRESS_ZSTD: u8 = 2;

/// How a repository compresses what it writes (its config; `lz4` for repositories made before it existed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Compression {
    /// LZ4: the fastest; the default.
    #[default]
    Lz4,
    /// Zstandard at this level (1–19): smaller, slower.
    Zstd(i32),
    /// Per object, from a sample: Zstandard level 3 for text-like data (LZ4 saves a third or more of the
    /// sample), LZ4 for data that compresses a little, raw for the rest.
    Auto,
}

/// Highest Zstandard level accepted (levels above 19 need far more memory to compress).
const ZSTD_MAX_LEVEL: i32 = 19;
/// The level [`Compression::Auto`] uses for text-like data.
const AUTO_ZSTD_LEVEL: i32 = 3;

impl std::str::FromStr for Compression {
    type Err = String;

    /// `lz4`, `auto`, `zstd` (level 3) or `zstd:LEVEL`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lz4" => Ok(Compression::Lz4),
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd(AUTO_ZSTD_LEVEL)),
            _ => {
                let level = s
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                    .filter(|l| (1..=ZSTD_MAX_LEVEL).contains(l));
                level.map(Compression::Zstd).ok_or_else(|| {
                    format!(
                        "compression {s:?}: use lz4, auto, zstd or zstd:LEVEL (1-{ZSTD_MAX_LEVEL})"
                    )
                })
            }
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
            Compression::Auto => f.write_str("auto"),
        }
    }
}

impl TryFrom<String> for Compression {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Compression> for String {
    fn from(c: Compression) -> String {
        c.to_string()
    }
}

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobKind {
    /// File content.
    Data,
    /// A directory tree.
    Tree,
}

impl BlobKind {
    fn crypto_kind(self) -> Kind {
        match self {
            BlobKind::Data => Kind::Data,
            BlobKind::Tree => Kind::Tree,
        }
    }
}

/// One blob inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// The blob's id.
    pub id: BlobId,
    /// Offset of its envelope in the pack.
    pub offset: u32,
    /// Length of its envelope.
    pub length: u32,
    /// Length of its plaintext.
    pub raw_length: u32,
}

/// The header at the end of every pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackHeader {
    /// [`PACK_VERSION`].
    pub version: u32,
    /// Kind of every blob in this pack.
    pub kind: BlobKind,
    /// The blobs, in file order.
    pub blobs: Vec<PackEntry>,
}

/// How one object is stored, from a 32 KiB sample of the middle of large inputs (compressed with LZ4 at
/// almost no cost): random or already-compressed data (saving under 3%) is not compressed at all.
fn method(compression: Compression, data: &[u8]) -> u8 {
    const SAMPLE: usize = 32 * 1024;
    let saved = if data.len() < 4 * SAMPLE {
        None // small: just try
    } else {
        let mid = data.len() / 2;
        let sample = &data[mid - SAMPLE / 2..mid + SAMPLE / 2];
        Some(SAMPLE.saturating_sub(lz4_flex::compress(sample).len()))
    };
    match (compression, saved) {
        (_, Some(s)) if s < SAMPLE / 32 => COMPRESS_NONE,
        (Compression::Lz4, _) => COMPRESS_LZ4,
        (Compression::Zstd(_), _) => COMPRESS_ZSTD,
        (Compression::Auto, Some(s)) if s < SAMPLE / 3 => COMPRESS_LZ4,
        (Compression::Auto, _) => COMPRESS_ZSTD,
    }
}

/// Compresses (per `compression`, when worth it; `None`: never) and encrypts a blob or metadata object.
pub fn encode(
    keys: &Keys,
    kind: Kind,
    plaintext: &[u8],
    compression: Option<Compression>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(keys, kind, plaintext, compression, &mut out)?;
    Ok(out)
}

/// [`encode`] into `out` (cleared first), reusing its allocation.
pub fn encode_into(
    keys: &Keys,
    kind: Kind,
    plaintext: &[u8],
    compression: Option<Compression>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let raw = |body: &mut Vec<u8>| {
        body.push(COMPRESS_NONE);
        body.extend_from_slice(plaintext);
    };
    let how = compression.map_or(COMPRESS_NONE, |c| method(c, plaintext));
    if how == COMPRESS_NONE {
        return keys.seal_filled_into(kind, plaintext.len() + 1, out, raw);
    }
    let level = match compression {
        Some(Compression::Zstd(l)) => l,
        _ => AUTO_ZSTD_LEVEL,
    };
    // Compress straight into the envelope (flag, u32 length, LZ4 block or Zstandard frame); keep it raw when
    // that does not save at least 1/64.
    let max = match how {
        COMPRESS_LZ4 => lz4_flex::block::get_maximum_output_size(plaintext.len()),
        _ => zstd::zstd_safe::compress_bound(plaintext.len()),
    };
    keys.seal_filled_into(kind, (1 + 4 + max).max(plaintext.len() + 1), out, |body| {
        let start = body.len();
        body.push(how);
        body.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
        let at = body.len();
        body.resize(at + max, 0);
        let out = &mut body[at..];
        let written = match how {
            COMPRESS_LZ4 => lz4_flex::block::compress_into(plaintext, out).ok(),
            _ => zstd_compress(plaintext, out, level),
        };
        match written {
            Some(n) if n + plaintext.len() / 64 < plaintext.len() => body.truncate(at + n),
            _ => {
                body.truncate(start);
                raw(body);
            }
        }
    })
}

/// Zstandard into `out` with this thread's compression context (kept between objects of the same level).
fn zstd_compress(plaintext: &[u8], out: &mut [u8], level: i32) -> Option<usize> {
    thread_local! {
        static CTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    CTX.with_borrow_mut(|ctx| {
        if ctx.as_ref().is_none_or(|(l, _)| *l != level) {
            *ctx = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = ctx.as_mut()?;
        c.compress_to_buffer(plaintext, out).ok()
    })
}

/// Decrypts and decompresses an object made by [`encode`].
pub fn decode(keys: &Keys, kind: Kind, stored: &[u8]) -> Result<Vec<u8>> {
    let mut body = keys.open(kind, stored)?;
    if body.first() == Some(&COMPRESS_NONE) {
        // Drop the flag byte in place rather than copying the rest into a new allocation.
        body.copy_within(1.., 0);
        body.truncate(body.len() - 1);
        return Ok(body);
    }
    Ok(unpack(kind, &body)?.into_owned())
}

/// A decoded object: where it was stored (it was stored uncompressed), or decompressed into its own buffer.
pub type Plain<'a> = std::borrow::Cow<'a, [u8]>;

/// [`decode`] where `stored` lies: decrypted in place, and an uncompressed object (most of a repository's
/// data, for incompressible content) is not copied at all. For a restore, which owns the ranges it fetched.
pub fn decode_in_place<'a>(keys: &Keys, kind: Kind, stored: &'a mut [u8]) -> Result<Plain<'a>> {
    unpack(kind, keys.open_in_place(kind, stored)?)
}

/// The object in a decrypted body: its compression flag byte, then the content.
fn unpack(kind: Kind, body: &[u8]) -> Result<Plain<'_>> {
    let bad = |e: String| Error::Integrity(format!("{kind:?} object does not decompress: {e}"));
    match body.first() {
        Some(&COMPRESS_NONE) => Ok(Plain::Borrowed(&body[1..])),
        Some(&COMPRESS_LZ4) => lz4_flex::decompress_size_prepended(&body[1..])
            .map(Plain::Owned)
            .map_err(|e| bad(e.to_string())),
        Some(&COMPRESS_ZSTD) => {
            let len = body
                .get(1..5)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| bad("no length".into()))?;
            let plain = zstd::bulk::decompress(&body[5..], len).map_err(|e| bad(e.to_string()))?;
            if plain.len() != len {
                return Err(bad(format!(
                    "{} bytes where {len} were declared",
                    plain.len()
                )));
            }
            Ok(Plain::Owned(plain))
        }
        other => Err(Error::Format(format!(
            "{kind:?} object has unknown compression {other:?}"
        ))),
    }
}

/// Encodes a blob for a pack.
pub fn encode_blob(
    keys: &Keys,
    kind: BlobKind,
    plaintext: &[u8],
    compression: Compression,
) -> Result<Vec<u8>> {
    encode(keys, kind.crypto_kind(), plaintext, Some(compression))
}

/// [`encode_blob`] into `out` (cleared first): a backup worker encodes every blob into one buffer.
pub fn encode_blob_into(
    keys: &Keys,
    kind: BlobKind,
    plaintext: &[u8],
    compression: Compression,
    out: &mut Vec<u8>,
) -> Result<()> {
    encode_into(keys, kind.crypto_kind(), plaintext, Some(compression), out)
}

/// Decodes a blob and checks that its plaintext has the expected id.
pub fn decode_blob(keys: &Keys, kind: BlobKind, id: &BlobId, stored: &[u8]) -> Result<Vec<u8>> {
    let plain = decode(keys, kind.crypto_kind(), stored)
        .map_err(|e| Error::Integrity(format!("blob {}: {e}", id.short())))?;
    check_blob_id(keys, id, &plain)?;
    Ok(plain)
}

/// [`decode_blob`] where `stored` lies ([`decode_in_place`]).
pub fn decode_blob_in_place<'a>(
    keys: &Keys,
    kind: BlobKind,
    id: &BlobId,
    stored: &'a mut [u8],
) -> Result<Plain<'a>> {
    let plain = decode_in_place(keys, kind.crypto_kind(), stored)
        .map_err(|e| Error::Integrity(format!("blob {}: {e}", id.short())))?;
    check_blob_id(keys, id, &plain)?;
    Ok(plain)
}

/// Checks that a decoded blob is the one its id names.
fn check_blob_id(keys: &Keys, id: &BlobId, plain: &[u8]) -> Result<()> {
    if keys.blob_id(plain) != *id {
        return Err(Error::Integrity(format!(
            "blob {} does not match its id",
            id.short()
        )));
    }
    Ok(())
}

/// Collects encoded blobs into one pack.
#[derive(Debug)]
pub struct PackWriter {
    kind: BlobKind,
    buf: Vec<u8>,
    /// Where `buf` goes once the finished pack's bytes are dropped everywhere (a buffer pool).
    recycle: Option<Recycle>,
    entries: Vec<PackEntry>,
    target: usize,
}

/// What becomes of a pack's buffer once nothing holds the finished pack's bytes any more, not even a clone
/// the S3 client keeps for a while after the upload returned: it goes back to the pool it came from, emptied,
/// so a pool of buffers bounds the packs in memory.
pub struct Recycle(Box<dyn FnOnce(Vec<u8>) + Send>);

impl Recycle {
    /// Calls `back` with the emptied buffer.
    pub fn new(back: impl FnOnce(Vec<u8>) + Send + 'static) -> Self {
        Recycle(Box::new(back))
    }
}

impl std::fmt::Debug for Recycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recycle(..)")
    }
}

/// The owner of a finished pack's bytes that recycles its buffer when the last clone of them is dropped.
struct Recycled {
    buf: Vec<u8>,
    recycle: Option<Recycle>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(Recycle(back)) = self.recycle.take() {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            back(buf);
        }
    }
}

/// A finished pack, ready to upload.
#[derive(Debug, Clone)]
pub struct FinishedPack {
    /// BLAKE3 of `bytes`.
    pub id: PackId,
    /// The whole file.
    pub bytes: Bytes,
    /// Its header.
    pub header: PackHeader,
}

/// Most bytes one blob's entry takes in the sealed header: its id and three varints of at most 5 bytes,
/// with room for LZ4's worst-case growth of incompressible input (1 byte in 255).
const HEADER_ENTRY_MAX: usize = 48;
/// Most bytes the sealed header and trailer take besides the entries: the envelope, the header's version,
/// kind and entry count, LZ4's fixed worst-case growth, the length and the magic.
const HEADER_FIXED_MAX: usize = ENVELOPE_OVERHEAD + 64;

impl PackWriter {
    /// An empty pack of `kind` whose finished pack stays within `target` bytes while blobs are added only
    /// when they fit ([`PackWriter::fits`]).
    pub fn new(kind: BlobKind, target: usize) -> Self {
        PackWriter {
            kind,
            buf: Vec::new(),
            recycle: None,
            entries: Vec::new(),
            target,
        }
    }

    /// Whether the pack has a buffer to fill (it has none when new and after [`PackWriter::finish`]).
    pub fn has_buffer(&self) -> bool {
        self.recycle.is_some() || self.buf.capacity() > 0
    }

    /// Gives the pack an empty buffer to fill, reusing its allocation, and where the buffer goes once the
    /// finished pack's bytes are dropped everywhere.
    pub fn set_buffer(&mut self, buf: Vec<u8>, recycle: Recycle) {
        debug_assert!(self.buf.is_empty() && buf.is_empty() && self.recycle.is_none());
        self.buf = buf;
        self.recycle = Some(recycle);
    }

    /// Appends an encoded blob.
    pub fn add(&mut self, id: BlobId, raw_length: usize, stored: &[u8]) {
        if self.buf.capacity() < self.target {
            // Room for the whole pack at once, header and trailer included (see `fits`), so it is not
            // reallocated as it fills.
            self.buf.reserve_exact(self.target - self.buf.len());
        }
        self.entries.push(PackEntry {
            id,
            offset: self.buf.len() as u32,
            length: stored.len() as u32,
            raw_length: raw_length as u32,
        });
        self.buf.extend_from_slice(stored);
    }

    /// Whether a blob of `stored` bytes can join the pack with the whole finished pack (its header and
    /// trailer too) staying within the target size. A writer that fills only while the next blob fits
    /// never outgrows a buffer of the target's size.
    pub fn fits(&self, stored: usize) -> bool {
        let header = (self.entries.len() + 1) * HEADER_ENTRY_MAX + HEADER_FIXED_MAX;
        self.buf.len() + stored + header <= self.target
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes added so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Seals the header and returns the pack, leaving this writer empty.
    pub fn finish(&mut self, keys: &Keys) -> Result<FinishedPack> {
        let header = PackHeader {
            version: PACK_VERSION,
            kind: self.kind,
            blobs: std::mem::take(&mut self.entries),
        };
        let plain =
            postcard::to_stdvec(&header).map_err(|e| Error::Format(format!("pack header: {e}")))?;
        let sealed = encode(keys, Kind::PackHeader, &plain, Some(Compression::Lz4))?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(&sealed);
        buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        buf.extend_from_slice(PACK_MAGIC);
        let id = PackId(storage_hash(&buf));
        let bytes = match self.recycle.take() {
            Some(recycle) => Bytes::from_owner(Recycled {
                buf,
                recycle: Some(recycle),
            }),
            None => Bytes::from(buf),
        };
        Ok(FinishedPack { id, bytes, header })
    }
}

/// Reads and checks the header of a whole pack file.
pub fn read_header(keys: &Keys, id: &PackId, pack: &[u8]) -> Result<PackHeader> {
    let bad = |m: &str| Error::Integrity(format!("pack {}: {m}", id.short()));
    if PackId(storage_hash(pack)) != *id {
        return Err(bad("content does not match its name"));
    }
    let n = pack.len();
    if n < 12 || &pack[n - 8..] != PACK_MAGIC {
        return Err(bad("no pack trailer"));
    }
    let hlen = u32::from_le_bytes(pack[n - 12..n - 8].try_into().expect("4 bytes")) as usize;
    if hlen + 12 > n || hlen < ENVELOPE_OVERHEAD {
        return Err(bad("bad header length"));
    }
    let plain = decode(keys, Kind::PackHeader, &pack[n - 12 - hlen..n - 12])
        .map_err(|e| bad(&e.to_string()))?;
    let header: PackHeader =
        postcard::from_bytes(&plain).map_err(|e| bad(&format!("header does not parse: {e}")))?;
    if header.version != PACK_VERSION {
        return Err(Error::Format(format!(
            "pack {} has unsupported version {}",
            id.short(),
            header.version
        )));
    }
    let body = (n - 12 - hlen) as u64;
    for b in &header.blobs {
        if b.offset as u64 + b.length as u64 > body {
            return Err(bad("blob outside the pack body"));
        }
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_buffer_is_not_free_again_while_an_upload_still_holds_its_bytes() {
        let keys = Keys::generate().expect("keys");
        let pool = crate::pool::Pool::new([Vec::new()]);
        let mut w = PackWriter::new(BlobKind::Data, 1 << 20);
        w.set_buffer(
            pool.take_unless(|| false).expect("the buffer"),
            Recycle::new(pool.returner()),
        );
        w.add(BlobId([1; 32]), 3, b"abc");
        let pack = w.finish(&keys).expect("finish");
        let (at, len) = (pack.bytes.as_ptr(), pack.bytes.len());
        // The S3 client's copy of the body, dropped some time after the upload returned.
        let client = pack.bytes.clone();
        drop(pack);
        assert!(
            pool.take_unless(|| true).is_none(),
            "no second pack buffer while the first lives"
        );
        drop(client);
        let reused = pool
            .take_unless(|| false)
            .expect("back once the last copy is gone");
        assert_eq!(
            (reused.as_ptr(), reused.is_empty()),
            (at, true),
            "the same allocation, emptied"
        );
        assert!(reused.capacity() >= len);
    }

    /// Packs filled while the next blob fits stay within their target, header and trailer included, and
    /// never reallocate the buffer they were given: with many tiny blobs (the header dominates) and with
    /// large ones (the last blob would overshoot).
    #[test]
    fn a_pack_filled_while_blobs_fit_stays_within_its_buffer() {
        let keys = Keys::generate().expect("keys");
        let target = 256 << 10;
        for sizes in [
            (1..200).collect::<Vec<usize>>(),
            vec![20_000, 31_000, 45_000],
        ] {
            let mut w = PackWriter::new(BlobKind::Data, target);
            w.set_buffer(Vec::with_capacity(target), Recycle::new(|_| {}));
            let at = w.buf.as_ptr();
            for i in 0.. {
                let blob = crate::testdata::pseudo_random(sizes[i % sizes.len()], i as u64);
                let stored =
                    encode_blob(&keys, BlobKind::Data, &blob, Compression::Lz4).expect("encode");
                if !w.fits(stored.len()) {
                    break;
                }
                w.add(keys.blob_id(&blob), blob.len(), &stored);
            }
            let pack = w.finish(&keys).expect("finish");
            assert!(
                pack.bytes.len() <= target,
                "{} > {target}",
                pack.bytes.len()
            );
            assert!(pack.bytes.len() > target * 3 / 4, "{}", pack.bytes.len());
            assert_eq!(
                pack.bytes.as_ptr(),
                at,
                "the buffer given, never reallocated"
            );
            read_header(&keys, &pack.id, &pack.bytes).expect("a valid pack");
        }
    }

    #[test]
    fn pack_round_trip_and_tamper() {
        let keys = Keys::generate().expect("keys");
        let mut w = PackWriter::new(BlobKind::Data, 1 << 20);
        let blobs: Vec<Vec<u8>> = vec![
            b"alpha".repeat(1000),
            (0..5000u32).map(|i| (i * 31) as u8).collect(),
            vec![],
        ];
        for b in &blobs {
            let id = keys.blob_id(b);
            w.add(
                id,
                b.len(),
                &encode_blob(&keys, BlobKind::Data, b, Compression::Lz4).expect("encode"),
            );
        }
        let p = w.finish(&keys).expect("finish");
        assert!(w.is_empty());
        let h = read_header(&keys, &p.id, &p.bytes).expect("header");
        assert_eq!(h, p.header);
        for (e, b) in h.blobs.iter().zip(&blobs) {
            let s = &p.bytes[e.offset as usize..(e.offset + e.length) as usize];
            assert_eq!(
                &decode_blob(&keys, BlobKind::Data, &e.id, s).expect("decode"),
                b
            );
            assert!(
                decode_blob(&keys, BlobKind::Tree, &e.id, s).is_err(),
                "kind confusion accepted"
            );
        }
        // The first blob compressed well.
        assert!(h.blobs[0].length < 1000);
        let mut bad = p.bytes.to_vec();
        bad[3] ^= 1;
        assert!(read_header(&keys, &p.id, &bad).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_blobs_round_trip_through_a_pack(blobs in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..5000), 0..12)) {
            let keys = Keys::generate().expect("keys");
            let mut w = PackWriter::new(BlobKind::Tree, 1 << 16);
            for b in &blobs {
                w.add(keys.blob_id(b), b.len(), &encode_blob(&keys, BlobKind::Tree, b, Compression::Lz4).expect("encode"));
            }
            let p = w.finish(&keys).expect("finish");
            let h = read_header(&keys, &p.id, &p.bytes).expect("header");
            for (e, b) in h.blobs.iter().zip(&blobs) {
                let s = &p.bytes[e.offset as usize..(e.offset + e.length) as usize];
                proptest::prop_assert_eq!(&decode_blob(&keys, BlobKind::Tree, &e.id, s).expect("decode"), b);
            }
        }

        #[test]
        fn garbage_never_decodes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let keys = Keys::generate().expect("keys");
            proptest::prop_assert!(decode(&keys, Kind::Snapshot, &bytes).is_err());
            proptest::prop_assert!(crate::tree::Tree::from_bytes(&bytes).map(|t| t.nodes.is_empty()).unwrap_or(true));
        }
    }

    #[test]
    fn one_buffer_encodes_blob_after_blob_whatever_it_held_before() {
        let keys = Keys::generate().expect("keys");
        let mut out = vec![0xEE; 3 << 20];
        let blobs = [
            b"text ".repeat(50_000),
            crate::testdata::pseudo_random(300_000, 7),
            b"x".to_vec(),
            Vec::new(),
        ];
        for (i, b) in blobs.iter().enumerate() {
            for c in [Compression::Lz4, Compression::Auto, Compression::Zstd(1)] {
                encode_blob_into(&keys, BlobKind::Data, b, c, &mut out).expect("encode");
                let id = keys.blob_id(b);
                let back = decode_blob(&keys, BlobKind::Data, &id, &out).expect("decodes");
                assert_eq!(&back, b, "blob {i}, {c:?}");
            }
        }
    }

    #[test]
    fn wrong_id_is_rejected() {
        let keys = Keys::generate().expect("keys");
        let s = encode_blob(&keys, BlobKind::Data, b"abc", Compression::Lz4).expect("encode");
        assert!(decode_blob(&keys, BlobKind::Data, &keys.blob_id(b"abd"), &s).is_err());
    }

    /// Log-like text (compresses well), text mixed with random bytes (a little), random (not at all).
    fn samples() -> [(&'static str, Vec<u8>); 3] {
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| {
                format!("2026-11-26 INFO request {i} served in {} ms\n", i % 97).into_bytes()
            })
            .collect();
        let some: Vec<u8> = crate::testdata::pseudo_random(600_000, 4)
            .chunks(60)
            .zip(text.chunks(20))
            .flat_map(|(r, t)| r.iter().chain(t).copied().collect::<Vec<u8>>())
            .collect();
        [
            ("text", text),
            ("some", some),
            ("random", crate::testdata::pseudo_random(600_000, 5)),
        ]
    }

    /// The compression byte of a stored object.
    fn method_of(keys: &Keys, stored: &[u8]) -> u8 {
        keys.open(Kind::Data, stored).expect("open")[0]
    }

    #[test]
    fn every_compression_round_trips_and_picks_as_documented() {
        let keys = Keys::generate().expect("keys");
        let [text, some, random] = samples();
        let expect = [
            (
                Compression::Lz4,
                [COMPRESS_LZ4, COMPRESS_LZ4, COMPRESS_NONE],
            ),
            (
                Compression::Zstd(3),
                [COMPRESS_ZSTD, COMPRESS_ZSTD, COMPRESS_NONE],
            ),
            (
                Compression::Zstd(19),
                [COMPRESS_ZSTD, COMPRESS_ZSTD, COMPRESS_NONE],
            ),
            (
                Compression::Auto,
                [COMPRESS_ZSTD, COMPRESS_LZ4, COMPRESS_NONE],
            ),
        ];
        for (c, methods) in expect {
            for ((name, data), want) in [&text, &some, &random].into_iter().zip(methods) {
                let id = keys.blob_id(data);
                let stored = encode_blob(&keys, BlobKind::Data, data, c).expect("encode");
                assert_eq!(method_of(&keys, &stored), want, "{c} on {name}");
                let back = decode_blob(&keys, BlobKind::Data, &id, &stored).expect("decode");
                assert!(back == *data, "{c} on {name}: round trip");
                let mut in_place = stored.clone();
                let back = decode_blob_in_place(&keys, BlobKind::Data, &id, &mut in_place)
                    .expect("decode in place");
                assert!(*back == **data, "{c} on {name}: round trip in place");
                assert_eq!(
                    matches!(back, Plain::Borrowed(_)),
                    want == COMPRESS_NONE,
                    "{c} on {name}: only an uncompressed blob is read where it lies"
                );
            }
        }
        // Zstandard is what makes text small.
        let size = |c| {
            encode_blob(&keys, BlobKind::Data, &text.1, c)
                .expect("encode")
                .len()
        };
        assert!(size(Compression::Zstd(3)) * 3 < size(Compression::Lz4) * 2);
    }

    #[test]
    fn a_tampered_or_misnamed_blob_fails_in_place_as_it_does_in_a_copy() {
        let keys = Keys::generate().expect("keys");
        let data = crate::testdata::pseudo_random(4096, 1);
        let id = keys.blob_id(&data);
        let stored = encode_blob(&keys, BlobKind::Data, &data, Compression::Lz4).expect("encode");
        let mut flipped = stored.clone();
        flipped[40] ^= 1;
        let e = decode_blob_in_place(&keys, BlobKind::Data, &id, &mut flipped)
            .expect_err("a flipped bit decodes");
        assert!(matches!(e, Error::Integrity(_)), "{e:?}");
        let other = keys.blob_id(b"another blob");
        let e = decode_blob_in_place(&keys, BlobKind::Data, &other, &mut stored.clone())
            .expect_err("a blob under another id decodes");
        assert!(e.to_string().contains("does not match its id"), "{e}");
        let e = decode_blob_in_place(&keys, BlobKind::Data, &id, &mut stored[..20].to_vec())
            .expect_err("a truncated blob decodes");
        assert!(matches!(e, Error::Integrity(_)), "{e:?}");
    }

    #[test]
    fn a_zstd_object_with_a_wrong_length_is_an_integrity_error() {
        let keys = Keys::generate().expect("keys");
        let text = samples()[0].1.clone();
        let stored = encode(&keys, Kind::Data, &text, Some(Compression::Zstd(1))).expect("encode");
        let mut body = keys.open(Kind::Data, &stored).expect("open");
        body[1..5].copy_from_slice(&(text.len() as u32 - 1).to_le_bytes());
        let forged = keys.seal(Kind::Data, &body).expect("seal");
        let e = decode(&keys, Kind::Data, &forged).expect_err("a wrong length decodes");
        assert!(matches!(e, Error::Integrity(_)), "{e:?}");
    }

    #[test]
    fn compression_names_parse_and_print() {
        for (s, c) in [
            ("lz4", Compression::Lz4),
            ("auto", Compression::Auto),
            ("zstd:1", Compression::Zstd(1)),
            ("zstd:19", Compression::Zstd(19)),
        ] {
            assert_eq!(s.parse::<Compression>(), Ok(c));
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd(3)));
        for bad in ["", "gzip", "zstd:0", "zstd:20", "zstd:x", "LZ4"] {
            let e = bad.parse::<Compression>().expect_err(bad);
            assert!(e.contains("use lz4, auto, zstd or zstd:LEVEL"), "{e}");
        }
        // In the config: a string; absent in configs written before it existed.
        #[derive(Deserialize)]
        struct C {
            #[serde(default)]
            compression: Compression,
        }
        let old: C = serde_json::from_str("{}").expect("old config");
        assert_eq!(old.compression, Compression::Lz4);
        let new: C = serde_json::from_str(r#"{"compression":"zstd:7"}"#).expect("new config");
        assert_eq!(new.compression, Compression::Zstd(7));
        assert!(serde_json::from_str::<C>(r#"{"compression":"zstd:99"}"#).is_err());
    }
}
