//! S3 backend (aws-sdk-s3). Works with AWS and S3-compatible servers: custom endpoint, path-style
//! addressing, checksums only where required, credentials from the standard AWS chain or given directly.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{Backend, ObjectInfo};
use crate::error::{Error, Result};

/// How to reach an S3 bucket.
#[derive(Debug, Clone, Default)]
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
    /// Extra trusted CA certificates (PEM), on top of the system roots: the BSL's `caCert`.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any server certificate: the BSL's `insecureSkipTLSVerify`.
    pub insecure_skip_tls_verify: bool,
}

/// A repository under a prefix of an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
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

/// The SDK's HTTPS client with `pem`'s certificates trusted in addition to the system roots.
fn https_client_trusting(
    pem: &[u8],
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
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
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(ctx)
        .build_https())
}

impl S3Backend {
    /// Connects (lazily) to the bucket described by `o`.
    pub async fn new(o: S3Options) -> Result<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = &o.profile {
            loader = loader.profile_name(p);
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
            // S3-compatible servers often reject the newer default integrity checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(6));
        if let Some(ep) = &o.endpoint {
            cfg = cfg.endpoint_url(ep);
        }
        if o.insecure_skip_tls_verify {
            tracing::warn!("S3 server certificates are not verified (insecureSkipTLSVerify)");
            cfg = cfg.http_client(super::insecure_http::client());
        } else if let Some(pem) = &o.ca_pem {
            cfg = cfg.http_client(https_client_trusting(pem)?);
        }
        Ok(S3Backend {
            client: Client::from_conf(cfg.build()),
            bucket: o.bucket,
            prefix: o.prefix,
        })
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    async fn read_body(key: &str, body: ByteStream) -> Result<Bytes> {
        body.collect()
            .await
            .map(|d| d.into_bytes())
            .map_err(|e| Error::backend("get", key, e))
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
            .body(ByteStream::from(data))
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
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if matches!(e.raw().status().as_u16(), 412 | 409)
                    || e.err().code() == Some("PreconditionFailed") =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_err("put", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
        {
            Ok(out) => Self::read_body(key, out.body).await,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                Err(Error::NotFound(key.to_string()))
            }
            Err(e) => Err(sdk_err("get", key, e)),
        }
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .range(range)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                return Err(Error::NotFound(key.to_string()));
            }
            Err(e) => return Err(sdk_err("get", key, e)),
        };
        let b = Self::read_body(key, out.body).await?;
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
