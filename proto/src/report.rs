//! What a mover pod tells the world while it runs: Kubernetes Events on its DataUpload / DataDownload.
//!
//! Each event carries a human message (for `kubectl describe`) and, in the annotation [`REPORT_ANNOTATION`],
//! a base64 [`Report`] (protobuf, prost) that the controller decodes. Events are informative only: a lost or
//! duplicated event never changes a CR's outcome, which is decided from the pod (phase and termination
//! message). Every event is labelled with [`crate::labels::OWNER_UID`] = the CR's uid so the controller can
//! watch them by label.
//!
//! The protobuf schema, for non-Rust movers:
//! ```proto
//! syntax = "proto3";
//! package ferry.v1;
//! enum Stage { STAGE_UNSPECIFIED = 0; STARTED = 1; PROGRESS = 2; COMPLETED = 3; FAILED = 4; CANCELED = 5; }
//! message Report {
//!   uint32 version = 1;      // REPORT_VERSION
//!   Stage stage = 2;
//!   uint64 total_bytes = 3;  // 0 while unknown
//!   uint64 done_bytes = 4;
//!   uint64 total_files = 5;
//!   uint64 done_files = 6;
//!   string message = 7;      // error text for FAILED
//! }
//! ```

use base64::Engine as _;
use prost::Message as _;

/// Version of [`Report`].
pub const REPORT_VERSION: u32 = 1;
/// Annotation on an Event that holds the base64 protobuf [`Report`].
pub const REPORT_ANNOTATION: &str = "ferry.dev/report";
/// `source.component` / reporting controller of mover events.
pub const REPORTER: &str = "ferry-mover";

/// Event reasons, one per [`Stage`].
pub mod reason {
    /// The data path started.
    pub const STARTED: &str = "FerryStarted";
    /// Bytes moved so far (one Event object, updated in place).
    pub const PROGRESS: &str = "FerryProgress";
    /// The data path finished.
    pub const COMPLETED: &str = "FerryCompleted";
    /// The data path failed.
    pub const FAILED: &str = "FerryFailed";
    /// The data path was canceled.
    pub const CANCELED: &str = "FerryCanceled";
}

/// Where the data path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Stage {
    /// Not set.
    Unspecified = 0,
    /// Started.
    Started = 1,
    /// Moving data.
    Progress = 2,
    /// Finished.
    Completed = 3,
    /// Failed.
    Failed = 4,
    /// Canceled.
    Canceled = 5,
}

impl Stage {
    /// The Event reason for this stage.
    pub fn reason(self) -> &'static str {
        match self {
            Stage::Unspecified | Stage::Progress => reason::PROGRESS,
            Stage::Started => reason::STARTED,
            Stage::Completed => reason::COMPLETED,
            Stage::Failed => reason::FAILED,
            Stage::Canceled => reason::CANCELED,
        }
    }
}

/// One report from a mover.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Report {
    /// [`REPORT_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Stage.
    #[prost(enumeration = "Stage", tag = "2")]
    pub stage: i32,
    /// Bytes to move; 0 while unknown.
    #[prost(uint64, tag = "3")]
    pub total_bytes: u64,
    /// Bytes moved.
    #[prost(uint64, tag = "4")]
    pub done_bytes: u64,
    /// Files to move.
    #[prost(uint64, tag = "5")]
    pub total_files: u64,
    /// Files moved.
    #[prost(uint64, tag = "6")]
    pub done_files: u64,
    /// Error text for a failure.
    #[prost(string, tag = "7")]
    pub message: String,
}

/// A report could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("bad ferry report: {0}")]
pub struct DecodeError(String);

impl Report {
    /// The base64 protobuf form stored in [`REPORT_ANNOTATION`].
    pub fn to_annotation(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.encode_to_vec())
    }

    /// Parses the annotation form.
    pub fn from_annotation(s: &str) -> Result<Self, DecodeError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| DecodeError(e.to_string()))?;
        let r = Report::decode(raw.as_slice()).map_err(|e| DecodeError(e.to_string()))?;
        if r.version != REPORT_VERSION {
            return Err(DecodeError(format!("unsupported version {}", r.version)));
        }
        Ok(r)
    }

    /// A human line for `kubectl describe`.
    pub fn human(&self) -> String {
        fn gib(b: u64) -> String {
            format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
        }
        match self.stage() {
            Stage::Started => "data path started".to_string(),
            Stage::Progress | Stage::Unspecified if self.total_bytes > 0 => format!(
                "{} of {} ({:.0}%), {} of {} files",
                gib(self.done_bytes),
                gib(self.total_bytes),
                100.0 * self.done_bytes as f64 / self.total_bytes as f64,
                self.done_files,
                self.total_files
            ),
            Stage::Progress | Stage::Unspecified => {
                format!(
                    "{} moved, {} files (counting)",
                    gib(self.done_bytes),
                    self.done_files
                )
            }
            Stage::Completed => format!(
                "completed: {} in {} files",
                gib(self.total_bytes),
                self.total_files
            ),
            Stage::Failed => format!("failed: {}", self.message),
            Stage::Canceled => "canceled".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_annotation() {
        let r = Report {
            version: REPORT_VERSION,
            stage: Stage::Progress as i32,
            total_bytes: 10 << 30,
            done_bytes: 5 << 30,
            total_files: 7,
            done_files: 3,
            message: String::new(),
        };
        let a = r.to_annotation();
        assert_eq!(Report::from_annotation(&a).expect("decodes"), r);
        assert!(r.human().contains("50%"), "{}", r.human());
        assert!(Report::from_annotation("!!").is_err());
        let future = Report { version: 9, ..r };
        assert!(Report::from_annotation(&future.to_annotation()).is_err());
    }

    #[test]
    fn wire_bytes_are_stable() {
        // Field numbers are the contract with movers written in other languages.
        let r = Report {
            version: 1,
            stage: Stage::Completed as i32,
            total_bytes: 300,
            done_bytes: 300,
            total_files: 0,
            done_files: 0,
            message: String::new(),
        };
        assert_eq!(
            r.encode_to_vec(),
            vec![0x08, 1, 0x10, 3, 0x18, 0xac, 0x02, 0x20, 0xac, 0x02]
        );
    }
}
