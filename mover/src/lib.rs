//! The mover pod's side of Ferry, on top of the storage engine (`ferry-engine`): [`pod`] runs
//! `ferry pod backup|restore|maintain` (repository from the pod's environment, the termination message,
//! exit codes) and [`events`] reports its progress as Kubernetes Events; [`datapath`] serves the engine as
//! a data path of the gRPC API `ferry.datapath.v1`. The Kubernetes client lives here
//! and only here; the `ferry` binary (`main.rs`, `cli.rs`) parses arguments and prints.
//!
//! Dependencies point inward: `ferry` binary → [`pod`] → [`events`] → `ferry-engine` → `ferry-proto`.

pub mod datapath;
pub mod events;
pub mod pod;
