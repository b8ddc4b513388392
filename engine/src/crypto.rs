//! Keys and authenticated encryption of every stored object.
//!
//! A repository has one random 64-byte master secret. Subkeys are derived from it with BLAKE3's
//! `derive_key`: one to encrypt, one to compute blob ids (keyed BLAKE3), one to seed the chunker's gear
//! table. The master secret is stored wrapped by a key derived from the password with Argon2id.
//!
//! Each stored object is an *envelope*: `version (1) || salt (24) || AES-256-GCM ciphertext || tag (16)`.
//! The object key is `BLAKE3-keyed(encryption key, salt)`, used for exactly one message, so the GCM nonce is
//! fixed at zero and nonce reuse is impossible by construction. The associated data is the object kind, so an
//! index segment cannot be passed off as a snapshot, and so on.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result};
use crate::id::BlobId;

/// Envelope format version.
pub const ENVELOPE_VERSION: u8 = 1;
const SALT_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes an envelope adds to its plaintext.
pub const ENVELOPE_OVERHEAD: usize = 1 + SALT_LEN + TAG_LEN;

/// What an encrypted object is; bound to the ciphertext as associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A chunk of file data.
    Data = 1,
    /// A directory tree.
    Tree = 2,
    /// An index segment.
    Index = 3,
    /// A snapshot manifest.
    Snapshot = 4,
    /// The repository configuration.
    Config = 5,
    /// A pack header.
    PackHeader = 6,
    /// A wrapped master key.
    MasterKey = 7,
    /// The prune bookkeeping object `prune/state`.
    PruneState = 8,
    /// A repository lease under `locks/`.
    Lease = 9,
}

/// The repository's secret keys, derived from the master secret.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Keys {
    master: [u8; 64],
    enc: [u8; 32],
    id: [u8; 32],
    chunker: [u8; 32],
}

impl Keys {
    /// Fresh random keys for a new repository.
    pub fn generate() -> Result<Self> {
        let mut master = [0u8; 64];
        fill_random(&mut master)?;
        Ok(Self::from_master(master))
    }

    /// Derives the subkeys from a master secret.
    pub fn from_master(master: [u8; 64]) -> Self {
        let enc = blake3::derive_key("ferry 2026 object encryption v1", &master);
        let id = blake3::derive_key("ferry 2026 blob id v1", &master);
        let chunker = blake3::derive_key("ferry 2026 chunker gear v1", &master);
        Keys {
            master,
            enc,
            id,
            chunker,
        }
    }

    /// The master secret (to be wrapped in a key file).
    pub fn master(&self) -> &[u8; 64] {
        &self.master
    }

    /// Key that seeds the chunker's gear table.
    pub fn chunker_key(&self) -> &[u8; 32] {
        &self.chunker
    }

    /// Id of a blob: keyed BLAKE3 over its plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.id, plaintext).as_bytes())
    }

    /// Encrypts `plaintext` into a new envelope.
    pub fn seal(&self, kind: Kind, plaintext: &[u8]) -> Result<Vec<u8>> {
        seal_with(&self.enc, kind, plaintext)
    }

    /// Encrypts the plaintext that `fill` appends to `out` (cleared first, its allocation reused), in place:
    /// no copy of the plaintext is made. `capacity` is the most `fill` will append.
    pub fn seal_filled_into(
        &self,
        kind: Kind,
        capacity: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<()> {
        seal_filled_into(&self.enc, kind, capacity, out, fill)
    }

    /// Decrypts and authenticates an envelope.
    pub fn open(&self, kind: Kind, envelope: &[u8]) -> Result<Vec<u8>> {
        open_with(&self.enc, kind, envelope)
    }

    /// [`Keys::open`] where the envelope lies; the plaintext is a part of `envelope`.
    pub fn open_in_place<'a>(&self, kind: Kind, envelope: &'a mut [u8]) -> Result<&'a mut [u8]> {
        open_in_place_with(&self.enc, kind, envelope)
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// Fills `buf` from the operating system's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::Invalid(format!("no system randomness: {e}")))
}

fn object_key(key: &[u8; 32], salt: &[u8]) -> LessSafeKey {
    let mut k = *blake3::keyed_hash(key, salt).as_bytes();
    let unbound = UnboundKey::new(&AES_256_GCM, &k).expect("32-byte key is valid for AES-256-GCM");
    k.zeroize();
    LessSafeKey::new(unbound)
}

