//! Ferry's wire contracts: everything a third party could depend on lives here.
//!
//! * [`result`]: the result document a mover writes to its termination message.
//!
//! The DataUpload / DataDownload CRD types and the progress event payloads join this crate with the
//! controller (see `design/`).

pub mod result;
