//! The engine's error type: every failure says what was being done and to which object.

use std::path::PathBuf;

/// A boxed error from a lower layer (S3 SDK, sqlite, ...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A storage operation failed (network, permissions, server error).
    #[error("storage {op} {key:?} failed: {source}")]
    Backend {
        /// The operation, e.g. `put`.
        op: &'static str,
        /// The object key.
        key: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// An object the repository refers to does not exist in storage.
    #[error("object {0:?} is missing from the repository")]
    NotFound(String),
    /// No key file opens with the given password.
    #[error("wrong password: no key in the repository opens with it")]
    WrongPassword,
    /// Stored data failed authentication or does not match its id: corruption or tampering.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// Stored data decrypted but does not parse, or has an unsupported version.
    #[error("format error: {0}")]
    Format(String),
    /// A local filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `init` on a location that already holds a repository.
    #[error("a repository already exists at {0}")]
    AlreadyInitialised(String),
    /// No repository at the location.
    #[error("no repository at {0} (run `ferry init` first)")]
    NoRepository(String),
    /// A snapshot id or prefix that matches nothing (or more than one snapshot).
    #[error("snapshot {0}")]
    Snapshot(String),
    /// A snapshot names an entry that would land outside the restore target.
    #[error("refusing unsafe entry in snapshot: {0}")]
    UnsafePath(String),
    /// The operation was canceled.
    #[error("canceled")]
    Canceled,
    /// A backup's pipeline stopped because another of its threads failed or the backup was canceled. The
    /// other failure is the one reported; this is reported only when nothing else is known.
    #[error("the backup pipeline stopped")]
    Stopped,
    /// Another process holds a lease that excludes this operation.
    #[error("repository locked: {0}")]
    Locked(String),
    /// This process's repository lease lapsed; it stopped before an irreversible step.
    #[error("{0}; nothing was committed, run it again")]
    LeaseLost(String),
    /// Bad input from the caller.
    #[error("{0}")]
    Invalid(String),
    /// A file the caller named (password, CA certificates) could not be read.
    #[error("reading {what} {}", path.display())]
    ReadFile {
        /// What the file holds, e.g. `password file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// What was being done when `source` happened.
    #[error("{context}")]
    Context {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Wraps a filesystem error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Says what was being done when this error happened.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The error under any [`Error::Context`] layers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }

    /// Whether the operation stopped because it was canceled.
    pub fn is_canceled(&self) -> bool {
        matches!(self.root(), Error::Canceled)
    }

    /// Wraps a storage error.
    pub fn backend(op: &'static str, key: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            op,
            key: key.into(),
            source: source.into(),
        }
    }
}