/// Encrypts `plaintext` with `key` into an envelope.
pub fn seal_with(key: &[u8; 32], kind: Kind, plaintext: &[u8]) -> Result<Vec<u8>> {
    seal_filled_with(key, kind, plaintext.len(), |out| {
        out.extend_from_slice(plaintext)
    })
}

/// Encrypts, in place, the plaintext `fill` appends (at most `capacity` bytes) into an envelope.
fn seal_filled_with(
    key: &[u8; 32],
    kind: Kind,
    capacity: usize,
    fill: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    seal_filled_into(key, kind, capacity, &mut out, fill)?;
    Ok(out)
}

/// [`seal_filled_with`] into `out`, which is cleared first: a caller sealing many objects reuses one
/// allocation for all of them.
fn seal_filled_into(
    key: &[u8; 32],
    kind: Kind,
    capacity: usize,
    out: &mut Vec<u8>,
    fill: impl FnOnce(&mut Vec<u8>),
) -> Result<()> {
    out.clear();
    out.reserve(capacity + ENVELOPE_OVERHEAD);
    out.push(ENVELOPE_VERSION);
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt)?;
    out.extend_from_slice(&salt);
    let start = out.len();
    fill(out);
    let tag = object_key(key, &salt)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from([kind as u8]),
            &mut out[start..],
        )
        .map_err(|_| Error::Integrity("encryption failed".into()))?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Decrypts and authenticates an envelope made by [`seal_with`].
pub fn open_with(key: &[u8; 32], kind: Kind, envelope: &[u8]) -> Result<Vec<u8>> {
    check_envelope(kind, envelope)?;
    let mut buf = envelope[1 + SALT_LEN..].to_vec();
    let len = open_ciphertext(key, kind, &envelope[1..1 + SALT_LEN], &mut buf)?.len();
    buf.truncate(len);
    Ok(buf)
}

/// [`open_with`] where the envelope lies, without a copy: the plaintext is a part of `envelope`.
pub fn open_in_place_with<'a>(
    key: &[u8; 32],
    kind: Kind,
    envelope: &'a mut [u8],
) -> Result<&'a mut [u8]> {
    check_envelope(kind, envelope)?;
    let (head, ciphertext) = envelope.split_at_mut(1 + SALT_LEN);
    open_ciphertext(key, kind, &head[1..], ciphertext)
}

/// Checks an envelope's length and version.
fn check_envelope(kind: Kind, envelope: &[u8]) -> Result<()> {
    if envelope.len() < ENVELOPE_OVERHEAD {
        return Err(Error::Integrity(format!(
            "{kind:?} object truncated ({} bytes)",
            envelope.len()
        )));
    }
    if envelope[0] != ENVELOPE_VERSION {
        return Err(Error::Format(format!(
            "{kind:?} object has unknown envelope version {}",
            envelope[0]
        )));
    }
    Ok(())
}

/// Decrypts and authenticates `ciphertext || tag` in place; returns the plaintext part.
fn open_ciphertext<'a>(
    key: &[u8; 32],
    kind: Kind,
    salt: &[u8],
    ciphertext: &'a mut [u8],
) -> Result<&'a mut [u8]> {
    object_key(key, salt)
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from([kind as u8]),
            ciphertext,
        )
        .map_err(|_| {
            Error::Integrity(format!(
                "{kind:?} object failed authentication (corrupt, tampered or wrong key)"
            ))
        })
}

/// Argon2id parameters of a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl Default for KdfParams {
    /// RFC 9106's second recommended option: 64 MiB, 3 passes, 4 lanes, computed in parallel (about 0.06 s
    /// on a 2-core machine, where one lane took 0.17–0.2 s with the RustCrypto crate); the memory is
    /// released before any data moves.
    fn default() -> Self {
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 4,
        }
    }
}

/// The most memory a key file may ask for: 1 GiB (the default asks for 64 MiB).
pub const KDF_MAX_M_KIB: u32 = 1024 * 1024;
/// The most passes a key file may ask for (the default: 3).
pub const KDF_MAX_T: u32 = 16;
/// The most lanes a key file may ask for (the default: 4).
pub const KDF_MAX_P: u32 = 64;

