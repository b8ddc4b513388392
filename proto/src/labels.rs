//! Label and annotation keys shared by the controller, the mover pods and the objects they create.

use sha2::{Digest, Sha256};

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
    format!("{}{:06x}", &s[..char_floor(s, 57)], h & 0xff_ffff)
}

/// `s` as Velero makes label values (`pkg/label/label.go` `GetValidName`): at most 63 bytes; a longer
/// value is cut to 57 bytes and suffixed with the first 6 hex characters of its SHA-256. Velero cuts bytes;
/// names Velero labels are ASCII (Kubernetes names), where this is the same, and other text is cut at the
/// character boundary before byte 57 instead of in the middle of a character.
pub fn velero_label_value(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_string();
    }
    let digest = Sha256::digest(s.as_bytes());
    format!("{}{}", &s[..char_floor(s, 57)], &hex::encode(&digest[..3]))
}

/// The largest character boundary of `s` at or below byte `at`.
fn char_floor(s: &str, at: usize) -> usize {
    (0..=at.min(s.len()))
        .rev()
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(0)
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
        assert_eq!(velero_label_value("b1"), "b1");
        let long = "a".repeat(70);
        let v = velero_label_value(&long);
        assert_eq!(v.len(), 63);
        // Go: label.GetValidName(strings.Repeat("a", 70)).
        assert_eq!(v, format!("{}{}", "a".repeat(57), "6bd5e5"));
    }

    #[test]
    fn velero_label_values_never_cut_a_character() {
        // 56 ASCII bytes, then a 2-byte character across the 57-byte cut.
        let s = format!("{}é{}", "a".repeat(56), "b".repeat(20));
        let v = velero_label_value(&s);
        assert_eq!(
            v,
            format!("{}{}", "a".repeat(56), &velero_label_value(&s)[56..])
        );
        assert!(v.len() <= 63);
    }
}
