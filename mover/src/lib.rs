//! The mover pod's two sides, on top of the storage engine (`ferry-engine`) and the data-path API
//! (`ferry_proto::datapath`):
//!
//! * [`agent`] — `ferry agent`, the controller's side of every mover pod: reads the controller's typed job,
//!   calls the data path over the API, reports through Kubernetes Events ([`events`]) and ends with the
//!   termination message and exit code the controller reads. The Kubernetes client lives here and only here.
//! * [`datapath`] — `ferry datapath`, Ferry's engine served as a data path of the API, like any third
//!   party's.
//! * [`memory`] — giving a backup's freed heap pages back while it runs.
//!
//! The `ferry` binary (`main.rs`, `cli.rs`) parses arguments and prints. Dependencies point inward:
//! `ferry` binary → [`agent`] → [`events`] → `ferry-proto`; [`datapath`] → `ferry-engine` → `ferry-proto`.

pub mod agent;
pub mod datapath;
pub mod events;
pub mod memory;
