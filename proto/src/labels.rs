//! Label and annotation keys shared by the controller, the mover pods and the objects they create.

/// Kind of the CR that owns an object (`DataUpload` or `DataDownload`).
pub const OWNER_KIND: &str = "ferry.dev/owner-kind";
/// Name of the owning CR (label-safe form, see [`label_value`]).
pub const OWNER_NAME: &str = "ferry.dev/owner-name";
/// UID of the owning CR: what cleanup and event watches select on.
pub const OWNER_UID: &str = "ferry.dev/owner-uid";
/// Marks every object the controller created (value [`MANAGED_BY_VALUE`]).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "ferry-controller";
/// On mover pods: `ferry-mover`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// Finalizer the controller puts on the DU/DD it claims.
pub const FINALIZER: &str = "ferry.dev/cleanup";
/// Annotation on a restore PV: its reclaim policy before the controller set `Retain`.
pub const ORIGINAL_RECLAIM_POLICY: &str = "ferry.dev/original-reclaim-policy";
/// Snapshot tag: the source PVC as `<namespace>/<name>` (selects the parent snapshot).
pub const TAG_SOURCE_PVC: &str = "ferry.dev/source-pvc";
/// Snapshot tag: Velero backup name (from the DU's `velero.io/backup-name` label).
pub const TAG_BACKUP_NAME: &str = "velero.io/backup-name";
/// Snapshot tag: Velero backup uid.
pub const TAG_BACKUP_UID: &str = "velero.io/backup-uid";
/// Snapshot tag: the DataUpload name.
pub const TAG_DATA_UPLOAD: &str = "ferry.dev/data-upload";

/// `s` as a valid label value: at most 63 characters; a longer value is cut to 57 and suffixed with 6 hex
/// characters of its hash (the scheme Velero uses, so values stay unique and stable).
pub fn label_value(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_string();
    }
    // FNV-1a 64: stable and dependency-free; uniqueness, not secrecy, is the point.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let mut cut = 57;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{:06x}", &s[..cut], h & 0xff_ffff)
}

/// `s` as Velero makes label values (`pkg/label/label.go` `GetValidName`): at most 63 characters; a longer
/// value is cut to 57 and suffixed with the first 6 hex characters of its SHA-256.
pub fn velero_label_value(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_string();
    }
    let digest = sha256(s.as_bytes());
    format!("{}{}", &s[..57], &hex6(&digest))
}

fn hex6(d: &[u8; 32]) -> String {
    d[..3].iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (FIPS 180-4), small and dependency-free; only used for label values.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_fit() {
        assert_eq!(label_value("short"), "short");
        let long = "x".repeat(100);
        let v = label_value(&long);
        assert_eq!(v.len(), 63);
        assert_ne!(v, label_value(&"x".repeat(101)));
    }

    #[test]
    fn velero_label_values_match_velero() {
        assert_eq!(hex6(&sha256(b"abc")), "ba7816");
        assert_eq!(
            sha256(b"")[..4],
            [0xe3, 0xb0, 0xc4, 0x42],
            "SHA-256 of the empty string"
        );
        assert_eq!(velero_label_value("b1"), "b1");
        let long = "a".repeat(70);
        let v = velero_label_value(&long);
        assert_eq!(v.len(), 63);
        assert!(v.starts_with(&"a".repeat(57)));
    }
}
