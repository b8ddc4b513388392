//! Ferry's controller: reconciles Velero DataUpload / DataDownload resources into one short-lived mover
//! pod per volume. The lifecycle is specified in `design/` and lands with its own issue; this crate
//! holds its place in the workspace so dependencies point inward from day one.
