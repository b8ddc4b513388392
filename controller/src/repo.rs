//! The repository a mover pod works on: where it is and how to reach it, read from a BackupStorageLocation
//! and checked along with the Secrets the pod will mount.

use ferry_proto::velero::BackupStorageLocation;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::objects::get_opt;

/// Where the repository is and how to reach it, from a BackupStorageLocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoTarget {
    /// `s3://bucket/prefix/plugins/ferry/<source-namespace>`.
    pub url: String,
    /// Custom endpoint (`s3Url`).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Path-style addressing.
    pub path_style: bool,
    /// AWS profile in the credentials file.
    pub profile: Option<String>,
    /// Credentials Secret name and key (AWS shared-credentials format).
    pub credentials: Option<(String, String)>,
    /// Extra CA certificates for the endpoint (`caCert` / `caCertRef`).
    pub ca: Option<CaSource>,
    /// Skip server certificate verification (`insecureSkipTLSVerify`).
    pub insecure_skip_tls_verify: bool,
}

/// Where the CA bundle of a BackupStorageLocation comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Inline PEM (the BSL's `caCert`, decoded).
    Pem(String),
    /// A Secret name and key holding PEM (the BSL's `caCertRef`).
    Secret(String, String),
}

/// Why a CR cannot run, for `status.message`.
pub type Refusal = String;

/// The repository for a CR: from its BackupStorageLocation, checked along with the Secrets the pod needs.
pub async fn repo_target<K: MoverCr>(
    ctx: &Context,
    cr: &K,
) -> Result<std::result::Result<RepoTarget, Refusal>> {
    repo_target_in(
        ctx,
        &cr.namespace().unwrap_or_default(),
        cr.bsl(),
        Some(cr.source_namespace()),
    )
    .await
}

/// The repository of `source_ns` under BSL `ns/bsl_name`, or with `None` the root holding every
/// namespace's repository.
pub async fn repo_target_in(
    ctx: &Context,
    ns: &str,
    bsl_name: &str,
    source_ns: Option<&str>,
) -> Result<std::result::Result<RepoTarget, Refusal>> {
    let ns = ns.to_string();
    let bsls: Api<BackupStorageLocation> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(bsl) = get_opt(&bsls, bsl_name).await? else {
        return Ok(Err(format!(
            "BackupStorageLocation {ns}/{bsl_name} not found"
        )));
    };
    let provider = bsl.spec.provider.trim_start_matches("velero.io/");
    if provider != "aws" {
        return Ok(Err(format!(
            "BackupStorageLocation {}: provider {:?} is not supported (Ferry speaks S3: use provider aws)",
            bsl_name, bsl.spec.provider
        )));
    }
    let config = match crate::validate::bsl_config(&bsl.spec.config.clone().unwrap_or_default()) {
        Ok(c) => c,
        Err(invalid) => return Ok(Err(format!("BackupStorageLocation {bsl_name}: {invalid}"))),
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // The CA bundle: caCertRef (a Secret key) wins over the inline, base64-encoded caCert.
    let ca = match (
        &bsl.spec.object_storage.ca_cert_ref,
        &bsl.spec.object_storage.ca_cert,
    ) {
        (Some(sel), _) => {
            let pem = get_opt(&secrets, &sel.name)
                .await?
                .and_then(|s| s.data.and_then(|mut d| d.remove(&sel.key)));
            match pem {
                Some(pem) if ferry_proto::pod::holds_pem_certificate(&pem.0) => {
                    Some(CaSource::Secret(sel.name.clone(), sel.key.clone()))
                }
                Some(_) => {
                    return Ok(Err(format!(
                        "BackupStorageLocation {bsl_name}: caCertRef {}/{}: key {:?} holds no PEM certificate",
                        ns, sel.name, sel.key
                    )));
                }
                None => {
                    return Ok(Err(format!(
                        "BackupStorageLocation {bsl_name}: caCertRef Secret {ns}/{} or its key {:?} not found",
                        sel.name, sel.key
                    )));
                }
            }
        }
        (None, Some(b64)) if !b64.trim().is_empty() => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(pem) if ferry_proto::pod::holds_pem_certificate(&pem) => {
                    Some(CaSource::Pem(String::from_utf8_lossy(&pem).into_owned()))
                }
                _ => {
                    return Ok(Err(format!(
                        "BackupStorageLocation {bsl_name}: caCert is not a base64-encoded PEM certificate"
                    )));
                }
            }
        }
        _ => None,
    };
    let credentials = match &bsl.spec.credential {
        Some(sel) => Some((sel.name.clone(), sel.key.clone())),
        // Velero's default: the cloud-credentials Secret its server uses, if present.
        None => get_opt(&secrets, "cloud-credentials")
            .await?
            .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("cloud")))
            .map(|_| ("cloud-credentials".to_string(), "cloud".to_string())),
    };
    if let Some((name, key)) = &credentials {
        match get_opt(&secrets, name).await? {
            None => {
                return Ok(Err(format!(
                    "credentials Secret {ns}/{name} of BackupStorageLocation {} not found",
                    bsl_name
                )));
            }
            Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key(key)) => {
                return Ok(Err(format!(
                    "credentials Secret {ns}/{name} has no key {key:?}"
                )));
            }
            Some(_) => {}
        }
    }
    let pw = &ctx.config.repository_password_secret;
    match get_opt(&secrets, pw).await? {
        None => {
            return Ok(Err(format!(
                "repository password Secret {ns}/{pw} not found (create it with a key \"password\")"
            )));
        }
        Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key("password")) => {
            return Ok(Err(format!(
                "repository password Secret {ns}/{pw} has no key \"password\""
            )));
        }
        Some(_) => {}
    }
    let prefix = bsl
        .spec
        .object_storage
        .prefix
        .as_deref()
        .unwrap_or("")
        .trim_matches('/');
    let mut url = format!("s3://{}/", bsl.spec.object_storage.bucket);
    if !prefix.is_empty() {
        url.push_str(prefix);
        url.push('/');
    }
    // Under `plugins/`: Velero marks a BSL Unavailable when its prefix holds any top-level directory
    // other than backups, restores, restic, kopia, metadata and plugins.
    url.push_str("plugins/ferry");
    if let Some(sns) = source_ns {
        url.push('/');
        url.push_str(sns);
    }
    Ok(Ok(RepoTarget {
        url,
        endpoint: config.endpoint,
        region: config.region,
        path_style: config.path_style,
        insecure_skip_tls_verify: config.insecure_skip_tls_verify,
        ca,
        profile: config.profile,
        credentials,
    }))
}
