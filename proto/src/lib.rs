//! Ferry's wire contracts: everything a third party could depend on lives here.
//!
//! * `velero` and `snapshot` (feature `k8s`, on by default): Velero's DataUpload / DataDownload / BackupStorageLocation
//!   resources, field for field, and the CSI VolumeSnapshot / VolumeSnapshotContent fields Ferry uses. The
//!   storage engine builds without them, and so without kube.
//! * [`result`]: the result document a mover writes to its termination message.
//! * [`report`]: the progress Events a mover emits (protobuf payload).
//! * [`pod`]: the mover-pod contract (paths, exit codes, the termination message).
//! * [`labels`]: label and annotation keys.
//!
//! * [`datapath`] (feature `datapath`, on by default): the gRPC data-path API `ferry.datapath.v1` between the
//!   pod agent and a data path (generated from `proto/ferry/datapath/v1/datapath.proto`).

#[cfg(feature = "datapath")]
pub mod datapath;
pub mod labels;
pub mod pod;
pub mod report;
pub mod result;
#[cfg(feature = "k8s")]
pub mod snapshot;
#[cfg(feature = "k8s")]
pub mod velero;
