//! S3 backend (aws-sdk-s3). Works with AWS and S3-compatible servers: custom endpoint, path-style
//! addressing, credentials from the standard AWS chain or given directly.
//!
//! Faults are bounded: every call has a connect timeout, a per-attempt timeout and a whole-operation
//! timeout, and is retried a few times with exponential backoff and full jitter on 5xx answers,
//! throttling (503 SlowDown), connection resets and timeouts (the SDK's standard retry strategy).
//! Reading a GET's body happens after the SDK has handed over the response, so a body that stops
//! early, is reset, or goes silent for [`S3Options::read_timeout`] is retried here, within the same
//! operation deadline. Uploads carry a CRC32C checksum (`x-amz-checksum-crc32c`) that the server checks,
//! so a body corrupted on its way is refused (and sent again) instead of stored. Every storage call thus
//! ends — done or failed with the operation, the key and the cause — within [`S3Options::operation_timeout`]
//! (at most [`MAX_OPERATION_TIMEOUT`]), which repository leases rely on (`crate::lease`).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::client::customize::CustomizableOperation;
use aws_sdk_s3::config::retry::{
    ClassifyRetry, RetryAction, RetryConfig, RetryPartition, TokenBucket,
};
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::put_object::{PutObjectError, PutObjectOutput};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;
use bytes::Bytes;

use super::{Backend, ObjectInfo};
use crate::error::{Error, Result};

/// Most bytes preallocated for a download on the server's word (`Content-Length`); bigger bodies grow
/// as they arrive.
const MAX_PREALLOCATION: usize = 64 << 20;

