//! What the controller needs from a DataUpload or a DataDownload, as one trait, so the phase machine is
//! written once for both.

use std::time::Duration;

use ferry_proto::velero::{
    DataDownload, DataDownloadStatus, DataMoveProgress, DataUpload, DataUploadStatus, Phase,
};
use kube::Resource;
use serde::{Serialize, de::DeserializeOwned};

use crate::validate::operation_timeout;

/// Mutable views of the status fields DU and DD share.
#[derive(Debug)]
pub struct Common<'a> {
    /// Phase.
    pub phase: &'a mut Phase,
    /// Message.
    pub message: &'a mut Option<String>,
    /// Start.
    pub start_timestamp: &'a mut Option<String>,
    /// Completion.
    pub completion_timestamp: &'a mut Option<String>,
    /// Progress.
    pub progress: &'a mut Option<DataMoveProgress>,
    /// Node running the data path.
    pub node: &'a mut Option<String>,
    /// Node of the controller that accepted it.
    pub accepted_by_node: &'a mut Option<String>,
    /// When accepted.
    pub accepted_timestamp: &'a mut Option<String>,
}

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// DataUpload: volume → repository.
    Backup,
    /// DataDownload: repository → volume.
    Restore,
}

/// A DataUpload or DataDownload.
pub trait MoverCr:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Which way.
    const DIRECTION: Direction;
    /// `spec.datamover`.
    fn datamover(&self) -> Option<&str>;
    /// `spec.cancel`.
    fn cancel_requested(&self) -> bool;
    /// `spec.operationTimeout` (default 10 minutes, like Velero's resource timeout; at most a year).
    fn operation_timeout(&self) -> Duration;
    /// `spec.backupStorageLocation`.
    fn bsl(&self) -> &str;
    /// `spec.sourceNamespace`.
    fn source_namespace(&self) -> &str;
    /// `spec.dataMoverConfig[key]`.
    fn mover_config(&self, key: &str) -> Option<&str>;
    /// All of `spec.dataMoverConfig`, as the data-path request carries it.
    fn mover_config_map(&self) -> std::collections::HashMap<String, String>;
    /// Current phase (`""` and absent are New).
    fn phase(&self) -> Phase;
    /// Status fields, created if absent.
    fn common(&mut self) -> Common<'_>;
    /// Current `status.progress`.
    fn progress(&self) -> Option<&DataMoveProgress>;
    /// `status.message`.
    fn message(&self) -> Option<&str>;
    /// `status.acceptedTimestamp`.
    fn accepted_timestamp(&self) -> Option<&str>;
}

/// The operation timeout, 10 minutes when unset; an invalid one fails the CR in validation first.
fn timeout(s: &str) -> Duration {
    operation_timeout(s)
        .ok()
        .flatten()
        .unwrap_or(Duration::from_secs(600))
}

/// DU and DD share field names; one implementation serves both.
macro_rules! impl_mover_cr {
    ($cr:ty, $status:ty, $direction:expr) => {
        impl MoverCr for $cr {
            const DIRECTION: Direction = $direction;
            fn datamover(&self) -> Option<&str> {
                self.spec.datamover.as_deref()
            }
            fn cancel_requested(&self) -> bool {
                self.spec.cancel == Some(true)
            }
            fn operation_timeout(&self) -> Duration {
                timeout(&self.spec.operation_timeout)
            }
            fn bsl(&self) -> &str {
                &self.spec.backup_storage_location
            }
            fn source_namespace(&self) -> &str {
                &self.spec.source_namespace
            }
            fn mover_config(&self, key: &str) -> Option<&str> {
                self.spec
                    .data_mover_config
                    .as_ref()?
                    .get(key)
                    .map(String::as_str)
            }
            fn mover_config_map(&self) -> std::collections::HashMap<String, String> {
                self.spec
                    .data_mover_config
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
            }
            fn phase(&self) -> Phase {
                self.status.as_ref().map(|s| s.phase).unwrap_or_default()
            }
            fn common(&mut self) -> Common<'_> {
                let s = self.status.get_or_insert_with(<$status>::default);
                Common {
                    phase: &mut s.phase,
                    message: &mut s.message,
                    start_timestamp: &mut s.start_timestamp,
                    completion_timestamp: &mut s.completion_timestamp,
                    progress: &mut s.progress,
                    node: &mut s.node,
                    accepted_by_node: &mut s.accepted_by_node,
                    accepted_timestamp: &mut s.accepted_timestamp,
                }
            }
            fn progress(&self) -> Option<&DataMoveProgress> {
                self.status.as_ref()?.progress.as_ref()
            }
            fn message(&self) -> Option<&str> {
                self.status.as_ref()?.message.as_deref()
            }
            fn accepted_timestamp(&self) -> Option<&str> {
                self.status.as_ref()?.accepted_timestamp.as_deref()
            }
        }
    };
}

impl_mover_cr!(DataUpload, DataUploadStatus, Direction::Backup);
impl_mover_cr!(DataDownload, DataDownloadStatus, Direction::Restore);
