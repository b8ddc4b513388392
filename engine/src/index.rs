//! The index: which pack holds each blob.
//!
//! Index segments are immutable objects under `index/`, written by each backup after its packs are stored
//! (so an index never names a pack that is not there). A segment is postcard [`IndexSegment`], compressed and
//! encrypted. In memory, all segments merge into one [`Index`] of compact entries (`crate::idtable`: about 60
//! bytes per blob).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{BlobId, PackId};
use crate::idtable::IdTable;
use crate::pack::{BlobKind, PackEntry};

/// Index segment format version.
pub const INDEX_VERSION: u32 = 1;

/// One pack as recorded in an index segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPack {
    /// The pack.
    pub id: PackId,
    /// Kind of all its blobs.
    pub kind: BlobKind,
    /// Size of the pack file.
    pub size: u64,
    /// Its blobs.
    pub blobs: Vec<PackEntry>,
}

/// The content of one index segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSegment {
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// The packs it describes.
    pub packs: Vec<IndexPack>,
}

impl IndexSegment {
    /// Serialises the segment.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(|e| Error::Format(format!("index segment: {e}")))
    }

    /// Parses a segment.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let s: IndexSegment =
            postcard::from_bytes(b).map_err(|e| Error::Format(format!("index segment: {e}")))?;
        if s.version != INDEX_VERSION {
            return Err(Error::Format(format!(
                "index segment version {} is not supported",
                s.version
            )));
        }
        Ok(s)
    }
}

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    /// The pack.
    pub pack: PackId,
    /// Kind of blob.
    pub kind: BlobKind,
    /// Offset of its envelope.
    pub offset: u32,
    /// Length of its envelope.
    pub length: u32,
    /// Length of its plaintext.
    pub raw_length: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// All known blobs, merged from every index segment.
#[derive(Debug, Default, Clone)]
pub struct Index {
    packs: Vec<(PackId, BlobKind, u64)>,
    pack_pos: HashMap<PackId, u32>,
    blobs: IdTable<Entry>,
}

impl Index {
    /// Adds every pack of a segment. A blob already known keeps its first location.
    pub fn add_segment(&mut self, s: &IndexSegment) {
        for p in &s.packs {
            self.add_pack(p);
        }
    }

    /// Adds one pack's blobs.
    pub fn add_pack(&mut self, p: &IndexPack) {
        let pos = *self.pack_pos.entry(p.id).or_insert_with(|| {
            self.packs.push((p.id, p.kind, p.size));
            (self.packs.len() - 1) as u32
        });
        for b in &p.blobs {
            self.blobs.insert(
                b.id,
                Entry {
                    pack: pos,
                    offset: b.offset,
                    length: b.length,
                    raw_length: b.raw_length,
                },
            );
        }
    }

    /// Whether a blob is stored.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains(id)
    }

    /// Where a blob is stored.
    pub fn get(&self, id: &BlobId) -> Option<BlobLocation> {
        self.blobs.get(id).map(|e| {
            let (pack, kind, _) = self.packs[e.pack as usize];
            BlobLocation {
                pack,
                kind,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            }
        })
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// True when no blob is known.
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Every pack the index names, with its kind and size.
    pub fn packs(&self) -> impl Iterator<Item = &(PackId, BlobKind, u64)> {
        self.packs.iter()
    }
}
