//go:build tools

// Package tools pins the upstream commands e2e/cluster/build compiles from this wrapper module,
// so `go mod tidy` keeps their modules at the versions from versions.env.
package tools

import (
	_ "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller"
)