/// Default [`S3Options::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`S3Options::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`S3Options::attempt_timeout`]: a 16 MiB pack at 300 KiB/s.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`S3Options::operation_timeout`].
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(100);
/// The longest [`S3Options::operation_timeout`] allowed: storage calls must stay well under half the
/// 300 s stale period of repository leases (`crate::lease`).
pub const MAX_OPERATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`S3Options::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Default [`S3Options::initial_backoff`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Default [`S3Options::max_backoff`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(20);

/// How to reach an S3 bucket, and the limits of every call.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing slash; may be empty).
    pub prefix: String,
    /// Custom endpoint URL, e.g. `http://10.88.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region; defaults to the AWS chain's region, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers.
    pub path_style: bool,
    /// Static credentials (access key, secret, session token); otherwise the AWS default chain.
    pub credentials: Option<(String, String, Option<String>)>,
    /// Named profile of the AWS chain (e.g. from a Velero credentials file).
    pub profile: Option<String>,
    /// AWS shared-credentials file to read instead of the default one (`~/.aws/credentials` or
    /// `$AWS_SHARED_CREDENTIALS_FILE`): the data-path API names it per call.
    pub credentials_file: Option<std::path::PathBuf>,
    /// Extra trusted CA certificates (PEM), on top of the system roots: the BSL's `caCert`.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any server certificate: the BSL's `insecureSkipTLSVerify`.
    pub insecure_skip_tls_verify: bool,
    /// Longest wait for a TCP (and TLS) connection (default 10 s).
    pub connect_timeout: Duration,
    /// Longest silence while a GET's body streams in; the read is then retried (default 30 s).
    pub read_timeout: Duration,
    /// Longest single attempt, from sending the request to the end of the response head — for a PUT
    /// that includes sending the body (default 60 s).
    pub attempt_timeout: Duration,
    /// Longest whole call, all attempts and backoff included; a GET's body too (default 100 s, at most
    /// [`MAX_OPERATION_TIMEOUT`]).
    pub operation_timeout: Duration,
    /// Attempts per call, the first included (default 4).
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles for each next one, up to `max_backoff`, and the
    /// actual wait is a random fraction of it (full jitter). Default 1 s.
    pub initial_backoff: Duration,
    /// Longest backoff between attempts (default 20 s).
    pub max_backoff: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            credentials: None,
            profile: None,
            credentials_file: None,
            ca_pem: None,
            insecure_skip_tls_verify: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl S3Options {
    /// Refuses limits that would leave calls unbounded, or bounded too loosely for leases.
    pub fn validate_limits(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(format!("S3 limits: {what}")));
        for (name, d) in [
            ("connect timeout", self.connect_timeout),
            ("read timeout", self.read_timeout),
            ("attempt timeout", self.attempt_timeout),
            ("operation timeout", self.operation_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("the {name} must be positive"));
            }
        }
        if self.operation_timeout > MAX_OPERATION_TIMEOUT {
            return bad(format!(
                "the operation timeout {:?} is over the maximum {MAX_OPERATION_TIMEOUT:?} (repository \
                 leases need storage calls bounded well under half their 300 s stale period)",
                self.operation_timeout
            ));
        }
        if self.attempt_timeout > self.operation_timeout {
            return bad(format!(
                "the attempt timeout {:?} is longer than the operation timeout {:?}",
                self.attempt_timeout, self.operation_timeout
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return bad(format!(
                "{} attempts per call (1 to 20 allowed)",
                self.max_attempts
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return bad(format!(
                "the initial backoff {:?} is longer than the maximum backoff {:?}",
                self.initial_backoff, self.max_backoff
            ));
        }
        Ok(())
    }
}

/// The limits a backend keeps for the retries it does itself (a GET's body).
#[derive(Debug, Clone, Copy)]
struct Limits {
    read_timeout: Duration,
    operation_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Limits {
    /// Exponential backoff with full jitter before retry number `retry` (1 for the first).
    fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(self.max_backoff);
        let fraction = f64::from(getrandom::u32().unwrap_or(u32::MAX / 2)) / f64::from(u32::MAX);
        cap.mul_f64(fraction)
    }
}

/// A repository under a prefix of an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
    limits: Limits,
    /// Whether uploads sign their payload's SHA-256 ([`signs_payload`]).
    sign_payload: bool,
}

/// Whether uploads to `endpoint` (`None`: AWS, over HTTPS) sign their payload's SHA-256. Over HTTPS they do
/// not (`UNSIGNED-PAYLOAD`, as the AWS SDKs' own transfer managers do): TLS protects the bytes in transit, the
/// server checks the CRC32C, and every object is authenticated (AES-GCM) when read, so hashing each pack a
/// second time with SHA-256 would only cost CPU. Over plain HTTP the signed hash is what makes the server
/// refuse a body changed on its way, so it stays.
pub fn signs_payload(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|e| !e.trim_start().to_ascii_lowercase().starts_with("https://"))
}

/// [`signs_payload`] applied to one PUT.
trait PayloadSigning {
    fn disable_payload_signing_unless(self, sign: bool) -> Self;
}

impl<E, B> PayloadSigning for CustomizableOperation<PutObjectOutput, E, B> {
    fn disable_payload_signing_unless(self, sign: bool) -> Self {
        if sign {
            self
        } else {
            self.disable_payload_signing()
        }
    }
}

/// A PUT refused because the body the server received does not match its checksum (CRC32C, or the
/// signed payload hash) was damaged on its way: send it again, like a reset connection.
#[derive(Debug)]
struct CorruptedUploadIsTransient;

