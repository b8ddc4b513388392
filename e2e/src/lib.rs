//! Harness for Ferry's end-to-end tests: locates the local cluster started by `e2e/cluster/up`.
