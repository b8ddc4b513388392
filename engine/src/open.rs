//! Repository targets: where a repository is (a path, `file://PATH` or `s3://BUCKET/PREFIX`), how to reach
//! it (S3 endpoint, region, path-style addressing, profile, extra CA, TLS verification, timeouts), its
//! password and the local cache; opened, created, or opened-or-created. The `ferry` CLI's flags and the mover
//! pod's environment (the BackupStorageLocation the controller turned into `FERRY_*` variables) both become a
//! [`Target`].

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{
    Backend, Location,
    local::LocalBackend,
    s3::{S3Backend, S3Options},
};
use crate::crypto::KdfParams;
use crate::error::{Error, Result};
use crate::repo::{Config, OpenOptions, Repository};

/// A repository and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The location as given: a path, `file://PATH` or `s3://BUCKET/PREFIX` (`None`: refused when needed).
    pub repo: Option<String>,
    /// File holding the password (one trailing newline is dropped); without it, `$FERRY_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// How to reach S3: endpoint, region, path style, profile, TLS verification and the limits. Bucket and
    /// prefix come from [`Target::repo`], extra CA certificates from [`Target::s3_ca_file`].
    pub s3: S3Options,
    /// PEM file of CA certificates to trust besides the system roots; without it, the PEM text of
    /// `$FERRY_S3_CA_PEM` when set and not empty.
    pub s3_ca_file: Option<PathBuf>,
    /// Directory of the local metadata cache (`None`: [`crate::repo::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Run without the local cache.
    pub no_cache: bool,
    /// Hard size limit of the cache, in bytes.
    pub cache_limit: u64,
    /// How a repository created here compresses (an existing one keeps its own).
    pub compression: crate::pack::Compression,
}

impl Target {
    /// The same settings for the repository `sub` below this one (`ROOT/sub`).
    pub fn sub(&self, sub: &str) -> Result<Target> {
        let root = self
            .repo
            .as_deref()
            .ok_or_else(|| Error::Invalid("no repository root given".into()))?;
        Ok(Target {
            repo: Some(format!("{}/{sub}", root.trim_end_matches('/'))),
            ..self.clone()
        })
    }

    /// Where the repository is.
    pub fn location(&self) -> Result<Location> {
        let repo = self.repo.as_deref().ok_or_else(|| {
            Error::Invalid("no repository given: use --repo or $FERRY_REPO".into())
        })?;
        Location::parse(repo)
    }

    /// Whether the repository is remote (S3), where more concurrent transfers pay off.
    pub fn is_remote(&self) -> Result<bool> {
        Ok(matches!(self.location()?, Location::S3 { .. }))
    }

    /// The repository password.
    pub fn password(&self) -> Result<Vec<u8>> {
        if let Some(f) = &self.password_file {
            let mut p = std::fs::read(f).map_err(|source| Error::ReadFile {
                what: "password file",
                path: f.clone(),
                source,
            })?;
            while p.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                p.pop();
            }
            return Ok(p);
        }
        match std::env::var_os("FERRY_PASSWORD") {
            Some(p) => Ok(p.as_bytes().to_vec()),
            None => Err(Error::Invalid(
                "no password: set $FERRY_PASSWORD or use --password-file".into(),
            )),
        }
    }

    /// The S3 settings with the extra CA certificates read.
    fn s3_options(&self) -> Result<S3Options> {
        let ca_pem = match (&self.s3_ca_file, std::env::var_os("FERRY_S3_CA_PEM")) {
            (Some(f), _) => Some(std::fs::read(f).map_err(|source| Error::ReadFile {
                what: "the S3 CA file",
                path: f.clone(),
                source,
            })?),
            (None, Some(pem)) if !pem.is_empty() => Some(pem.as_bytes().to_vec()),
            _ => None,
        };
        Ok(S3Options {
            ca_pem,
            ..self.s3.clone()
        })
    }

    /// The storage backend.
    pub async fn backend(&self) -> Result<Arc<dyn Backend>> {
        let s3 = self.s3_options()?;
        open_backend(&self.location()?, s3).await
    }

    /// How the repository is opened: the cache.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            cache_dir: if self.no_cache {
                None
            } else {
                self.cache_dir
                    .clone()
                    .or_else(crate::repo::default_cache_dir)
            },
            cache_limit: self.cache_limit,
            ..Default::default()
        }
    }

    /// Opens the repository.
    pub async fn open(&self) -> Result<Arc<Repository>> {
        let backend = self.backend().await?;
        Ok(Arc::new(
            Repository::open(backend, &self.password()?, &self.open_options()).await?,
        ))
    }

    /// Creates the repository.
    pub async fn init(&self) -> Result<Config> {
        Repository::init_with(
            self.backend().await?,
            &self.password()?,
            KdfParams::default(),
            self.compression,
        )
        .await
    }

    /// Opens the repository, creating it on first use. Safe when several processes race to create it:
    /// exactly one `init` wins (conditional put of the config) and the others open what it made.
    pub async fn open_or_init(&self) -> Result<Arc<Repository>> {
        for attempt in 0..5 {
            match self.open().await {
                Ok(r) => return Ok(r),
                Err(Error::NoRepository(_)) => match self.init().await {
                    Ok(cfg) => tracing::info!(id = %cfg.id, "created the repository"),
                    Err(Error::AlreadyInitialised(_)) => {}
                    Err(e) => return Err(e.context("creating the repository")),
                },
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
        }
        Err(Error::Invalid(
            "the repository could not be opened or created".into(),
        ))
    }
}

/// Opens the backend for a location; `s3` supplies endpoint, region and credentials for `s3://` locations.
pub async fn open_backend(location: &Location, s3: S3Options) -> Result<Arc<dyn Backend>> {
    Ok(match location {
        Location::Local(p) => Arc::new(LocalBackend::new(p)),
        Location::S3 { bucket, prefix } => Arc::new(
            S3Backend::new(S3Options {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                ..s3
            })
            .await?,
        ),
    })
}
