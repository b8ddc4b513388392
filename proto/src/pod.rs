//! The mover-pod contract: where the controller puts a volume and a repository's secrets in a mover pod, and
//! what the pod hands back. A third-party data path that serves [`crate::datapath`] gets expose, pods,
//! progress, cancel, restarts and cleanup from the controller.
//!
//! * Two containers: the data path (the mover image, a native sidecar `datapath`) serves the data-path API on
//!   the socket [`crate::datapath::SOCKET_PATH`]; Ferry's pod agent (`ferry agent`, the container `mover`)
//!   reads its one request from `FERRY_AGENT_JOB` ([`crate::datapath::agent::AgentJob`], base64 protobuf)
//!   and makes the call. The request names the paths below.
//! * The volume (data-path container only): mounted at [`VOLUME_PATH`] (filesystem mode) or attached at
//!   [`DEVICE_PATH`] (block mode); read-only for backup.
//! * The repository password: the file [`PASSWORD_FILE`]. S3 credentials: an AWS shared-credentials file
//!   at [`CREDENTIALS_FILE`] when the BSL names a credential Secret (`AWS_SHARED_CREDENTIALS_FILE` is set).
//!   Endpoint CA: [`ENV_S3_CA_PEM`] in the agent, which writes it to [`crate::datapath::CA_FILE`].
//! * Reporting: Events on the CR (see [`crate::report`]); the service account may create and patch events.
//! * The result: on success the agent exits 0 and writes the [`crate::result`] JSON to
//!   `/dev/termination-log`; on failure it exits [`EXIT_FAILED`] with the error text there; when canceled
//!   (SIGTERM) the call is canceled, the data path stops at the next safe point, leaves the repository
//!   consistent, and the agent exits [`EXIT_CANCELED`].
//!
//! Before the data-path API the contract was one container running `<mover> pod backup|restore|maintain`
//! with flags and `FERRY_*` variables; that contract is gone (design 0004).

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

/// Environment variable the `ferry` CLI reads for `--s3-insecure-skip-tls-verify` (in a mover pod the
/// data-path request carries `Repository.insecure_skip_tls_verify` instead).
pub const ENV_S3_INSECURE_SKIP_TLS_VERIFY: &str = "FERRY_S3_INSECURE_SKIP_TLS_VERIFY";
/// Scratch directory (index cache).
pub const CACHE_PATH: &str = "/ferry/cache";
/// Exit code: failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: canceled.
pub const EXIT_CANCELED: i32 = 2;
/// Longest termination message the kubelet keeps.
pub const TERMINATION_MESSAGE_MAX: usize = 4096;