impl ClassifyRetry for CorruptedUploadIsTransient {
    fn classify_retry(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::InterceptorContext,
    ) -> RetryAction {
        let Some(Err(err)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let code = err
            .as_operation_error()
            .and_then(|e| e.downcast_ref::<PutObjectError>())
            .and_then(|e| e.code());
        match code {
            Some("BadDigest" | "XAmzContentChecksumMismatch" | "XAmzContentSHA256Mismatch") => {
                RetryAction::transient_error()
            }
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "corrupted upload"
    }
}

/// Why one GET attempt failed.
enum GetFailure {
    /// Final: missing key, refused, out of SDK retries.
    Final(Error),
    /// The body broke off or went silent; worth another attempt.
    Body(String),
}

fn sdk_err<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    op: &'static str,
    key: &str,
    e: SdkError<E>,
) -> Error {
    let detail = match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{} (HTTP {}): {}",
                err.code().unwrap_or("error"),
                s.raw().status().as_u16(),
                err.message().unwrap_or("no message")
            )
        }
        other => {
            let text = format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(other)
            );
            if text.contains("certificate") {
                format!(
                    "{text} (the S3 server's TLS certificate is not trusted: give its CA as caCert \
                     or caCertRef in the BackupStorageLocation, or --s3-ca-file)"
                )
            } else {
                text
            }
        }
    };
    Error::backend(op, key, detail)
}

/// The SDK's HTTPS client (rustls with ring, the one crypto provider of the workspace), trusting `pem`'s
/// certificates in addition to the system roots when given.
pub fn https_client(
    pem: Option<&[u8]>,
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    let builder = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(
        tls::rustls_provider::CryptoMode::Ring,
    ));
    let Some(pem) = pem else {
        return Ok(builder.build_https());
    };
    if !ferry_proto::pod::holds_pem_certificate(pem) {
        return Err(Error::Invalid(
            "the S3 CA bundle (caCert) holds no PEM certificate".into(),
        ));
    }
    let ctx = TlsContext::builder()
        .with_trust_store(
            TrustStore::empty()
                .with_native_roots(true)
                .with_pem_certificate(pem.to_vec()),
        )
        .build()
        .map_err(|e| Error::Invalid(format!("the S3 CA bundle (caCert): {e}")))?;
    Ok(builder.tls_context(ctx).build_https())
}

