//! The repository a mover pod works on: where it is and how to reach it, read from a BackupStorageLocation
//! and checked along with the Secrets the pod will mount.

use std::collections::BTreeMap;

use ferry_proto::datapath::{CA_FILE, Repository};
use ferry_proto::pod::{CREDENTIALS_FILE, PASSWORD_FILE, holds_pem_certificate};
use ferry_proto::velero::{BackupStorageLocation, ObjectStorageLocation};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use crate::context::Context;
use crate::cr::MoverCr;
use crate::error::Result;
use crate::objects::get_opt;
use crate::proceed;
use crate::step::Step;
use crate::validate::bsl_config;

/// Where the repository is and how to reach it, from a BackupStorageLocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoTarget {
    /// `s3://<bucket>/<prefix>`, as recorded in a DataUpload's result.
    pub url: String,
    /// Bucket.
    pub bucket: String,
    /// Key prefix in the bucket: `[<bsl prefix>/]plugins/<mover>[/<source-namespace>]`.
    pub prefix: String,
    /// The BSL's config map as it is.
    pub config: BTreeMap<String, String>,
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

/// The repository for a CR: from its BackupStorageLocation, checked along with the Secrets the pod needs.
/// Done or Fail (with why, for `status.message`); it never waits.
pub async fn repo_target<K: MoverCr>(ctx: &Context, cr: &K) -> Result<Step<RepoTarget>> {
    repo_target_in(
        ctx,
        &cr.namespace().unwrap_or_default(),
        cr.bsl(),
        cr.datamover().unwrap_or("ferry"),
        Some(cr.source_namespace()),
    )
    .await
}

/// The repository of `source_ns` under BSL `ns/bsl_name` for the data path `mover`, or with `None` the
/// root holding every namespace's repository of that mover.
pub async fn repo_target_in(
    ctx: &Context,
    ns: &str,
    bsl_name: &str,
    mover: &str,
    source_ns: Option<&str>,
) -> Result<Step<RepoTarget>> {
    let bsls: Api<BackupStorageLocation> = Api::namespaced(ctx.client.clone(), ns);
    let Some(bsl) = get_opt(&bsls, bsl_name).await? else {
        return Ok(Step::fail(format!(
            "BackupStorageLocation {ns}/{bsl_name} not found"
        )));
    };
    let provider = bsl.spec.provider.trim_start_matches("velero.io/");
    if provider != "aws" {
        return Ok(Step::fail(format!(
            "BackupStorageLocation {bsl_name}: provider {:?} is not supported (Ferry speaks S3: use provider aws)",
            bsl.spec.provider
        )));
    }
    let config_map = bsl.spec.config.clone().unwrap_or_default();
    let config = match bsl_config(&config_map) {
        Ok(c) => c,
        Err(invalid) => {
            return Ok(Step::fail(format!(
                "BackupStorageLocation {bsl_name}: {invalid}"
            )));
        }
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let ca = proceed!(ca_source(&secrets, ns, bsl_name, &bsl.spec.object_storage).await?);
    let credentials = proceed!(credentials(&secrets, ns, &bsl).await?);
    proceed!(password(ctx, &secrets, ns).await?);
    let prefix = repo_prefix(&bsl.spec.object_storage, mover, source_ns);
    Ok(Step::Done(RepoTarget {
        url: format!("s3://{}/{prefix}", bsl.spec.object_storage.bucket),
        bucket: bsl.spec.object_storage.bucket.clone(),
        prefix,
        config: config_map,
        endpoint: config.endpoint,
        region: config.region,
        path_style: config.path_style,
        insecure_skip_tls_verify: config.insecure_skip_tls_verify,
        ca,
        profile: config.profile,
        credentials,
    }))
}

impl RepoTarget {
    /// The repository as the data-path API names it: files where the mover pod mounts them
    /// (`ferry_proto::pod`), the CA where the agent writes it ([`CA_FILE`]).
    pub fn repository(&self) -> Repository {
        Repository {
            provider: "aws".into(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            endpoint: self.endpoint.clone().unwrap_or_default(),
            region: self.region.clone().unwrap_or_default(),
            path_style: self.path_style,
            credentials_file: self
                .credentials
                .as_ref()
                .map(|_| CREDENTIALS_FILE.to_string())
                .unwrap_or_default(),
            profile: self.profile.clone().unwrap_or_default(),
            ca_file: self
                .ca
                .as_ref()
                .map(|_| CA_FILE.to_string())
                .unwrap_or_default(),
            insecure_skip_tls_verify: self.insecure_skip_tls_verify,
            password_file: PASSWORD_FILE.into(),
            config: self.config.clone().into_iter().collect(),
        }
    }
}

/// `<prefix>/plugins/<mover>[/<source-namespace>]` (no leading or trailing slash): each data path keeps
/// its own tree, so two movers never read each other's objects.
fn repo_prefix(storage: &ObjectStorageLocation, mover: &str, source_ns: Option<&str>) -> String {
    let prefix = storage.prefix.as_deref().unwrap_or("").trim_matches('/');
    let mut url = String::new();
    if !prefix.is_empty() {
        url.push_str(prefix);
        url.push('/');
    }
    // Under `plugins/`: Velero marks a BSL Unavailable when its prefix holds any top-level directory
    // other than backups, restores, restic, kopia, metadata and plugins.
    url.push_str("plugins/");
    url.push_str(mover);
    if let Some(sns) = source_ns {
        url.push('/');
        url.push_str(sns);
    }
    url
}

/// The CA bundle: caCertRef (a Secret key, checked to hold a PEM certificate) wins over the inline,
/// base64-encoded caCert.
async fn ca_source(
    secrets: &Api<Secret>,
    ns: &str,
    bsl_name: &str,
    storage: &ObjectStorageLocation,
) -> Result<Step<Option<CaSource>>> {
    let bad = |why: String| {
        Ok(Step::fail(format!(
            "BackupStorageLocation {bsl_name}: {why}"
        )))
    };
    match (&storage.ca_cert_ref, &storage.ca_cert) {
        (Some(sel), _) => {
            let pem = get_opt(secrets, &sel.name)
                .await?
                .and_then(|s| s.data.and_then(|mut d| d.remove(&sel.key)));
            match pem {
                Some(pem) if holds_pem_certificate(&pem.0) => Ok(Step::Done(Some(
                    CaSource::Secret(sel.name.clone(), sel.key.clone()),
                ))),
                Some(_) => bad(format!(
                    "caCertRef {ns}/{}: key {:?} holds no PEM certificate",
                    sel.name, sel.key
                )),
                None => bad(format!(
                    "caCertRef Secret {ns}/{} or its key {:?} not found",
                    sel.name, sel.key
                )),
            }
        }
        (None, Some(b64)) if !b64.trim().is_empty() => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(pem) if holds_pem_certificate(&pem) => Ok(Step::Done(Some(CaSource::Pem(
                    String::from_utf8_lossy(&pem).into_owned(),
                )))),
                _ => bad("caCert is not a base64-encoded PEM certificate".into()),
            }
        }
        _ => Ok(Step::Done(None)),
    }
}

