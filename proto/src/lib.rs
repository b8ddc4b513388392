//! Ferry's wire contracts: everything a third party could depend on lives here.
//!
//! * [`velero`]: Velero's DataUpload / DataDownload / BackupStorageLocation resources, field for field.
//! * [`result`]: the result document a mover writes to its termination message.
//!
//! The progress event payloads (prost) and the gRPC data-path interface join this crate with the controller.

pub mod result;
pub mod velero;
