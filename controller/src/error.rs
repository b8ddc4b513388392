//! Errors of the controller.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// An object is not shaped as expected.
    #[error("{0}")]
    Invalid(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the API answered 409 (someone else wrote first).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }

    /// Whether retrying cannot help: the API server refused the request itself (a 4xx other than 401, which
    /// is the controller's own expiring credentials, 408 timeout, 409 conflict and 429 throttling), or an
    /// object is not shaped as the controller needs.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => {
                (400..500).contains(&s.code) && !matches!(s.code, 401 | 408 | 409 | 429)
            }
            Error::Invalid(_) => true,
            Error::Kube(_) | Error::Config(_) => false,
        }
    }

    /// A one-line description for `status.message`: the API server's own message and code for API errors.
    pub fn describe(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) => {
                format!(
                    "the API server answered {} {}: {}",
                    s.code, s.reason, s.message
                )
            }
            e => e.to_string(),
        }
    }
}

/// Whether a kube error is 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether a kube error is 409 AlreadyExists / Conflict.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