impl KdfParams {
    /// Refuses parameters beyond Ferry's limits. They are read from a key file before the password can be
    /// checked, so a corrupt or tampered one must fail here, not allocate terabytes or run for hours.
    pub fn check(&self) -> Result<()> {
        for (name, value, max) in [
            ("m_kib", self.m_kib, KDF_MAX_M_KIB),
            ("t", self.t, KDF_MAX_T),
            ("p", self.p, KDF_MAX_P),
        ] {
            if value > max {
                return Err(Error::Format(format!(
                    "key derivation parameter {name} = {value} is over Ferry's limit of {max}"
                )));
            }
        }
        Ok(())
    }
}

/// Derives a key-encryption key from a password with Argon2id, its lanes in parallel (`argon2-rust`: the
/// reference implementation's algorithm with SIMD; bit-exact with the RustCrypto `argon2` crate that wrote
/// the first key files, as the known answers in the tests check).
pub fn derive_kek(password: &[u8], salt: &[u8], p: KdfParams) -> Result<[u8; 32]> {
    p.check()?;
    let params = argon2_rust::Params::builder()
        .memory(argon2_rust::params::Memory::kib(u64::from(p.m_kib)))
        .passes(p.t)
        .lanes(p.p)
        .threads((p.p as usize).min(crate::cpus()) as u32) // p <= KDF_MAX_P, checked above
        .build()
        .map_err(|e| Error::Format(format!("bad key derivation parameters: {e}")))?;
    let argon = argon2_rust::Argon2::new(
        argon2_rust::Algorithm::Argon2id,
        argon2_rust::Version::V0x13,
        params,
    );
    let mut out = [0u8; 32];
    argon
        .hash_password_into(password, salt, &mut out)
        .map_err(|e| Error::Format(format!("key derivation failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let keys = Keys::generate().expect("keys");
        let env = keys.seal(Kind::Data, b"hello world").expect("seal");
        assert_eq!(env.len(), 11 + ENVELOPE_OVERHEAD);
        assert_eq!(keys.open(Kind::Data, &env).expect("open"), b"hello world");
        // Wrong kind is rejected.
        assert!(matches!(
            keys.open(Kind::Tree, &env),
            Err(Error::Integrity(_))
        ));
        // Every single bit flip is rejected.
        for i in 0..env.len() {
            for bit in 0..8 {
                let mut t = env.clone();
                t[i] ^= 1 << bit;
                assert!(
                    keys.open(Kind::Data, &t).is_err(),
                    "flip at byte {i} bit {bit} accepted"
                );
            }
        }
        // Another key is rejected.
        let other = Keys::generate().expect("keys");
        assert!(other.open(Kind::Data, &env).is_err());
    }

    /// Key files written by the first Ferry versions (RustCrypto's `argon2` crate) must open with today's
    /// derivation: known answers computed with that crate, for the tests' parameters, the old default (p = 1)
    /// and today's (p = 4).
    #[test]
    fn key_derivation_matches_the_known_answers_of_the_first_implementation() {
        let (pw, salt) = (b"correct horse battery staple", [0x5au8; 32]);
        for (m_kib, t, p, want) in [
            (
                1024,
                1,
                1,
                "ccf12286ce85b985dc696671618c130b632bf783c77a5af47d28ebf57f966d24",
            ),
            (
                65536,
                3,
                1,
                "ab0a9251254785cce451694432ea34c6bf3f0f30d5560392b29cdbaf71b80b6b",
            ),
            (
                65536,
                3,
                4,
                "e34e61849ebb79eb1c08337e36c50bc83a00164c44f542da8cc5971fa78e2d22",
            ),
        ] {
            let kek = derive_kek(pw, &salt, KdfParams { m_kib, t, p }).expect("derive");
            assert_eq!(hex::encode(kek), want, "m={m_kib} t={t} p={p}");
        }
        assert_eq!(
            KdfParams::default(),
            KdfParams {
                m_kib: 65536,
                t: 3,
                p: 4
            }
        );
    }

    #[test]
    fn two_seals_differ() {
        let keys = Keys::generate().expect("keys");
        assert_ne!(
            keys.seal(Kind::Data, b"x").expect("seal"),
            keys.seal(Kind::Data, b"x").expect("seal")
        );
    }

    #[test]
    fn blob_ids_are_keyed() {
        let a = Keys::generate().expect("keys");
        let b = Keys::generate().expect("keys");
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
    }
}
