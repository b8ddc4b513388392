//! A compact map from blob ids to small values, for the index and a backup's set of blobs in flight.
//!
//! A repository of many small files holds millions of blobs, and a backup looks every chunk up in these
//! maps, so their size per entry sets the engine's memory at scale. A `HashMap<BlobId, V>` keeps every
//! 32-byte id in a bucket array sized to a power of two at most 7/8 full: between 1.14 and 2.3 times the
//! entries, and both arrays at once while it grows. Here the entries live in one `Vec` in insertion order,
//! and the hash table holds only a 4-byte position per bucket: about `32 + size_of::<V>()` bytes per entry
//! plus 5 to 10 for the table. Ids are keyed BLAKE3 outputs, uniform in every bit, so their first 8 bytes
//! are the hash.

use hashbrown::HashTable;

use crate::id::BlobId;

/// Blob ids with a value each; the first value inserted for an id stays.
#[derive(Debug, Clone)]
pub struct IdTable<V> {
    entries: Vec<(BlobId, V)>,
    table: HashTable<u32>,
}

impl<V> Default for IdTable<V> {
    fn default() -> Self {
        IdTable {
            entries: Vec::new(),
            table: HashTable::new(),
        }
    }
}

fn hash(id: &BlobId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

impl<V> IdTable<V> {
    /// Inserts `id` with `value` unless present. Returns whether it was inserted.
    pub fn insert(&mut self, id: BlobId, value: V) -> bool {
        let IdTable { entries, table } = self;
        let h = hash(&id);
        let found = table.find(h, |&i| entries[i as usize].0 == id);
        if found.is_some() {
            return false;
        }
        let pos = u32::try_from(entries.len()).expect("fewer than 2^32 blobs");
        entries.push((id, value));
        table.insert_unique(h, pos, |&i| hash(&entries[i as usize].0));
        true
    }

    /// The value of `id`.
    pub fn get(&self, id: &BlobId) -> Option<&V> {
        self.table
            .find(hash(id), |&i| self.entries[i as usize].0 == *id)
            .map(|&i| &self.entries[i as usize].1)
    }

    /// Whether `id` is present.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.get(id).is_some()
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> BlobId {
        BlobId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn finds_what_was_inserted_and_keeps_the_first_value() {
        let mut t = IdTable::default();
        for n in 0..10_000 {
            assert!(t.insert(id(n), n));
        }
        assert!(!t.insert(id(7), 99), "a second insert of an id is refused");
        assert_eq!(t.len(), 10_000);
        for n in 0..10_000 {
            assert_eq!(t.get(&id(n)), Some(&n));
        }
        assert_eq!(t.get(&id(10_000)), None);
        assert!(!t.contains(&id(20_000)));
    }

    /// Ids that share their first 8 bytes (the hash) are still told apart by the whole id: only a full
    /// match counts, so a blob is never taken for stored because another one hashes alike.
    #[test]
    fn ids_with_the_same_hash_are_different_entries() {
        let mut t = IdTable::default();
        let mut a = id(1);
        let mut b = a;
        b.0[31] ^= 1;
        assert!(t.insert(a, 'a'));
        assert!(!t.contains(&b));
        assert!(t.insert(b, 'b'));
        assert_eq!((t.get(&a), t.get(&b)), (Some(&'a'), Some(&'b')));
        a.0[8] ^= 1;
        assert!(!t.contains(&a));
    }
}