impl S3Backend {
    /// Connects (lazily) to the bucket described by `o`.
    pub async fn new(o: S3Options) -> Result<Self> {
        o.validate_limits()?;
        // The credential chain (STS, IMDS) and S3 share one client; which one depends on the options.
        let http = if o.insecure_skip_tls_verify {
            tracing::warn!("S3 server certificates are not verified (insecureSkipTLSVerify)");
            super::insecure_http::client(o.connect_timeout)
        } else {
            https_client(o.ca_pem.as_deref())?
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(p) = &o.profile {
            loader = loader.profile_name(p);
        }
        // A given region spares the chain's lookups (IMDS: seconds where no instance metadata answers).
        if let Some(r) = &o.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(f) = &o.credentials_file {
            use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
            loader = loader.profile_files(
                EnvConfigFiles::builder()
                    .with_file(EnvConfigFileKind::Credentials, f)
                    .build(),
            );
        }
        if let Some((id, secret, token)) = &o.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id,
                secret,
                token.clone(),
                None,
                "ferry",
            ));
        }
        let shared = loader.load().await;
        let region = o
            .region
            .clone()
            .map(Region::new)
            .or_else(|| shared.region().cloned())
            .unwrap_or_else(|| Region::new("us-east-1"));
        let mut cfg = aws_sdk_s3::config::Builder::from(&shared)
            .region(region)
            .force_path_style(o.path_style)
            // Checksums where supported: the SDK then computes the CRC32C that `put` asks for (sent as
            // a header, the body being in memory, not as an aws-chunked trailer). GETs need no response
            // checksum: every object is authenticated (AES-GCM) when read.
            .request_checksum_calculation(RequestChecksumCalculation::WhenSupported)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(o.connect_timeout)
                    .operation_attempt_timeout(o.attempt_timeout)
                    .operation_timeout(o.operation_timeout)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(o.max_attempts)
                    .with_initial_backoff(o.initial_backoff)
                    .with_max_backoff(o.max_backoff),
            )
            // This backend's own retry budget: the SDK's default one is shared by every client in
            // the process, and a burst of faults on one repository must not stop retries on another.
            .retry_partition(
                RetryPartition::custom("ferry-s3")
                    .token_bucket(TokenBucket::unlimited())
                    .build(),
            )
            .retry_classifier(CorruptedUploadIsTransient);
        if let Some(ep) = &o.endpoint {
            cfg = cfg.endpoint_url(ep);
        }
        Ok(S3Backend {
            sign_payload: signs_payload(o.endpoint.as_deref()),
            client: Client::from_conf(cfg.build()),
            bucket: o.bucket,
            prefix: o.prefix,
            limits: Limits {
                read_timeout: o.read_timeout,
                operation_timeout: o.operation_timeout,
                max_attempts: o.max_attempts,
                initial_backoff: o.initial_backoff,
                max_backoff: o.max_backoff,
            },
        })
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// One GET attempt (the SDK retries sending it); the body read with at most `read_timeout` of
    /// silence.
    async fn get_once(
        &self,
        key: &str,
        range: Option<&str>,
    ) -> std::result::Result<Bytes, GetFailure> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .set_range(range.map(str::to_string))
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                return Err(GetFailure::Final(Error::NotFound(key.to_string())));
            }
            Err(e) => return Err(GetFailure::Final(sdk_err("get", key, e))),
        };
        let expected = out.content_length().and_then(|l| usize::try_from(l).ok());
        let mut body: ByteStream = out.body;
        // The server's claim sizes the buffer only up to a bound: a broken or hostile Content-Length
        // must end as a clear error (the body ends early), not abort the process on a huge allocation.
        let mut data = bytes::BytesMut::with_capacity(expected.unwrap_or(0).min(MAX_PREALLOCATION));
        loop {
            match tokio::time::timeout(self.limits.read_timeout, body.next()).await {
                Err(_) => {
                    return Err(GetFailure::Body(format!(
                        "the body stalled: nothing for {:?} after {} bytes",
                        self.limits.read_timeout,
                        data.len()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Ok(piece))) => data.extend_from_slice(&piece),
                Ok(Some(Err(e))) => {
                    return Err(GetFailure::Body(format!(
                        "the body broke off after {} bytes: {}",
                        data.len(),
                        aws_smithy_types::error::display::DisplayErrorContext(&e)
                    )));
                }
            }
        }
        if let Some(n) = expected
            && n != data.len()
        {
            return Err(GetFailure::Body(format!(
                "the body ended after {} of {n} bytes",
                data.len()
            )));
        }
        Ok(data.freeze())
    }

    /// A GET with its body, retried (bounded, with backoff) when the body breaks off, all within the
    /// operation timeout.
    async fn get_object(&self, key: &str, range: Option<&str>) -> Result<Bytes> {
        let l = self.limits;
        let deadline = tokio::time::Instant::now() + l.operation_timeout;
        let mut attempt = 1;
        loop {
            let failure = match tokio::time::timeout_at(deadline, self.get_once(key, range)).await {
                Err(_) => {
                    return Err(Error::backend(
                        "get",
                        key,
                        format!(
                            "no complete answer within the operation timeout of {:?} ({attempt} attempt(s))",
                            l.operation_timeout
                        ),
                    ));
                }
                Ok(Ok(data)) => return Ok(data),
                Ok(Err(GetFailure::Final(e))) => return Err(e),
                Ok(Err(GetFailure::Body(why))) => why,
            };
            if attempt >= l.max_attempts {
                return Err(Error::backend(
                    "get",
                    key,
                    format!("gave up after {attempt} attempts: {failure}"),
                ));
            }
            let wait = l.backoff(attempt);
            tracing::warn!(key, attempt, ?wait, "S3 GET failed, retrying: {failure}");
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(Error::backend(
                    "get",
                    key,
                    format!(
                        "no time left within the operation timeout of {:?} after {attempt} attempt(s): {failure}",
                        l.operation_timeout
                    ),
                ));
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[async_trait]
impl Backend for S3Backend {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let len = data.len() as i64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_length(len)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .body(ByteStream::from(data))
            .customize()
            .disable_payload_signing_unless(self.sign_payload)
            .send()
            .await
            .map_err(|e| sdk_err("put", key, e))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        let len = data.len() as i64;
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_length(len)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .if_none_match("*")
            .body(ByteStream::from(data.clone()))
            .customize()
            .disable_payload_signing_unless(self.sign_payload)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if matches!(e.raw().status().as_u16(), 412 | 409)
                    || e.err().code() == Some("PreconditionFailed") =>
            {
                // The object exists — but it may be ours: when the answer to a first attempt was lost,
                // the SDK sends the PUT again and this is the answer to the retry. Ours if it holds
                // exactly our bytes (callers write unique content, such as a config with a random id).
                match self.get(key).await {
                    Ok(there) => Ok(there == data),
                    Err(Error::NotFound(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(sdk_err("put", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.get_object(key, None).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let b = self.get_object(key, Some(&range)).await?;
        if b.len() as u64 != len {
            return Err(Error::backend(
                "get",
                key,
                format!(
                    "short read: wanted {len} bytes at {offset}, got {}",
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = self.full(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_err("list", prefix, e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push(ObjectInfo {
                        key: k[strip..].to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o
                            .last_modified()
                            .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| sdk_err("delete", key, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid_and_bounded_for_leases() {
        let o = S3Options::default();
        o.validate_limits().expect("valid");
        assert!(o.operation_timeout <= MAX_OPERATION_TIMEOUT);
        // Well under half of the leases' 300 s stale period (`crate::lease`).
        assert!(MAX_OPERATION_TIMEOUT * 2 < Duration::from_secs(300));
        assert_eq!(o.connect_timeout, Duration::from_secs(10));
        assert_eq!(o.attempt_timeout, Duration::from_secs(60));
        assert_eq!(o.max_attempts, 4);
    }

    #[test]
    fn payloads_are_signed_over_plain_http_only() {
        assert!(signs_payload(Some("http://10.88.0.1:9000")));
        assert!(signs_payload(Some("HTTP://minio.local")));
        assert!(!signs_payload(Some("https://minio.example:9000")));
        assert!(!signs_payload(Some("HTTPS://s3.example")));
        assert!(!signs_payload(None), "AWS's own endpoints are HTTPS");
    }

    #[test]
    fn invalid_limits_are_refused() {
        let cases: [(&str, S3Options); 6] = [
            (
                "positive",
                S3Options {
                    read_timeout: Duration::ZERO,
                    ..Default::default()
                },
            ),
            (
                "maximum",
                S3Options {
                    operation_timeout: Duration::from_secs(121),
                    ..Default::default()
                },
            ),
            (
                "longer than the operation",
                S3Options {
                    attempt_timeout: Duration::from_secs(90),
                    operation_timeout: Duration::from_secs(60),
                    ..Default::default()
                },
            ),
            (
                "attempts",
                S3Options {
                    max_attempts: 0,
                    ..Default::default()
                },
            ),
            (
                "attempts",
                S3Options {
                    max_attempts: 21,
                    ..Default::default()
                },
            ),
            (
                "maximum backoff",
                S3Options {
                    initial_backoff: Duration::from_secs(30),
                    ..Default::default()
                },
            ),
        ];
        for (want, o) in cases {
            let err = o.validate_limits().expect_err("refused").to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let l = Limits {
            read_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(10),
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(700),
        };
        for retry in 1..12 {
            let cap = Duration::from_millis((100u64 << (retry - 1)).min(700));
            let waits: Vec<_> = (0..50).map(|_| l.backoff(retry)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "{retry}: {waits:?}");
            assert!(waits.iter().any(|w| *w != waits[0]), "no jitter: {waits:?}");
        }
    }
}
