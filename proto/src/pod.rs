//! The mover-pod contract: how the controller hands a volume and a repository to a mover container, and
//! what the container hands back. A third-party data path that honours this contract gets expose, pods,
//! progress, cancel, restarts and cleanup from the controller.
//!
//! * Command: `<mover> pod backup|restore` with the flags below (the `ferry` binary implements it).
//! * The volume: mounted at [`VOLUME_PATH`] (filesystem mode) or attached at [`DEVICE_PATH`] (block mode);
//!   read-only for backup.
//! * The repository password: the file [`PASSWORD_FILE`]. S3 credentials: an AWS shared-credentials file
//!   at [`CREDENTIALS_FILE`] when the BSL names a credential Secret (`AWS_SHARED_CREDENTIALS_FILE` is set).
//!   Endpoint TLS: [`ENV_S3_CA_PEM`] and [`ENV_S3_INSECURE_SKIP_TLS_VERIFY`].
//! * Reporting: Events on the CR (see [`crate::report`]); the service account may create and patch events.
//! * The result: on success the container exits 0 and writes the [`crate::result`] JSON to
//!   `/dev/termination-log`; on failure it exits [`EXIT_FAILED`] with the error text there; when canceled
//!   (SIGTERM) it stops at the next safe point, leaves the repository consistent and exits [`EXIT_CANCELED`].

/// Mount point of the exposed volume in filesystem mode.
pub const VOLUME_PATH: &str = "/ferry/volume";
/// Device path of the exposed volume in block mode.
pub const DEVICE_PATH: &str = "/ferry/device";
/// The repository password file.
pub const PASSWORD_FILE: &str = "/ferry/secrets/password/password";
/// Directory of the S3 credentials file.
pub const CREDENTIALS_DIR: &str = "/ferry/secrets/credentials";
/// The S3 credentials file (AWS shared-credentials format).
pub const CREDENTIALS_FILE: &str = "/ferry/secrets/credentials/cloud";
/// Environment variable holding the PEM CA bundle for the S3 endpoint (the BSL's `caCert` or the Secret key
/// named by `caCertRef`), trusted in addition to the system roots.
pub const ENV_S3_CA_PEM: &str = "FERRY_S3_CA_PEM";
/// Whether `bytes` hold at least one PEM certificate: what [`ENV_S3_CA_PEM`] must contain.
pub fn holds_pem_certificate(bytes: &[u8]) -> bool {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    bytes.windows(BEGIN.len()).any(|w| w == BEGIN)
}

/// Environment variable set to `true` when the BSL says `insecureSkipTLSVerify: "true"`.
pub const ENV_S3_INSECURE_SKIP_TLS_VERIFY: &str = "FERRY_S3_INSECURE_SKIP_TLS_VERIFY";
/// Scratch directory (index cache).
pub const CACHE_PATH: &str = "/ferry/cache";
/// Exit code: failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: canceled.
pub const EXIT_CANCELED: i32 = 2;
/// Longest termination message the kubelet keeps.
pub const TERMINATION_MESSAGE_MAX: usize = 4096;