/// The credentials Secret and key the pod mounts: the BSL's `credential`, else Velero's default
/// `cloud-credentials` Secret if present; checked to exist with its key.
async fn credentials(
    secrets: &Api<Secret>,
    ns: &str,
    bsl: &BackupStorageLocation,
) -> Result<Step<Option<(String, String)>>> {
    let chosen = match &bsl.spec.credential {
        Some(sel) => Some((sel.name.clone(), sel.key.clone())),
        None => get_opt(secrets, "cloud-credentials")
            .await?
            .filter(|s| has_key(s, "cloud"))
            .map(|_| ("cloud-credentials".to_string(), "cloud".to_string())),
    };
    if let Some((name, key)) = &chosen {
        match get_opt(secrets, name).await? {
            None => {
                return Ok(Step::fail(format!(
                    "credentials Secret {ns}/{name} of BackupStorageLocation {} not found",
                    bsl.name_any()
                )));
            }
            Some(s) if !has_key(&s, key) => {
                return Ok(Step::fail(format!(
                    "credentials Secret {ns}/{name} has no key {key:?}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(Step::Done(chosen))
}

/// The repository password Secret exists with its key `password`.
async fn password(ctx: &Context, secrets: &Api<Secret>, ns: &str) -> Result<Step> {
    let pw = &ctx.config.repository_password_secret;
    Ok(match get_opt(secrets, pw).await? {
        None => Step::fail(format!(
            "repository password Secret {ns}/{pw} not found (create it with a key \"password\")"
        )),
        Some(s) if !has_key(&s, "password") => Step::fail(format!(
            "repository password Secret {ns}/{pw} has no key \"password\""
        )),
        Some(_) => Step::Done(()),
    })
}

fn has_key(s: &Secret, key: &str) -> bool {
    s.data.as_ref().is_some_and(|d| d.contains_key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_and_the_repository_request() {
        let storage = |prefix: Option<&str>| ObjectStorageLocation {
            bucket: "b".into(),
            prefix: prefix.map(String::from),
            ..Default::default()
        };
        assert_eq!(
            repo_prefix(&storage(Some("/velero/")), "ferry", Some("app")),
            "velero/plugins/ferry/app"
        );
        assert_eq!(repo_prefix(&storage(None), "ferry", None), "plugins/ferry");
        assert_eq!(
            repo_prefix(&storage(None), "tar-example", Some("app")),
            "plugins/tar-example/app"
        );
        let t = RepoTarget {
            bucket: "b".into(),
            prefix: "plugins/ferry/app".into(),
            endpoint: Some("https://minio:9000".into()),
            path_style: true,
            credentials: Some(("cloud-credentials".into(), "cloud".into())),
            ca: Some(CaSource::Pem("pem".into())),
            config: BTreeMap::from([("region".into(), "minio".into())]),
            ..Default::default()
        };
        let r = t.repository();
        assert_eq!(
            (r.provider.as_str(), r.bucket.as_str(), r.prefix.as_str()),
            ("aws", "b", "plugins/ferry/app")
        );
        assert_eq!(r.endpoint, "https://minio:9000");
        assert!(r.path_style && !r.insecure_skip_tls_verify);
        assert_eq!(r.credentials_file, CREDENTIALS_FILE);
        assert_eq!(r.ca_file, CA_FILE);
        assert_eq!(r.password_file, PASSWORD_FILE);
        assert_eq!(r.config["region"], "minio");
        let bare = RepoTarget::default().repository();
        assert_eq!(
            (bare.credentials_file, bare.ca_file),
            (String::new(), String::new())
        );
    }
}
