//! Typed 256-bit ids. A chunk or tree id is a keyed BLAKE3 hash of the plaintext; a pack, index segment
//! or snapshot id is the plain BLAKE3 hash of the stored (encrypted) bytes, so storage integrity can be
//! checked without the key.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Lower-case hex form, as used in object names.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parses a full 64-character hex id.
            pub fn from_hex(s: &str) -> Result<Self> {
                let mut b = [0u8; 32];
                hex::decode_to_slice(s, &mut b)
                    .map_err(|e| Error::Format(format!("bad {} {s:?}: {e}", stringify!($name))))?;
                Ok(Self(b))
            }

            /// The first 8 hex digits, for humans.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }
    };
}

id_type!(
    /// Id of a blob (a data chunk or a tree): keyed BLAKE3 of its plaintext.
    BlobId
);
id_type!(
    /// Id of a pack file: BLAKE3 of its stored bytes.
    PackId
);
id_type!(
    /// Id of an index segment: BLAKE3 of its stored bytes.
    IndexId
);
id_type!(
    /// Id of a snapshot manifest: BLAKE3 of its stored bytes.
    SnapshotId
);

impl PackId {
    /// Storage key of this pack: `data/<2 hex>/<64 hex>`.
    pub fn key(&self) -> String {
        let h = self.to_hex();
        format!("data/{}/{h}", &h[..2])
    }
}

impl IndexId {
    /// Storage key of this index segment.
    pub fn key(&self) -> String {
        format!("index/{}", self.to_hex())
    }
}

impl SnapshotId {
    /// Storage key of this snapshot manifest.
    pub fn key(&self) -> String {
        format!("snapshots/{}", self.to_hex())
    }
}

/// Plain BLAKE3 of stored bytes, for content-addressed object names.
pub fn storage_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_keys() {
        let id = PackId([0xab; 32]);
        assert_eq!(PackId::from_hex(&id.to_hex()).expect("parse"), id);
        assert!(id.key().starts_with("data/ab/abab"));
        assert!(PackId::from_hex("zz").is_err());
    }
}
