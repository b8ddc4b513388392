//! Pack files and blob encoding.
//!
//! A blob's stored form is an envelope (see [`crate::crypto`]) around `compression (1) || payload`, where
//! compression is 0 (raw) or 1 (LZ4 block with its length prefixed). Data blobs are stored raw when LZ4
//! does not save at least 1/64 of the size.
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

/// Whether LZ4 is worth trying: for large inputs, a 32 KiB sample from the middle must compress by at
/// least 3%, which skips random or already-compressed data at almost no cost.
fn looks_compressible(data: &[u8]) -> bool {
    const SAMPLE: usize = 32 * 1024;
    if data.len() < 4 * SAMPLE {
        return true;
    }
    let mid = data.len() / 2;
    let sample = &data[mid - SAMPLE / 2..mid + SAMPLE / 2];
    lz4_flex::compress(sample).len() < SAMPLE - SAMPLE / 32
}

/// Compresses (when worth it) and encrypts a blob or metadata object.
pub fn encode(keys: &Keys, kind: Kind, plaintext: &[u8], try_compress: bool) -> Result<Vec<u8>> {
    let raw = |body: &mut Vec<u8>| {
        body.push(COMPRESS_NONE);
        body.extend_from_slice(plaintext);
    };
    if !(try_compress && looks_compressible(plaintext)) {
        return keys.seal_filled(kind, plaintext.len() + 1, raw);
    }
    // Compress straight into the envelope (flag, u32 length, LZ4 block); keep it raw when that does not
    // save at least 1/64.
    let max = lz4_flex::block::get_maximum_output_size(plaintext.len());
    keys.seal_filled(kind, (1 + 4 + max).max(plaintext.len() + 1), |body| {
        let start = body.len();
        body.push(COMPRESS_LZ4);
        body.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
        let at = body.len();
        body.resize(at + max, 0);
        match lz4_flex::block::compress_into(plaintext, &mut body[at..]) {
            Ok(n) if n + plaintext.len() / 64 < plaintext.len() => body.truncate(at + n),
            _ => {
                body.truncate(start);
                raw(body);
            }
        }
    })
}

/// Decrypts and decompresses an object made by [`encode`].
pub fn decode(keys: &Keys, kind: Kind, stored: &[u8]) -> Result<Vec<u8>> {
    let mut body = keys.open(kind, stored)?;
    match body.first() {
        Some(&COMPRESS_NONE) => {
            // Drop the flag byte in place rather than copying the rest into a new allocation.
            body.copy_within(1.., 0);
            body.truncate(body.len() - 1);
            Ok(body)
        }
        Some(&COMPRESS_LZ4) => lz4_flex::decompress_size_prepended(&body[1..])
            .map_err(|e| Error::Integrity(format!("{kind:?} object does not decompress: {e}"))),
        other => Err(Error::Format(format!(
            "{kind:?} object has unknown compression {other:?}"
        ))),
    }
}

/// Encodes a blob for a pack.
pub fn encode_blob(keys: &Keys, kind: BlobKind, plaintext: &[u8]) -> Result<Vec<u8>> {
    encode(keys, kind.crypto_kind(), plaintext, true)
}

/// Decodes a blob and checks that its plaintext has the expected id.
pub fn decode_blob(keys: &Keys, kind: BlobKind, id: &BlobId, stored: &[u8]) -> Result<Vec<u8>> {
    let plain = decode(keys, kind.crypto_kind(), stored)
        .map_err(|e| Error::Integrity(format!("blob {}: {e}", id.short())))?;
    if keys.blob_id(&plain) != *id {
        return Err(Error::Integrity(format!(
            "blob {} does not match its id",
            id.short()
        )));
    }
    Ok(plain)
}

/// Collects encoded blobs into one pack.
#[derive(Debug)]
pub struct PackWriter {
    kind: BlobKind,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    target: usize,
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

impl PackWriter {
    /// An empty pack of `kind` that reports full at about `target` bytes.
    pub fn new(kind: BlobKind, target: usize) -> Self {
        PackWriter {
            kind,
            buf: Vec::new(),
            entries: Vec::new(),
            target,
        }
    }

    /// Appends an encoded blob.
    pub fn add(&mut self, id: BlobId, raw_length: usize, stored: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf
                .reserve_exact(self.target + stored.len() + 64 * 1024);
        }
        self.entries.push(PackEntry {
            id,
            offset: self.buf.len() as u32,
            length: stored.len() as u32,
            raw_length: raw_length as u32,
        });
        self.buf.extend_from_slice(stored);
    }

    /// True once the pack has reached its target size.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= self.target
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
        let sealed = encode(keys, Kind::PackHeader, &plain, true)?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(&sealed);
        buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        buf.extend_from_slice(PACK_MAGIC);
        let id = PackId(storage_hash(&buf));
        Ok(FinishedPack {
            id,
            bytes: Bytes::from(buf),
            header,
        })
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
                &encode_blob(&keys, BlobKind::Data, b).expect("encode"),
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
                w.add(keys.blob_id(b), b.len(), &encode_blob(&keys, BlobKind::Tree, b).expect("encode"));
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
    fn wrong_id_is_rejected() {
        let keys = Keys::generate().expect("keys");
        let s = encode_blob(&keys, BlobKind::Data, b"abc").expect("encode");
        assert!(decode_blob(&keys, BlobKind::Data, &keys.blob_id(b"abd"), &s).is_err());
    }
}
